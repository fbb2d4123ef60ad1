//! The round on PostgreSQL: several `lottery-server` replicas on one database, black box.
//! Each test has a database of its own (see `common/pg.rs`), so they run in parallel.

mod common {
    pub mod agency;
    pub mod client;
    pub mod client_silence;
    pub mod pg;
    pub mod process;
    pub mod run;
    pub mod server;
    pub mod server_temp;
    pub mod store;
    pub mod winners_reply;
}

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::agency::agency;
use common::pg::{Database, Outage};
use common::process::{Proc, STEP, command};
use common::run::run_to_exit;
use common::server::{SERVER, TestServer};
use common::store::{assert_store, expected_store, read_csv, winners_of};
use common::winners_reply::winners_reply;

/// A replica of the round in `db`, for `agencies` agencies.
fn replica(db: &Database, agencies: u32) -> TestServer {
    TestServer::start(agencies, &[("SERVER_DATABASE_URL", &db.url)])
}

/// `lottery-server --export-bets` of the round in `db`, read back as rows.
fn export(db: &Database, dir: &Path) -> PathBuf {
    let out = dir.join("export.csv");
    let cmd = command(SERVER, dir, &[("SERVER_DATABASE_URL", &db.url), ("SERVER_STORAGE_PATH", "unused.csv")]);
    let (status, stdout, stderr) = run_to_exit("lottery-server --export-bets", {
        let mut cmd = cmd;
        cmd.arg("--export-bets").arg(&out);
        cmd
    });
    assert!(status.success(), "export failed: {stderr}");
    assert!(stdout.contains("bets to"), "{stdout}");
    out
}

/// `server`'s `STATUS` once it says `expected` (its figures are up to about a second old), or
/// what it last said after a generous deadline.
fn wait_status(server: &TestServer, expected: &str) -> String {
    let deadline = Instant::now() + STEP;
    loop {
        // A connection of its own each time: a guest may make only 16 requests before `HELLO`,
        // and the figures may take a second to catch up.
        let status = server.client().send("STATUS");
        if status == expected || Instant::now() > deadline {
            return status;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Every `sorteo` both replicas logged, read to the end after a SIGTERM each.
fn draws(servers: &mut [&mut TestServer]) -> usize {
    for server in servers.iter_mut() {
        server.proc.signal(libc::SIGTERM);
        assert!(server.proc.wait_exit(STEP).success(), "{} did not stop cleanly", server.proc.name);
    }
    servers.iter_mut().map(|s| s.proc.logs.until_eof().iter().filter(|l| l.contains("action: sorteo")).count()).sum()
}

/// Each agency's process logged its own number of winners, and a raw `WINNERS` on `server`
/// answers its documents in file order.
fn check_winners(agencies: &mut [Proc], files: &[PathBuf], server: &TestServer) {
    for ((id, agency), file) in (1..).zip(agencies.iter_mut()).zip(files) {
        agency.wait_success(STEP * 3);
        let expected = winners_of(&read_csv(file));
        let said = format!("cant_ganadores: {} | agency: {id}", expected.len());
        assert!(agency.logs.seen.iter().any(|l| l.ends_with(&said)), "agency {id}: expected {said}");
        let mut client = server.client();
        assert!(client.send(&format!("HELLO {id}")).starts_with("OK "));
        assert_eq!(client.send("WINNERS"), winners_reply(&expected), "agency {id}");
    }
}

#[test]
#[ignore = "needs PostgreSQL: set SERVER_DATABASE_URL"]
fn a_round_through_two_replicas() {
    let db = Database::create("two_replicas");
    let data = tempfile::tempdir().unwrap();
    let files = lottery::tools::dataset::generate(data.path(), 5, 2_000, 2).unwrap();
    let (mut a, mut b) = (replica(&db, 5), replica(&db, 5));
    // Agencies 1, 3 and 5 on A; 2 and 4 on B.
    let mut agencies: Vec<Proc> = (1..=5)
        .zip(&files)
        .map(|(id, file)| {
            let address = if id % 2 == 1 { a.address() } else { b.address() };
            agency(data.path(), id, &address, file, 100, &[])
        })
        .collect();
    check_winners(&mut agencies, &files, &b);
    let status = "STATUS agencies_done=5/5 bets=10000 drawn=true";
    assert_eq!((wait_status(&a, status), wait_status(&b, status)), (status.into(), status.into()));
    assert_eq!(draws(&mut [&mut a, &mut b]), 1, "one draw for the round");
    assert_store(&export(&db, data.path()), &expected_store(&files));
}

#[test]
#[ignore = "needs PostgreSQL: set SERVER_DATABASE_URL"]
fn a_replica_killed_mid_round_hands_its_agencies_to_the_other() {
    let db = Database::create("killed");
    let data = tempfile::tempdir().unwrap();
    let files = lottery::tools::dataset::generate(data.path(), 5, 6_000, 3).unwrap();
    let (mut a, mut b) = (replica(&db, 5), replica(&db, 5));
    // Every agency knows both, and starts on A.
    let both = format!("{},{}", a.address(), b.address());
    let mut agencies: Vec<Proc> =
        (1..=5).zip(&files).map(|(id, file)| agency(data.path(), id, &both, file, 50, &[])).collect();
    a.proc.logs.wait_count("action: apuesta_recibida | result: success", 40);
    a.proc.child.kill().expect("SIGKILL replica A");
    a.proc.child.wait().expect("reap replica A");
    check_winners(&mut agencies, &files, &b);
    // Wherever each started (A may have died before it first connected), it ended on B.
    let on_b = format!("action: connect | result: success | address: {}", b.address());
    for agency in &agencies {
        assert!(agency.logs.seen.iter().any(|l| l.ends_with(&on_b)), "{} did not move to B", agency.name);
    }
    assert_eq!(draws(&mut [&mut b]), 1, "B made the draw");
    assert_store(&export(&db, data.path()), &expected_store(&files));
}

#[test]
#[ignore = "needs PostgreSQL: set SERVER_DATABASE_URL"]
fn the_last_two_dones_at_once_on_two_replicas_make_one_draw() {
    for _ in 0..4 {
        let db = Database::create("two_dones");
        let (mut a, mut b) = (replica(&db, 2), replica(&db, 2));
        let (mut one, mut two) = (a.client(), b.client());
        assert_eq!(one.send("HELLO 1"), "OK 0");
        assert_eq!(two.send("HELLO 2"), "OK 0");
        assert_eq!(one.send("BET Ana,Paz,11,1990-01-01,7574"), "OK 1");
        assert_eq!(two.send("BET Eva,Sol,22,1980-02-02,7574"), "OK 1");
        // Both DONEs are on the wire before either reply is read.
        one.write(b"DONE\n").unwrap();
        two.write(b"DONE\n").unwrap();
        assert_eq!((one.read_line(), two.read_line()), ("OK".into(), "OK".into()));
        assert_eq!((one.send("WINNERS"), two.send("WINNERS")), ("WINNERS 1 11".into(), "WINNERS 1 22".into()));
        assert_eq!(draws(&mut [&mut a, &mut b]), 1, "one draw for the round");
    }
}

#[test]
#[ignore = "needs PostgreSQL: set SERVER_DATABASE_URL"]
fn a_winners_waiter_on_one_replica_wakes_when_another_draws() {
    let db = Database::create("waiter");
    let (a, b) = (replica(&db, 2), replica(&db, 2));
    let mut waiter = a.client();
    assert_eq!(waiter.send("HELLO 1"), "OK 0");
    assert_eq!(waiter.send("BET Ana,Paz,00000042,1990-01-01,7574"), "OK 1");
    assert_eq!(waiter.send("DONE"), "OK");
    waiter.write(b"WINNERS\n").unwrap();
    waiter.expect_silence(Duration::from_millis(300));
    let mut last = b.client();
    assert_eq!(last.send("HELLO 2"), "OK 0");
    assert_eq!(last.send("DONE"), "OK");
    assert_eq!(waiter.read_line(), "WINNERS 1 00000042");
    let status = "STATUS agencies_done=2/2 bets=1 drawn=true";
    assert_eq!(wait_status(&a, status), status);
}

#[test]
#[ignore = "needs PostgreSQL: set SERVER_DATABASE_URL"]
fn a_retried_batch_on_another_replica_is_not_stored_twice() {
    let db = Database::create("retried");
    let (a, b) = (replica(&db, 1), replica(&db, 1));
    let batch = "BATCH 0 2\nAna,Paz,1,1990-01-01,1\nEva,Sol,2,1980-02-02,2\n";
    let mut first = a.client();
    assert_eq!(first.send("HELLO 1"), "OK 0");
    first.write(batch.as_bytes()).unwrap();
    assert_eq!(first.read_line(), "OK 2");
    // The same agency, resuming on B as if A's reply had been lost: acknowledged, not stored.
    let mut second = b.client();
    assert_eq!(second.send("HELLO 1"), "OK 2");
    second.write(batch.as_bytes()).unwrap();
    assert_eq!(second.read_line(), "OK 2");
    assert_eq!(
        second.send("BATCH 3 1\nLuis,Gil,3,1970-03-03,3"),
        "ERR BAD_REQUEST offset 3 is past the 2 bets held for agency 1"
    );
    let rows: i64 = db.connect().query_one("SELECT count(*) FROM lottery_bet", &[]).unwrap().get(0);
    assert_eq!(rows, 2);
}

#[test]
#[ignore = "needs PostgreSQL: set SERVER_DATABASE_URL"]
fn past_the_quota_a_batch_is_refused_whole() {
    let db = Database::create("quota");
    let server = TestServer::start(1, &[("SERVER_DATABASE_URL", &db.url), ("SERVER_MAX_BETS_PER_AGENCY", "2")]);
    let mut client = server.client();
    assert_eq!(client.send("HELLO 1"), "OK 0");
    client.write(b"BATCH 0 3\nAna,Paz,1,1990-01-01,1\nEva,Sol,2,1980-02-02,2\nLuis,Gil,3,1970-03-03,3\n").unwrap();
    assert!(client.read_line().starts_with("ERR QUOTA agency 1 may store at most 2 bets and holds 0"));
    client.write(b"BATCH 0 2\nAna,Paz,1,1990-01-01,1\nEva,Sol,2,1980-02-02,2\n").unwrap();
    assert_eq!(client.read_line(), "OK 2");
    let rows: i64 = db.connect().query_one("SELECT count(*) FROM lottery_bet", &[]).unwrap().get(0);
    assert_eq!(rows, 2);
}

#[test]
#[ignore = "needs PostgreSQL: set SERVER_DATABASE_URL"]
fn shutdown_wakes_a_waiter_and_a_round_of_another_size_is_refused() {
    let db = Database::create("shutdown");
    let mut server = replica(&db, 2);
    let mut waiter = server.client();
    assert_eq!(waiter.send("HELLO 1"), "OK 0");
    waiter.write(b"WINNERS\n").unwrap();
    waiter.expect_silence(Duration::from_millis(200));
    server.proc.signal(libc::SIGTERM);
    assert!(waiter.read_line().starts_with("ERR SHUTDOWN"));
    assert!(server.proc.wait_exit(STEP).success());
    let dir = tempfile::tempdir().unwrap();
    let plain = [("SERVER_AGENCY_KEYS", ""), ("SERVER_TLS_CERT", ""), ("SERVER_TLS_KEY", "")];
    let cmd = command(
        SERVER,
        dir.path(),
        &[&plain[..], &[("SERVER_DATABASE_URL", &db.url), ("SERVER_AGENCIES", "3")]].concat(),
    );
    let (status, _, stderr) = run_to_exit("lottery-server", cmd);
    assert!(!status.success());
    assert!(stderr.contains("this round has 2 agencies, SERVER_AGENCIES is 3"), "{stderr}");
}

#[test]
fn an_agency_moves_on_to_the_next_address_when_one_refuses() {
    // A port nobody listens on: bound, then let go.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let data = tempfile::tempdir().unwrap();
    let files = lottery::tools::dataset::generate(data.path(), 1, 300, 2).unwrap();
    let server = TestServer::start(1, &[]);
    let addresses = format!("{dead},{}", server.address());
    let mut one = agency(data.path(), 1, &addresses, &files[0], 100, &[]);
    one.wait_success(STEP);
    let expected = winners_of(&read_csv(&files[0]));
    assert!(one.logs.seen.iter().any(|l| l.ends_with(&format!("cant_ganadores: {} | agency: 1", expected.len()))));
    assert_store(&server.bets_path(), &expected_store(&files));
}

#[test]
#[ignore = "needs PostgreSQL: set SERVER_DATABASE_URL"]
fn a_database_outage_never_stops_the_door_and_no_reply_names_the_database() {
    let db = Database::create("outage");
    let outage = Outage::proxy(&db);
    let mut server = TestServer::start(2, &[("SERVER_DATABASE_URL", &db.url_through(&outage.address))]);
    let mut agency = server.client();
    assert_eq!(agency.send("HELLO 1"), "OK 0");
    assert_eq!(agency.send("BET Ana,Paz,11,1990-01-01,7574"), "OK 1");
    let before = "STATUS agencies_done=0/2 bets=1 drawn=false";
    assert_eq!(wait_status(&server, before), before);

    outage.begin();
    // A stranger's STATUS is answered from the figures the server keeps, and the door is free
    // for the PING behind it: both while the database is still down.
    let mut stranger = server.client();
    assert_eq!(stranger.send("STATUS"), before);
    assert_eq!(stranger.send("PING"), "PONG");
    // An agency's request that needs the database is refused without saying where it is.
    let refused = server.client().send("HELLO 2");
    assert_eq!(refused, "ERR STORAGE the database is unavailable; try again later");
    let bet = agency.send("BET Eva,Sol,22,1980-02-02,1");
    assert_eq!(bet, "ERR STORAGE the database is unavailable; try again later");
    for reply in [&refused, &bet] {
        assert!(!reply.contains(&db.port()) && !reply.contains("lottery_outage"), "{reply}");
    }
    // The log keeps the detail, never the password.
    let logged = server.proc.logs.wait_for("action: database | result: fail");
    assert!(logged.contains(&outage.address), "{logged}");
    let password = db.url.split_once("://").and_then(|(_, r)| r.split_once('@')).map(|(u, _)| u.to_owned());
    let password = password.and_then(|u| u.split_once(':').map(|(_, p)| p.to_owned())).unwrap_or_default();
    assert!(password.is_empty() || !logged.contains(&password), "the log holds the password");

    outage.end();
    // The round goes on where it was.
    let mut again = server.client();
    let deadline = Instant::now() + STEP * 3;
    let mut hello = again.send("HELLO 2");
    while hello != "OK 0" && Instant::now() < deadline {
        hello = again.send("HELLO 2");
    }
    assert_eq!(hello, "OK 0");
    assert_eq!(agency.send("BET Eva,Sol,22,1980-02-02,1"), "OK 2");
}

#[test]
#[ignore = "needs PostgreSQL: set SERVER_DATABASE_URL"]
fn a_role_without_update_is_refused_at_start_up_naming_the_privilege() {
    let db = Database::create("no_update");
    let role = db.role("lottery_no_update", "no-update-pw", "SELECT, INSERT");
    let (status, stderr) = start_and_fail(&role.url);
    assert!(!status.success());
    assert!(stderr.contains("lacks UPDATE on table lottery_round, UPDATE on table lottery_agency"), "{stderr}");
    assert!(!stderr.contains("no-update-pw"), "{stderr}");
    // With the privilege, the same role serves.
    db.connect().batch_execute(&format!("GRANT UPDATE ON ALL TABLES IN SCHEMA public TO {}", role.name())).unwrap();
    let mut server = TestServer::start(1, &[("SERVER_DATABASE_URL", &role.url)]);
    assert_eq!(server.client().send("HELLO 1"), "OK 0");
    server.proc.signal(libc::SIGTERM);
    assert!(server.proc.wait_exit(STEP).success());
}

#[test]
#[ignore = "needs PostgreSQL: set SERVER_DATABASE_URL"]
fn start_up_says_which_database_failure_it_met_and_never_the_password() {
    let db = Database::create("failures");
    let wrong = db.url_as("postgres", "wrong-password-7574");
    let (status, stderr) = start_and_fail(&wrong);
    assert!(!status.success());
    assert!(stderr.contains("authentication failed for user postgres"), "{stderr}");
    assert!(!stderr.contains("wrong-password-7574"), "{stderr}");

    let missing = with_database(&db.url, "no_such_round");
    let (status, stderr) = start_and_fail(&missing);
    assert!(!status.success());
    assert!(stderr.contains("no_such_round does not exist; create it"), "{stderr}");

    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (status, stderr) = start_and_fail(&db.url_through(&dead.to_string()));
    assert!(!status.success());
    assert!(stderr.contains("connection refused"), "{stderr}");

    let (status, stderr) = start_and_fail("postgres://user:secret-7574@127.0.0.1:notaport/db");
    assert!(!status.success());
    assert!(stderr.contains("SERVER_DATABASE_URL is not a connection string"), "{stderr}");
    assert!(!stderr.contains("secret-7574"), "{stderr}");
}

/// Runs a plain-text server on `url` expecting it to refuse to start: its status and stderr,
/// one line with no library Debug text or docs URL.
fn start_and_fail(url: &str) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("SERVER_AGENCY_KEYS", ""),
        ("SERVER_TLS_CERT", ""),
        ("SERVER_TLS_KEY", ""),
        ("SERVER_PORT", "0"),
        ("SERVER_AGENCIES", "1"),
        ("SERVER_DATABASE_URL", url),
    ];
    let (status, _, stderr) = run_to_exit("lottery-server", command(SERVER, dir.path(), &env));
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("Error {") && !stderr.contains("Kind") && !stderr.contains("https://"), "{stderr}");
    (status, stderr)
}

/// `url` with another database name.
fn with_database(url: &str, name: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("a database in the URL");
    format!("{base}/{name}")
}
