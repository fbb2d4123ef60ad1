//! The server: the accept loop, one thread per connection, and an orderly shutdown.
//!
//! Shutdown order: set the flag → wake the blocked `accept` by connecting to ourselves → wake
//! every waiter in the round (they answer `ERR SHUTDOWN`) → shut down the reading half of every
//! live socket (from the registry), so blocked reads end → after a grace period, both halves of
//! whatever is still open (a client that does not read our reply) → join every thread → sync
//! `bets.csv` → log.

pub mod auth;
pub mod guest_log;
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

use crate::config::ServerSettings;
use crate::ledger::Ledger;
use crate::wire::connection::Connection;
use crate::wire::protocol::{ErrorCode, ProtocolError, Reply};
use crate::wire::transport::{Arrived, Transport, peek_now};
use auth::AgencyKeys;
use guest_log::{GuestEvent, GuestLog};
use registry::{Ended, GuestLimits, Peer, Registry, Stage};
use session::{Context, Session};

/// Stack of a connection's thread: a session needs a few KiB; the default 2 MiB would only
/// reserve address space per connection.
const STACK_SIZE: usize = 128 * 1024;

/// Limits on what clients can hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Threads at once: the hard ceiling, past which a connection is turned away at the door.
    pub max_connections: usize,
    pub idle_timeout: Duration,
    /// Connections not yet authenticated, at once and per address.
    pub guests: GuestLimits,
    /// How long a guest has to authenticate, or to finish its probe.
    pub hello_timeout: Duration,
}

impl Limits {
    /// The limits the settings give.
    pub fn from_settings(settings: &ServerSettings) -> Limits {
        Limits {
            max_connections: settings.max_connections,
            idle_timeout: settings.idle_timeout,
            guests: GuestLimits { total: settings.max_guests, per_ip: settings.max_guests_per_ip },
            hello_timeout: settings.hello_timeout,
        }
    }
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

/// How long a guest (but a trusted one) may take to send its first byte.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long shutdown lets connections finish their last reply before cutting them off.
const GRACE: Duration = Duration::from_millis(500);

/// Serves `listener` until `shutdown` is triggered, then shuts down in order and returns.
///
/// # Errors
/// Only an error that stops the whole server: a final sync of `bets.csv` that failed.
pub fn run(
    listener: TcpListener,
    round: Arc<dyn Ledger>,
    limits: Limits,
    security: Arc<Security>,
    shutdown: &ShutdownHandle,
) -> io::Result<()> {
    let registry = Arc::new(Registry::default());
    let guest_log = Arc::new(GuestLog::default());
    let gate = Arc::new(tls::HandshakeGate::per_core());
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
        let ip = stream.peer_addr().map(|a| a.ip()).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        next_id += 1;
        let stream = Arc::new(stream);
        // A TLS client has usually sent its hello by the time it is accepted: under way from
        // the start, not mistaken for a silent guest while its thread is being started.
        let stage =
            if security.tls.is_some() && tls::opens_handshake_now(&stream) { Stage::Underway } else { Stage::Silent };
        let (peer, evicted) =
            registry.admit(next_id, ip, Arc::clone(&stream), stage, limits.guests, limits.max_connections);
        for _ in 0..evicted {
            guest_log.event(GuestEvent::Evicted, || {
                info!("action: evict_guest | result: success | detail: the oldest guest made room for a newer one");
            });
        }
        let Some(peer) = peer else {
            guest_log.event(GuestEvent::Refused, || {
                warn!("action: accept_connections | result: fail | ip: {ip} | error: BUSY");
            });
            refuse_busy(&stream, limits.max_connections, security.tls.is_some());
            continue;
        };
        guest_log.event(GuestEvent::Accepted, || info!("action: accept_connections | result: success | ip: {ip}"));
        let shared = Shared {
            round: Arc::clone(&round),
            security: Arc::clone(&security),
            registry: Arc::clone(&registry),
            guest_log: Arc::clone(&guest_log),
            gate: Arc::clone(&gate),
        };
        match spawn_connection(next_id, stream, ip, peer, shared, limits) {
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
    guest_log.flush();
    let synced = round.close();
    match &synced {
        Ok(()) => info!("action: close_storage | result: success | {}", round.describe()),
        Err(e) => error!("action: close_storage | result: fail | error: {e}"),
    }
    synced
}

/// Answers `ERR BUSY` and closes, without a thread: the client is told at once, never queued.
/// On a TLS server a client that has already begun (or may yet begin) a handshake is closed
/// without a word: a plain-text line would reach its TLS layer as a broken record, where the
/// agency treats it as final; a bare close it retries.
fn refuse_busy(stream: &TcpStream, max: usize, tls: bool) {
    if tls && !tls::speaks_plain_now(stream) {
        let _ = stream.shutdown(SocketShutdown::Both);
        return;
    }
    let mut out = Vec::new();
    let why = format!("the server serves {max} connections at once; try again later");
    Reply::Err(ProtocolError::new(ErrorCode::Busy, why)).encode(&mut out);
    // A fresh socket's send buffer takes a short line without blocking; the timeout guards
    // the accept loop anyway.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = (&*stream).write_all(&out);
    let _ = stream.shutdown(SocketShutdown::Both);
}

/// What every connection's thread shares.
struct Shared {
    round: Arc<dyn Ledger>,
    security: Arc<Security>,
    registry: Arc<Registry>,
    guest_log: Arc<GuestLog>,
    gate: Arc<tls::HandshakeGate>,
}

fn spawn_connection(
    id: u64,
    stream: Arc<TcpStream>,
    ip: IpAddr,
    peer: Arc<Peer>,
    shared: Shared,
    limits: Limits,
) -> io::Result<JoinHandle<()>> {
    let registry = Arc::clone(&shared.registry);
    let spawned = thread::Builder::new().name(format!("conn-{id}")).stack_size(STACK_SIZE).spawn(move || {
        // Deregisters even if the session panics.
        let _registered = Registered { id, registry: Arc::clone(&shared.registry) };
        // Replies are single short lines: send each at once.
        let _ = stream.set_nodelay(true);
        let accepted = Instant::now();
        // A guest must authenticate within the hello timeout, but a person at `nc` on the
        // server's own machine, in protected mode, gets the idle timeout.
        let trusted = shared.security.keys.is_none() && auth::is_loopback(ip);
        let guest_deadline = (!trusted).then(|| accepted + limits.hello_timeout);
        // Its first byte comes at once from any client but a person: a TLS hello, a probe. A
        // connection that sends nothing for a second is a parked stranger, or a dead one the
        // kernel handed over late (its peer gone before its handshake was accepted), and is
        // not kept for the whole hello timeout.
        let first_byte = match guest_deadline {
            Some(deadline) => deadline.min(accepted + FIRST_BYTE_TIMEOUT),
            None => accepted + limits.idle_timeout,
        };
        let transport = match tls::accept(Arc::clone(&stream), shared.security.tls.as_ref(), first_byte) {
            Ok(Some(Transport::Tls(mut tls))) => {
                // A handshake has begun: under way, the last a guest to be evicted.
                peer.set_stage(Stage::Underway);
                // Ended by the server, or hung up by the client while waiting for its turn.
                let gone = || peer.ended() != Ended::No || peek_now(&stream) == Arrived::Closed;
                let by =
                    guest_deadline.map_or(accepted + limits.idle_timeout, |d| d.min(accepted + limits.idle_timeout));
                if let Err(e) = tls::handshake(&mut tls, &shared.gate, by, &gone) {
                    debug!("action: tls_handshake | result: fail | id: {id} | error: {e}");
                    return;
                }
                Transport::Tls(tls)
            }
            Ok(Some(transport)) => transport,
            Ok(None) => return,
            Err(e) => {
                // Silent from the start (or evicted before a word): not TLS, so it may read a
                // line of plain text.
                debug!("action: accept_tls | result: fail | id: {id} | error: {e}");
                let mut conn = Connection::new(stream, Duration::from_millis(100));
                let waited = first_byte.saturating_duration_since(accepted);
                session::farewell_before_first_byte(&mut conn, &peer, waited, &shared.guest_log, ip);
                return;
            }
        };
        let mut conn = Connection::with_transport(transport, limits.idle_timeout);
        let context = Context {
            round: &*shared.round,
            security: &shared.security,
            registry: &shared.registry,
            guest_log: &shared.guest_log,
            peer: &peer,
            id,
            ip,
            idle_timeout: limits.idle_timeout,
            hello_timeout: limits.hello_timeout,
            guest_deadline,
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
