//! Nothing acknowledged is lost: a round whose server is killed with SIGKILL (or stopped with
//! SIGTERM) at random moments and restarted on the same files still ends with every bet stored
//! exactly once, every agency with its winners, and one draw.

mod common;

use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{
    Proc, STEP, TestServer, agency, assert_store, expected_store, log_field, read_csv, winners_of, winners_reply,
};

const AGENCIES: u32 = 5;
const BETS: u64 = 3_000;
const LIVES: usize = 6;

/// The seed of the kill moments: `LOTTERY_TEST_SEED`, or the clock (a failure names it, to
/// replay the run).
fn seed() -> u64 {
    std::env::var("LOTTERY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(7574))
}

/// A port that was free a moment ago: every life of the server must listen on the same one,
/// since the agencies keep reconnecting to it.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap().port()
}

/// Draws logged by a server that has exited (its whole output is read first).
fn sorteos(server: &mut TestServer) -> usize {
    server.logs().until_eof().iter().filter(|l| l.contains("action: sorteo | result: success")).count()
}

/// How a life of the server ends.
#[derive(Clone, Copy)]
enum Stop {
    /// SIGKILL: no warning, nothing flushed.
    Kill,
    /// SIGTERM: it must exit 0 within 2 s, its last line `shutdown`.
    Term,
}

impl Stop {
    fn apply(self, server: &mut TestServer) {
        match self {
            Stop::Kill => {
                server.proc.child.kill().unwrap();
                server.proc.wait_exit(STEP);
            }
            Stop::Term => {
                server.proc.sigterm();
                let status = server.proc.wait_exit(Duration::from_secs(2));
                assert!(status.success(), "exit status {status} on SIGTERM");
                let last = server.logs().until_eof().last().cloned().unwrap_or_default();
                assert!(last.ends_with("action: shutdown | result: success"), "last line {last:?}");
            }
        }
    }
}

#[test]
fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    round_across_lives(Stop::Kill);
}

#[test]
fn sigterm_mid_round_loses_and_duplicates_nothing() {
    round_across_lives(Stop::Term);
}

/// [`lives`] with a fresh seed; a failure's panic message ends with the seed that replays it,
/// so that it shows wherever the failure does.
fn round_across_lives(how: Stop) {
    let seed = seed();
    if let Err(panic) = std::panic::catch_unwind(|| lives(how, seed)) {
        let why = match (panic.downcast_ref::<String>(), panic.downcast_ref::<&str>()) {
            (Some(why), _) => why.clone(),
            (None, Some(why)) => (*why).to_owned(),
            (None, None) => "a panic without a message".to_owned(),
        };
        panic!("{why}\nreplay with LOTTERY_TEST_SEED={seed}");
    }
}

/// A 5-agency round whose server is stopped `LIVES` times, each after a random number of
/// acknowledged batches, and once more after the draw; every life restarts on the same files.
fn lives(how: Stop, seed: u64) {
    let mut rng = seed | 1;
    let mut next = move |below: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % below
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let files = lottery::tools::dataset::generate(&data, AGENCIES, BETS, 99).unwrap();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let start = || TestServer::start_in(dir.path(), AGENCIES, port, &[]);

    let mut server = start();
    // Small batches: many of them, so that every stop lands mid-round.
    let retry = [("CLI_RETRY_TIMEOUT_MS", "30000")];
    let mut agencies: Vec<Proc> =
        files.iter().zip(1..).map(|(file, id)| agency(dir.path(), id, &address, file, 10, &retry)).collect();

    // Each life stores a random number of batches (at most 1,500 are sent in all), then stops;
    // the next life starts on the same files.
    let mut draws = 0;
    for life in 1..=LIVES {
        let batches = 1 + next(150) as usize;
        server.logs().wait_count("action: apuesta_recibida | result: success", batches);
        how.apply(&mut server);
        draws += sorteos(&mut server);
        println!("life {life}: stopped after {batches} batches");
        server = start();
        let resumed = server.logs().wait_for("action: open_storage | result: success");
        assert!(log_field(&resumed, "bets").is_some_and(|b| b != "0"), "{resumed}");
    }

    for (agency, file) in agencies.iter_mut().zip(&files) {
        let status = agency.wait_exit(STEP * 6);
        assert!(status.success(), "{} failed:\n{}", agency.name, agency.logs.until_eof().join("\n"));
        let line = agency.logs.wait_for("action: consulta_ganadores | result: success");
        let want = winners_of(&read_csv(file)).len().to_string();
        assert_eq!(log_field(&line, "cant_ganadores"), Some(want.as_str()), "{}", agency.name);
        assert!(!agency.logs.seen.iter().any(|l| l.contains("result: fail")), "{}", agency.name);
    }

    // Stopped after the draw too: the next life knows it and answers WINNERS at once, without
    // drawing again.
    server.logs().wait_for("action: sorteo | result: success");
    how.apply(&mut server);
    draws += sorteos(&mut server);
    let mut server = start();
    let mut client = server.client();
    assert_eq!(client.send("STATUS"), format!("STATUS agencies_done=5/5 bets={} drawn=true", BETS * 5));
    for (file, id) in files.iter().zip(1..) {
        assert_eq!(client.send(&format!("HELLO {id}")), format!("OK {BETS}"));
        assert_eq!(client.send("WINNERS"), winners_reply(&winners_of(&read_csv(file))));
    }
    server.proc.sigterm();
    assert!(server.proc.wait_exit(Duration::from_secs(2)).success());
    draws += sorteos(&mut server);
    assert_eq!(draws, 1, "the draw must be logged once over all the server's lives");

    // Exactly the agencies' bets, each once.
    assert_store(&dir.path().join("bets.csv"), &expected_store(&files));
}
