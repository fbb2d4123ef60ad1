//! One connection's conversation: read a request, check that this connection may make it,
//! apply it to the round, write the reply.
//!
//! Errors a client causes are answered with an `ERR` line and end at most this connection;
//! they never reach the round or the other connections. Refusals of identity (`ERR AUTH`) end
//! the connection: a client that is not who it says has nothing more to do here.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::ledger::{Appended, Ledger, Rows};
use crate::server::Security;
use crate::server::auth;
use crate::server::guest_log::{GuestEvent, GuestLog};
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

/// How often a `WINNERS` waiter looks up from the round to see whether its client is still
/// there (or was replaced): a client that hangs up frees its thread within this.
const WAITER_CHECK: Duration = Duration::from_millis(250);

/// What a session needs from the server around it.
pub struct Context<'a> {
    pub round: &'a dyn Ledger,
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
}

/// One connection's state besides its socket.
pub struct Session<'a> {
    round: &'a dyn Ledger,
    cx: Context<'a>,
    idle_timeout: Duration,
    agency: Option<u32>,
    /// Requests made while a guest.
    guest_requests: u32,
    parser: RowParser,
    writer: RowWriter,
    /// A batch's rows: checked in place and copied (or re-encoded) into `rows`, both reused
    /// from batch to batch.
    encoder: RowEncoder,
    rows: Rows,
    /// Batches appended but not yet durable, with their row counts, oldest first.
    pending: Vec<(Appended, u32)>,
}

/// What to do after a reply.
enum Next {
    Continue,
    Close,
}

/// Why a request (a batch with its rows) could not be read whole: the connection is over.
enum Cut {
    Read(ReadError),
    TooBig,
    /// Another connection ended this one: a newer one of the same agency, or a newer guest.
    Ended,
}

impl<'a> Session<'a> {
    pub fn new(cx: Context<'a>) -> Self {
        Session {
            round: cx.round,
            idle_timeout: cx.idle_timeout,
            guest_requests: cx.guest_requests,
            cx,
            agency: None,
            parser: RowParser::default(),
            writer: RowWriter::default(),
            encoder: RowEncoder::new(bet::today()),
            rows: Rows::default(),
            pending: Vec::new(),
        }
    }

    /// Serves `conn` until the client quits, breaks the protocol beyond repair, goes silent
    /// for the idle timeout, or the server shuts down.
    ///
    /// Batches from a client that pipelines them are appended back to back and acknowledged
    /// together after one sync: the session only waits for durability (and answers) when no
    /// further request has arrived, or before answering a request of another kind.
    pub fn run(mut self, conn: &mut Connection) {
        loop {
            let idle = !self.pending.is_empty() && !conn.has_buffered_line() && !conn.fill_available();
            if idle && self.acknowledge(conn).is_err() {
                return;
            }
            // Each request, a batch with all its rows included, must arrive within the timeout
            // (a guest's hello timeout is the door's: it ends the guest through the registry).
            let deadline = Instant::now() + self.idle_timeout;
            let (header_len, request) = match conn.read_line(deadline) {
                Ok(line) => (line.len() + 1, protocol::parse_request(line)),
                Err(e) => return self.end(conn, Cut::Read(e), "request"),
            };
            if self.cx.peer.ended() != Ended::No {
                return self.end(conn, Cut::Ended, "request");
            }
            if let Ok(request) = &request
                && let Err(refused) = self.allowed(request, conn.is_tls())
            {
                return self.refuse(conn, refused);
            }
            if let Err(refused) = self.count_guest_request(&request) {
                return self.refuse(conn, refused);
            }
            let (reply, next) = match request {
                Ok(Request::Batch { offset, count }) => {
                    match self.read_batch(conn, (offset, count), header_len, deadline) {
                        Ok(Ok(appended)) => {
                            self.pending.push((appended, count));
                            let full = self.pending.len() >= MAX_PENDING || !self.round.pipelines();
                            if full && self.acknowledge(conn).is_err() {
                                return;
                            }
                            continue;
                        }
                        Ok(Err(refused)) => (Reply::Err(refused), Next::Continue),
                        Err(cut) => {
                            info!(
                                "action: apuesta_recibida | result: fail | cantidad: {count} | error: batch cut short"
                            );
                            return self.end(conn, cut, "batch");
                        }
                    }
                }
                Ok(request) => {
                    // Replies go out in request order, and DONE must follow every OK.
                    if self.acknowledge(conn).is_err() {
                        return;
                    }
                    match request {
                        Request::Hello { agency, token } => match self.hello(agency, token) {
                            Ok(reply) => (reply, Next::Continue),
                            Err(refused) if refused.code == ErrorCode::Auth => return self.refuse(conn, refused),
                            Err(refused) => (Reply::Err(refused), Next::Continue),
                        },
                        Request::Winners => match self.wait_winners(conn) {
                            Some(reply) => (reply, Next::Continue),
                            None => return,
                        },
                        request => self.apply(request),
                    }
                }
                Err(e) => (Reply::Err(e), Next::Continue),
            };
            conn.set_write_timeout(self.idle_timeout);
            if self.acknowledge(conn).and_then(|()| conn.write_reply(&reply)).is_err() {
                return;
            }
            // `ERR SHUTDOWN` is the last thing a client hears.
            let shutting_down = matches!(&reply, Reply::Err(e) if e.code == ErrorCode::Shutdown);
            if shutting_down || matches!(next, Next::Close) {
                conn.close();
                return;
            }
        }
    }

    /// Waits until every pending batch is durable, then answers each, in order.
    fn acknowledge(&mut self, conn: &mut Connection) -> std::io::Result<()> {
        let Some(end) = self.pending.iter().map(|(a, _)| a.end).max() else {
            return Ok(());
        };
        let durable = self.round.make_durable(end);
        for (appended, count) in self.pending.drain(..) {
            let reply = match &durable {
                Ok(()) => {
                    info!("action: apuesta_recibida | result: success | cantidad: {count}");
                    Reply::Ok(Some(appended.stored))
                }
                Err(e) => {
                    info!("action: apuesta_recibida | result: fail | cantidad: {count} | error: {}", e.code.as_str());
                    Reply::Err(e.clone())
                }
            };
            conn.queue_reply(&reply);
        }
        conn.flush().inspect_err(|e| debug!("action: reply | result: fail | error: {e}"))
    }

    /// Answers a request that is one line long.
    fn apply(&mut self, request: Request) -> (Reply, Next) {
        let reply = match request {
            Request::Ping => Ok(Reply::Pong),
            Request::Quit => return (Reply::Bye, Next::Close),
            Request::Status => self.round.status().map(Reply::Status),
            Request::Bet(row) => self.bet(&row),
            Request::Done => self.agency().and_then(|a| self.round.done(a)).map(|()| Reply::Ok(None)),
            // Read with its rows, answered or waited for by `run`.
            Request::Batch { .. } | Request::Hello { .. } | Request::Winners => {
                Err(ProtocolError::new(ErrorCode::BadRequest, "not a one-line request"))
            }
        };
        (reply.unwrap_or_else(Reply::Err), Next::Continue)
    }

    /// Whether this connection may make `request` at all: over plain text on a TLS server, only
    /// the probes `PING`, `STATUS` and `QUIT`.
    fn allowed(&self, request: &Request, tls: bool) -> Result<(), ProtocolError> {
        let probe = matches!(request, Request::Ping | Request::Status | Request::Quit);
        if probe || tls || self.cx.security.tls.is_none() {
            Ok(())
        } else {
            Err(ProtocolError::new(ErrorCode::Auth, "this server takes agencies over TLS only"))
        }
    }

    /// `HELLO`: the agency's number in range, then who may speak for it (its token, or loopback
    /// in protected mode), then the count it holds; this connection now speaks for it, and an
    /// older connection of the same agency is ended.
    fn hello(&mut self, agency: u32, token: Option<Token>) -> Result<Reply, ProtocolError> {
        self.round.check_agency(agency)?;
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
            info!("action: replace_session | result: success | agency: {agency} | ip: {}", self.cx.ip);
        }
        self.agency = Some(agency);
        let stored = self.round.hello(agency)?;
        Ok(Reply::Ok(Some(stored)))
    }

    /// `WINNERS`: waits for the draw, looking up every [`WAITER_CHECK`] to see whether the
    /// client hung up or was replaced. `None` if the connection is over.
    fn wait_winners(&mut self, conn: &mut Connection) -> Option<Reply> {
        let agency = match self.agency() {
            Ok(agency) => agency,
            Err(e) => return Some(Reply::Err(e)),
        };
        loop {
            match self.round.winners(agency, WAITER_CHECK) {
                Ok(Some(line)) => return Some(Reply::Line(line)),
                Err(e) => return Some(Reply::Err(e)),
                Ok(None) if self.cx.peer.ended() != Ended::No => {
                    self.end(conn, Cut::Ended, "request");
                    return None;
                }
                Ok(None) if conn.peer_gone() => {
                    debug!("action: winners | result: fail | agency: {agency} | error: the client hung up");
                    conn.close();
                    return None;
                }
                Ok(None) => {}
            }
        }
    }

    /// Answers an identity refusal and ends the connection.
    fn refuse(&mut self, conn: &mut Connection, refused: ProtocolError) {
        let _ = self.acknowledge(conn);
        let _ = conn.write_reply(&Reply::Err(refused));
        conn.close();
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
        let stored = self.round.store(agency, None, &rows)?;
        info!("action: apuesta_almacenada | result: success | dni: {} | numero: {}", bet.document, bet.number);
        Ok(Reply::Ok(Some(stored)))
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
    ) -> Result<Result<Appended, ProtocolError>, Cut> {
        self.encoder.set_today(bet::today());
        let agency = self.agency.unwrap_or(0);
        let mut size = header_len;
        let mut first_error: Option<String> = None;
        self.rows.bytes.clear();
        self.rows.ends.clear();
        for i in 1..=count {
            let line = conn.read_line(deadline).map_err(Cut::Read)?;
            size += line.len() + 1;
            if size > MAX_LINE {
                return Err(Cut::TooBig);
            }
            if first_error.is_some() {
                continue;
            }
            match self.encoder.push_stored(agency, line, &mut self.rows.bytes) {
                Ok(()) => self.rows.ends.push(self.rows.bytes.len()),
                Err(e) => first_error = Some(format!("row {i}: {e}")),
            }
        }
        let result = self.agency().and_then(|agency| match first_error {
            Some(why) => Err(ProtocolError::new(ErrorCode::BadBet, why)),
            None => self.round.append(agency, Some(offset), &self.rows),
        });
        if let Err(e) = &result {
            info!("action: apuesta_recibida | result: fail | cantidad: {count} | error: {}", e.code.as_str());
        }
        Ok(result)
    }

    /// Acknowledges what is pending, tells the client why the connection ends if it can still
    /// hear it, and closes.
    fn end(&mut self, conn: &mut Connection, cut: Cut, reading: &str) {
        let _ = self.acknowledge(conn);
        // A connection ended by another was woken by the shutdown of its reading half: say why.
        let cut = if self.cx.peer.ended() == Ended::No { cut } else { Cut::Ended };
        let reply = match cut {
            Cut::Ended if self.cx.peer.ended() == Ended::Replaced => {
                let agency = self.agency.map(|a| a.to_string()).unwrap_or_default();
                Some((ErrorCode::Replaced, format!("agency {agency} connected again on another connection")))
            }
            Cut::Ended if self.cx.peer.ended() == Ended::TimedOut => {
                conn.set_write_timeout(FAREWELL);
                Some((ErrorCode::Timeout, registry::hello_timed_out(self.cx.hello_timeout)))
            }
            Cut::Ended => {
                conn.set_write_timeout(FAREWELL);
                Some((ErrorCode::Busy, registry::EVICTED.to_owned()))
            }
            Cut::TooBig => Some((ErrorCode::TooLong, format!("a batch is at most {MAX_LINE} bytes, header and rows"))),
            // Our own shutdown closed the reading half: the client can still hear why.
            Cut::Read(ReadError::Closed | ReadError::ClosedMidLine) if self.round.is_shutting_down() => {
                Some((ErrorCode::Shutdown, "the server is shutting down".to_owned()))
            }
            Cut::Read(ReadError::Closed) => None,
            Cut::Read(error @ (ReadError::ClosedMidLine | ReadError::Io(_))) => {
                debug!("action: read_{reading} | result: fail | error: {error:?}");
                None
            }
            Cut::Read(ReadError::TooLong) => Some((ErrorCode::TooLong, format!("a line is at most {MAX_LINE} bytes"))),
            Cut::Read(ReadError::TimedOut) => {
                let ms = self.idle_timeout.as_millis();
                Some((ErrorCode::Timeout, format!("no complete {reading} within {ms} ms")))
            }
        };
        if let Some((code, why)) = reply {
            let _ = conn.write_reply(&Reply::Err(ProtocolError::new(code, format!("{why}; closing"))));
        }
        conn.close();
    }
}
