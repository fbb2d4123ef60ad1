//! A man in the middle between a client and the server.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread::{self, JoinHandle};

use super::process::STEP;

/// A man in the middle: forwards one connection at a time between a client and `upstream`,
/// keeps every byte it saw, and may flip one byte of what the server sends once the client
/// has sent `flip_after` bytes.
pub struct Relay {
    pub port: u16,
    /// Every byte that crossed, both ways.
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    _accept: JoinHandle<()>,
}

impl Relay {
    pub fn start(upstream: u16, flip_after: Option<usize>) -> Relay {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let captured = Arc::clone(&seen);
        let accept = thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
                let sent_up = Arc::new(AtomicUsize::new(0));
                let flipped = Arc::new(AtomicBool::new(false));
                for (from, to, upward) in [
                    (client.try_clone().expect("clone"), server.try_clone().expect("clone"), true),
                    (server, client, false),
                ] {
                    let (captured, sent_up, flipped) =
                        (Arc::clone(&captured), Arc::clone(&sent_up), Arc::clone(&flipped));
                    thread::spawn(move || pump(from, to, upward, &captured, &sent_up, &flipped, flip_after));
                }
            }
        });
        // The accept thread ends with the test process; the listener dies with it.
        Relay { port, seen, _accept: accept }
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    upward: bool,
    captured: &std::sync::Mutex<Vec<u8>>,
    sent_up: &std::sync::atomic::AtomicUsize,
    flipped: &std::sync::atomic::AtomicBool,
    flip_after: Option<usize>,
) {
    use std::sync::atomic::Ordering;
    let _ = from.set_read_timeout(Some(STEP * 6));
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        captured.lock().expect("capture").extend_from_slice(&buf[..n]);
        if upward {
            sent_up.fetch_add(n, Ordering::SeqCst);
        } else if flip_after.is_some_and(|after| sent_up.load(Ordering::SeqCst) >= after)
            && !flipped.swap(true, Ordering::SeqCst)
        {
            buf[n - 1] ^= 0x01;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
