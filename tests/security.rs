//! Identity and transport, black box: the attacks of an outsider, another agency, a relay and
//! a second server on the same files, each replayed against the real binaries, while real
//! agencies finish an exact round.

mod common {
    pub mod agency;
    pub mod agency_keys;
    pub mod client;
    pub mod client_eof;
    pub mod keys;
    pub mod process;
    pub mod relay;
    pub mod run;
    pub mod server;
    pub mod server_keys;
    pub mod server_temp;
    pub mod store;
    pub mod tls;
}

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::agency::agency;
use common::client::Client;
use common::keys::{Keys, env_refs};
use common::process::{Proc, STEP, command};
use common::relay::Relay;
use common::run::run_to_exit;
use common::server::TestServer;
use common::store::{assert_store, expected_store, read_csv, winners_of};
use common::tls::TlsClient;

const AGENCIES: u32 = 5;

/// A server on TLS + tokens for `AGENCIES` agencies, with its keys.
fn secure_server(dir: &std::path::Path, extra: &[(&str, &str)]) -> (Keys, TestServer) {
    let keys = Keys::make(dir, AGENCIES);
    let mut env = keys.server_env();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let server = TestServer::start(AGENCIES, &env_refs(&env));
    (keys, server)
}

#[test]
fn make_keys_writes_private_files_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::make(dir.path(), 3);
    for name in ["server.key", "agencies.keys", "agency-1.token", "agency-3.token"] {
        let mode = fs::metadata(keys.dir.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    let keys_file = fs::read_to_string(keys.dir.join("agencies.keys")).unwrap();
    assert!(!keys_file.contains(&keys.token(1)), "agencies.keys holds a token");
    assert!(keys.token(1).len() >= 32, "a token of at least 128 bits");
    let before: Vec<Vec<u8>> =
        ["ca.pem", "agency-1.token"].iter().map(|n| fs::read(keys.dir.join(n)).unwrap()).collect();
    let mut again = command(common::server::SERVER, dir.path(), &[("SERVER_AGENCIES", "3")]);
    again.arg("--make-keys").arg(&keys.dir);
    let (status, _, stderr) = run_to_exit("lottery-server --make-keys again", again);
    assert!(!status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");
    let after: Vec<Vec<u8>> =
        ["ca.pem", "agency-1.token"].iter().map(|n| fs::read(keys.dir.join(n)).unwrap()).collect();
    assert_eq!(before, after);
}

#[test]
fn a_server_without_its_key_files_says_how_to_make_them() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = command(common::server::SERVER, dir.path(), &[("SERVER_PORT", "0"), ("SERVER_IP", "127.0.0.1")]);
    let (status, _, stderr) = run_to_exit("lottery-server without keys", cmd);
    assert!(!status.success());
    assert!(stderr.contains(".secrets/server.pem does not exist") && stderr.contains("--make-keys"), "{stderr}");
    assert!(!dir.path().join("bets.csv").exists(), "it touched its storage before failing");
}

#[test]
fn plain_text_may_only_probe_a_tls_server() {
    let dir = tempfile::tempdir().unwrap();
    let (_keys, mut server) = secure_server(dir.path(), &[]);
    let mut probe = server.client();
    assert_eq!(probe.send("PING"), "PONG");
    assert_eq!(probe.send("STATUS"), "STATUS agencies_done=0/5 bets=0 drawn=false");
    assert_eq!(probe.send("QUIT"), "BYE");
    for request in ["HELLO 1", "BET Ana,Paz,1,2000-01-01,7574", "BATCH 0 1", "DONE", "WINNERS"] {
        let mut plain = server.client();
        assert_eq!(plain.send(request), "ERR AUTH this server takes agencies over TLS only", "{request}");
        plain.expect_eof();
    }
    assert_eq!(server.client().send("STATUS"), "STATUS agencies_done=0/5 bets=0 drawn=false");
    server.proc.logs.wait_for("tls: true | agency_keys: true");
}

/// A client of a TLS server that has not spoken may be about to send its TLS hello: the door
/// that ends it (to make room, or for its silence) closes it without a plain-text word, which
/// its TLS layer would take for a broken record, final for an agency.
#[test]
fn a_tls_server_ends_a_client_that_has_not_spoken_without_a_plain_word() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("SERVER_MAX_GUESTS_PER_IP", "1"), ("SERVER_HELLO_TIMEOUT_MS", "500")];
    let (_keys, mut server) = secure_server(dir.path(), &env);
    let mut evicted = server.client();
    server.proc.logs.wait_for("action: accept_connections | result: success");
    // The newer guest takes the only place of their address.
    assert_eq!(server.client().send("PING"), "PONG");
    evicted.expect_eof();
    // One that stays silent is closed at its hello deadline, as silently.
    let mut silent = server.client();
    silent.expect_eof();
    server.proc.logs.wait_for("action: hello | result: fail | ip: 127.0.0.1 | error: TIMEOUT");
}

#[test]
fn a_token_speaks_only_for_its_own_agency_and_never_reaches_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, mut server) = secure_server(dir.path(), &[]);
    let ca = keys.path("ca.pem");
    let cases = [
        (format!("HELLO 1 {}", keys.token(2)), "that is not agency 1's token"),
        ("HELLO 1".to_owned(), "agency 1 must give its token"),
        ("HELLO 1 0000000000000000000000000000000000000000000000000000000000000000".to_owned(), "not agency 1's"),
    ];
    for (hello, why) in &cases {
        let mut tls = TlsClient::connect(server.port, &ca);
        let reply = tls.send(hello);
        assert!(reply.starts_with("ERR AUTH ") && reply.contains(why), "{reply}");
        assert_eq!(tls.read_line(), None, "the connection stays open after ERR AUTH");
    }
    let fail = server.proc.logs.wait_count("action: hello | result: fail", cases.len());
    assert!(fail.ends_with("action: hello | result: fail | agency: 1 | ip: 127.0.0.1 | error: AUTH"), "{fail}");
    let mut tls = TlsClient::connect(server.port, &ca);
    assert_eq!(tls.send(&format!("HELLO 2 {}", keys.token(2))), "OK 0");
    assert_eq!(tls.send("BET Ana,Paz,42,2000-01-01,7574"), "OK 1");
    assert_eq!(tls.send("STATUS"), "STATUS agencies_done=0/5 bets=1 drawn=false");
    server.proc.signal(libc::SIGTERM);
    server.proc.wait_exit(Duration::from_secs(2));
    let logs = server.proc.logs.until_eof().join("\n");
    for id in 1..=AGENCIES {
        assert!(!logs.contains(&keys.token(id)), "a token reached the server's log");
    }
}

#[test]
fn a_newer_session_of_an_agency_ends_the_older_one() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, server) = secure_server(dir.path(), &[]);
    let (ca, hello) = (keys.path("ca.pem"), format!("HELLO 3 {}", keys.token(3)));
    let mut first = TlsClient::connect(server.port, &ca);
    assert_eq!(first.send(&hello), "OK 0");
    first.write(b"BATCH 0 1\nAna,Paz,41,2000-01-01,7574\n").unwrap();
    assert_eq!(first.read_line().as_deref(), Some("OK 1"));
    let mut second = TlsClient::connect(server.port, &ca);
    assert_eq!(second.send(&hello), "OK 1", "what the older session stored stays");
    let said = first.read_line().expect("the older session is told why it ends");
    assert!(said.starts_with("ERR REPLACED "), "{said}");
    assert_eq!(first.read_line(), None);
    assert_eq!(second.send("BET Ana,Paz,42,2000-01-01,7574"), "OK 2");
}

#[test]
fn attacks_without_tokens_store_nothing_while_five_real_agencies_finish_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let files = lottery::tools::dataset::generate(data.path(), AGENCIES, 500, 7).unwrap();
    let (keys, mut server) = secure_server(dir.path(), &[]);
    let ca = keys.path("ca.pem");
    // Before the agencies: every agency's identity tried over plain text and over TLS with no
    // token or another agency's, to store, to close the agency, to read its winners.
    for k in 1..=AGENCIES {
        let other = keys.token(k % AGENCIES + 1);
        for hello in [format!("HELLO {k}"), format!("HELLO {k} {other}")] {
            let mut plain = server.client();
            assert!(plain.send(&hello).starts_with("ERR AUTH "));
            let mut tls = TlsClient::connect(server.port, &ca);
            assert!(tls.send(&hello).starts_with("ERR AUTH "));
            // Whatever follows the refused HELLO is never read: the connection is closed.
            let _ = tls.write(b"BATCH 0 1\nEvil,Row,1,2000-01-01,7574\nDONE\nWINNERS\n");
            assert_eq!(tls.read_line(), None);
        }
    }
    assert_eq!(server.client().send("STATUS"), "STATUS agencies_done=0/5 bets=0 drawn=false");
    let mut agencies: Vec<Proc> = (1..=AGENCIES)
        .zip(&files)
        .map(|(id, file)| agency(data.path(), id, &server.address(), file, 50, &env_refs(&keys.agency_env(id))))
        .collect();
    for (agency, file) in agencies.iter_mut().zip(&files) {
        agency.wait_success(STEP * 3);
        let expected = format!("cant_ganadores: {} | agency: ", winners_of(&read_csv(file)).len());
        assert!(agency.logs.wait_for("action: consulta_ganadores").contains(&expected), "{}", agency.name);
    }
    assert_store(&server.bets_path(), &expected_store(&files));
    server.proc.logs.wait_for("action: sorteo | result: success");
    assert_eq!(server.proc.logs.seen.iter().filter(|l| l.contains("action: sorteo | result: success")).count(), 1);
}

#[test]
fn a_relay_reads_no_bet_and_a_tampering_relay_makes_the_agency_fail_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let files = lottery::tools::dataset::generate(data.path(), 1, 300, 3).unwrap();
    let keys = Keys::make(dir.path(), 1);
    let server = TestServer::start(1, &env_refs(&keys.server_env()));
    // The relay's address is 127.0.0.1, one of the names on the server's certificate.
    let honest = Relay::start(server.port, None);
    let mut through =
        agency(data.path(), 1, &format!("127.0.0.1:{}", honest.port), &files[0], 100, &env_refs(&keys.agency_env(1)));
    through.wait_success(STEP);
    let seen = honest.seen.lock().unwrap().clone();
    assert!(seen.len() > 10_000, "the relay saw {} bytes", seen.len());
    for row in read_csv(&files[0]) {
        assert!(!contains(&seen, row[2].as_bytes()) || row[2].len() < 6, "the relay read DNI {}", row[2]);
        assert!(!contains(&seen, row[1].as_bytes()) || row[1].len() < 6, "the relay read a name");
    }

    let dir2 = tempfile::tempdir().unwrap();
    let keys2 = Keys::make(dir2.path(), 1);
    let server2 = TestServer::start(1, &env_refs(&keys2.server_env()));
    let tamper = Relay::start(server2.port, Some(4096));
    let mut fooled =
        agency(data.path(), 1, &format!("127.0.0.1:{}", tamper.port), &files[0], 100, &env_refs(&keys2.agency_env(1)));
    let status = fooled.wait_exit(STEP);
    let logs = fooled.logs.until_eof().join("\n");
    assert!(!status.success(), "the agency trusted a tampered stream:\n{logs}");
    assert!(!logs.contains("consulta_ganadores | result: success"), "{logs}");
    let stderr = fooled.stderr();
    assert!(stderr.contains("TLS with 127.0.0.1:") && stderr.lines().count() == 1, "{stderr}");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_wrong_ca_or_a_wrong_name_is_final_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let files = lottery::tools::dataset::generate(data.path(), 1, 10, 3).unwrap();
    let keys = Keys::make(dir.path(), 1);
    let server = TestServer::start(1, &env_refs(&keys.server_env()));
    let stranger = tempfile::tempdir().unwrap();
    let other_ca = Keys::make(stranger.path(), 1).path("ca.pem");
    let cases: [(&str, Vec<(String, String)>); 2] = [
        ("UnknownIssuer", vec![("CLI_TLS_CA".into(), other_ca)]),
        ("not valid for name", vec![("CLI_TLS_NAME".into(), "lottery.example".into())]),
    ];
    for (why, extra) in cases {
        let mut env = keys.agency_env(1);
        env.extend(extra);
        // A long retry window: the failure must be final, not waited out.
        env.push(("CLI_RETRY_TIMEOUT_MS".into(), "60000".into()));
        let mut proc = agency(data.path(), 1, &server.address(), &files[0], 100, &env_refs(&env));
        let status = proc.wait_exit(STEP);
        assert!(!status.success(), "{why}");
        let stderr = proc.stderr();
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(why), "{why}: {stderr}");
    }
}

#[test]
fn an_agency_with_a_wrong_token_fails_at_once_and_its_pipelined_batches_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let files = lottery::tools::dataset::generate(data.path(), 2, 2_000, 3).unwrap();
    let keys = Keys::make(dir.path(), 2);
    let mut server = TestServer::start(2, &env_refs(&keys.server_env()));
    // Agency 1 with agency 2's token: its first batches go behind its HELLO, before the refusal.
    let mut env = keys.agency_env(1);
    env.retain(|(k, _)| k != "CLI_TOKEN_FILE");
    env.push(("CLI_TOKEN_FILE".into(), keys.path("agency-2.token")));
    // A long retry window: the refusal must be final, heard the first time, not waited out.
    env.push(("CLI_RETRY_TIMEOUT_MS".into(), "60000".into()));
    let mut proc = agency(data.path(), 1, &server.address(), &files[0], 20, &env_refs(&env));
    let status = proc.wait_exit(STEP);
    assert_eq!(status.code(), Some(1), "{status}");
    let stderr = proc.stderr();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("ERR AUTH"), "{stderr}");
    let logs = proc.logs.until_eof();
    assert!(!logs.iter().any(|l| l.contains("action: reconnect")), "{logs:#?}");
    server.proc.logs.wait_for("action: hello | result: fail | agency: 1");
    let mut tls = TlsClient::connect(server.port, &keys.path("ca.pem"));
    assert_eq!(tls.send("STATUS"), "STATUS agencies_done=0/2 bets=0 drawn=false");
}

#[test]
fn a_second_server_on_the_same_storage_changes_no_byte_and_says_who_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, server) = secure_server(dir.path(), &[]);
    let mut tls = TlsClient::connect(server.port, &keys.path("ca.pem"));
    assert_eq!(tls.send(&format!("HELLO 1 {}", keys.token(1))), "OK 0");
    assert_eq!(tls.send("BET Ana,Paz,42,2000-01-01,7574"), "OK 1");
    let before = fs::read(server.bets_path()).unwrap();
    let mut env = keys.server_env();
    env.extend([
        ("SERVER_STORAGE_PATH".to_owned(), server.bets_path().to_str().unwrap().to_owned()),
        ("SERVER_PORT".to_owned(), "0".to_owned()),
        ("SERVER_IP".to_owned(), "127.0.0.1".to_owned()),
    ]);
    let (status, _, stderr) =
        run_to_exit("second lottery-server", command(common::server::SERVER, dir.path(), &env_refs(&env)));
    assert!(!status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("in use by another lottery-server") && stderr.contains(&format!("pid {}", server.proc.pid())),
        "{stderr}"
    );
    assert_eq!(fs::read(server.bets_path()).unwrap(), before);
    // The first server goes on with its round.
    assert_eq!(tls.send("BET Ana,Paz,43,2000-01-01,1"), "OK 2");
}

#[test]
fn protected_mode_warns_and_still_serves_the_nc_session_from_loopback() {
    let mut server = TestServer::start(AGENCIES, &[]);
    server.proc.logs.wait_for("action: agency_keys | result: success | enabled: false");
    let mut client: Client = server.client();
    assert_eq!(client.send("HELLO 1"), "OK 0");
}

#[test]
fn a_waiter_is_released_when_its_client_hangs_up_and_told_when_it_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, mut server) = secure_server(dir.path(), &[("LOGGING_LEVEL", "DEBUG")]);
    let ca = keys.path("ca.pem");
    // Agency 1 waits for the draw, then hangs up: its socket is watched, so its thread is freed.
    let mut leaving = TlsClient::connect(server.port, &ca);
    assert_eq!(leaving.send(&format!("HELLO 1 {}", keys.token(1))), "OK 0");
    assert_eq!(leaving.send("DONE"), "OK");
    leaving.write(b"WINNERS\n").unwrap();
    drop(leaving);
    server.proc.logs.wait_for("action: winners | result: fail | agency: 1 | error: the client hung up");
    // Agency 2 waits, and a newer session of agency 2 takes over: the waiter hears why it ends.
    let hello = format!("HELLO 2 {}", keys.token(2));
    let mut older = TlsClient::connect(server.port, &ca);
    assert_eq!(older.send(&hello), "OK 0");
    older.write(b"WINNERS\n").unwrap();
    let mut newer = TlsClient::connect(server.port, &ca);
    assert_eq!(newer.send(&hello), "OK 0");
    let said = older.read_line().expect("the waiting session is told why it ends");
    assert!(said.starts_with("ERR REPLACED "), "{said}");
    assert_eq!(newer.send("STATUS"), "STATUS agencies_done=1/5 bets=0 drawn=false");
}
