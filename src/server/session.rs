//! One connection's conversation: read a request, check that this connection may make it,
//! apply it to the round, write the reply.
//!
//! Errors a client causes are answered with an `ERR` line and end at most this connection;
//! they never reach the round or the other connections. Refusals of identity (`ERR AUTH`) end
//! the connection: a client that is not who it says has nothing more to do here.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::ledger::{Appended, Ledger, Rows};
use crate::server::Security;
use crate::server::auth;
use crate::server::guest_log::{GuestEvent, GuestLog};
use crate::server::hangups::{Hangups, Watched};
use crate::server::probes::{self, MAX_GUEST_REQUESTS};
use crate::server::registry::{self, Ended, Peer, Registry, Stage};
use crate::wire::bet::{self, RowParser, RowWriter};
use crate::wire::connection::{Connection, ReadError};
use crate::wire::protocol::{self, ErrorCode, MAX_LINE, ProtocolError, Reply, Request};
use crate::wire::row::RowEncoder;
use crate::wire::token::Token;

/// How long a connection that is being ended (evicted, timed out) may take to read why.
const FAREWELL: Duration = Duration::from_millis(100);

/// Most batches appended and not yet acknowledged on one connection.
const MAX_PENDING: usize = 64;

/// Requests of an agency refused one after another (bad batches, say) before its connection is
/// closed: it must reconnect, a TLS handshake and a `HELLO`, before the server reads more. As
/// many as a guest may make before `HELLO`.
const MAX_REFUSALS_IN_A_ROW: u32 = MAX_GUEST_REQUESTS;

/// How often a `WINNERS` waiter looks up from the round to see whether its client is still
/// there (or was replaced) when its socket cannot be watched: a client that hangs up frees its
/// thread within this.
const WAITER_CHECK: Duration = Duration::from_millis(250);

/// How often a watched waiter looks up all the same: a hang-up wakes it at once, so this only
/// bounds the cost of an event the kernel never sends.
const WATCHED_WAITER_CHECK: Duration = Duration::from_secs(5);

/// What a session needs from the server around it.
pub(crate) struct Context<'a> {
    pub ledger: &'a dyn Ledger,
    pub security: &'a Security,
    pub registry: &'a Registry,
    pub guest_log: &'a GuestLog,
    /// This connection, as the registry knows it.
    pub peer: &'a Peer,
    pub id: u64,
    pub ip: IpAddr,
    pub idle_timeout: Duration,
    pub hello_timeout: Duration,
    /// The probes the door answered before this connection got its thread.
    pub guest_requests: u32,
    pub metrics: &'a crate::server::metrics::Metrics,
    /// The waiters' sockets, watched for a hang-up while they wait for the draw.
    pub hangups: &'a Hangups,
}

/// One connection's state besides its socket.
pub(crate) struct Session<'a> {
    cx: Context<'a>,
    agency: Option<u32>,
    /// Requests made while a guest.
    guest_requests: u32,
    /// Requests refused since the last one that was not: past [`MAX_REFUSALS_IN_A_ROW`], the
    /// connection is closed.
    refused_in_a_row: u32,
    parser: RowParser,
    writer: RowWriter,
    /// A batch's rows: checked in place and copied (or re-encoded) into `rows`, both reused
    /// from batch to batch.
    encoder: RowEncoder,
    rows: Rows,
    /// Batches appended but not yet durable, with their row counts, oldest first.
    pending: Vec<(Appended, u32)>,
}

/// Why the conversation is over: [`Session::serve`] returns it with `?`, and [`Session::end`]
/// says it to the client if it can still hear, and closes.
enum End {
    /// The reply already sent was the last (`BYE`, `ERR SHUTDOWN`), or the client left.
    Closed,
    /// Writing failed: the client is gone.
    Gone,
    /// A refusal that ends the connection: an identity refused (`ERR AUTH`), too many requests
    /// before `HELLO`, or too many refused in a row.
    Refused(ProtocolError),
    /// Reading the request (or a batch's rows, `batch`) failed: closed, timed out, too long.
    Read(ReadError, &'static str),
    /// A batch's header and rows over 8 KiB.
    TooBig,
    /// Another connection ended this one: a newer one of the same agency, or a newer guest.
    Ended,
}

impl From<std::io::Error> for End {
    fn from(_: std::io::Error) -> Self {
        End::Gone
    }
}

/// A request line as read: what it asks, and what the rows of a batch are held to.
struct Incoming {
    request: Result<Request, ProtocolError>,
    /// The line's own length, `\n` included: it counts against a batch's 8 KiB.
    header_len: usize,
    /// When the request, a batch's rows included, must have arrived.
    deadline: Instant,
}

impl<'a> Session<'a> {
    pub(crate) fn new(cx: Context<'a>) -> Self {
        Session {
            guest_requests: cx.guest_requests,
            cx,
            agency: None,
            refused_in_a_row: 0,
            parser: RowParser::default(),
            writer: RowWriter::default(),
            encoder: RowEncoder::new(bet::today()),
            rows: Rows::default(),
            pending: Vec::new(),
        }
    }

    /// Serves `conn` until the client quits, breaks the protocol beyond repair, goes silent
    /// for the idle timeout, or the server shuts down.
    pub(crate) fn run(mut self, conn: &mut Connection) {
        if let Err(end) = self.serve(conn) {
            self.end(conn, end);
        }
    }

    /// Reads the next request, answers it, and again, until something ends the conversation.
    ///
    /// Batches from a client that pipelines them are appended back to back and acknowledged
    /// together after one sync: the session only waits for durability (and answers) when no
    /// further request has arrived, or before answering a request of another kind.
    fn serve(&mut self, conn: &mut Connection) -> Result<(), End> {
        loop {
            if !self.pending.is_empty() && !conn.has_buffered_line() && !conn.fill_available() {
                self.acknowledge(conn)?;
            }
            let incoming = self.read_request(conn)?;
            self.admit(&incoming.request, conn.is_tls())?;
            if let Some(reply) = self.dispatch(conn, incoming)? {
                self.reply(conn, &reply)?;
            }
        }
    }

    /// Reads one request line. Each request, a batch with all its rows included, must arrive
    /// within the idle timeout (a guest's hello timeout is the door's: it ends the guest through
    /// the registry).
    fn read_request(&mut self, conn: &mut Connection) -> Result<Incoming, End> {
        let deadline = Instant::now() + self.cx.idle_timeout;
        let line = conn.read_line(deadline).map_err(|e| End::Read(e, "request"))?;
        let (header_len, request) = (line.len() + 1, protocol::parse_request(line));
        if self.cx.peer.ended() != Ended::No {
            return Err(End::Ended);
        }
        Ok(Incoming { request, header_len, deadline })
    }

    /// Whether this connection may make the request at all: over plain text on a TLS server,
    /// only the probes `PING`, `STATUS` and `QUIT`; a guest, at most [`MAX_GUEST_REQUESTS`].
    fn admit(&mut self, request: &Result<Request, ProtocolError>, tls: bool) -> Result<(), End> {
        if let Ok(request) = request {
            let probe = matches!(request, Request::Ping | Request::Status | Request::Quit);
            if !probe && !tls && self.cx.security.tls.is_some() {
                let refused = ProtocolError::new(ErrorCode::Auth, "this server takes agencies over TLS only");
                return Err(End::Refused(refused));
            }
        }
        self.count_guest_request(request).map_err(End::Refused)
    }

    /// Carries out a request. `None`: a batch appended, to be acknowledged once durable.
    fn dispatch(&mut self, conn: &mut Connection, incoming: Incoming) -> Result<Option<Reply>, End> {
        let request = match incoming.request {
            Ok(Request::Batch { offset, count }) => {
                return self.batch(conn, (offset, count), incoming.header_len, incoming.deadline);
            }
            Ok(request) => request,
            Err(refused) => return Ok(Some(Reply::Err(refused))),
        };
        // Replies go out in request order, and DONE must follow every OK.
        self.acknowledge(conn)?;
        let reply = match request {
            Request::Ping => Ok(Reply::Pong),
            Request::Quit => Ok(Reply::Bye),
            Request::Status => self.cx.ledger.status().map(Reply::Status),
            Request::Bet(row) => self.bet(&row),
            Request::Done => self
                .agency()
                .and_then(|a| self.cx.ledger.done(a).map(|()| self.cx.metrics.done(a)))
                .map(|()| Reply::Ok(None)),
            Request::Hello { agency, token } => match self.hello(agency, token) {
                Err(refused) if refused.code == ErrorCode::Auth => return Err(End::Refused(refused)),
                reply => reply,
            },
            Request::Winners => return self.wait_winners(conn).map(Some),
            // Dispatched above, with its rows.
            Request::Batch { .. } => Err(ProtocolError::new(ErrorCode::BadRequest, "not a one-line request")),
        };
        Ok(Some(reply.unwrap_or_else(Reply::Err)))
    }

    /// Answers after what is pending: at once if it is winners or the last a client hears (`BYE`,
    /// `ERR SHUTDOWN`), else in one write with the replies to the requests that follow, once
    /// the session would wait (for the peer, the draw or the end). A refusal past
    /// [`MAX_REFUSALS_IN_A_ROW`] ends the connection.
    fn reply(&mut self, conn: &mut Connection, reply: &Reply) -> Result<(), End> {
        if let Reply::Err(e) = reply {
            self.cx.metrics.refused(e.code);
        }
        self.count_refusal(reply)?;
        conn.set_write_timeout(self.cx.idle_timeout);
        self.acknowledge(conn)?;
        let last = matches!(reply, Reply::Bye) || matches!(reply, Reply::Err(e) if e.code == ErrorCode::Shutdown);
        if last || matches!(reply, Reply::Line(_)) {
            conn.write_reply(reply)?;
        } else {
            // Sent with the replies to the requests that follow, when the session would wait.
            conn.queue_reply(reply);
        }
        if last { Err(End::Closed) } else { Ok(()) }
    }

    /// Counts an agency's refusals in a row: the one that reaches [`MAX_REFUSALS_IN_A_ROW`]
    /// is sent as the connection's last word. A client whose requests keep failing reconnects
    /// (a TLS handshake and a `HELLO`) before the server reads any more of them.
    fn count_refusal(&mut self, reply: &Reply) -> Result<(), End> {
        let Reply::Err(refused) = reply else {
            self.refused_in_a_row = 0;
            return Ok(());
        };
        if self.agency.is_none() {
            return Ok(());
        }
        self.refused_in_a_row += 1;
        if self.refused_in_a_row < MAX_REFUSALS_IN_A_ROW {
            return Ok(());
        }
        let why = format!("{}; {MAX_REFUSALS_IN_A_ROW} requests refused in a row, closing", refused.message);
        Err(End::Refused(ProtocolError::new(refused.code, why)))
    }

    /// Waits until every pending batch is durable, then answers each, in order.
    fn acknowledge(&mut self, conn: &mut Connection) -> std::io::Result<()> {
        let Some(end) = self.pending.iter().map(|(a, _)| a.end).max() else {
            return Ok(());
        };
        let durable = self.cx.ledger.make_durable(end);
        // Taken out (and put back, with its allocation) so that the loop may log through `self`.
        let mut pending = std::mem::take(&mut self.pending);
        for (appended, count) in pending.drain(..) {
            let reply = match &durable {
                Ok(()) => {
                    self.cx.metrics.stored(count);
                    info!("action: apuesta_recibida | result: success | cantidad: {count}");
                    self.refused_in_a_row = 0;
                    Reply::Ok(Some(appended.stored))
                }
                Err(e) => {
                    self.cx.metrics.refused(e.code);
                    self.log_batch_refused(count, e.code.as_str());
                    self.refused_in_a_row += 1;
                    Reply::Err(e.clone())
                }
            };
            conn.queue_reply(&reply);
        }
        self.pending = pending;
        conn.flush().inspect_err(|e| debug!("action: reply | result: fail | error: {e}"))
    }

    /// Logs a batch refused (or cut short): an agency's through its refusals' rate limit, a
    /// guest's through the guests'.
    fn log_batch_refused(&self, count: u32, error: &'static str) {
        let line = || info!("action: apuesta_recibida | result: fail | cantidad: {count} | error: {error}");
        match self.agency {
            Some(agency) => self.cx.guest_log.refusal(agency, error, line),
            None => self.cx.guest_log.event(GuestEvent::Batch, line),
        }
    }

    /// `HELLO`: the agency's number in range, then who may speak for it (its token, or loopback
    /// in protected mode), then the count it holds; this connection now speaks for it, and an
    /// older connection of the same agency is ended.
    fn hello(&mut self, agency: u32, token: Option<Token>) -> Result<Reply, ProtocolError> {
        self.cx.ledger.check_agency(agency)?;
        if let Err(why) = auth::check_hello(self.cx.security.keys.as_ref(), agency, token.as_ref(), self.cx.ip) {
            let ip = self.cx.ip;
            self.cx.registry.suspects().failed(ip);
            self.cx.guest_log.event(GuestEvent::AuthFailed, || {
                warn!("action: hello | result: fail | agency: {agency} | ip: {ip} | error: AUTH");
            });
            return Err(ProtocolError::new(ErrorCode::Auth, why));
        }
        // Authenticated: no guest any more, before the count's wait for a sync in progress.
        if self.cx.registry.claim(agency, self.cx.id) {
            let ip = self.cx.ip;
            self.cx.guest_log.refusal(agency, "REPLACED", || {
                info!("action: replace_session | result: success | agency: {agency} | ip: {ip}");
            });
        }
        self.agency = Some(agency);
        self.cx.metrics.hello(self.cx.id, agency);
        let stored = self.cx.ledger.hello(agency)?;
        Ok(Reply::Ok(Some(stored)))
    }

    /// `WINNERS`: waits for the draw, woken at once if the client hangs up or the connection
    /// is replaced (its socket is watched, see [`Hangups`]), else looking up every
    /// [`WAITER_CHECK`].
    fn wait_winners(&mut self, conn: &mut Connection) -> Result<Reply, End> {
        let agency = match self.agency() {
            Ok(agency) => agency,
            Err(e) => return Ok(Reply::Err(e)),
        };
        conn.flush()?;
        let watched = self.cx.hangups.watch(self.cx.id, conn.socket()).ok();
        let unwatched = AtomicBool::new(false);
        let (hung_up, check) = match &watched {
            Some(watched) => (&*watched.hung_up, WATCHED_WAITER_CHECK),
            None => (&unwatched, WAITER_CHECK),
        };
        loop {
            match self.cx.ledger.winners(agency, check, hung_up) {
                Ok(Some(line)) => {
                    self.cx.metrics.told(agency);
                    return Ok(Reply::Line(line));
                }
                Err(e) => return Ok(Reply::Err(e)),
                Ok(None) if self.cx.peer.ended() != Ended::No => return Err(End::Ended),
                Ok(None) if conn.peer_gone() => {
                    debug!("action: winners | result: fail | agency: {agency} | error: the client hung up");
                    return Err(End::Closed);
                }
                Ok(None) => watched.iter().filter(|w| w.hung_up.load(Ordering::SeqCst)).for_each(Watched::rearm),
            }
        }
    }

    /// While a guest, notes how far it has got (which decides who is evicted first) and counts
    /// its requests.
    ///
    /// # Errors
    /// `BUSY` past [`MAX_GUEST_REQUESTS`]: the connection is to be closed.
    fn count_guest_request(&mut self, request: &Result<Request, ProtocolError>) -> Result<(), ProtocolError> {
        if self.agency.is_some() {
            return Ok(());
        }
        let probe = matches!(request, Ok(Request::Ping | Request::Status));
        self.cx.peer.set_stage(if probe { Stage::Probed } else { Stage::Underway });
        self.guest_requests += 1;
        if self.guest_requests > MAX_GUEST_REQUESTS {
            return Err(probes::too_many());
        }
        Ok(())
    }

    fn agency(&self) -> Result<u32, ProtocolError> {
        self.agency.ok_or_else(|| ProtocolError::new(ErrorCode::NoAgency, "say HELLO <agency> first"))
    }

    fn bet(&mut self, row: &[u8]) -> Result<Reply, ProtocolError> {
        let agency = self.agency()?;
        let bet =
            self.parser.bet(row, bet::today()).map_err(|e| ProtocolError::new(ErrorCode::BadBet, e.to_string()))?;
        self.writer.push_stored(agency, &bet);
        let rows = Rows { ends: vec![self.writer.len()], bytes: self.writer.take() };
        let stored = self.cx.ledger.store(agency, None, &rows)?;
        self.cx.metrics.stored(1);
        info!("action: apuesta_almacenada | result: success | dni: {} | numero: {}", bet.document, bet.number);
        Ok(Reply::Ok(Some(stored)))
    }

    /// `BATCH`: its rows read and appended, to be acknowledged once durable (`None`), or its
    /// refusal. Too many appended and not yet acknowledged (or a ledger that does not pipeline)
    /// and the session waits for them now.
    fn batch(
        &mut self,
        conn: &mut Connection,
        (offset, count): (u64, u32),
        header_len: usize,
        deadline: Instant,
    ) -> Result<Option<Reply>, End> {
        match self.read_batch(conn, (offset, count), header_len, deadline) {
            Ok(Ok(appended)) => {
                self.pending.push((appended, count));
                if self.pending.len() >= MAX_PENDING || !self.cx.ledger.pipelines() {
                    self.acknowledge(conn)?;
                }
                Ok(None)
            }
            Ok(Err(refused)) => {
                self.log_batch_refused(count, refused.code.as_str());
                Ok(Some(Reply::Err(refused)))
            }
            Err(end) => {
                self.log_batch_refused(count, "batch cut short");
                Err(end)
            }
        }
    }

    /// Reads the `count` rows of a batch (all of them, even after a bad one, so that the
    /// connection stays in step), then appends them all or none. The outer `Err` means the
    /// batch could not be read whole and the connection is over.
    /// The header line's own `header_len` bytes count against the batch's 8 KiB.
    fn read_batch(
        &mut self,
        conn: &mut Connection,
        (offset, count): (u64, u32),
        header_len: usize,
        deadline: Instant,
    ) -> Result<Result<Appended, ProtocolError>, End> {
        self.encoder.set_today(bet::today());
        let agency = self.agency.unwrap_or(0);
        let mut size = header_len;
        let mut first_error: Option<String> = None;
        self.rows.bytes.clear();
        self.rows.ends.clear();
        for i in 1..=count {
            let line = conn.read_line(deadline).map_err(|e| End::Read(e, "batch"))?;
            size += line.len() + 1;
            if size > MAX_LINE {
                return Err(End::TooBig);
            }
            if first_error.is_some() {
                continue;
            }
            match self.encoder.push_stored(agency, line, &mut self.rows.bytes) {
                Ok(()) => self.rows.ends.push(self.rows.bytes.len()),
                Err(e) => first_error = Some(format!("row {i}: {e}")),
            }
        }
        Ok(self.agency().and_then(|agency| match first_error {
            Some(why) => Err(ProtocolError::new(ErrorCode::BadBet, why)),
            None => self.cx.ledger.append(agency, Some(offset), &self.rows),
        }))
    }

    /// Acknowledges what is pending, tells the client why the connection ends if it can still
    /// hear it, and closes.
    fn end(&mut self, conn: &mut Connection, end: End) {
        if matches!(end, End::Gone) {
            return;
        }
        let _ = self.acknowledge(conn);
        // A connection ended by another was woken by the shutdown of its reading half: say why.
        let end = if self.cx.peer.ended() == Ended::No { end } else { End::Ended };
        if let Some(last_word) = self.last_word(conn, end) {
            self.cx.metrics.refused(last_word.code);
            let _ = conn.write_reply(&Reply::Err(last_word));
        }
        conn.close();
    }

    /// What a client hears as the connection ends, if anything.
    fn last_word(&mut self, conn: &mut Connection, end: End) -> Option<ProtocolError> {
        let (code, why) = match end {
            End::Closed | End::Gone => return None,
            End::Refused(refused) => return Some(refused),
            End::Ended if self.cx.peer.ended() == Ended::Replaced => {
                let agency = self.agency.map(|a| a.to_string()).unwrap_or_default();
                (ErrorCode::Replaced, format!("agency {agency} connected again on another connection"))
            }
            End::Ended if self.cx.peer.ended() == Ended::TimedOut => {
                conn.set_write_timeout(FAREWELL);
                (ErrorCode::Timeout, registry::hello_timed_out(self.cx.hello_timeout))
            }
            End::Ended => {
                conn.set_write_timeout(FAREWELL);
                (ErrorCode::Busy, registry::EVICTED.to_owned())
            }
            End::TooBig => (ErrorCode::TooLong, format!("a batch is at most {MAX_LINE} bytes, header and rows")),
            // Our own shutdown closed the reading half: the client can still hear why.
            End::Read(ReadError::Closed | ReadError::ClosedMidLine, _) if self.cx.ledger.is_shutting_down() => {
                (ErrorCode::Shutdown, "the server is shutting down".to_owned())
            }
            End::Read(ReadError::Closed, _) => return None,
            End::Read(error @ (ReadError::ClosedMidLine | ReadError::Io(_)), reading) => {
                debug!("action: read_{reading} | result: fail | error: {error}");
                return None;
            }
            End::Read(ReadError::TooLong, _) => (ErrorCode::TooLong, format!("a line is at most {MAX_LINE} bytes")),
            End::Read(ReadError::TimedOut, reading) => {
                let ms = self.cx.idle_timeout.as_millis();
                (ErrorCode::Timeout, format!("no complete {reading} within {ms} ms"))
            }
        };
        Some(ProtocolError::new(code, format!("{why}; closing")))
    }
}
