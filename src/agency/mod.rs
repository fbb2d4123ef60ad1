//! The agency client: streams its bets file to the server in batches, says `DONE`, asks for its
//! winners. On a broken connection (or `ERR BUSY`, `ERR SHUTDOWN`) it reconnects with backoff,
//! says `HELLO` again and resumes from the count the server holds, so a bet is never sent twice
//! into the file nor skipped. Over TLS, a certificate it does not trust, a name that does not
//! match or a record that fails its integrity check is final: retrying cannot cure it.

pub mod credentials;

mod source;

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::{info, warn};

use rustls::{ClientConnection, StreamOwned};

use crate::config::AgencySettings;
use crate::logging::field;
use crate::wire::bet::{self, Bet, RowWriter};
use crate::wire::protocol::{ErrorCode, ProtocolError, Reply};
use crate::wire::transport::{Socket, Transport, tls_error};
use credentials::Credentials;
use source::{Batches, BetSource};

/// The longest reply read: a server gone wrong cannot make us buffer more. The longest legal
/// reply is `WINNERS` for an agency all of whose bets won, at the default quota
/// (`SERVER_MAX_BETS_PER_AGENCY`, 10,000,000) of 10-digit documents: 110,000,000 bytes and a
/// few. A server with a higher quota may send more, and this agency would refuse it.
const MAX_REPLY: u64 = 128 << 20;

/// Longest wait for a reply other than `WINNERS` (which waits for the other agencies).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why an agency could not complete its round.
#[derive(Debug)]
pub enum AgencyError {
    /// The data file is missing, unreadable, or holds a row that is not a bet.
    Data { path: PathBuf, line: Option<u64>, why: String },
    /// The server refused something that retrying cannot fix.
    Refused(ProtocolError),
    /// No server answered within `CLI_RETRY_TIMEOUT_MS`.
    Unreachable { address: String, why: String },
    /// The server said something that is not a reply.
    Protocol(String),
    /// The token or CA file is missing or unusable (found before any connection).
    Credentials(String),
    /// TLS failed in a way no retry cures: an untrusted certificate, a name mismatch, a
    /// tampered record.
    Tls { address: String, why: String },
    /// A stop was asked for (SIGTERM).
    Stopped,
}

impl fmt::Display for AgencyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgencyError::Data { path, line: Some(line), why } => write!(f, "{} line {line}: {why}", path.display()),
            AgencyError::Data { path, line: None, why } => write!(f, "{}: {why}", path.display()),
            AgencyError::Refused(e) => write!(f, "the server refused: ERR {e}"),
            AgencyError::Unreachable { address, why } => write!(f, "no server at {address}: {why}"),
            AgencyError::Protocol(why) => write!(f, "protocol: {why}"),
            AgencyError::Credentials(why) => f.write_str(why),
            AgencyError::Tls { address, why } => write!(f, "TLS with {address} failed: {why}"),
            AgencyError::Stopped => write!(f, "stopped"),
        }
    }
}

impl std::error::Error for AgencyError {}

/// What a completed agency got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Its winners' documents, as the server sent them.
    pub winners: Vec<String>,
    /// Bets the server holds for it at the end.
    pub stored: u64,
    /// Times it had to connect again.
    pub reconnects: u32,
}

/// Stops a running agency from another thread: wakes its backoff and closes its socket.
#[derive(Clone, Default)]
pub struct Stop {
    inner: Arc<(Mutex<StopState>, Condvar)>,
}

#[derive(Default)]
struct StopState {
    stopped: bool,
    socket: Option<Arc<TcpStream>>,
}

impl Stop {
    pub fn trigger(&self) {
        let (lock, wake) = &*self.inner;
        let mut st = lock.lock().unwrap_or_else(PoisonError::into_inner);
        st.stopped = true;
        if let Some(socket) = st.socket.take() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        wake.notify_all();
    }

    pub fn is_triggered(&self) -> bool {
        self.inner.0.lock().unwrap_or_else(PoisonError::into_inner).stopped
    }

    /// Sleeps for `pause` unless stopped first; true if stopped.
    fn sleep(&self, pause: Duration) -> bool {
        let (lock, wake) = &*self.inner;
        let st = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let (st, _) = wake.wait_timeout_while(st, pause, |s| !s.stopped).unwrap_or_else(PoisonError::into_inner);
        st.stopped
    }

    /// Remembers the live socket so that `trigger` can close it.
    fn watch(&self, socket: &Arc<TcpStream>) -> Result<(), AgencyError> {
        let mut st = self.inner.0.lock().unwrap_or_else(PoisonError::into_inner);
        if st.stopped {
            return Err(AgencyError::Stopped);
        }
        st.socket = Some(Arc::clone(socket));
        Ok(())
    }
}

/// Runs one agency to the end of the round.
///
/// # Errors
/// See [`AgencyError`]; a broken connection is not one while the retry window lasts.
pub fn run(settings: &AgencySettings, stop: &Stop) -> Result<Outcome, AgencyError> {
    let extra = extra_bet(settings)?;
    let has_file = settings.data_path.exists() || extra.is_none();
    if has_file {
        BetSource::open(&settings.data_path)?;
    }
    let credentials = Credentials::load(settings).map_err(AgencyError::Credentials)?;
    let mut reconnects = 0;
    let mut backoff = Backoff::new(settings);
    // Which of the server's addresses to try first: after a broken connection, the next one.
    let mut first = 0;
    loop {
        let mut link = connect(settings, &credentials, stop, &mut backoff, &mut first)?;
        match round(settings, &credentials, &mut link, extra.as_ref(), has_file, &mut backoff) {
            Ok((winners, stored)) => return Ok(Outcome { winners, stored, reconnects }),
            // A TLS failure is said without the address where it is found; it is added here.
            Err(Attempt::Fatal(AgencyError::Tls { why, .. })) => {
                return Err(AgencyError::Tls { address: settings.server_address.clone(), why });
            }
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(_)) if stop.is_triggered() => return Err(AgencyError::Stopped),
            Err(Attempt::Retry(why)) => {
                first += 1;
                backoff
                    .wait(stop, &why, || warn!("action: reconnect | result: in_progress | error: {}", field(&why)))?;
                reconnects += 1;
            }
        }
    }
}

/// The agency's retry window (`CLI_RETRY_TIMEOUT_MS`) and its backoff, 50 ms doubling to 250 ms.
/// Both start again at every `HELLO` the server answers: a server that restarts many times
/// in one round is waited for each time, but one that keeps refusing (`ERR BUSY`) is not
/// hammered, and not waited for forever.
///
/// It also sets how long one attempt waits for the server to answer the connection (its
/// *patience*): 100 ms at first, doubling after each attempt that timed out, up to 5 s. A
/// connection request lost on the way (a server's listen queue overflowing under a flood of
/// connections drops it) is otherwise sent again by the kernel only after a second, then
/// three; a far server only costs the first attempts' 300 ms.
struct Backoff {
    address: String,
    limit: Duration,
    since: Option<Instant>,
    pause: Duration,
    patience: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);
    const FIRST_PATIENCE: Duration = Duration::from_millis(100);
    const LAST_PATIENCE: Duration = Duration::from_secs(5);
    /// The longest pause: a server that sheds strangers by closing its oldest guests may close
    /// an agency that is still connecting, and it should try again soon, not in seconds; four
    /// tries a second are still nothing to a server that is down.
    const LAST: Duration = Duration::from_millis(250);

    fn new(settings: &AgencySettings) -> Backoff {
        Backoff {
            address: settings.server_address.clone(),
            limit: settings.retry_timeout,
            since: None,
            pause: Self::FIRST,
            patience: Self::FIRST_PATIENCE,
        }
    }

    fn reset(&mut self) {
        self.since = None;
        self.pause = Self::FIRST;
        self.patience = Self::FIRST_PATIENCE;
    }

    /// Waits longer for the next connection, after one that was not answered in time.
    fn lose_patience(&mut self) {
        self.patience = (self.patience * 2).min(Self::LAST_PATIENCE);
    }

    /// Calls `retrying` (to log it) and waits before the next attempt.
    ///
    /// # Errors
    /// `Unreachable` once the window has closed, `Stopped` if a stop is asked meanwhile.
    fn wait(&mut self, stop: &Stop, why: &str, retrying: impl FnOnce()) -> Result<(), AgencyError> {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.limit {
            return Err(AgencyError::Unreachable { address: self.address.clone(), why: why.to_owned() });
        }
        retrying();
        if stop.sleep(self.pause) {
            return Err(AgencyError::Stopped);
        }
        self.pause = (self.pause * 2).min(Self::LAST);
        Ok(())
    }
}

fn extra_bet(settings: &AgencySettings) -> Result<Option<Bet>, AgencyError> {
    let Some(fields) = &settings.extra_bet else { return Ok(None) };
    let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    Bet::from_fields(&fields, bet::today()).map(Some).map_err(|e| AgencyError::Data {
        path: PathBuf::from("NOMBRE, APELLIDO, DOCUMENTO, NACIMIENTO, NUMERO"),
        line: None,
        why: e.to_string(),
    })
}

/// A TLS failure said for a person: what it means for this agency, then rustls's own words.
fn describe(error: &rustls::Error) -> String {
    use rustls::{CertificateError, Error};
    let meaning = match error {
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => {
            "the server's certificate does not hold the name this agency checks (CLI_TLS_NAME, else the host of CLI_SERVER_ADDRESS)"
        }
        Error::InvalidCertificate(_) => "the server's certificate is not one that CLI_TLS_CA vouches for",
        Error::DecryptError | Error::InvalidMessage(_) | Error::PeerMisbehaved(_) => {
            "what arrived was not what the server sent (tampered with on the way?)"
        }
        _ => "the TLS session broke",
    };
    format!("{meaning}: {error}")
}

/// One connection's failure: worth another connection, or final.
enum Attempt {
    Retry(String),
    Fatal(AgencyError),
}

impl From<io::Error> for Attempt {
    fn from(e: io::Error) -> Self {
        match tls_error(&e) {
            // Said without the address here; `round` knows it and adds it.
            Some(tls) => Attempt::Fatal(AgencyError::Tls { address: String::new(), why: describe(tls) }),
            None => Attempt::Retry(e.to_string()),
        }
    }
}

impl From<AgencyError> for Attempt {
    fn from(e: AgencyError) -> Self {
        Attempt::Fatal(e)
    }
}

/// The conversation over one connection, from `HELLO` to the winners.
fn round(
    settings: &AgencySettings,
    credentials: &Credentials,
    link: &mut Link,
    extra: Option<&Bet>,
    has_file: bool,
    backoff: &mut Backoff,
) -> Result<(Vec<String>, u64), Attempt> {
    let hello = match &credentials.token {
        Some(token) => format!("HELLO {} {}\n", settings.id, token.expose()),
        None => format!("HELLO {}\n", settings.id),
    };
    let mut stored = link.ok_count(&hello)?;
    backoff.reset();
    let mut writer = RowWriter::default();
    if let Some(bet) = extra.filter(|_| stored == 0) {
        writer.push_bet(bet);
        let row = String::from_utf8_lossy(&writer.take()).into_owned();
        stored = link.ok_count(&format!("BET {row}"))?;
        info!("action: apuesta_enviada | result: success | dni: {} | numero: {}", bet.document, bet.number);
    }
    if has_file {
        let skip = stored - u64::from(extra.is_some());
        stored = send_file(settings, link, skip, stored)?;
    }
    link.ok(b"DONE\n")?;
    let winners = link.winners()?;
    info!("action: consulta_ganadores | result: success | cant_ganadores: {}", winners.len());
    let _ = link.send(b"QUIT\n");
    Ok((winners, stored))
}

/// Batches sent before waiting for the first reply. The server appends a connection's
/// queued batches back to back and acknowledges them after one sync, so a window keeps the
/// disk's syncs shared by many batches instead of one per agency.
const WINDOW: usize = 8;

/// Sends the data file from row `skip` on, in batches, up to [`WINDOW`] of them awaiting their
/// reply; returns the count the server holds.
fn send_file(settings: &AgencySettings, link: &mut Link, skip: u64, mut stored: u64) -> Result<u64, Attempt> {
    let mut batches = Batches::open(settings, skip)?;
    let mut in_flight = VecDeque::with_capacity(WINDOW);
    let mut offset = stored;
    loop {
        while in_flight.len() < WINDOW {
            let Some(count) = batches.next(offset)? else { break };
            link.send(&batches.bytes)?;
            in_flight.push_back(count);
            offset += count as u64;
        }
        let Some(count) = in_flight.pop_front() else { return Ok(stored) };
        stored = link.ok_count_reply()?;
        info!("action: apuesta_enviada | result: success | cantidad: {count}");
    }
}

/// Connects, retrying with backoff until the retry window that began at `since` closes.
fn connect(
    settings: &AgencySettings,
    credentials: &Credentials,
    stop: &Stop,
    backoff: &mut Backoff,
    first: &mut usize,
) -> Result<Link, AgencyError> {
    let address = &settings.server_address;
    loop {
        let why = match open(address, *first, backoff.patience) {
            Ok((stream, used)) => {
                let stream = Arc::new(stream);
                stop.watch(&stream)?;
                *first = used;
                let used = address.split(',').nth(used).map_or(address.as_str(), str::trim);
                match Link::new(stream, credentials, used) {
                    Ok(link) => {
                        info!("action: connect | result: success | address: {used}");
                        return Ok(link);
                    }
                    Err(LinkError::Io(e)) => e.to_string(),
                    Err(LinkError::Fatal(e)) => return Err(e),
                }
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::TimedOut {
                    backoff.lose_patience();
                }
                e.to_string()
            }
        };
        let retry = || info!("action: connect | result: in_progress | address: {address} | error: {}", field(&why));
        if let Err(e) = backoff.wait(stop, &why, retry) {
            if !stop.is_triggered() {
                warn!("action: connect | result: fail | address: {address} | error: {}", field(&why));
            }
            return Err(e);
        }
    }
}

/// Asks the server at `address` for `PONG`: a health check that needs nothing but this binary.
///
/// # Errors
/// What went wrong, for a person: no connection, no reply within `timeout`, another reply.
pub fn ping(address: &str, timeout: Duration) -> Result<(), String> {
    let (mut stream, _) = open(address, 0, timeout).map_err(|e| format!("cannot reach {address}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    stream.write_all(b"PING\nQUIT\n").map_err(|e| format!("cannot write to {address}: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(|e| format!("no reply from {address}: {e}"))?;
    match line.trim_end() {
        "PONG" => Ok(()),
        other => Err(format!("{address} answered {other:?}, not PONG")),
    }
}

/// Connects to the first of `addresses` (`host:port,host:port,…`) that answers, trying them in
/// turn from the `first`-th (modulo their number), and every address each name resolves to;
/// returns the stream and which of `addresses` it reached. Each address gets `patience` to answer.
fn open(addresses: &str, first: usize, patience: Duration) -> io::Result<(TcpStream, usize)> {
    let list: Vec<&str> = addresses.split(',').map(str::trim).collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
    for i in (0..list.len()).map(|k| (first + k) % list.len()) {
        let resolved = match list[i].to_socket_addrs() {
            Ok(resolved) => resolved,
            Err(e) => {
                last = e;
                continue;
            }
        };
        for addr in resolved {
            match TcpStream::connect_timeout(&addr, patience) {
                Ok(stream) => return Ok((stream, i)),
                Err(e) => last = io::Error::new(e.kind(), format!("{}: {e}", list[i])),
            }
        }
    }
    Err(last)
}

/// A connection to the server, plain or TLS: requests out, reply lines in.
struct Link {
    /// The socket itself, shared with the [`Stop`], for its timeouts.
    stream: Arc<TcpStream>,
    io: BufReader<Transport<ClientConnection>>,
    line: String,
}

/// Why a link could not be set up.
enum LinkError {
    Io(io::Error),
    Fatal(AgencyError),
}

impl Link {
    fn new(stream: Arc<TcpStream>, credentials: &Credentials, address: &str) -> Result<Link, LinkError> {
        stream.set_nodelay(true).map_err(LinkError::Io)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(LinkError::Io)?;
        let socket = Socket::new(Arc::clone(&stream));
        let transport = match &credentials.tls {
            None => Transport::Plain(socket),
            Some(config) => {
                let fatal = |why: String| LinkError::Fatal(AgencyError::Tls { address: address.to_owned(), why });
                let name = credentials.server_name(address).map_err(fatal)?;
                let conn = ClientConnection::new(Arc::clone(config), name).map_err(|e| fatal(e.to_string()))?;
                Transport::Tls(Box::new(StreamOwned::new(conn, socket)))
            }
        };
        Ok(Link { stream, io: BufReader::new(transport), line: String::new() })
    }

    /// Sends `request` and reads its reply.
    fn call(&mut self, request: &[u8], timeout: Option<Duration>) -> Result<Reply, Attempt> {
        self.send(request)?;
        self.receive(timeout)
    }

    fn send(&mut self, request: &[u8]) -> Result<(), Attempt> {
        let transport = self.io.get_mut();
        Ok(transport.write_all(request).and_then(|()| transport.flush())?)
    }

    /// Reads one reply, waiting at most `timeout` (`None`: forever).
    fn receive(&mut self, timeout: Option<Duration>) -> Result<Reply, Attempt> {
        self.stream.set_read_timeout(timeout)?;
        self.line.clear();
        let n = (&mut self.io).take(MAX_REPLY).read_line(&mut self.line)?;
        if n == 0 || !self.line.ends_with('\n') {
            return Err(Attempt::Retry("the server closed the connection".into()));
        }
        let reply =
            Reply::parse(self.line.trim_end_matches(['\n', '\r'])).map_err(|e| AgencyError::Protocol(e.message))?;
        match reply {
            Reply::Err(e)
                if matches!(
                    e.code,
                    ErrorCode::Busy | ErrorCode::Shutdown | ErrorCode::Storage | ErrorCode::Timeout
                ) =>
            {
                Err(Attempt::Retry(format!("ERR {e}")))
            }
            Reply::Err(e) => {
                warn!("action: request | result: fail | error: {}", field(&e.to_string()));
                Err(AgencyError::Refused(e).into())
            }
            reply => Ok(reply),
        }
    }

    fn ok_count(&mut self, request: &str) -> Result<u64, Attempt> {
        self.send(request.as_bytes())?;
        self.ok_count_reply()
    }

    fn ok_count_reply(&mut self) -> Result<u64, Attempt> {
        match self.receive(Some(REPLY_TIMEOUT))? {
            Reply::Ok(Some(n)) => Ok(n),
            other => Err(unexpected(&other)),
        }
    }

    fn ok(&mut self, request: &[u8]) -> Result<(), Attempt> {
        match self.call(request, Some(REPLY_TIMEOUT))? {
            Reply::Ok(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks for the winners; waits as long as the draw takes.
    fn winners(&mut self) -> Result<Vec<String>, Attempt> {
        match self.call(b"WINNERS\n", None)? {
            Reply::Winners(w) => Ok(w),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(reply: &Reply) -> Attempt {
    Attempt::Fatal(AgencyError::Protocol(format!("unexpected reply {reply:?}")))
}
