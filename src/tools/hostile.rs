//! Misbehaving clients, for `lottery-round --hostile K` and the tests: each kind breaks the
//! protocol in its own way, and reports what the server answered. None of them ever sends a
//! valid bet, so an honest round beside them must end with exactly the honest bets stored.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The ways a hostile client misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Connects and says nothing.
    Idle,
    /// Sends a request one byte at a time, slower than any deadline.
    Slowloris,
    /// Sends a line far over 8 KiB.
    Oversized,
    /// Sends random bytes, NULs and invalid UTF-8 among them, in lines.
    Garbage,
    /// Announces a batch of 10 rows, sends 3, and hangs up.
    HalfBatch,
    /// Sends bets that are invalid in every field, before and after `HELLO`.
    BadBets,
    /// Asks for agencies and offsets that do not exist.
    OutOfRange,
}

impl Kind {
    pub const ALL: [Kind; 7] =
        [Kind::Idle, Kind::Slowloris, Kind::Oversized, Kind::Garbage, Kind::HalfBatch, Kind::BadBets, Kind::OutOfRange];

    /// The `i`-th client's kind: the kinds in turn.
    pub fn nth(i: usize) -> Kind {
        Kind::ALL[i % Kind::ALL.len()]
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What one hostile client got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub kind: Kind,
    /// The first word of each reply (`PONG`, `OK`) or `ERR <CODE>`, in order.
    pub replies: Vec<String>,
    /// Whether the server closed the connection (rather than the client giving up).
    pub closed_by_server: bool,
}

/// How long a hostile client waits for the server to deal with it.
const PATIENCE: Duration = Duration::from_secs(20);

/// Runs one hostile client of `kind` against `addr`; `seed` varies its garbage. The kinds that
/// say `HELLO` speak for `agency`: give them one no honest agency uses, or (in protected mode,
/// where loopback is trusted) they take over that agency's session, as they may.
pub fn run(kind: Kind, addr: SocketAddr, seed: u64, agency: u32) -> Report {
    let mut report = Report { kind, replies: Vec::new(), closed_by_server: false };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        report.replies.push("connect failed".into());
        return report;
    };
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let sent = match kind {
        Kind::Idle => Ok(()),
        Kind::Slowloris => return slowloris(stream, report),
        Kind::Oversized => stream.write_all(&vec![b'A'; 64 * 1024]),
        Kind::Garbage => stream.write_all(&garbage(seed)).and_then(|()| stream.write_all(b"\nQUIT\n")),
        Kind::HalfBatch => stream.write_all(
            format!("HELLO {agency}\nBATCH 0 10\nNot,Sent,1,2000-01-01,1\n\"Half\",a,2,2000-01-01,2\nx,y,3").as_bytes(),
        ),
        Kind::BadBets => stream.write_all(BAD_BETS.replace("HELLO 1", &format!("HELLO {agency}")).as_bytes()),
        Kind::OutOfRange => stream.write_all(
            format!("HELLO 0\nHELLO 4294967295\nHELLO {agency}\nBATCH 999999999 1\nOut,Of,1,2000-01-01,1\nQUIT\n")
                .as_bytes(),
        ),
    };
    // A write may fail when the server has already answered and closed: read what it said.
    let _ = sent;
    if kind == Kind::HalfBatch {
        // Hang up mid-batch: the server must store nothing of it.
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    read_replies(&mut stream, &mut report);
    report
}

/// Every field wrong in turn, a bet before `HELLO` (of agency 1, which [`run`] replaces by its
/// own), and a batch with one bad row among good-
/// looking rows whose agency is not this connection's business (the batch is refused whole).
const BAD_BETS: &str = "BET Ana,Paz,1,2000-01-01,1\n\
    HELLO 1\n\
    BET ,Paz,1,2000-01-01,1\n\
    BET Ana,Paz,12345678901,2000-01-01,1\n\
    BET Ana,Paz,1,2001-02-29,1\n\
    BET Ana,Paz,1,2999-01-01,1\n\
    BET Ana,Paz,1,1899-12-31,1\n\
    BET Ana,Paz,1,2000-01-01,-1\n\
    BET Ana,Paz,1,2000-01-01,10000\n\
    BET \"Ana,Paz,1,2000-01-01,1\n\
    BET Ana,Paz,1,2000-01-01\n\
    BET Ana,Paz\x00,1,2000-01-01,1\n\
    BATCH 0 2\n\
    Bad,Row,1,2000-13-01,1\n\
    Bad,Row,2,2000-01-01,99999\n\
    QUIT\n";

/// Random bytes with line breaks among them; never a request at all, as the bytes never spell
/// a keyword: every ASCII letter is replaced by `#`.
fn garbage(seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..4096)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let b = (state >> 24) as u8;
            if i % 97 == 96 {
                b'\n'
            } else if b.is_ascii_alphabetic() {
                b'#'
            } else {
                b
            }
        })
        .collect()
}

/// Sends `PING` one byte every 50 ms, never finishing the line, until the server gives up.
fn slowloris(mut stream: TcpStream, mut report: Report) -> Report {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    while started.elapsed() < PATIENCE {
        if stream.write_all(b"P").is_err() {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                report.closed_by_server = true;
                break;
            }
            Ok(n) => {
                collect(&buf[..n], &mut report.replies);
                read_replies(&mut stream, &mut report);
                break;
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    report
}

/// Reads replies until the server closes the connection or patience runs out.
fn read_replies(stream: &mut TcpStream, report: &mut Report) {
    let deadline = Instant::now() + PATIENCE;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                report.closed_by_server = true;
                break;
            }
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            // A reset after the server's last words is the server closing too.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                report.closed_by_server = true;
                break;
            }
            Err(_) => break,
        }
    }
    collect(&bytes, &mut report.replies);
}

/// Adds the first word of each line (two for `ERR <CODE>`) to `replies`.
fn collect(bytes: &[u8], replies: &mut Vec<String>) {
    for line in String::from_utf8_lossy(bytes).lines() {
        let mut words = line.split(' ');
        let first = words.next().unwrap_or_default();
        let reply = match (first, words.next()) {
            ("ERR", Some(code)) => format!("ERR {code}"),
            _ => first.to_owned(),
        };
        replies.push(reply);
    }
}
