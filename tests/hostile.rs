//! Hostile clients beside an honest round: the round completes with exactly the honest bets
//! and winners, every hostile client is answered and cut off, and the server still shuts down
//! cleanly.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use common::{Proc, STEP, TestServer, agency, assert_store, expected_store, log_field, read_csv, winners_of};
use lottery::tools::hostile::{self, Kind};

const AGENCIES: u32 = 5;
const BETS: u64 = 2_000;
const HOSTILE_PER_KIND: usize = 30;

#[test]
fn an_honest_round_completes_beside_two_hundred_hostile_clients() {
    let data = tempfile::tempdir().unwrap();
    let files = lottery::tools::dataset::generate(data.path(), AGENCIES, BETS, 42).unwrap();
    // Few connections and a short idle timeout: the hostile clients overflow the guest places
    // (the oldest is closed with ERR BUSY for each newcomer) and are cut off quickly; the
    // agencies retry until they get in. The server is
    // in protected mode (loopback is trusted), so the hostile clients get an agency of their
    // own, the last one: its DONE, said once they are all dealt with, lets the draw happen.
    let mut server = TestServer::start(
        AGENCIES + 1,
        &[
            ("SERVER_MAX_CONNECTIONS", "40"),
            ("SERVER_MAX_GUESTS", "34"),
            ("SERVER_MAX_GUESTS_PER_IP", "34"),
            ("SERVER_IDLE_TIMEOUT_MS", "500"),
        ],
    );
    let address = server.address();
    let addr: SocketAddr = address.parse().unwrap();

    let hostile: Vec<_> = (0..HOSTILE_PER_KIND * Kind::ALL.len())
        .map(|i| thread::spawn(move || hostile::run(Kind::nth(i), addr, i as u64, AGENCIES + 1)))
        .collect();
    let mut agencies: Vec<Proc> = files
        .iter()
        .zip(1..)
        .map(|(file, id)| agency(data.path(), id, &address, file, 100, &[("CLI_RETRY_TIMEOUT_MS", "60000")]))
        .collect();

    let reports: Vec<hostile::Report> = hostile.into_iter().map(|h| h.join().unwrap()).collect();
    check_hostile_replies(&reports);
    let mut hostiles_agency = server.client();
    assert!(hostiles_agency.send(&format!("HELLO {}", AGENCIES + 1)).starts_with("OK "));
    assert_eq!(hostiles_agency.send("DONE"), "OK");

    for (agency, file) in agencies.iter_mut().zip(&files) {
        let status = agency.wait_exit(STEP * 6);
        assert!(status.success(), "{} failed:\n{}", agency.name, agency.logs.until_eof().join("\n"));
        let line = agency.logs.wait_for("action: consulta_ganadores | result: success");
        let got: usize = log_field(&line, "cant_ganadores").unwrap().parse().unwrap();
        assert_eq!(got, winners_of(&read_csv(file)).len(), "{}", agency.name);
    }

    // Exactly the honest bets: nothing of a half batch, a bad row or garbage got in.
    assert_store(&server.bets_path(), &expected_store(&files));

    server.proc.sigterm();
    let status = server.proc.wait_exit(Duration::from_secs(2));
    assert!(status.success(), "the server exited with {status}");
    let lines = server.logs().until_eof();
    assert!(lines.last().is_some_and(|l| l.ends_with("action: shutdown | result: success")));
    assert_eq!(lines.iter().filter(|l| l.contains("action: sorteo | result: success")).count(), 1);
}

/// Every hostile client was dealt with by the server, each kind in its own way (or turned
/// away with `ERR BUSY` when the server was full).
fn check_hostile_replies(reports: &[hostile::Report]) {
    // Some may be turned away (the ceiling), none need be: a newcomer waits for a guest place
    // while the guests are progressing, and takes a stalled one's.
    let mut seen: BTreeMap<Kind, Vec<String>> = BTreeMap::new();
    for report in reports {
        assert!(report.closed_by_server, "the server never closed a {:?} client: {:?}", report.kind, report.replies);
        if report.replies.first().is_some_and(|r| r == "ERR BUSY") {
            assert_eq!(report.replies.len(), 1, "{report:?}");
            continue;
        }
        seen.entry(report.kind).or_default().extend(report.replies.iter().cloned());
    }
    let expect = |kind: Kind, reply: &str| {
        let replies = seen.get(&kind).unwrap_or_else(|| panic!("every {kind:?} client was turned away"));
        assert!(replies.iter().any(|r| r == reply), "{kind:?} never got {reply}: {replies:?}");
    };
    expect(Kind::Idle, "ERR TIMEOUT");
    expect(Kind::Slowloris, "ERR TIMEOUT");
    expect(Kind::Oversized, "ERR TOO_LONG");
    expect(Kind::Garbage, "ERR UNKNOWN");
    // Garbage of many lines reaches the cap on requests before HELLO (ERR BUSY); a short one, QUIT.
    let garbage = &seen[&Kind::Garbage];
    assert!(garbage.iter().any(|r| r == "BYE" || r == "ERR BUSY"), "{garbage:?}");
    expect(Kind::BadBets, "ERR NO_AGENCY");
    expect(Kind::BadBets, "ERR BAD_BET");
    expect(Kind::OutOfRange, "ERR BAD_AGENCY");
    for (kind, replies) in &seen {
        assert!(!replies.iter().any(|r| r == "ERR STORAGE"), "{replies:?}");
        // A batch past what the hostile clients' agency holds: refused for its offset. That
        // agency says DONE only after them, so nothing is refused as closed.
        if *kind == Kind::OutOfRange {
            assert!(replies.iter().any(|r| r == "ERR BAD_REQUEST"), "{replies:?}");
        }
        assert!(!replies.iter().any(|r| r == "ERR CLOSED"), "{kind:?}: {replies:?}");
    }
}
