//! The server: the accept loop, one thread per connection, and an orderly shutdown.
//!
//! Shutdown order: set the flag → wake the blocked `accept` by connecting to ourselves → wake
//! every waiter in the round (they answer `ERR SHUTDOWN`) → shut down the reading half of every
//! live socket (from the registry), so blocked reads end → after a grace period, both halves of
//! whatever is still open (a client that does not read our reply) → join every thread → sync
//! `bets.csv` → log.

pub mod auth;
pub mod registry;
pub mod session;
pub mod tls;

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown as SocketShutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use crate::ledger::round::Round;
use crate::wire::connection::Connection;
use crate::wire::protocol::{ErrorCode, ProtocolError, Reply};
use auth::AgencyKeys;
use registry::Registry;
use session::{Context, Session};

/// Stack of a connection's thread: a session needs a few KiB; the default 2 MiB would only
/// reserve address space per connection.
const STACK_SIZE: usize = 128 * 1024;

/// Limits on what clients can hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

/// Who may do what: TLS on the port, and the agencies' token digests.
#[derive(Default)]
pub struct Security {
    /// Set: a client whose first byte opens a TLS handshake gets TLS, and plain text may only
    /// `PING`, `STATUS` and `QUIT`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Set: `HELLO <agency> <token>`. Unset: protected mode, `HELLO` only from loopback.
    pub keys: Option<AgencyKeys>,
}

/// Binds `ip:port` with the given listen backlog (std's `bind` fixes the backlog itself).
///
/// # Errors
/// The address cannot be bound.
pub fn bind(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Stops a running server from any thread (the signal handler's, a test's).
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    flag: Arc<AtomicBool>,
    wake: SocketAddr,
}

impl ShutdownHandle {
    /// A handle for the server that will `run` on `listener`.
    ///
    /// # Errors
    /// The listener has no local address.
    pub fn new(listener: &TcpListener) -> io::Result<Self> {
        let mut wake = listener.local_addr()?;
        // A server bound to every address is reached, to wake it, through loopback.
        match wake.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => wake.set_ip(Ipv4Addr::LOCALHOST.into()),
            IpAddr::V6(ip) if ip.is_unspecified() => wake.set_ip(Ipv6Addr::LOCALHOST.into()),
            _ => {}
        }
        Ok(ShutdownHandle { flag: Arc::new(AtomicBool::new(false)), wake })
    }

    /// Asks the server to stop: sets the flag, then wakes `accept` with a connection of our own.
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.wake, Duration::from_secs(1));
    }

    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// How long the accept loop pauses after a failed `accept`.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(20);

/// How long shutdown lets connections finish their last reply before cutting them off.
const GRACE: Duration = Duration::from_millis(500);

/// Serves `listener` until `shutdown` is triggered, then shuts down in order and returns.
///
/// # Errors
/// Only an error that stops the whole server: a final sync of `bets.csv` that failed.
pub fn run(
    listener: TcpListener,
    round: Arc<Round>,
    limits: Limits,
    security: Arc<Security>,
    shutdown: &ShutdownHandle,
) -> io::Result<()> {
    let registry = Arc::new(Registry::default());
    let mut handles: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    for incoming in listener.incoming() {
        if shutdown.is_triggered() {
            break;
        }
        let stream = match incoming {
            Ok(stream) => stream,
            Err(e) => {
                // Out of file descriptors, a connection reset before accept: not fatal. A short
                // pause keeps a lasting one (no descriptor frees up) from spinning this loop.
                warn!("action: accept_connections | result: fail | error: {e}");
                thread::sleep(ACCEPT_ERROR_PAUSE);
                continue;
            }
        };
        handles.retain(|h| !h.is_finished());
        let ip = stream.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
        if registry.len() >= limits.max_connections {
            warn!("action: accept_connections | result: fail | ip: {ip} | error: BUSY");
            refuse_busy(stream, limits.max_connections);
            continue;
        }
        info!("action: accept_connections | result: success | ip: {ip}");
        next_id += 1;
        let shared =
            Shared { round: Arc::clone(&round), security: Arc::clone(&security), registry: Arc::clone(&registry) };
        match spawn_connection(next_id, stream, shared, limits) {
            Ok(handle) => handles.push(handle),
            Err(e) => error!("action: spawn_thread | result: fail | error: {e}"),
        }
    }
    drop(listener);
    info!("action: close_listener | result: success");
    round.begin_shutdown();
    registry.close_all(GRACE);
    let count = handles.len();
    for handle in handles {
        // A thread that panicked has already logged it; its connection is gone either way.
        let _ = handle.join();
    }
    info!("action: join_threads | result: success | threads: {count}");
    let synced = round.close();
    match &synced {
        Ok(()) => info!("action: close_storage | result: success | path: {}", round.storage_path().display()),
        Err(e) => error!("action: close_storage | result: fail | error: {e}"),
    }
    synced
}

/// Answers `ERR BUSY` and closes, without a thread: the client is told at once, never queued.
fn refuse_busy(mut stream: TcpStream, max: usize) {
    let mut out = Vec::new();
    let why = format!("the server serves {max} connections at once; try again later");
    Reply::Err(ProtocolError::new(ErrorCode::Busy, why)).encode(&mut out);
    // A fresh socket's send buffer takes a short line without blocking; the timeout guards
    // the accept loop anyway.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = stream.write_all(&out);
    let _ = stream.shutdown(SocketShutdown::Both);
}

/// What every connection's thread shares.
struct Shared {
    round: Arc<Round>,
    security: Arc<Security>,
    registry: Arc<Registry>,
}

fn spawn_connection(id: u64, stream: TcpStream, shared: Shared, limits: Limits) -> io::Result<JoinHandle<()>> {
    // Replies are single short lines: send each at once.
    stream.set_nodelay(true)?;
    let ip = stream.peer_addr().map(|a| a.ip()).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let stream = Arc::new(stream);
    let peer = shared.registry.insert(id, Arc::clone(&stream));
    let registry = Arc::clone(&shared.registry);
    let spawned = thread::Builder::new().name(format!("conn-{id}")).stack_size(STACK_SIZE).spawn(move || {
        // Deregisters even if the session panics.
        let _registered = Registered { id, registry: Arc::clone(&shared.registry) };
        let deadline = Instant::now() + limits.idle_timeout;
        let transport = match tls::accept(Arc::clone(&stream), shared.security.tls.as_ref(), deadline) {
            Ok(Some(transport)) => transport,
            Ok(None) => return,
            Err(e) => {
                // Silent from the start: not TLS, so it may read a line of plain text.
                debug!("action: accept_tls | result: fail | id: {id} | error: {e}");
                let ms = limits.idle_timeout.as_millis();
                let why = ProtocolError::new(ErrorCode::Timeout, format!("no request within {ms} ms; closing"));
                let mut conn = Connection::new(stream, Duration::from_secs(1));
                let _ = conn.write_reply(&Reply::Err(why));
                conn.close();
                return;
            }
        };
        let mut conn = Connection::with_transport(transport, limits.idle_timeout);
        let context = Context {
            round: &shared.round,
            security: &shared.security,
            registry: &shared.registry,
            peer: &peer,
            id,
            ip,
            idle_timeout: limits.idle_timeout,
        };
        Session::new(context).run(&mut conn);
        debug!("action: close_connection | result: success | id: {id}");
    });
    if spawned.is_err() {
        registry.remove(id);
    }
    spawned
}

/// Removes a connection from the registry when its thread ends.
struct Registered {
    id: u64,
    registry: Arc<Registry>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}
