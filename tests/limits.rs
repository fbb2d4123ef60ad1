//! What one client can hold: the idle timeout, a per-request deadline, the connection limit;
//! and what a crowd may: every agency connecting at once gets in.

mod common {
    pub mod client;
    pub mod client_eof;
    pub mod client_silence;
    pub mod keys;
    pub mod log_line;
    pub mod process;
    pub mod run;
    pub mod server;
    pub mod server_keys;
    pub mod server_temp;
    pub mod tls;
}

use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::keys::{Keys, env_refs};
use common::log_line::log_field;
use common::process::STEP;
use common::server::TestServer;
use common::tls::TlsClient;

#[test]
fn a_silent_connection_is_told_and_closed() {
    let server = TestServer::start(1, &[("SERVER_IDLE_TIMEOUT_MS", "300")]);
    let start = Instant::now();
    let mut silent = server.client();
    let reply = silent.read_line();
    let took = start.elapsed();
    assert!(reply.starts_with("ERR TIMEOUT "), "{reply:?}");
    silent.expect_eof();
    assert!(took >= Duration::from_millis(300), "cut off after {took:?}");
    // The server goes on serving.
    assert_eq!(server.client().send("PING"), "PONG");
}

#[test]
fn a_client_trickling_one_byte_every_100ms_is_cut_off() {
    let server = TestServer::start(1, &[("SERVER_IDLE_TIMEOUT_MS", "300")]);
    let mut client = server.client();
    let mut writer = client.stream.try_clone().expect("clone socket");
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            // A request that never ends: one byte per 100 ms, each well within the idle timeout.
            // The pause is the behaviour under test, not a synchronisation.
            while !stop.load(Ordering::Relaxed) && writer.write_all(b"P").is_ok() {
                thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // Cut off while it still trickles: the deadline is the request's, not the last byte's.
    let reply = client.try_read_line();
    let still_trickling = !trickle.is_finished();
    stop.store(true, Ordering::Relaxed);
    trickle.join().unwrap();
    let reply = reply.expect("a reply").expect("a reply before the close");
    assert!(reply.starts_with("ERR TIMEOUT "), "{reply:?}");
    assert!(still_trickling, "the server waited until the client stopped");
    client.expect_eof();
}

#[test]
fn a_connection_waiting_for_the_draw_is_not_idle() {
    let server = TestServer::start(2, &[("SERVER_IDLE_TIMEOUT_MS", "300")]);
    let mut waiting = server.client();
    assert_eq!(waiting.send("HELLO 1"), "OK 0");
    assert_eq!(waiting.send("DONE"), "OK");
    waiting.write(b"WINNERS\n").unwrap();
    // A connection opened after that one's last request times out, so the idle timeout has
    // passed for the waiting one as well; it must still be waiting.
    let mut silent = server.client();
    assert!(silent.read_line().starts_with("ERR TIMEOUT "));
    waiting.expect_silence(Duration::from_millis(100));
    let mut last = server.client();
    assert_eq!(last.send("HELLO 2"), "OK 0");
    assert_eq!(last.send("DONE"), "OK");
    assert_eq!(waiting.read_line(), "WINNERS 0");
}

#[test]
fn a_stalled_guest_makes_room_and_an_agency_is_no_guest() {
    let server = TestServer::start(
        1,
        &[("SERVER_MAX_CONNECTIONS", "3"), ("SERVER_MAX_GUESTS", "2"), ("SERVER_MAX_GUESTS_PER_IP", "2")],
    );
    let mut first = server.client();
    let mut second = server.client();
    // Both are served (so both are counted) before the third arrives.
    assert_eq!(first.send("PING"), "PONG");
    assert_eq!(second.send("PING"), "PONG");
    // The third waits until a guest has stalled (sent nothing for a while), then takes the
    // place of the one stalled longest: the first.
    let mut third = server.client();
    assert_eq!(third.send("PING"), "PONG");
    let reply = first.read_line();
    assert!(reply.starts_with("ERR BUSY "), "{reply:?}");
    first.expect_eof();
    assert_eq!(second.send("STATUS"), "STATUS agencies_done=0/1 bets=0 drawn=false");
    // An agency leaves the guests: two more guests come and go, and it stays.
    assert_eq!(second.send("HELLO 1"), "OK 0");
    let mut fourth = server.client();
    assert_eq!(fourth.send("PING"), "PONG");
    let mut fifth = server.client();
    assert_eq!(fifth.send("PING"), "PONG");
    assert!(third.read_line().starts_with("ERR BUSY "));
    assert_eq!(second.send("BET Ana,Paz,1,2000-01-01,1"), "OK 1");
}

#[test]
fn a_line_over_8_kib_is_refused_and_closed() {
    let server = TestServer::start(1, &[]);
    let mut client = server.client();
    let mut line = vec![b'X'; 8193];
    line.push(b'\n');
    client.write(&line).unwrap();
    let reply = client.read_line();
    assert!(reply.starts_with("ERR TOO_LONG "), "{reply:?}");
    client.expect_eof();
    // A line of exactly 8192 bytes is read (and refused as no request), not cut off.
    let mut client = server.client();
    let mut line = vec![b'X'; 8192];
    line.push(b'\n');
    client.write(&line).unwrap();
    assert!(client.read_line().starts_with("ERR UNKNOWN "));
    assert_eq!(client.send("PING"), "PONG");
}

/// More agencies than guest places (256), and than places per address (64), connect over TLS
/// from one address at the same instant, with the default settings: every one gets in at its
/// first try, and no guest is evicted: a crowd is not a flood.
#[test]
fn a_crowd_of_agencies_from_one_address_all_get_in_at_once() {
    const CROWD: u32 = 300;
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::make(dir.path(), CROWD);
    let mut server = TestServer::start(CROWD, &env_refs(&keys.server_env()));
    let (port, ca) = (server.port, keys.path("ca.pem"));
    let tokens: Vec<String> = (1..=CROWD).map(|id| keys.token(id)).collect();
    let start = Arc::new(Barrier::new(CROWD as usize));
    let all_in = Arc::new(Barrier::new(CROWD as usize + 1));
    let crowd: Vec<_> = (1..=CROWD)
        .zip(tokens)
        .map(|(id, token)| {
            let (start, all_in, ca) = (Arc::clone(&start), Arc::clone(&all_in), ca.clone());
            thread::spawn(move || {
                start.wait();
                let hello = panic::catch_unwind(AssertUnwindSafe(|| {
                    let mut agency = TlsClient::connect(port, &ca);
                    let reply = agency.send(&format!("HELLO {id} {token}"));
                    (agency, reply)
                }));
                // Connected together: every agency holds its connection until all are in (and
                // one that failed still arrives here, so that none waits for it for ever).
                all_in.wait();
                hello.map_or_else(|_| "no reply".to_owned(), |(_, reply)| reply)
            })
        })
        .collect();
    all_in.wait();
    let replies: Vec<String> = crowd.into_iter().map(|t| t.join().unwrap()).collect();
    let refused: Vec<&String> = replies.iter().filter(|r| r.as_str() != "OK 0").collect();
    assert!(refused.is_empty(), "{} of {CROWD} agencies not let in: {:?}", refused.len(), refused.first());
    // Shut down, then look for any eviction in the whole log (counted or logged).
    let mut probe = server.client();
    assert_eq!(probe.send("PING"), "PONG");
    server.proc.signal(libc::SIGTERM);
    server.proc.wait_success(STEP);
    let lines = server.proc.logs.until_eof();
    let evicted: u64 = lines
        .iter()
        .map(|l| {
            if l.contains("action: evict_guest") {
                1
            } else {
                log_field(l, "evicted").and_then(|n| n.parse().ok()).unwrap_or(0)
            }
        })
        .sum();
    assert_eq!(evicted, 0, "guests evicted in a crowd of agencies");
}
