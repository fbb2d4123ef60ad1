//! One connection to the server, plain or TLS: requests out, reply lines in; and how one is
//! opened among the addresses of `CLI_SERVER_ADDRESS`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use log::warn;
use rustls::{ClientConnection, StreamOwned};

use crate::agency::credentials::Credentials;
use crate::agency::{AgencyError, Attempt};
use crate::logging::field;
use crate::wire::protocol::{ErrorCode, Reply, Status};
use crate::wire::transport::{Socket, Transport};

/// The longest reply read: a server gone wrong cannot make us buffer more. The longest legal
/// reply is `WINNERS` for an agency all of whose bets won, at the default quota
/// (`SERVER_MAX_BETS_PER_AGENCY`, 10,000,000) of 10-digit documents: 110,000,000 bytes and a
/// few. A server with a higher quota may send more, and this agency would refuse it.
const MAX_REPLY: u64 = 128 << 20;

/// Longest wait for a reply other than `WINNERS` (which waits for the other agencies).
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why no connection could be opened.
pub(crate) struct OpenError {
    pub(crate) why: String,
    /// No answer within the time given (worth more patience next time).
    pub(crate) timed_out: bool,
    /// A name that does not resolve.
    pub(crate) unresolved: bool,
}

/// Connects to the first of `addresses` (`host:port,host:port,…`) that answers, trying them in
/// turn from the `first`-th (modulo their number), and every address each name resolves to;
/// returns the stream and which of `addresses` it reached. Each address gets `timeout` to
/// answer. With one address, the error does not repeat it (the caller says it).
pub(crate) fn open(addresses: &str, first: usize, timeout: Duration) -> Result<(TcpStream, usize), OpenError> {
    let list: Vec<&str> = addresses.split(',').map(str::trim).collect();
    let name = |i: usize, e: &dyn std::fmt::Display| {
        if list.len() > 1 { format!("{}: {e}", list[i]) } else { e.to_string() }
    };
    let mut last = OpenError { why: "the name resolves to no address".into(), timed_out: false, unresolved: true };
    for i in (0..list.len()).map(|k| (first + k) % list.len()) {
        let resolved = match list[i].to_socket_addrs() {
            Ok(resolved) => resolved,
            Err(e) => {
                last = OpenError { why: name(i, &e), timed_out: false, unresolved: true };
                continue;
            }
        };
        for addr in resolved {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(stream) => return Ok((stream, i)),
                Err(e) => {
                    let timed_out = e.kind() == io::ErrorKind::TimedOut;
                    last = OpenError { why: name(i, &e), timed_out, unresolved: false };
                }
            }
        }
    }
    Err(last)
}

/// A connection to the server, plain or TLS: requests out, reply lines in.
pub(crate) struct Link {
    /// The socket itself, shared with the [`crate::agency::Stop`], for its timeouts.
    stream: Arc<TcpStream>,
    io: BufReader<Transport<ClientConnection>>,
    line: String,
}

/// Why a link could not be set up.
pub(crate) enum LinkError {
    Io(io::Error),
    Fatal(AgencyError),
}

impl Link {
    pub(crate) fn new(stream: Arc<TcpStream>, credentials: &Credentials, address: &str) -> Result<Link, LinkError> {
        stream.set_nodelay(true).map_err(LinkError::Io)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(LinkError::Io)?;
        let socket = Socket::new(Arc::clone(&stream));
        let transport = match &credentials.tls {
            None => {
                // Plain text goes to this machine only: the token and the bets would cross the
                // network in clear (a name that resolved to loopback at start may not now).
                let peer = stream.peer_addr().map_err(LinkError::Io)?;
                if !peer.ip().to_canonical().is_loopback() {
                    return Err(LinkError::Fatal(AgencyError::Credentials(
                        crate::agency::credentials::plain_text_refusal(address),
                    )));
                }
                Transport::Plain(socket)
            }
            Some(config) => {
                let fatal = |why: String| LinkError::Fatal(AgencyError::Tls { address: address.to_owned(), why });
                let name = credentials.server_name(address).map_err(fatal)?;
                let conn = ClientConnection::new(Arc::clone(config), name).map_err(|e| fatal(e.to_string()))?;
                Transport::Tls(Box::new(StreamOwned::new(conn, socket)))
            }
        };
        Ok(Link { stream, io: BufReader::new(transport), line: String::new() })
    }

    pub(crate) fn send(&mut self, request: &[u8]) -> Result<(), Attempt> {
        let transport = self.io.get_mut();
        Ok(transport.write_all(request).and_then(|()| transport.flush())?)
    }

    /// Drops what could not be sent (the server closed the connection), so that a read can
    /// still take the replies that came before the close: rustls would otherwise try to send
    /// it again first, and fail.
    pub(crate) fn drop_unsent(&mut self) {
        if let Transport::Tls(tls) = self.io.get_mut() {
            while tls.conn.wants_write() {
                if tls.conn.write_tls(&mut io::sink()).is_err() {
                    break;
                }
            }
        }
    }

    /// Reads one reply line, waiting at most `timeout` (`None`: forever).
    fn read_reply(&mut self, timeout: Option<Duration>) -> Result<Reply, Attempt> {
        self.stream.set_read_timeout(timeout)?;
        self.line.clear();
        let n = (&mut self.io).take(MAX_REPLY).read_line(&mut self.line)?;
        if n == 0 || !self.line.ends_with('\n') {
            return Err(Attempt::Retry("the server closed the connection".into()));
        }
        Reply::parse(self.line.trim_end_matches(['\n', '\r'])).map_err(|e| AgencyError::Protocol(e.message).into())
    }

    /// Reads one reply; an `ERR` is a reason to retry or a final refusal.
    fn receive(&mut self, timeout: Option<Duration>) -> Result<Reply, Attempt> {
        match self.read_reply(timeout)? {
            Reply::Err(e) if e.code == ErrorCode::Storage => Err(Attempt::Storage(format!("ERR {e}"))),
            Reply::Err(e) if matches!(e.code, ErrorCode::Busy | ErrorCode::Shutdown | ErrorCode::Timeout) => {
                Err(Attempt::Retry(format!("ERR {e}")))
            }
            Reply::Err(e) => {
                warn!("action: request | result: fail | error: {}", field(&e.to_string()));
                Err(AgencyError::Refused(e).into())
            }
            reply => Ok(reply),
        }
    }

    pub(crate) fn ok_count(&mut self, request: &str) -> Result<u64, Attempt> {
        self.send(request.as_bytes())?;
        self.ok_count_reply()
    }

    pub(crate) fn ok_count_reply(&mut self) -> Result<u64, Attempt> {
        match self.receive(Some(REPLY_TIMEOUT))? {
            Reply::Ok(Some(n)) => Ok(n),
            other => Err(unexpected(&other)),
        }
    }

    /// Reads the `OK` that answers a request sent before.
    pub(crate) fn ok_reply(&mut self) -> Result<(), Attempt> {
        match self.receive(Some(REPLY_TIMEOUT))? {
            Reply::Ok(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Reads the reply to a `STATUS` sent before `WINNERS`: where the round is (`None` if the
    /// server did not say).
    pub(crate) fn status_reply(&mut self) -> Result<Option<Status>, Attempt> {
        match self.read_reply(Some(REPLY_TIMEOUT))? {
            Reply::Status(status) => Ok(Some(status)),
            _ => Ok(None),
        }
    }

    /// Waits for the `WINNERS` reply asked for after `STATUS`, as long as
    /// the draw takes; `waiting` is called each time `first` (then what `waiting` returns)
    /// passes without it.
    pub(crate) fn winners(
        &mut self,
        first: Duration,
        mut waiting: impl FnMut() -> Duration,
    ) -> Result<Vec<String>, Attempt> {
        self.stream.set_read_timeout(Some(first))?;
        loop {
            // Nothing consumed until a byte is there: a timeout never cuts a line in two.
            match self.io.fill_buf() {
                Ok(_) => break,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    self.stream.set_read_timeout(Some(waiting()))?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        match self.receive(None)? {
            Reply::Winners(w) => Ok(w),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(reply: &Reply) -> Attempt {
    Attempt::Fatal(AgencyError::Protocol(format!("unexpected reply {reply:?}")))
}
