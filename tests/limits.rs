//! What one client can hold: the idle timeout, a per-request deadline, the connection limit.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::TestServer;

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
    let mut writer = client.writer();
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
    let start = Instant::now();
    let reply = client.try_read_line();
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    trickle.join().unwrap();
    let reply = reply.expect("a reply").expect("a reply before the close");
    assert!(reply.starts_with("ERR TIMEOUT "), "{reply:?}");
    assert!(took < Duration::from_millis(1500), "a trickling client held its connection for {took:?}");
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
fn the_oldest_guest_makes_room_and_an_agency_is_no_guest() {
    let server = TestServer::start(
        1,
        &[("SERVER_MAX_CONNECTIONS", "3"), ("SERVER_MAX_GUESTS", "2"), ("SERVER_MAX_GUESTS_PER_IP", "2")],
    );
    let mut first = server.client();
    let mut second = server.client();
    // Both are served (so both are counted) before the third arrives.
    assert_eq!(first.send("PING"), "PONG");
    assert_eq!(second.send("PING"), "PONG");
    let mut third = server.client();
    assert_eq!(third.send("PING"), "PONG");
    // The first, the oldest guest, made room for the third: it is told why, and closed.
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
