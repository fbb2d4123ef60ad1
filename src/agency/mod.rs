//! The agency client: streams its bets file to the server in batches, says `DONE`, asks for its
//! winners. On a broken connection (or `ERR BUSY`, `ERR SHUTDOWN`) it reconnects with backoff,
//! says `HELLO` again and resumes from the count the server holds, so a bet is never sent twice
//! into the file nor skipped. Over TLS, a certificate it does not trust, a name that does not
//! match or a record that fails its integrity check is final: retrying cannot cure it.

pub(crate) mod credentials;

mod link;
mod patience;
mod source;

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::info;

use crate::config::AgencySettings;
use crate::sync::lock_unpoisoned;
use crate::wire::bet::{self, Bet, RowWriter};
use crate::wire::protocol::ProtocolError;
use crate::wire::transport::tls_error;
use credentials::Credentials;
use link::{Link, LinkError, OpenError};
use patience::{Patience, Setback};
use source::{Batches, BetSource};
pub(crate) use source::{BetData, MakeRows};

/// The address an agency uses when none is configured: the server's name in docker compose.
const COMPOSE_ADDRESS: &str = "server:12345";

/// Why an agency could not complete its round.
#[derive(Debug)]
pub(crate) enum AgencyError {
    /// The data file is missing, unreadable, or holds a row that is not a bet.
    Data { path: PathBuf, line: Option<u64>, why: String },
    /// The server refused something that retrying cannot fix.
    Refused(ProtocolError),
    /// No server answered within `CLI_RETRY_TIMEOUT_MS`.
    Unreachable { address: String, why: String },
    /// Connections, but nothing stored or answered, for `CLI_RETRY_TIMEOUT_MS`.
    NoProgress { address: String, waited: Duration, why: String },
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
            AgencyError::NoProgress { address, waited, why } => write!(
                f,
                "no progress with the server at {address} for {} ms (CLI_RETRY_TIMEOUT_MS): {why}",
                waited.as_millis()
            ),
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
pub(crate) struct Outcome {
    /// Its winners' documents, as the server sent them.
    pub winners: Vec<String>,
    /// Bets the server holds for it at the end.
    pub stored: u64,
    /// Times it had to connect again.
    pub reconnects: u32,
}

/// Stops a running agency from another thread: wakes its backoff and closes its socket.
#[derive(Clone, Default)]
pub(crate) struct Stop {
    inner: Arc<(Mutex<StopState>, Condvar)>,
}

#[derive(Default)]
struct StopState {
    stopped: bool,
    socket: Option<Arc<TcpStream>>,
}

impl Stop {
    pub(crate) fn trigger(&self) {
        let (lock, wake) = &*self.inner;
        let mut st = lock_unpoisoned(lock);
        st.stopped = true;
        if let Some(socket) = st.socket.take() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        wake.notify_all();
    }

    pub(crate) fn is_triggered(&self) -> bool {
        lock_unpoisoned(&self.inner.0).stopped
    }

    /// Sleeps for `pause` unless stopped first; true if stopped.
    fn sleep(&self, pause: Duration) -> bool {
        let (lock, wake) = &*self.inner;
        let st = lock_unpoisoned(lock);
        let (st, _) = wake.wait_timeout_while(st, pause, |s| !s.stopped).unwrap_or_else(PoisonError::into_inner);
        st.stopped
    }

    /// Remembers the live socket so that `trigger` can close it.
    fn watch(&self, socket: &Arc<TcpStream>) -> Result<(), AgencyError> {
        let mut st = lock_unpoisoned(&self.inner.0);
        if st.stopped {
            return Err(AgencyError::Stopped);
        }
        st.socket = Some(Arc::clone(socket));
        Ok(())
    }
}

/// Runs one agency to the end of the round, on its data file and the credentials its
/// settings name.
///
/// # Errors
/// See [`AgencyError`]; a broken connection is not one while the retry window lasts.
pub(crate) fn run(settings: &AgencySettings, stop: &Stop) -> Result<Outcome, AgencyError> {
    let data = BetData::File(settings.data_path.clone());
    // The data first: a missing file is said before anything about keys.
    check_data(settings, &data)?;
    let credentials = Credentials::load(settings).map_err(AgencyError::Credentials)?;
    run_with(settings, &credentials, &data, stop)
}

/// Runs one agency on `data` with `credentials` already loaded (`lottery-round` shares one TLS
/// configuration among its agencies and makes their data in memory).
///
/// # Errors
/// As [`run`].
pub(crate) fn run_with(
    settings: &AgencySettings,
    credentials: &Credentials,
    data: &BetData,
    stop: &Stop,
) -> Result<Outcome, AgencyError> {
    let (extra, has_file) = check_data(settings, data)?;
    credentials::check_plain_text(&settings.server_address, credentials).map_err(AgencyError::Credentials)?;
    let mut reconnects = 0;
    let mut patience = Patience::new(&settings.server_address, settings.retry_timeout, u64::from(settings.id));
    let job = Job { settings, credentials, data, extra: extra.as_ref(), has_file };
    // Which of the server's addresses to try first: after a broken connection, the next one.
    let mut first = 0;
    loop {
        let mut link = connect(settings, credentials, stop, &mut patience, &mut first)?;
        let (setback, why) = match job.converse(&mut link, &mut patience, reconnects == 0) {
            Ok((winners, stored)) => return Ok(Outcome { winners, stored, reconnects }),
            // A TLS failure is said without the address where it is found; it is added here.
            Err(Attempt::Fatal(AgencyError::Tls { why, .. })) => {
                return Err(AgencyError::Tls { address: settings.server_address.clone(), why });
            }
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(_) | Attempt::Storage(_)) if stop.is_triggered() => return Err(AgencyError::Stopped),
            Err(Attempt::Retry(why)) => (Setback::Broken, why),
            Err(Attempt::Storage(why)) => (Setback::Storage, why),
        };
        first += 1;
        patience.wait(stop, setback, &why)?;
        reconnects += 1;
    }
}

/// The extra bet of the environment, and whether there is a data file to send: checked before
/// any connection.
fn check_data(settings: &AgencySettings, data: &BetData) -> Result<(Option<Bet>, bool), AgencyError> {
    let extra = extra_bet(settings)?;
    let has_file = match data {
        BetData::File(path) => path.exists() || extra.is_none(),
        BetData::Made { .. } => true,
    };
    if has_file {
        BetSource::open(data)?;
    }
    Ok((extra, has_file))
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
    /// The server could not store (`ERR STORAGE`): worth another try, after a longer pause.
    Storage(String),
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

/// What one agency sends, the same over every connection it needs.
struct Job<'a> {
    settings: &'a AgencySettings,
    credentials: &'a Credentials,
    data: &'a BetData,
    extra: Option<&'a Bet>,
    has_file: bool,
}

/// How long an agency waits for the draw before it says again that it waits; doubled after
/// each line, up to a minute.
const FIRST_WAIT_LINE: Duration = Duration::from_secs(5);

impl Job<'_> {
    /// The conversation over one connection, from `HELLO` to the winners. On the agency's first
    /// connection, with only a file to send, its first batches go out behind the `HELLO`
    /// from row 0, without waiting for its answer: rows the server already holds (an agency
    /// restarted) are acknowledged, not stored again, and the sending skips ahead to what it
    /// holds. `DONE` goes with the `STATUS` and `WINNERS` that follow it: two round trips where
    /// waiting for each answer took four.
    fn converse(
        &self,
        link: &mut Link,
        patience: &mut Patience,
        first_connection: bool,
    ) -> Result<(Vec<String>, u64), Attempt> {
        let id = self.settings.id;
        let hello = match &self.credentials.token {
            Some(token) => format!("HELLO {id} {}\n", token.expose()),
            None => format!("HELLO {id}\n"),
        };
        let stored = if first_connection && self.has_file && self.extra.is_none() {
            link.send(hello.as_bytes())?;
            let mut sending = Sending::open(self, 0)?;
            let sent = sending.fill(link);
            // A refused HELLO closes the connection, maybe before the batches behind it are all
            // sent: its answer, already here, says why better than the broken pipe does.
            if sent.is_err() {
                link.drop_unsent();
            }
            let stored = match (sent, link.ok_count_reply()) {
                (Err(e @ Attempt::Fatal(_)), _) | (_, Err(e @ Attempt::Fatal(_))) => return Err(e),
                (Err(e), _) | (Ok(()), Err(e)) => return Err(e),
                (Ok(()), Ok(stored)) => stored,
            };
            patience.hello_answered();
            self.send_file(link, patience, sending, stored)?
        } else {
            let stored = link.ok_count(&hello)?;
            patience.hello_answered();
            self.send_rest(link, patience, stored)?
        };
        link.send(b"DONE\nSTATUS\nWINNERS\n")?;
        link.ok_reply()?;
        patience.progress();
        // A wait for the draw, however long, ends the window there: a server lost after an
        // hour in WINNERS is waited for as long as one lost while sending.
        let winners = wait_for_draw(link);
        patience.progress();
        let winners = winners?;
        info!("action: consulta_ganadores | result: success | cant_ganadores: {} | agency: {id}", winners.len());
        let _ = link.send(b"QUIT\n");
        Ok((winners, stored))
    }

    /// The environment's bet if the server holds nothing yet, then the file from what it
    /// holds; returns the count the server holds.
    fn send_rest(&self, link: &mut Link, patience: &mut Patience, mut stored: u64) -> Result<u64, Attempt> {
        let mut writer = RowWriter::default();
        if let Some(bet) = self.extra.filter(|_| stored == 0) {
            writer.push_bet(bet);
            let row = String::from_utf8_lossy(&writer.take()).into_owned();
            stored = link.ok_count(&format!("BET {row}"))?;
            patience.progress();
            info!("action: apuesta_enviada | result: success | dni: {} | numero: {}", bet.document, bet.number);
        }
        if !self.has_file {
            return Ok(stored);
        }
        let sending = Sending::open(self, stored)?;
        self.send_file(link, patience, sending, stored)
    }

    /// Sends the file's batches, up to [`WINDOW`] of them awaiting their reply, skipping ahead
    /// whenever the server holds more than was sent; returns the count the server holds.
    fn send_file(
        &self,
        link: &mut Link,
        patience: &mut Patience,
        mut sending: Sending,
        mut stored: u64,
    ) -> Result<u64, Attempt> {
        loop {
            if stored > sending.offset {
                sending.skip_to(self, stored)?;
            }
            sending.fill(link)?;
            let Some(count) = sending.in_flight.pop_front() else { return Ok(stored) };
            stored = link.ok_count_reply()?;
            patience.progress();
            info!("action: apuesta_enviada | result: success | cantidad: {count}");
        }
    }
}

/// A file's batches on their way: where the next one starts, and the sizes of those sent and
/// not yet acknowledged.
struct Sending {
    batches: Batches,
    offset: u64,
    in_flight: VecDeque<u32>,
}

impl Sending {
    /// The file's batches from the agency's bet number `offset` on (the environment's bet,
    /// when there is one, is number 0 and not in the file).
    fn open(job: &Job, offset: u64) -> Result<Sending, Attempt> {
        let batches = Batches::open(job.settings, job.data, offset.saturating_sub(u64::from(job.extra.is_some())))?;
        Ok(Sending { batches, offset, in_flight: VecDeque::with_capacity(WINDOW) })
    }

    /// Goes on from bet number `offset`, past what was sent; those sent still await their reply.
    fn skip_to(&mut self, job: &Job, offset: u64) -> Result<(), Attempt> {
        let in_flight = std::mem::take(&mut self.in_flight);
        *self = Sending { in_flight, ..Sending::open(job, offset)? };
        Ok(())
    }

    /// Sends batches until [`WINDOW`] await their reply or the file is all sent.
    fn fill(&mut self, link: &mut Link) -> Result<(), Attempt> {
        while self.in_flight.len() < WINDOW {
            let Some(count) = self.batches.next(self.offset)? else { break };
            link.send(&self.batches.bytes)?;
            self.in_flight.push_back(count);
            self.offset += u64::from(count);
        }
        Ok(())
    }
}

/// Waits for the winners, saying once where the round is (agencies done, from the `STATUS`
/// sent before `WINNERS`) and then, every few seconds, that it still waits.
fn wait_for_draw(link: &mut Link) -> Result<Vec<String>, Attempt> {
    let started = Instant::now();
    let status = link.status_reply()?;
    let mut every = FIRST_WAIT_LINE;
    match status {
        Some(s) if !s.drawn => info!(
            "action: wait_draw | result: in_progress | agencies_done: {}/{} | waiting_for: the other agencies' DONE",
            s.agencies_done, s.agencies
        ),
        _ => {}
    }
    link.winners(every, || {
        info!(
            "action: wait_draw | result: in_progress | waiting_s: {} | waiting_for: the draw",
            started.elapsed().as_secs()
        );
        every = (every * 2).min(Duration::from_secs(60));
        every
    })
}

/// Batches sent before waiting for the first reply. The server appends a connection's
/// queued batches back to back and acknowledges them after one sync, so a window keeps the
/// disk's syncs shared by many batches instead of one per agency.
const WINDOW: usize = 8;

/// Connects, retrying with backoff while `patience` lasts.
fn connect(
    settings: &AgencySettings,
    credentials: &Credentials,
    stop: &Stop,
    patience: &mut Patience,
    first: &mut usize,
) -> Result<Link, AgencyError> {
    let address = &settings.server_address;
    loop {
        let why = match link::open(address, *first, patience.connect_timeout) {
            Ok((stream, used)) => {
                let stream = Arc::new(stream);
                stop.watch(&stream)?;
                *first = used;
                let used = address.split(',').nth(used).map_or(address.as_str(), str::trim);
                match Link::new(stream, credentials, used) {
                    Ok(link) => {
                        patience.connected();
                        info!("action: connect | result: success | address: {used}");
                        return Ok(link);
                    }
                    Err(LinkError::Io(e)) => e.to_string(),
                    Err(LinkError::Fatal(e)) => return Err(e),
                }
            }
            Err(e) => {
                if e.timed_out {
                    patience.lose_patience();
                }
                explain(address, e)
            }
        };
        patience.wait(stop, Setback::Connect, &why)?;
    }
}

/// Why a connection failed, with what to do when the default compose name does not resolve.
fn explain(address: &str, e: OpenError) -> String {
    if e.unresolved && address == COMPOSE_ADDRESS {
        format!(
            "{} ({COMPOSE_ADDRESS} is the server's name inside docker compose; elsewhere set CLI_SERVER_ADDRESS, e.g. CLI_SERVER_ADDRESS=127.0.0.1:12345)",
            e.why
        )
    } else {
        e.why
    }
}

/// Asks the server at `address` for `PONG`: a health check that needs nothing but this binary.
///
/// # Errors
/// What went wrong, for a person: no connection, no reply within `timeout`, another reply.
pub(crate) fn ping(address: &str, timeout: Duration) -> Result<(), String> {
    let (mut stream, _) =
        link::open(address, 0, timeout).map_err(|e| format!("cannot reach {address}: {}", explain(address, e)))?;
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
