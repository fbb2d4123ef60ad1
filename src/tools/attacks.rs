//! Attackers, for `lottery-round --attack` and the tests: the cheap ways a stranger (or a
//! botnet) could try to keep agencies out of a round, each run by many threads until told to
//! stop. Every attacker reconnects when the server closes it, so the pressure lasts; every
//! loop checks the stop flag at least every 200 ms, and every socket has timeouts, so that
//! stopping them is prompt and nothing of theirs outlives [`Attackers::stop`].
//!
//! Attacker threads run at the lowest CPU priority (`SCHED_IDLE`, see `lowest_priority`):
//! they stand in for a botnet's own machines, and on a shared machine a thousand busy attacker
//! threads would otherwise take the CPU from the server and agencies by their number alone,
//! whatever the server does. The server's work for them (accepts, handshakes, replies) runs at
//! normal priority and counts. `lottery-round` also runs them in a process and a scheduling
//! group of their own (see `tools::botnet`).
//!
//! The attackers hold no token: on a server with agency keys, what they may do is what a
//! stranger may. (In protected mode every loopback peer is trusted, so attacks make no sense
//! there and `lottery-round` refuses them.)

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection, StreamOwned};

/// How often an attacker looks at the stop flag.
const TICK: Duration = Duration::from_millis(200);

/// The kinds of attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Attack {
    /// `HELLO` with a wrong token (over TLS when the server has it), then `BET`, `DONE`, `WINNERS`.
    Impersonate,
    /// Connect, then nothing.
    Park,
    /// `PING` just under every timeout, to look alive.
    Refresh,
    /// One byte a second of a request that never ends.
    Trickle,
    /// Connect and close, as fast as possible.
    Churn,
    /// `STATUS` and `PING` as fast as possible, reading the replies.
    Flood,
    /// Requests pipelined without end, never reading a reply.
    NoRead,
    /// `HELLO` and `WINNERS` (as a waiting agency would), then hang up at once.
    HangupWaiter,
    /// A TLS ClientHello (made once per attacker, sent as canned bytes: no cryptography per
    /// connection), then silence: the server's flight is never answered.
    Stall,
    /// At the operator's metrics port, not the agencies': unknown paths, request heads over
    /// 8 KiB, requests that never end, and `/metrics` as fast as it is answered.
    Metrics,
}

impl Attack {
    pub const ALL: [Attack; 10] = [
        Attack::Impersonate,
        Attack::Park,
        Attack::Refresh,
        Attack::Trickle,
        Attack::Churn,
        Attack::Flood,
        Attack::NoRead,
        Attack::HangupWaiter,
        Attack::Stall,
        Attack::Metrics,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Attack::Impersonate => "impersonate",
            Attack::Park => "park",
            Attack::Refresh => "refresh",
            Attack::Trickle => "trickle",
            Attack::Churn => "churn",
            Attack::Flood => "flood",
            Attack::NoRead => "noread",
            Attack::HangupWaiter => "hangup-waiter",
            Attack::Stall => "stall",
            Attack::Metrics => "metrics",
        }
    }

    /// `all`, or kinds separated by commas.
    ///
    /// # Errors
    /// An unknown kind, naming the known ones.
    pub(crate) fn parse_list(text: &str) -> Result<Vec<Attack>, String> {
        if text == "all" {
            return Ok(Attack::ALL.to_vec());
        }
        text.split(',')
            .map(|name| {
                Attack::ALL.into_iter().find(|a| a.name() == name.trim()).ok_or_else(|| {
                    let known: Vec<&str> = Attack::ALL.iter().map(|a| a.name()).collect();
                    format!("unknown attack {name:?}: expected all, or some of {}", known.join(","))
                })
            })
            .collect()
    }
}

impl fmt::Display for Attack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where attackers connect from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sources {
    /// Each attacker from an address of its own in 127.0.0.0/8, from 127.1.0.1 on, as a botnet.
    Spread,
    /// All from 127.0.0.1, the agencies' own address.
    Same,
}

/// What the attackers aim at.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// The server speaks TLS: the impersonators do too (trusting this configuration).
    pub tls: Option<Arc<ClientConfig>>,
    pub agencies: u32,
    /// How often a `refresh` attacker pings: just under the server's timeout.
    pub refresh_every: Duration,
}

/// What the attackers of one kind got.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub(crate) attackers: usize,
    /// Connections made.
    pub connections: u64,
    /// Connections that could not be made (refused, timed out).
    pub(crate) failed_connects: u64,
    /// Replies, by their first words (`ERR BUSY`, `PONG`, …), and `closed` for every close by
    /// the server.
    pub(crate) replies: BTreeMap<String, u64>,
}

impl Report {
    fn merge(&mut self, other: Report) {
        self.attackers += other.attackers;
        self.connections += other.connections;
        self.failed_connects += other.failed_connects;
        for (reply, n) in other.replies {
            *self.replies.entry(reply).or_default() += n;
        }
    }

    fn reply(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let mut words = text.split(' ');
        let key = match (words.next(), words.next()) {
            (Some("ERR"), Some(code)) => format!("ERR {code}"),
            (Some(first), _) => first.to_owned(),
            (None, _) => String::new(),
        };
        *self.replies.entry(key).or_default() += 1;
    }

    /// Counts the whole lines of `bytes`, after what `pending` kept of the last read.
    fn lines(&mut self, pending: &mut Vec<u8>, bytes: &[u8]) {
        pending.extend_from_slice(bytes);
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            self.reply(&line[..line.len() - 1]);
        }
    }

    /// The replies as `ERR BUSY x3, closed x5`.
    pub(crate) fn replies_text(&self) -> String {
        let parts: Vec<String> = self.replies.iter().map(|(r, n)| format!("{r} x{n}")).collect();
        if parts.is_empty() { "nothing".to_owned() } else { parts.join(", ") }
    }
}

/// Running attackers of one kind.
pub struct Attackers {
    stop: Arc<AtomicBool>,
    connected: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Report>>,
}

/// Starts `count` attackers of `kind` against `target`.
pub fn launch(kind: Attack, count: usize, target: &Target, sources: Sources) -> Attackers {
    let stop = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicU64::new(0));
    let threads = (0..count)
        .filter_map(|i| {
            let (stop, target, counter) = (Arc::clone(&stop), target.clone(), Arc::clone(&connected));
            let source = match sources {
                Sources::Spread => Some(spread_address(i)),
                Sources::Same => None,
            };
            thread::Builder::new()
                .name(format!("attack-{kind}"))
                .stack_size(256 * 1024)
                .spawn(move || attacker(kind, &target, source, i as u64, &stop, &counter))
                .ok()
        })
        .collect();
    Attackers { stop, connected, threads }
}

impl Attackers {
    /// Connections made so far, by all of them.
    pub fn connected(&self) -> u64 {
        self.connected.load(Ordering::Relaxed)
    }

    /// Stops every attacker, waits for each to close its socket, and sums what they got.
    pub fn stop(self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        for thread in &self.threads {
            normal_priority(thread);
        }
        let mut total = Report::default();
        for thread in self.threads {
            if let Ok(report) = thread.join() {
                total.merge(report);
            }
        }
        total
    }
}

/// Puts this thread (only) in Linux's `SCHED_IDLE` class, or at nice 19 where that is refused;
/// if neither can be done the attack runs at full priority, which is harsher.
///
/// Nice 19 alone is not enough: the scheduler weighs each thread, a nice-19 thread 15 and a
/// normal one 1024, so 2,000 busy attacker threads outweighed the round's dozen threads 2.5 to
/// 1, and a round measured the attackers' own appetite (in an `impersonate` round, two thirds
/// of the CPU went to the attackers' key generation). A `SCHED_IDLE` thread weighs 3.
fn lowest_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler(2) on the calling thread (pid 0) with a valid parameter; it
    // reads `param` and touches no memory of ours.
    let idle = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0;
    if !idle {
        let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19);
    }
}

/// Puts an attacker told to stop back in the normal class, so that it gets the CPU to see it:
/// beside a busy loop on each core, 2,000 attackers at `SCHED_IDLE` took 70 to 90 s to end.
/// (One at nice 19, where `SCHED_IDLE` was refused, stays there: raising it needs a privilege.)
fn normal_priority(thread: &JoinHandle<Report>) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pthread_setschedparam(3) on a thread not yet joined, whose `pthread_t` is
    // therefore still valid (if it has ended, the call fails harmlessly); it reads `param` only.
    let _ = unsafe { libc::pthread_setschedparam(thread.as_pthread_t(), libc::SCHED_OTHER, &param) };
}

/// Attacker `i`'s own loopback address: 127.1.0.1, 127.1.0.2, … (never .0 or .255).
fn spread_address(i: usize) -> IpAddr {
    let (hi, lo) = ((i / 254) as u8, (i % 254 + 1) as u8);
    IpAddr::V4(Ipv4Addr::new(127, 1, hi, lo))
}

/// One attacker: connects, attacks until the server closes it, and again, until stopped.
fn attacker(
    kind: Attack,
    target: &Target,
    source: Option<IpAddr>,
    seed: u64,
    stop: &AtomicBool,
    connected: &AtomicU64,
) -> Report {
    lowest_priority();
    let mut report = Report { attackers: 1, ..Report::default() };
    let hello = if kind == Attack::Stall { client_hello(target) } else { Vec::new() };
    let mut seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while !stop.load(Ordering::SeqCst) {
        let Ok(stream) = connect(target.addr, source) else {
            report.failed_connects += 1;
            pause(stop, Duration::from_millis(50));
            continue;
        };
        report.connections += 1;
        connected.fetch_add(1, Ordering::Relaxed);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let result = match kind {
            Attack::Churn => Ok(()),
            Attack::Park => watch(&stream, stop, &mut report, None),
            Attack::Refresh => watch(&stream, stop, &mut report, Some((target.refresh_every, b"PING\n"))),
            Attack::Trickle => watch(&stream, stop, &mut report, Some((Duration::from_secs(1), b"S"))),
            Attack::Flood => flood(&stream, stop, &mut report),
            Attack::NoRead => no_read(&stream, stop),
            Attack::Impersonate => impersonate(stream.try_clone(), target, seed, stop, &mut report),
            Attack::HangupWaiter => hangup_waiter(stream.try_clone(), target, seed, &mut report),
            Attack::Stall => stall(&stream, &hello, stop, &mut report),
            Attack::Metrics => metrics(&stream, seed, stop, &mut report),
        };
        let _ = result;
        let _ = stream.shutdown(Shutdown::Both);
    }
    report
}

/// What an attacker's socket holds of what it sent and the server has not taken. The kernel
/// would let it grow to megabytes: 2,000 `noread` attackers then held gigabytes, and on this one
/// machine that memory counts against the same kernel limit for TCP as the server's, which
/// then dropped the agencies' packets (a round took up to 16 s). A botnet's send buffers are on
/// its own machines; 64 KiB still keeps the server's receive buffer full.
const ATTACKER_SEND_BUFFER: usize = 64 * 1024;

fn connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_send_buffer_size(ATTACKER_SEND_BUFFER)?;
    if let Some(source) = source {
        socket.bind(&SocketAddr::new(source, 0).into())?;
    }
    socket.connect_timeout(&addr.into(), Duration::from_secs(2))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TICK))?;
    stream.set_write_timeout(Some(TICK))?;
    Ok(stream)
}

/// Sleeps `pause`, or less if stopped meanwhile.
fn pause(stop: &AtomicBool, pause: Duration) {
    let until = Instant::now() + pause;
    while !stop.load(Ordering::SeqCst) && Instant::now() < until {
        thread::sleep(TICK.min(until.saturating_duration_since(Instant::now())));
    }
}

/// Reads what the server says until it closes (or stop), sending `every.1` every `every.0`.
fn watch(
    stream: &TcpStream,
    stop: &AtomicBool,
    report: &mut Report,
    every: Option<(Duration, &[u8])>,
) -> io::Result<()> {
    let mut next = Instant::now();
    let mut pending = Vec::new();
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::SeqCst) {
        if let Some((period, bytes)) = every
            && Instant::now() >= next
        {
            (&*stream).write_all(bytes)?;
            next = Instant::now() + period;
        }
        match (&*stream).read(&mut buf) {
            Ok(0) => {
                *report.replies.entry("closed".into()).or_default() += 1;
                return Ok(());
            }
            Ok(n) => report.lines(&mut pending, &buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `STATUS` and `PING` back to back, each reply read before the next request.
fn flood(stream: &TcpStream, stop: &AtomicBool, report: &mut Report) -> io::Result<()> {
    let mut reader = io::BufReader::new(stream);
    let mut line = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        (&*stream).write_all(if i.is_multiple_of(2) { b"PING\n" } else { b"STATUS\n" })?;
        line.clear();
        if io::BufRead::read_until(&mut reader, b'\n', &mut line)? == 0 {
            *report.replies.entry("closed".into()).or_default() += 1;
            return Ok(());
        }
        report.reply(line.strip_suffix(b"\n").unwrap_or(&line));
    }
    Ok(())
}

/// One abuse of the operator's HTTP listener a connection, chosen by `seed`; the reply's status
/// line is what the attacker got.
fn metrics(stream: &TcpStream, seed: u64, stop: &AtomicBool, report: &mut Report) -> io::Result<()> {
    let request = match seed % 4 {
        0 => b"GET /bets.csv HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        1 => [&b"GET /metrics HTTP/1.1\r\nX-Pad: "[..], &[b'a'; 9000], b"\r\n\r\n"].concat(),
        // A head that never ends: the listener's deadline, not the attacker, closes it.
        2 => b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec(),
        _ => b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
    };
    (&*stream).write_all(&request)?;
    let mut status = Vec::new();
    let mut reader = io::BufReader::new(stream);
    while !stop.load(Ordering::SeqCst) {
        match io::BufRead::read_until(&mut reader, b'\n', &mut status) {
            Ok(0) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&status);
                let code = line.split_whitespace().nth(1).unwrap_or("?");
                *report.replies.entry(format!("HTTP {code}")).or_default() += 1;
                // The rest (a body) is not the attack's business.
                let _ = io::copy(&mut reader.take(1 << 20), &mut io::sink());
                return Ok(());
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    *report.replies.entry("closed".into()).or_default() += 1;
    Ok(())
}

/// Requests written without end, never a reply read, until the server gives up on us.
fn no_read(stream: &TcpStream, stop: &AtomicBool) -> io::Result<()> {
    let burst = b"STATUS\n".repeat(512);
    while !stop.load(Ordering::SeqCst) {
        match (&*stream).write(&burst) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A plain or TLS line client over an attacker's socket.
enum Line {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Line {
    fn open(stream: TcpStream, target: &Target) -> io::Result<Line> {
        let Some(config) = &target.tls else { return Ok(Line::Plain(stream)) };
        let name = rustls::pki_types::ServerName::try_from("localhost").map_err(io::Error::other)?;
        let conn = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
        Ok(Line::Tls(Box::new(StreamOwned::new(conn, stream))))
    }

    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            Line::Plain(s) => s,
            Line::Tls(s) => &mut **s,
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A token that is nobody's.
fn fake_token(seed: u64) -> String {
    format!("{seed:016x}{:016x}", seed.rotate_left(17) ^ 0x5bd1_e995)
}

/// `HELLO` with a wrong token, then what an agency would say; reads until closed.
fn impersonate(
    stream: io::Result<TcpStream>,
    target: &Target,
    seed: u64,
    stop: &AtomicBool,
    report: &mut Report,
) -> io::Result<()> {
    let mut line = Line::open(stream?, target)?;
    let agency = seed % u64::from(target.agencies.max(1)) + 1;
    let requests = format!("HELLO {agency} {}\nBET Ana,Paz,1,2000-01-01,7574\nDONE\nWINNERS\n", fake_token(seed));
    let io = line.io();
    io.write_all(requests.as_bytes())?;
    io.flush()?;
    read_until_closed(io, stop, report)
}

/// `HELLO` and `WINNERS`, then an immediate hang-up.
fn hangup_waiter(stream: io::Result<TcpStream>, target: &Target, seed: u64, report: &mut Report) -> io::Result<()> {
    let mut line = Line::open(stream?, target)?;
    let agency = seed % u64::from(target.agencies.max(1)) + 1;
    let io = line.io();
    io.write_all(format!("HELLO {agency} {}\nWINNERS\n", fake_token(seed)).as_bytes())?;
    io.flush()?;
    *report.replies.entry("hung up".into()).or_default() += 1;
    Ok(())
}

/// The first flight of a TLS client of `target` (its ClientHello, about 517 bytes), made once;
/// a plain-text target gets the bytes of a ClientHello all the same. Empty if rustls cannot
/// make one.
fn client_hello(target: &Target) -> Vec<u8> {
    let config = match &target.tls {
        Some(config) => Arc::clone(config),
        None => {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let Ok(builder) = ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()
            else {
                return Vec::new();
            };
            Arc::new(builder.with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth())
        }
    };
    let mut hello = Vec::new();
    let Ok(name) = rustls::pki_types::ServerName::try_from("localhost") else { return hello };
    if let Ok(mut conn) = ClientConnection::new(config, name) {
        while conn.wants_write() && conn.write_tls(&mut hello).is_ok_and(|n| n > 0) {}
    }
    hello
}

/// Sends the canned `hello`, then nothing, reading what the server sends until it closes.
fn stall(stream: &TcpStream, hello: &[u8], stop: &AtomicBool, report: &mut Report) -> io::Result<()> {
    (&*stream).write_all(hello)?;
    let mut answered = false;
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        match (&*stream).read(&mut buf) {
            Ok(0) => break,
            Ok(_) if !answered => {
                answered = true;
                *report.replies.entry("server flight".into()).or_default() += 1;
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    *report.replies.entry("closed".into()).or_default() += 1;
    Ok(())
}

fn read_until_closed(io: &mut dyn ReadWrite, stop: &AtomicBool, report: &mut Report) -> io::Result<()> {
    let mut pending = Vec::new();
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::SeqCst) {
        match io.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => report.lines(&mut pending, &buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    *report.replies.entry("closed".into()).or_default() += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_by_name_or_all() {
        assert_eq!(Attack::parse_list("all").unwrap().len(), 10);
        assert_eq!(Attack::parse_list("churn,hangup-waiter").unwrap(), [Attack::Churn, Attack::HangupWaiter]);
        assert!(Attack::parse_list("chrun").unwrap_err().contains("unknown attack"));
    }

    #[test]
    fn a_stall_attacker_sends_a_canned_client_hello() {
        let target = Target {
            addr: "127.0.0.1:9".parse().unwrap(),
            tls: None,
            agencies: 1,
            refresh_every: Duration::from_secs(1),
        };
        let hello = client_hello(&target);
        // A handshake record holding a ClientHello (handshake type 1).
        assert!(hello.len() > 200, "{} bytes", hello.len());
        assert_eq!((hello[0], hello[5]), (0x16, 1));
    }

    #[test]
    fn spread_addresses_are_distinct_loopback_hosts() {
        let addrs: std::collections::HashSet<IpAddr> = (0..3000).map(spread_address).collect();
        assert_eq!(addrs.len(), 3000);
        assert!(addrs.iter().all(|a| a.is_loopback()));
    }
}
