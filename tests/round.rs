//! Whole rounds with the real binaries: one `lottery-server` and several `lottery-agency`
//! processes over loopback TCP, checked against what the test computes from the data files.

mod common {
    pub mod agency;
    pub mod agency_keys;
    pub mod keys;
    pub mod log_line;
    pub mod process;
    pub mod run;
    pub mod server;
    pub mod server_keys;
    pub mod server_temp;
    pub mod store;
    pub mod tls;
    pub mod winners_reply;
}

use std::time::Duration;

use common::agency::agency;
use common::keys::{Keys, env_refs};
use common::log_line::log_field;
use common::process::{Proc, STEP};
use common::server::TestServer;
use common::store::{assert_store, expected_store, read_csv, winners_of};
use common::tls::TlsClient;
use common::winners_reply::winners_reply;

fn no_fail(name: &str, lines: &[String]) {
    if let Some(line) = lines.iter().find(|l| l.contains("result: fail")) {
        panic!("{name} logged a failure in a normal round: {line}");
    }
}

/// The round as deployed: TLS and agency tokens, keys made by `lottery-server --make-keys`.
#[test]
fn a_full_round_of_five_agency_processes() {
    const AGENCIES: u32 = 5;
    const BETS: u64 = 2_000;
    // Not the default 100, so the setting is seen to apply; 64 rows stay well under 8 KiB.
    const BATCH: usize = 64;
    let data = tempfile::tempdir().unwrap();
    // Seed 2 gives 1, 2, 2, 1 and 0 winners: agencies with several winners and one with none.
    let files = lottery::tools::dataset::generate(data.path(), AGENCIES, BETS, 2).unwrap();
    let keys = Keys::make(data.path(), AGENCIES);
    let mut server = TestServer::start(AGENCIES, &env_refs(&keys.server_env()));
    let address = server.address();
    let mut agencies: Vec<Proc> = (1..=AGENCIES)
        .zip(&files)
        .map(|(id, file)| agency(data.path(), id, &address, file, BATCH, &env_refs(&keys.agency_env(id))))
        .collect();
    for agency in &mut agencies {
        agency.wait_success(STEP);
    }

    let rows: Vec<Vec<Vec<String>>> = files.iter().map(|f| read_csv(f)).collect();
    let winners: Vec<Vec<String>> = rows.iter().map(|r| winners_of(r)).collect();
    assert!(winners.iter().any(|w| w.len() > 1) && winners.iter().any(Vec::is_empty), "the seed's data: {winners:?}");
    let mut batches_sent = 0;
    for (id, (agency, winners)) in (1..).zip(agencies.iter().zip(&winners)) {
        let lines = &agency.logs.seen;
        lines.iter().for_each(|l| assert_log_format(l));
        no_fail(&agency.name, lines);
        let queries: Vec<&String> = lines.iter().filter(|l| l.contains("action: consulta_ganadores")).collect();
        assert_eq!(queries.len(), 1, "{}: {queries:?}", agency.name);
        let expected =
            format!("action: consulta_ganadores | result: success | cant_ganadores: {} | agency: {id}", winners.len());
        assert!(queries[0].ends_with(&expected), "{}: {:?}, expected {expected:?}", agency.name, queries[0]);

        let sizes: Vec<usize> = lines
            .iter()
            .filter(|l| l.contains("action: apuesta_enviada | result: success | cantidad: "))
            .map(|l| log_field(l, "cantidad").and_then(|n| n.parse().ok()).expect("a count"))
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), BETS as usize, "{}: bets in its batches", agency.name);
        let (last, full) = sizes.split_last().expect("at least one batch");
        assert!(full.iter().all(|&n| n == BATCH), "{}: a batch before the last is not full: {sizes:?}", agency.name);
        assert!((1..=BATCH).contains(last), "{}: last batch of {last}", agency.name);
        batches_sent += sizes.len();
    }

    // What the server answers to a raw query is what the agencies were told.
    for (id, winners) in (1..=AGENCIES).zip(&winners) {
        let mut client = TlsClient::connect(server.port, &keys.path("ca.pem"));
        assert_eq!(client.send(&format!("HELLO {id} {}", keys.token(id))), format!("OK {BETS}"));
        assert_eq!(client.send("WINNERS"), winners_reply(winners), "agency {id}");
        assert_eq!(client.send("QUIT"), "BYE");
        assert_eq!(client.read_line(), None);
    }
    assert_store(&server.bets_path(), &expected_store(&files));

    // Stop the server to read its whole log.
    server.proc.signal(libc::SIGTERM);
    assert!(server.proc.wait_exit(STEP).success());
    let lines = server.proc.logs.until_eof().to_vec();
    lines.iter().for_each(|l| assert_log_format(l));
    no_fail("lottery-server", &lines);
    let draws: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("action: sorteo | result: success"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(draws.len(), 1, "one draw per round");
    let received: Vec<usize> =
        lines.iter().enumerate().filter(|(_, l)| l.contains("action: apuesta_recibida")).map(|(i, _)| i).collect();
    assert_eq!(received.len(), batches_sent, "one apuesta_recibida per batch sent");
    assert!(received.iter().all(|&i| i < draws[0]), "an apuesta_recibida after the sorteo");
}

/// A port held by a socket that is bound but not listening: a connection to it is refused, as
/// to a server that is not up yet, and the server (which sets `SO_REUSEADDR`, as this socket
/// does) can still bind and listen on it. Holding the port for the whole test means that no
/// other process can take it between "no server yet" and "the server is up". (Linux semantics
/// of `SO_REUSEADDR`.)
#[cfg(target_os = "linux")]
fn held_port() -> (socket2::Socket, u16) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    (socket, port)
}

#[cfg(target_os = "linux")]
#[test]
fn an_agency_started_before_the_server_connects_once_it_is_up() {
    let dir = tempfile::tempdir().unwrap();
    let files = lottery::tools::dataset::generate(&dir.path().join("data"), 1, 500, 3).unwrap();
    let (_held, port) = held_port();
    let address = format!("127.0.0.1:{port}");
    let mut agency = agency(dir.path(), 1, &address, &files[0], 100, &[("CLI_RETRY_TIMEOUT_MS", "20000")]);
    // It has tried, and been refused: there is no server yet.
    agency.logs.wait_for("action: connect | result: in_progress");
    assert!(agency.child.try_wait().unwrap().is_none(), "the agency gave up on a server that is not up yet");

    let server = TestServer::start_in(dir.path(), 1, port, &[]);
    assert_eq!(server.port, port);
    agency.wait_success(STEP);
    let lines = &agency.logs.seen;
    no_fail("lottery-agency", lines);
    let winners = winners_of(&read_csv(&files[0]));
    let expected =
        format!("action: consulta_ganadores | result: success | cant_ganadores: {} | agency: 1", winners.len());
    assert!(lines.iter().any(|l| l.ends_with(&expected)), "no {expected:?}");
    assert_store(&server.bets_path(), &expected_store(&files));
}

#[cfg(target_os = "linux")]
#[test]
fn an_agency_resumes_after_the_server_is_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let files = lottery::tools::dataset::generate(&dir.path().join("data"), 2, 2_000, 5).unwrap();
    let (_held, port) = held_port();
    let address = format!("127.0.0.1:{port}");
    let mut first = TestServer::start_in(dir.path(), 2, port, &[]);
    let mut one = agency(dir.path(), 1, &address, &files[0], 20, &[("CLI_RETRY_TIMEOUT_MS", "20000")]);
    one.logs.wait_for("action: apuesta_enviada | result: success | cantidad: 20");
    // Wherever agency 1 is now (sending, or waiting in WINNERS for agency 2), the round is not
    // over, so it must notice the loss, reconnect and resume.
    first.proc.child.kill().unwrap();
    first.proc.child.wait().unwrap();
    one.logs.wait_for("action: reconnect | result: in_progress");

    let second = TestServer::start_in(dir.path(), 2, port, &[]);
    let mut two = agency(dir.path(), 2, &address, &files[1], 100, &[]);
    for agency in [&mut one, &mut two] {
        agency.wait_success(STEP);
    }
    for ((id, agency), file) in (1..).zip([&one, &two]).zip(&files) {
        no_fail(&agency.name, &agency.logs.seen);
        let winners = winners_of(&read_csv(file));
        let expected =
            format!("action: consulta_ganadores | result: success | cant_ganadores: {} | agency: {id}", winners.len());
        assert!(agency.logs.seen.iter().any(|l| l.ends_with(&expected)), "{}: no {expected:?}", agency.name);
    }
    // Nothing lost, nothing stored twice.
    assert_store(&second.bets_path(), &expected_store(&files));
}

#[test]
fn an_agency_started_again_skips_what_the_server_holds() {
    let dir = tempfile::tempdir().unwrap();
    let files = lottery::tools::dataset::generate(&dir.path().join("data"), 2, 2_000, 9).unwrap();
    let server = TestServer::start(2, &[]);
    let sent = "action: apuesta_enviada | result: success | cantidad: 20";
    let mut before = agency(dir.path(), 1, &server.address(), &files[0], 20, &[]);
    before.logs.wait_count(sent, 40);
    before.signal(libc::SIGKILL);
    before.wait_exit(STEP);
    // Its first batches go out behind its HELLO, from row 0: the server acknowledges what it
    // holds without storing it again, and the agency goes on from there.
    let mut again = agency(dir.path(), 1, &server.address(), &files[0], 20, &[]);
    let mut two = agency(dir.path(), 2, &server.address(), &files[1], 100, &[]);
    for agency in [&mut again, &mut two] {
        agency.wait_success(STEP);
        no_fail(&agency.name, &agency.logs.seen);
    }
    let batches_again = again.logs.seen.iter().filter(|l| l.ends_with(sent)).count();
    assert!(batches_again < 100, "{batches_again} batches of 20 sent again, of 100");
    assert_store(&server.bets_path(), &expected_store(&files));
}

#[test]
fn an_agency_waiting_for_the_draw_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let files = lottery::tools::dataset::generate(&dir.path().join("data"), 1, 300, 3).unwrap();
    // Two agencies in the round and only one runs: it sends everything and waits for the draw.
    let server = TestServer::start(2, &[]);
    let mut agency = agency(dir.path(), 1, &server.address(), &files[0], 100, &[]);
    // Its third and last batch is acknowledged: it is saying DONE or waiting in WINNERS.
    agency.logs.wait_count("action: apuesta_enviada | result: success | cantidad: 100", 3);
    // It says that it waits, and for what.
    agency.logs.wait_for("action: wait_draw | result: in_progress | agencies_done: 1/2");
    agency.signal(libc::SIGTERM);
    let status = agency.wait_exit(std::time::Duration::from_secs(2));
    assert_eq!(status.code(), Some(0), "{status}");
    let lines = agency.logs.until_eof();
    assert!(lines.last().is_some_and(|l| l.ends_with("action: shutdown | result: success")), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains("consulta_ganadores")), "no winners before the draw");
}

#[test]
fn an_agency_whose_batches_fail_with_storage_backs_off_and_gives_up_without_progress() {
    let dir = tempfile::tempdir().unwrap();
    let files = lottery::tools::dataset::generate(&dir.path().join("data"), 1, 50, 3).unwrap();
    // Never enough free space: every batch is refused with ERR STORAGE, every HELLO answered.
    let server = TestServer::start(1, &[("SERVER_MIN_FREE_BYTES", "18446744073709551615")]);
    let mut agency = agency(dir.path(), 1, &server.address(), &files[0], 10, &[("CLI_RETRY_TIMEOUT_MS", "3000")]);
    let status = agency.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{status}");
    let lines = agency.logs.until_eof().to_vec();
    let retries: Vec<&String> =
        lines.iter().filter(|l| l.contains("action: reconnect | result: in_progress")).collect();
    // Pauses from 50 ms doubling to 5 s, jittered: a handful in 3 s, not a tight loop.
    assert!((2..=12).contains(&retries.len()), "{retries:#?}");
    assert!(retries.iter().all(|l| l.contains("ERR STORAGE") && l.contains("retry_in_ms: ")), "{retries:#?}");
    let pauses: Vec<u64> = retries.iter().filter_map(|l| log_field(l, "retry_in_ms")?.parse().ok()).collect();
    assert!(pauses.last() > pauses.first(), "the pauses do not grow: {pauses:?}");
    let stderr = agency.stderr();
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(stderr.contains("no progress") && stderr.contains("STORAGE"), "{stderr}");
}

/// Asserts that `line` has the spec's shape:
/// `YYYY-MM-DD HH:MM:SS LEVEL    action: <a> | result: <success|fail|in_progress> | <k>: <v> …`.
pub fn assert_log_format(line: &str) {
    let bad = |why: &str| panic!("log line {line:?}: {why}");
    let (stamp, rest) = line.split_at_checked(20).unwrap_or_else(|| bad("too short"));
    let digits_at = |s: &str, i: &[usize]| i.iter().all(|&i| s.as_bytes()[i].is_ascii_digit());
    let stamp_ok = stamp.len() == 20
        && digits_at(stamp, &[0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18])
        && &stamp[4..5] == "-"
        && &stamp[7..8] == "-"
        && &stamp[10..11] == " "
        && &stamp[13..14] == ":"
        && &stamp[16..17] == ":"
        && &stamp[19..20] == " ";
    if !stamp_ok {
        bad("no `YYYY-MM-DD HH:MM:SS ` stamp");
    }
    let (level, fields) = rest.split_at_checked(9).unwrap_or_else(|| bad("no level"));
    if !["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level.trim_end()) {
        bad("no level padded to 8 columns");
    }
    let mut fields = fields.split(" | ");
    let action = fields.next().and_then(|f| f.strip_prefix("action: "));
    if action.is_none_or(str::is_empty) {
        bad("the first field is not `action: …`");
    }
    let result = fields.next().and_then(|f| f.strip_prefix("result: "));
    if result.is_none_or(|r| !["success", "fail", "in_progress"].contains(&r)) {
        bad("the second field is not `result: success|fail|in_progress`");
    }
    for field in fields {
        if field.split_once(": ").is_none_or(|(k, _)| k.is_empty() || k.contains(' ')) {
            bad("a field that is not `key: value`");
        }
    }
}
