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
use std::time::Instant;

use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags};
use rustls::{ConnectionCommon, SideData, StreamOwned};

/// A socket shared with whoever must be able to shut it down (the server's registry, the
/// agency's stop handle), with the deadlines of the read and write under way.
pub(crate) struct Socket {
    stream: Arc<TcpStream>,
    pub read_deadline: Option<Instant>,
    pub write_deadline: Option<Instant>,
}

impl Socket {
    pub(crate) fn new(stream: Arc<TcpStream>) -> Socket {
        Socket { stream, read_deadline: None, write_deadline: None }
    }

    pub(crate) fn stream(&self) -> &Arc<TcpStream> {
        &self.stream
    }
}

/// The time left before `deadline`, or a `TimedOut` error once it has passed.
fn left(deadline: Option<Instant>) -> io::Result<Option<std::time::Duration>> {
    match deadline {
        None => Ok(None),
        Some(d) => match d.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(Some(left)),
            _ => Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed")),
        },
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(left) = left(self.read_deadline)? {
            self.stream.set_read_timeout(Some(left))?;
        }
        (&*self.stream).read(buf)
    }
}

impl Socket {
    /// Gives the next write the time left before its deadline.
    fn arm_write(&self) -> io::Result<()> {
        if let Some(left) = left(self.write_deadline)? {
            self.stream.set_write_timeout(Some(left))?;
        }
        Ok(())
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm_write()?;
        (&*self.stream).write(buf)
    }

    /// In one system call: rustls hands a whole flight of TLS records (the server's hello,
    /// certificate, signature and `Finished`) over at once, and the default would send each
    /// record on its own, waking the peer for each.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.arm_write()?;
        (&*self.stream).write_vectored(bufs)
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
