//! One connection's conversation: read a request, apply it to the round, write the reply.
//!
//! Errors a client causes are answered with an `ERR` line and end at most this connection;
//! they never reach the round or the other connections.

use std::time::{Duration, Instant};

use log::{debug, info};

use crate::ledger::round::{Appended, Round, Rows};
use crate::wire::bet::{self, RowParser, RowWriter};
use crate::wire::connection::{Connection, ReadError};
use crate::wire::protocol::{self, ErrorCode, MAX_LINE, ProtocolError, Reply, Request};

/// Most batches appended and not yet acknowledged on one connection.
const MAX_PENDING: usize = 64;

/// One connection's state besides its socket.
pub struct Session<'a> {
    round: &'a Round,
    idle_timeout: Duration,
    agency: Option<u32>,
    parser: RowParser,
    writer: RowWriter,
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
}

impl<'a> Session<'a> {
    pub fn new(round: &'a Round, idle_timeout: Duration) -> Self {
        Session {
            round,
            idle_timeout,
            agency: None,
            parser: RowParser::default(),
            writer: RowWriter::default(),
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
            // Each request, a batch with all its rows included, must arrive within the timeout.
            let deadline = Instant::now() + self.idle_timeout;
            let (header_len, request) = match conn.read_line(deadline) {
                Ok(line) => (line.len() + 1, protocol::parse_request(line)),
                Err(e) => return self.end(conn, Cut::Read(e), "request"),
            };
            let (reply, next) = match request {
                Ok(Request::Batch { offset, count }) => {
                    match self.read_batch(conn, (offset, count), header_len, deadline) {
                        Ok(Ok(appended)) => {
                            self.pending.push((appended, count));
                            let full = self.pending.len() >= MAX_PENDING || !self.round.group_commit();
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
                    self.apply(request)
                }
                Err(e) => (Reply::Err(e), Next::Continue),
            };
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
            Request::Status => Ok(Reply::Status(self.round.status())),
            Request::Hello(agency) => self.round.hello(agency).map(|stored| {
                self.agency = Some(agency);
                Reply::Ok(Some(stored))
            }),
            Request::Bet(row) => self.bet(&row),
            Request::Done => self.agency().and_then(|a| self.round.done(a)).map(|()| Reply::Ok(None)),
            Request::Winners => self.agency().and_then(|a| self.round.winners(a)).map(Reply::Winners),
            // Read with its rows by `run`.
            Request::Batch { .. } => Err(ProtocolError::new(ErrorCode::BadRequest, "BATCH without rows")),
        };
        (reply.unwrap_or_else(Reply::Err), Next::Continue)
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
        let today = bet::today();
        let mut size = header_len;
        let mut first_error: Option<String> = None;
        let mut ends = Vec::with_capacity(count as usize);
        for i in 1..=count {
            let line = conn.read_line(deadline).map_err(Cut::Read)?;
            size += line.len() + 1;
            if size > MAX_LINE {
                return Err(Cut::TooBig);
            }
            if first_error.is_some() {
                continue;
            }
            match self.parser.bet(line, today) {
                Ok(bet) => {
                    self.writer.push_stored(self.agency.unwrap_or(0), &bet);
                    ends.push(self.writer.len());
                }
                Err(e) => first_error = Some(format!("row {i}: {e}")),
            }
        }
        let rows = Rows { bytes: self.writer.take(), ends };
        let result = self.agency().and_then(|agency| match first_error {
            Some(why) => Err(ProtocolError::new(ErrorCode::BadBet, why)),
            None => self.round.append(agency, Some(offset), &rows),
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
        let reply = match cut {
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
