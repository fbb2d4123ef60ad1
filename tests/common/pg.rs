//! A PostgreSQL database of its own for each test that needs one.
//!
//! The cluster is `SERVER_DATABASE_URL` if it is set (`.ci/run` starts one and sets it); else,
//! if PostgreSQL's binaries are here, one started for this test binary by
//! `scripts/pg-test-cluster.sh serve`, which stops and removes it when this process ends (its
//! standard input, held here, closes). With neither, a test fails under `CI=true` and is
//! skipped elsewhere, saying why.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use postgres::{Client, NoTls};

/// Why there is no cluster to test on.
enum NoCluster {
    /// Nothing to start one with: the test is skipped, except under CI.
    Missing(String),
    /// Starting one failed: the test fails.
    Broken(String),
}

/// The cluster's URL, or why there is none.
fn cluster() -> &'static Result<String, NoCluster> {
    static CLUSTER: OnceLock<Result<String, NoCluster>> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        if let Ok(url) = std::env::var("SERVER_DATABASE_URL") {
            return Ok(url);
        }
        if !has_pg_ctl() {
            let why = "SERVER_DATABASE_URL is not set and PostgreSQL's pg_ctl is not installed";
            return Err(NoCluster::Missing(why.into()));
        }
        serve().map_err(NoCluster::Broken)
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
    /// A new, empty database; `None` (the test is skipped, and says why) without PostgreSQL,
    /// except under `CI=true`, where that fails the test.
    pub fn create(test: &str) -> Option<Database> {
        let admin = match cluster() {
            Ok(url) => url.clone(),
            Err(NoCluster::Broken(why)) => panic!("{test}: cannot start PostgreSQL: {why}"),
            Err(NoCluster::Missing(why)) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("{test} needs PostgreSQL: {why}")
            }
            Err(NoCluster::Missing(why)) => {
                eprintln!("skipped {test}: it needs PostgreSQL: {why}");
                return None;
            }
        };
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("lottery_{test}_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut client = Client::connect(&admin, NoTls).unwrap_or_else(|e| panic!("cannot connect to {admin}: {e}"));
        client.batch_execute(&format!("CREATE DATABASE \"{name}\"")).expect("CREATE DATABASE");
        Some(Database { url: with_database(&admin, &name), admin, name })
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

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let authority = base.find("://").map_or(0, |i| i + 3);
    let end = base[authority..].find('/').map_or(base.len(), |i| authority + i);
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    format!("{}/{name}{query}", &base[..end])
}
