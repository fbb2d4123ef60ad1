//! One TCP socket as a byte stream, in plain text or TLS (rustls over the same blocking
//! socket), with a deadline on reads and on writes.
//!
//! A socket timeout alone restarts with every system call, so a peer that trickles a byte per
//! tick, or reads our reply a byte at a time, could hold a thread for ever; rustls also makes
//! several reads per call while it handshakes. The deadline lives in [`Socket`], under rustls,
//! so every system call gets only the time that is left, whichever layer makes it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags};
use rustls::{ConnectionCommon, SideData, StreamOwned};

/// A socket shared with whoever must be able to shut it down (the server's registry, the
/// agency's stop handle), with the deadlines of the read and write under way. While it has
/// deadlines it owns the socket's timeouts: it remembers the ones it set, and nobody else may
/// set them.
pub(crate) struct Socket {
    stream: Arc<TcpStream>,
    pub read_deadline: Option<Instant>,
    pub write_deadline: Option<Instant>,
    /// Reads return what has arrived, or `WouldBlock`, without waiting.
    pub dont_wait: bool,
    /// The socket's timeouts as last set: the longest a read or a write blocks.
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl Socket {
    pub(crate) fn new(stream: Arc<TcpStream>) -> Socket {
        Socket {
            stream,
            read_deadline: None,
            write_deadline: None,
            dont_wait: false,
            read_timeout: None,
            write_timeout: None,
        }
    }

    pub(crate) fn stream(&self) -> &Arc<TcpStream> {
        &self.stream
    }
}

/// The time left before `deadline`, or a `TimedOut` error once it has passed.
fn left(deadline: Option<Instant>) -> io::Result<Option<Duration>> {
    match deadline {
        None => Ok(None),
        Some(d) => match d.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(Some(left)),
            _ => Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed")),
        },
    }
}

/// The socket timeout a call with `left` before its deadline may block for: the one already
/// set if that cannot overrun the deadline and is not much shorter (no system call), else a new
/// one, half of what is left, which the next deadlines, as long as this one, keep. A call that
/// times out before the deadline is made again with the time then left.
fn timeout_for(set: Option<Duration>, left: Duration) -> Option<Duration> {
    match set {
        Some(set) if set <= left && set >= left / 4 => None,
        _ if left < Duration::from_millis(2) => Some(left),
        _ => Some(left / 2),
    }
}

/// Gives the next call on `stream` what is left before `deadline`, through the socket timeout
/// that `set` says it has and `set_timeout` sets; a `TimedOut` error once the deadline has passed.
fn arm(
    stream: &TcpStream,
    deadline: Option<Instant>,
    set: &mut Option<Duration>,
    set_timeout: fn(&TcpStream, Option<Duration>) -> io::Result<()>,
) -> io::Result<()> {
    if let Some(left) = left(deadline)?
        && let Some(timeout) = timeout_for(*set, left)
    {
        set_timeout(stream, Some(timeout))?;
        *set = Some(timeout);
    }
    Ok(())
}

/// Whether `error` is a socket timeout (which the deadline, not the timeout, decides on).
fn timed_out(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.dont_wait {
            return rustix::net::recv(&*self.stream, buf, RecvFlags::DONTWAIT).map(|(_, n)| n).map_err(Into::into);
        }
        loop {
            arm(&self.stream, self.read_deadline, &mut self.read_timeout, TcpStream::set_read_timeout)?;
            // A socket timeout before the deadline: the next turn gives the call what is left.
            match (&*self.stream).read(buf) {
                Err(e) if timed_out(&e) && self.read_deadline.is_some() => {}
                read => return read,
            }
        }
    }
}

impl Socket {
    /// Makes `write` (one system call) within the write deadline, as reads are made within theirs.
    fn write_within_deadline(&mut self, write: impl Fn(&TcpStream) -> io::Result<usize>) -> io::Result<usize> {
        loop {
            arm(&self.stream, self.write_deadline, &mut self.write_timeout, TcpStream::set_write_timeout)?;
            match write(&self.stream) {
                Err(e) if timed_out(&e) && self.write_deadline.is_some() => {}
                written => return written,
            }
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_within_deadline(|mut stream| stream.write(buf))
    }

    /// In one system call: rustls hands a whole flight of TLS records (the server's hello,
    /// certificate, signature and `Finished`) over at once, and the default would send each
    /// record on its own, waking the peer for each.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.write_within_deadline(|mut stream| stream.write_vectored(bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A socket in plain text or TLS; `C` is rustls's `ServerConnection` or `ClientConnection`.
pub(crate) enum Transport<C> {
    Plain(Socket),
    Tls(Box<StreamOwned<C, Socket>>),
}

impl<C> Transport<C> {
    pub(crate) fn socket_mut(&mut self) -> &mut Socket {
        match self {
            Transport::Plain(socket) => socket,
            Transport::Tls(tls) => &mut tls.sock,
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }
}

impl<C, S> Read for Transport<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>>,
    S: SideData,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(socket) => socket.read(buf),
            Transport::Tls(tls) => tls.read(buf),
        }
    }
}

impl<C, S> Write for Transport<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>>,
    S: SideData,
{
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(socket) => socket.write(buf),
            Transport::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(socket) => socket.flush(),
            Transport::Tls(tls) => tls.flush(),
        }
    }
}

/// What has arrived on a socket, looked at without waiting or consuming anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrived {
    /// Nothing yet; the peer is still there.
    Nothing,
    /// At least one byte, this one first.
    Byte(u8),
    /// The peer closed its side, or the socket is broken.
    Closed,
}

/// Peeks at `stream` without blocking and without touching its mode: one `recv` with
/// `MSG_PEEK | MSG_DONTWAIT`.
pub(crate) fn peek_now(stream: &TcpStream) -> Arrived {
    let mut first = [0u8; 1];
    match peek_all_now(stream, &mut first) {
        None => Arrived::Nothing,
        Some(0) => Arrived::Closed,
        Some(_) => Arrived::Byte(first[0]),
    }
}

/// What has arrived and is unread, as much of it as `buf` holds, never waiting: how many bytes,
/// or `None` if nothing has; `Some(0)` once the client has closed (or the connection broke).
pub(crate) fn peek_all_now(stream: &TcpStream, buf: &mut [u8]) -> Option<usize> {
    match rustix::net::recv(stream, buf, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((_, n)) => Some(n),
        Err(e) if e == Errno::AGAIN || e == Errno::INTR => None,
        Err(_) => Some(0),
    }
}

/// Reads and drops the next `n` bytes, which have arrived (a peek saw them); false if they
/// could not all be read at once.
pub(crate) fn consume_now(stream: &TcpStream, mut n: usize) -> bool {
    let mut sink = [0u8; 512];
    while n > 0 {
        let len = n.min(sink.len());
        match rustix::net::recv(stream, &mut sink[..len], RecvFlags::DONTWAIT) {
            Ok((_, 0)) | Err(_) => return false,
            Ok((_, read)) => n -= read,
        }
    }
    true
}

/// Writes what a socket's send buffer takes of `bytes` at once, never waiting: for a thread that
/// must not block (a last word to a connection being closed, a probe's reply from the door);
/// true if it took them all.
pub(crate) fn send_now(stream: &TcpStream, bytes: &[u8]) -> bool {
    let sent = rustix::net::send(stream, bytes, SendFlags::DONTWAIT | SendFlags::NOSIGNAL);
    sent.is_ok_and(|n| n == bytes.len())
}

/// The rustls error behind an I/O error, if any: a certificate that is not trusted, a record
/// that fails its integrity check. Such an error is never cured by trying again.
pub(crate) fn tls_error(error: &io::Error) -> Option<&rustls::Error> {
    error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_timeout_is_set_only_when_the_one_set_could_overrun_the_deadline_or_is_far_shorter() {
        assert_eq!(timeout_for(None, 30_000 * MS), Some(15_000 * MS));
        // The next request's deadline is as far: the timeout set for the last one serves.
        assert_eq!(timeout_for(Some(15_000 * MS), 29_990 * MS), None);
        assert_eq!(timeout_for(Some(15_000 * MS), 15_000 * MS), None);
        // It could block past the deadline.
        assert_eq!(timeout_for(Some(15_000 * MS), 10_000 * MS), Some(5_000 * MS));
        // A much later deadline: a silent peer would otherwise wake the thread four times or more.
        assert_eq!(timeout_for(Some(100 * MS), 30_000 * MS), Some(15_000 * MS));
        assert_eq!(timeout_for(Some(15_000 * MS), MS), Some(MS));
    }

    fn pair() -> (TcpStream, Socket) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, Socket::new(Arc::new(server)))
    }

    #[test]
    fn a_read_from_a_silent_peer_ends_at_its_deadline_not_at_a_socket_timeout() {
        let (_client, mut socket) = pair();
        let deadline = Instant::now() + 200 * MS;
        socket.read_deadline = Some(deadline);
        let err = socket.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(Instant::now() >= deadline);
    }

    #[test]
    fn reads_under_deadlines_as_far_as_the_last_set_no_timeout() {
        let (mut client, mut socket) = pair();
        let mut set = Vec::new();
        for _ in 0..3 {
            socket.read_deadline = Some(Instant::now() + 30_000 * MS);
            client.write_all(b"x").unwrap();
            assert_eq!(socket.read(&mut [0u8; 8]).unwrap(), 1);
            set.push(socket.stream.read_timeout().unwrap());
        }
        // One timeout, set for the first read (half its deadline), served all three.
        assert!(set[0].is_some_and(|t| t <= 15_000 * MS && t > 14_000 * MS), "{set:?}");
        assert!(set.iter().all(|&t| t == set[0]), "{set:?}");
    }

    #[test]
    fn a_read_that_must_not_wait_returns_at_once_with_nothing_there() {
        let (_client, mut socket) = pair();
        socket.read_deadline = Some(Instant::now() + 30_000 * MS);
        socket.dont_wait = true;
        let err = socket.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }
}
