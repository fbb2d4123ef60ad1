//! A PostgreSQL database of its own for each test that needs one.
//!
//! The tests that need one are `#[ignore = "needs PostgreSQL: set SERVER_DATABASE_URL"]`, so
//! that a machine without PostgreSQL says "ignored", never "passed"; `--include-ignored` runs
//! them. The cluster is `SERVER_DATABASE_URL` if it is set (`.ci/run` starts one and sets it);
//! else, if PostgreSQL's binaries are here, one started for this test binary by
//! `scripts/pg-test-cluster.sh serve`, which stops and removes it when this process ends (its
//! standard input, held here, closes). With neither, the test fails, saying why.

use std::io::{BufRead, BufReader};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;

use postgres::{Client, NoTls};

/// The cluster's URL, or why there is none.
fn cluster() -> &'static Result<String, String> {
    static CLUSTER: OnceLock<Result<String, String>> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        if let Ok(url) = std::env::var("SERVER_DATABASE_URL") {
            return Ok(url);
        }
        if !has_pg_ctl() {
            return Err("SERVER_DATABASE_URL is not set and PostgreSQL's pg_ctl is not installed".into());
        }
        serve()
    })
}

/// Starts a cluster that lives as long as this process, and returns its URL.
fn serve() -> Result<String, String> {
    // Held until the process ends: dropping its stdin would stop the cluster.
    static SERVED: Mutex<Option<Child>> = Mutex::new(None);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-test-cluster.sh");
    let mut child = Command::new(script)
        .arg("serve")
        .env("PG_TEST_FSYNC", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run scripts/pg-test-cluster.sh: {e}"))?;
    let mut url = String::new();
    let stdout = child.stdout.take().ok_or("no stdout")?;
    BufReader::new(stdout).read_line(&mut url).map_err(|e| e.to_string())?;
    *SERVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
    match url.trim() {
        "" => Err("scripts/pg-test-cluster.sh serve printed no URL".into()),
        url => Ok(url.to_owned()),
    }
}

fn has_pg_ctl() -> bool {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("pg_ctl").is_file()));
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| dirs.flatten().any(|d| d.path().join("bin/pg_ctl").is_file()))
        .unwrap_or(false);
    on_path || debian
}

/// A database created for one test, dropped when it ends.
pub struct Database {
    pub url: String,
    admin: String,
    name: String,
}

impl Database {
    /// A new, empty database.
    pub fn create(test: &str) -> Database {
        let admin = match cluster() {
            Ok(url) => url.clone(),
            Err(why) => panic!("{test} needs PostgreSQL: {why}"),
        };
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("lottery_{test}_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        // The URL holds the cluster's password: never in a message.
        let mut client =
            Client::connect(&admin, NoTls).unwrap_or_else(|e| panic!("cannot connect to the cluster: {e}"));
        client.batch_execute(&format!("CREATE DATABASE \"{name}\"")).expect("CREATE DATABASE");
        Database { url: with_database(&admin, &name), admin, name }
    }

    /// This database's URL with another user and password.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        let (scheme, rest) = self.url.split_once("://").expect("a URL");
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{user}:{password}@{host}")
    }

    /// This database's URL through `address` (`host:port`) instead of the cluster's.
    pub fn url_through(&self, address: &str) -> String {
        let (scheme, rest) = self.url.split_once("://").expect("a URL");
        let (user, host) = rest.rsplit_once('@').map_or(("", rest), |(u, h)| (u, h));
        let path = host.find('/').map_or("", |i| &host[i..]);
        format!("{scheme}://{user}@{address}{path}")
    }

    /// The cluster's port, which a test may name to check that no reply does.
    pub fn port(&self) -> String {
        let host = self.url.rsplit_once('@').map_or(self.url.as_str(), |(_, h)| h);
        host.split(['/', ':']).nth(1).unwrap_or("").to_owned()
    }

    /// A role of the cluster that may log in with `password` and do on this database's
    /// tables only `grants` (e.g. `SELECT, INSERT`); the schema is created first, as an
    /// administrator would. Dropped with its privileges at the end of the test.
    pub fn role(&self, name: &str, password: &str, grants: &str) -> Role {
        let name = format!("{name}_{}", std::process::id());
        let mut admin = Client::connect(&self.admin, NoTls).expect("connect to the cluster");
        admin.batch_execute(&format!("CREATE ROLE {name} LOGIN PASSWORD '{password}'")).expect("CREATE ROLE");
        let mut db = self.connect();
        db.batch_execute(include_str!("../../src/ledger/schema.sql")).expect("the schema");
        db.batch_execute(&format!(
            "GRANT USAGE ON SCHEMA public TO {name}; GRANT {grants} ON ALL TABLES IN SCHEMA public TO {name}"
        ))
        .expect("GRANT");
        Role { url: self.url_as(&name, password), name, admin: self.admin.clone(), db: self.url.clone() }
    }

    /// A plain connection to this database, to look inside it.
    pub fn connect(&self) -> Client {
        Client::connect(&self.url, NoTls).expect("connect to the test database")
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Ok(mut client) = Client::connect(&self.admin, NoTls) {
            let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name));
        }
    }
}

/// A login role of the test cluster, dropped at the end.
pub struct Role {
    /// The test database's URL as this role.
    pub url: String,
    name: String,
    admin: String,
    db: String,
}

impl Role {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        if let Ok(mut db) = Client::connect(&self.db, NoTls) {
            let _ = db.batch_execute(&format!("DROP OWNED BY {}", self.name));
        }
        if let Ok(mut admin) = Client::connect(&self.admin, NoTls) {
            let _ = admin.batch_execute(&format!("DROP ROLE IF EXISTS {}", self.name));
        }
    }
}

/// A TCP proxy in front of the cluster that a test can cut, as a database outage: while cut it
/// closes every connection through it and every new one at once.
pub struct Outage {
    pub address: String,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Outage {
    /// A proxy to the cluster of `db`.
    pub fn proxy(db: &Database) -> Outage {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let address = listener.local_addr().expect("the proxy's address").to_string();
        let upstream = format!("127.0.0.1:{}", db.port());
        let (cut, open) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (cutting, opened) = (Arc::clone(&cut), Arc::clone(&open));
        // Ends with the test process.
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if cutting.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                let mut open = opened.lock().unwrap_or_else(|e| e.into_inner());
                for (from, to) in [(client.try_clone(), server.try_clone()), (Ok(server), Ok(client))] {
                    let (Ok(from), Ok(to)) = (from, to) else { continue };
                    open.extend(from.try_clone());
                    thread::spawn(move || pump(from, to));
                }
            }
        });
        Outage { address, cut, open }
    }

    /// The database goes away: every connection through the proxy is closed, and new ones are
    /// closed as they arrive.
    pub fn begin(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for stream in self.open.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// The database is back.
    pub fn end(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Both);
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let authority = base.find("://").map_or(0, |i| i + 3);
    let end = base[authority..].find('/').map_or(base.len(), |i| authority + i);
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    format!("{}/{name}{query}", &base[..end])
}
