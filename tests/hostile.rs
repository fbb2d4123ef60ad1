//! Hostile clients beside an honest round: the round completes with exactly the honest bets
//! and winners, every hostile client is answered and cut off, and the server still shuts down
//! cleanly.

mod common {
    pub mod agency;
    pub mod client;
    pub mod keys;
    pub mod log_line;
    pub mod process;
    pub mod run;
    pub mod server;
    pub mod server_keys;
    pub mod server_temp;
    pub mod store;
    pub mod tls;
}

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::thread;

use common::agency::agency;
use common::keys::{Keys, env_refs};
use common::log_line::log_field;
use common::process::{Proc, STEP};
use common::server::TestServer;
use common::store::{assert_store, expected_store, read_csv, winners_of};
use common::tls::TlsClient;
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

    server.proc.signal(libc::SIGTERM);
    server.proc.wait_success(STEP);
    let lines = server.proc.logs.until_eof();
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

/// The documented limits on what peers can make the server log: guest lines logged as they are
/// each second (all guests together), and refusals each second per agency; past them, one
/// summary line a second.
const GUEST_LINES_PER_SECOND: usize = 50;
const REFUSALS_PER_SECOND: usize = 5;
/// The documented bound on log bytes a second, from all strangers together and from each agency.
const MAX_LOG_BYTES_PER_SECOND: usize = 16 * 1024;

/// Requests a guest may make before `HELLO`, and refusals in a row an agency gets, before the
/// connection is closed.
const REQUESTS_BEFORE_CLOSE: usize = 16;

/// A guest's `BATCH` before `HELLO`, a one-row batch with a valid row, one more than a guest may
/// make (the last is refused `ERR BUSY`), as one write.
fn guest_batches() -> Vec<u8> {
    "BATCH 0 1\nAna,Paz,1,2000-01-01,1\n".repeat(REQUESTS_BEFORE_CLOSE + 1).into_bytes()
}

/// Strangers over TLS that send batches before `HELLO`, and agency 1 that sends invalid one-row
/// batches, reconnecting each time the server closes it: the server's log grows at no more than
/// the documented rate, and every refusal is logged or counted.
#[test]
fn a_flood_of_refused_batches_logs_at_a_bounded_rate() {
    const STRANGERS: usize = 60;
    const AGENCY_CONNECTIONS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::make(dir.path(), 2);
    let mut server = TestServer::start(2, &env_refs(&keys.server_env()));
    let (port, ca) = (server.port, keys.path("ca.pem"));
    let strangers: Vec<_> = (0..3)
        .map(|_| {
            let ca = ca.clone();
            thread::spawn(move || {
                for _ in 0..STRANGERS / 3 {
                    let mut tls = TlsClient::connect(port, &ca);
                    let _ = tls.write(&guest_batches());
                    while tls.read_line().is_some() {}
                }
            })
        })
        .collect();
    let hello = format!("HELLO 1 {}", keys.token(1));
    for _ in 0..AGENCY_CONNECTIONS {
        let mut tls = TlsClient::connect(port, &ca);
        assert!(tls.send(&hello).starts_with("OK "));
        tls.write("BATCH 0 1\nAna2,Paz,1,2000-01-01,1\n".repeat(REQUESTS_BEFORE_CLOSE).as_bytes()).unwrap();
        let replies: Vec<String> = std::iter::from_fn(|| tls.read_line()).collect();
        assert_eq!(replies.len(), REQUESTS_BEFORE_CLOSE, "{replies:?}");
        assert!(replies.iter().all(|r| r.starts_with("ERR BAD_BET row 1: first_name has '2'")), "{replies:?}");
        assert!(replies[REQUESTS_BEFORE_CLOSE - 1].ends_with("16 requests refused in a row, closing"), "{replies:?}");
    }
    strangers.into_iter().for_each(|s| s.join().unwrap());
    let lines = flood_lines(&mut server);
    let (agency, guests): (Vec<&String>, Vec<&String>) =
        lines.iter().partition(|l| l.contains("agency: 1 |") || l.contains("error: BAD_BET"));
    // Every refused batch is logged or counted. A summary counts the agency's refusals of every
    // kind: its previous session, closed but not yet gone when the next `HELLO` arrives, may be
    // replaced, and that is one more refusal (`REPLACED`), at most one per reconnection.
    let refused = counted(&agency, "error: BAD_BET", "count");
    let replaced = refused.saturating_sub(AGENCY_CONNECTIONS * REQUESTS_BEFORE_CLOSE);
    assert!(refused >= AGENCY_CONNECTIONS * REQUESTS_BEFORE_CLOSE, "{refused} refusals logged or counted");
    assert!(
        replaced == 0 || (replaced < AGENCY_CONNECTIONS && agency.iter().any(|l| l.contains("REPLACED"))),
        "{refused} refusals logged or counted, {replaced} more than the batches refused"
    );
    assert_eq!(counted(&guests, "error: NO_AGENCY", "batches"), STRANGERS * REQUESTS_BEFORE_CLOSE);
    assert_bounded(&lines, &guests, GUEST_LINES_PER_SECOND, "strangers");
    assert_bounded(&lines, &agency, REFUSALS_PER_SECOND, "agency 1");
}

/// The same for strangers over plain text, on a server without TLS.
#[test]
fn a_flood_of_batches_before_hello_in_plain_text_logs_at_a_bounded_rate() {
    const STRANGERS: usize = 120;
    let mut server = TestServer::start(2, &[]);
    let port = server.port;
    let strangers: Vec<_> = (0..3)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..STRANGERS / 3 {
                    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                    let mut stream = TcpStream::connect_timeout(&addr, STEP).unwrap();
                    stream.set_read_timeout(Some(STEP)).unwrap();
                    stream.set_write_timeout(Some(STEP)).unwrap();
                    let _ = stream.write_all(&guest_batches());
                    let mut replies = Vec::new();
                    let _ = stream.read_to_end(&mut replies);
                }
            })
        })
        .collect();
    strangers.into_iter().for_each(|s| s.join().unwrap());
    let lines = flood_lines(&mut server);
    let guests: Vec<&String> = lines.iter().collect();
    assert_eq!(counted(&guests, "error: NO_AGENCY", "batches"), STRANGERS * REQUESTS_BEFORE_CLOSE);
    assert_bounded(&lines, &guests, GUEST_LINES_PER_SECOND, "strangers");
}

/// The server's lines from its start to its shutdown (summaries of what was counted included),
/// after a SIGTERM.
fn flood_lines(server: &mut TestServer) -> Vec<String> {
    server.proc.signal(libc::SIGTERM);
    server.proc.wait_success(STEP);
    let lines = server.proc.logs.until_eof();
    let start = lines.iter().position(|l| l.contains("action: listen | result: success")).unwrap();
    let shutdown_lines = ["action: close_", "action: join_threads", "action: shutdown"];
    lines[start + 1..].iter().filter(|l| !shutdown_lines.iter().any(|s| l.contains(s))).cloned().collect()
}

/// How many events `lines` account for: each line holding `needle`, plus the `key` count of
/// each summary line.
fn counted(lines: &[&String], needle: &str, key: &str) -> usize {
    let summary = |l: &&&String| l.contains("action: guests") || l.contains("action: refusals");
    let logged = lines.iter().filter(|l| !summary(l) && l.contains(needle)).count();
    let summarised: usize =
        lines.iter().filter(summary).filter_map(|l| log_field(l, key).map(|n| n.parse::<usize>().unwrap())).sum();
    logged + summarised
}

/// `part`, some of `all` (the flood's lines), holds no more than `per_second` lines, plus one
/// summary, for each one-second window that can overlap the flood, and no more than the
/// documented bytes a second. A rate: the span is read from the lines' own timestamps.
fn assert_bounded(all: &[String], part: &[&String], per_second: usize, who: &str) {
    let seconds: Vec<i64> = all.iter().map(|l| second_of(l)).collect();
    let span = (seconds.iter().max().unwrap() - seconds.iter().min().unwrap() + 1) as usize;
    // Windows last at least a second: at most `span + 1` of them overlap the flood, and the
    // last one's counts are said at shutdown.
    let windows = span + 1;
    let bytes: usize = part.iter().map(|l| l.len() + 1).sum();
    eprintln!("{who}: {} lines, {bytes} bytes of log in {span} s ({} bytes/s)", part.len(), bytes / span);
    assert!(part.len() <= windows * (per_second + 1), "{who}: {} lines in {span} s", part.len());
    assert!(bytes <= windows * MAX_LOG_BYTES_PER_SECOND, "{who}: {bytes} bytes in {span} s");
}

/// A log line's time, `YYYY-MM-DD HH:MM:SS …`, in seconds.
fn second_of(line: &str) -> i64 {
    let number = |range: std::ops::Range<usize>| line[range].parse::<i64>().unwrap();
    let date = time::Date::from_calendar_date(
        number(0..4) as i32,
        time::Month::try_from(number(5..7) as u8).unwrap(),
        number(8..10) as u8,
    )
    .unwrap();
    i64::from(date.to_julian_day()) * 86_400 + number(11..13) * 3600 + number(14..16) * 60 + number(17..19)
}
