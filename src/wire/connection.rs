//! A server-side connection, plain or TLS, and its read buffer: lines in, replies out, with a
//! deadline on every line and on every reply.
//!
//! The read buffer is fixed-size: a line longer than [`MAX_LINE`] is refused after reading
//! just past the cap, never buffered whole. A read timeout alone would let a client that sends
//! one byte per tick hold a thread forever, so every line (or a whole batch) gets a deadline;
//! likewise a reply must be taken whole within the write timeout of its first byte.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ServerConnection;

use crate::wire::protocol::{MAX_LINE, Reply};
use crate::wire::transport::{Arrived, Transport, peek_now};

/// Room for one longest line, its `\r\n`, and what a pipelining client sent after it.
const BUFFER: usize = 2 * MAX_LINE + 2;

/// Why no line could be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer closed the connection between lines.
    Closed,
    /// The peer closed the connection in the middle of a line.
    ClosedMidLine,
    /// The line is longer than [`MAX_LINE`] bytes.
    TooLong,
    /// The deadline passed before the line was complete.
    TimedOut,
    Io(io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Closed => f.write_str("closed between lines"),
            ReadError::ClosedMidLine => f.write_str("closed in the middle of a line"),
            ReadError::TooLong => write!(f, "a line longer than {MAX_LINE} bytes"),
            ReadError::TimedOut => f.write_str("timed out"),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// One client's socket with its read buffer.
pub(crate) struct Connection {
    /// Shared with the server's registry, which shuts it down at shutdown: an `Arc` rather than
    /// a `try_clone`, so that a connection costs one file descriptor, not two.
    stream: Arc<TcpStream>,
    transport: Transport<ServerConnection>,
    /// How long a reply may take to be taken whole by the client.
    write_timeout: Duration,
    buf: Box<[u8]>,
    /// `buf[start..end]` is read but not yet consumed.
    start: usize,
    end: usize,
    out: Vec<u8>,
}

impl Connection {
    /// A plain-text connection over `stream`.
    #[cfg(test)]
    pub(crate) fn new(stream: Arc<TcpStream>, write_timeout: Duration) -> Self {
        let transport = Transport::Plain(crate::wire::transport::Socket::new(Arc::clone(&stream)));
        Connection::with_transport(transport, write_timeout)
    }

    /// A connection over `transport` (plain text, or TLS whose handshake runs on first use).
    pub(crate) fn with_transport(mut transport: Transport<ServerConnection>, write_timeout: Duration) -> Self {
        let stream = Arc::clone(transport.socket_mut().stream());
        Connection {
            stream,
            transport,
            write_timeout,
            buf: vec![0; BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            out: Vec::with_capacity(256),
        }
    }

    /// Whether the client speaks TLS.
    pub(crate) fn is_tls(&self) -> bool {
        self.transport.is_tls()
    }

    /// Whether a whole line is already buffered, so reading it will not block.
    pub(crate) fn has_buffered_line(&self) -> bool {
        memchr::memchr(b'\n', &self.buf[self.start..self.end]).is_some()
    }

    /// Reads whatever bytes have already arrived, without waiting; true if any were read.
    /// Lets the session see whether a pipelining client has sent more requests.
    pub(crate) fn fill_available(&mut self) -> bool {
        self.compact();
        if self.end == self.buf.len() {
            return false;
        }
        self.transport.socket_mut().dont_wait = true;
        let read = self.transport.read(&mut self.buf[self.end..]);
        self.transport.socket_mut().dont_wait = false;
        match read {
            Ok(n) => {
                self.end += n;
                n > 0
            }
            Err(_) => false,
        }
    }

    /// Moves unread bytes to the front when the buffer's end is reached.
    fn compact(&mut self) {
        if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Reads the next line, without its `\n` or `\r\n`, before `deadline`.
    ///
    /// # Errors
    /// See [`ReadError`]. After `TooLong`, `TimedOut` or an I/O error the stream is no longer
    /// in step with the peer and should be closed.
    pub(crate) fn read_line(&mut self, deadline: Instant) -> Result<&[u8], ReadError> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        let mut scanned = 0;
        loop {
            let pending = &self.buf[self.start..self.end];
            if let Some(i) = memchr::memchr(b'\n', &pending[scanned..]) {
                let line_end = self.start + scanned + i;
                let mut line = &self.buf[self.start..line_end];
                self.start = line_end + 1;
                if let Some(stripped) = line.strip_suffix(b"\r") {
                    line = stripped;
                }
                return if line.len() > MAX_LINE { Err(ReadError::TooLong) } else { Ok(line) };
            }
            scanned = pending.len();
            // Room for MAX_LINE bytes plus `\r` and no `\n` yet: too long, whatever follows.
            if scanned > MAX_LINE + 1 {
                return Err(ReadError::TooLong);
            }
            self.fill(deadline)?;
        }
    }

    /// Reads more bytes into the buffer, waiting at most until `deadline`; first sends the
    /// replies queued, which the peer may be waiting for.
    fn fill(&mut self, deadline: Instant) -> Result<(), ReadError> {
        self.flush().map_err(ReadError::Io)?;
        self.compact();
        self.transport.socket_mut().read_deadline = Some(deadline);
        match self.transport.read(&mut self.buf[self.end..]) {
            Ok(0) if self.start == self.end => Err(ReadError::Closed),
            Ok(0) => Err(ReadError::ClosedMidLine),
            // A TLS peer that hung up without saying so: the same as a plain one.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && self.start == self.end => Err(ReadError::Closed),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ReadError::ClosedMidLine),
            Ok(n) => {
                self.end += n;
                Ok(())
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                Err(ReadError::TimedOut)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(ReadError::Io(e)),
        }
    }

    /// Sends one reply line (and any queued before it).
    ///
    /// # Errors
    /// The socket's write error (the peer is gone, or did not read for the write timeout).
    pub(crate) fn write_reply(&mut self, reply: &Reply) -> io::Result<()> {
        if let Reply::Line(line) = reply {
            // Possibly megabytes, shared with every other request for it: sent as it is.
            self.flush()?;
            return self.send(line);
        }
        self.queue_reply(reply);
        self.flush()
    }

    /// Adds a reply to those sent by the next [`Connection::flush`], or before the next read that
    /// has to wait for the peer.
    pub(crate) fn queue_reply(&mut self, reply: &Reply) {
        reply.encode(&mut self.out);
    }

    /// Sends the queued replies in one write.
    ///
    /// # Errors
    /// As [`Connection::write_reply`].
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let result = self.send(&out);
        self.out = out;
        self.out.clear();
        result
    }

    /// Writes `bytes`, which the client must take whole within the write timeout of the first.
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.transport.socket_mut().write_deadline = Some(Instant::now() + self.write_timeout);
        self.transport.write_all(bytes).and_then(|()| self.transport.flush())
    }

    /// Sets the time the next replies may take (shorter for a guest or a connection that is
    /// being ended).
    pub(crate) fn set_write_timeout(&mut self, timeout: Duration) {
        self.write_timeout = timeout;
    }

    /// The socket, to be watched for a hang-up while its thread waits on the round.
    pub(crate) fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.stream)
    }

    /// Whether the client has hung up, without waiting or consuming anything: for a thread
    /// that is waiting on the round rather than reading.
    pub(crate) fn peer_gone(&self) -> bool {
        peek_now(&self.stream) == Arrived::Closed
    }

    /// Closes both directions, so that a peer blocked on us sees the end at once; a TLS peer is
    /// told first (`close_notify`), so that it can tell our close from a cut connection.
    pub(crate) fn close(&mut self) {
        if let Transport::Tls(tls) = &mut self.transport {
            tls.conn.send_close_notify();
            tls.sock.write_deadline = Some(Instant::now() + self.write_timeout.min(Duration::from_secs(1)));
            let _ = tls.flush();
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, Connection) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, Connection::new(Arc::new(server), Duration::from_secs(5)))
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn splits_pipelined_lines_and_strips_crlf() {
        let (mut client, mut conn) = pair();
        client.write_all(b"PING\r\nSTATUS\nQU").unwrap();
        assert_eq!(conn.read_line(soon()).unwrap(), b"PING");
        assert!(conn.has_buffered_line());
        assert_eq!(conn.read_line(soon()).unwrap(), b"STATUS");
        assert!(!conn.has_buffered_line());
        client.write_all(b"IT\n").unwrap();
        assert_eq!(conn.read_line(soon()).unwrap(), b"QUIT");
        drop(client);
        assert!(matches!(conn.read_line(soon()), Err(ReadError::Closed)));
    }

    #[test]
    fn refuses_a_long_line_without_reading_it_all() {
        let (mut client, mut conn) = pair();
        let exact = vec![b'x'; MAX_LINE];
        client.write_all(&exact).unwrap();
        client.write_all(b"\n").unwrap();
        assert_eq!(conn.read_line(soon()).unwrap().len(), MAX_LINE);
        // A client that never stops: the server reads one buffer's worth and gives up.
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'y'; 64 * 1024];
            for _ in 0..1024 {
                if client.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        assert!(matches!(conn.read_line(soon()), Err(ReadError::TooLong)));
        conn.close();
        writer.join().unwrap();
    }

    #[test]
    fn a_trickling_client_hits_the_deadline() {
        let (mut client, mut conn) = pair();
        client.write_all(b"PI").unwrap();
        let deadline = Instant::now() + Duration::from_millis(200);
        assert!(matches!(conn.read_line(deadline), Err(ReadError::TimedOut)));
    }

    #[test]
    fn queued_replies_go_out_together_before_a_read_waits_for_the_peer() {
        let (mut client, mut conn) = pair();
        client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        client.write_all(b"PING\nPING\n").unwrap();
        let mut replies = Vec::new();
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..2 {
                    assert_eq!(conn.read_line(soon()).unwrap(), b"PING");
                    conn.queue_reply(&Reply::Pong);
                }
                // Nothing more has come: the client hears both replies before this read waits.
                assert_eq!(conn.read_line(soon()).unwrap(), b"QUIT");
            });
            while replies.len() < 10 {
                let mut some = [0u8; 16];
                let n = client.read(&mut some).unwrap();
                assert!(n > 0, "closed early");
                replies.extend_from_slice(&some[..n]);
            }
            client.write_all(b"QUIT\n").unwrap();
        });
        assert_eq!(replies, b"PONG\nPONG\n");
    }

    #[test]
    fn closed_mid_line_is_told_apart() {
        let (mut client, mut conn) = pair();
        client.write_all(b"PI").unwrap();
        drop(client);
        assert!(matches!(conn.read_line(soon()), Err(ReadError::ClosedMidLine)));
    }
}
