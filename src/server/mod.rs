//! The server: the door (which accepts every connection, answers its probes, and holds it until
//! it says more), a thread (from a pool) per connection that has, and an orderly shutdown.
//!
//! The life of a connection: the door ([`door`]) accepts it; if every guest place is taken by a
//! guest that is progressing, it waits in the door's waiting room; admitted, it is a *guest*
//! ([`registry`]), held by the door while it says nothing or only probes; once it says more (a
//! TLS hello, a `HELLO`) it gets a thread of its own from the [`pool`], which runs its TLS
//! handshake ([`tls`], rationed per core) and its [`session`]; `HELLO` makes it an agency, no
//! guest any more; `WINNERS` waits on the round's `Mutex` + `Condvar` (see [`crate::ledger`])
//! until the draw; the thread ends with the connection. A guest that stalls goes when a
//! newcomer needs its place; one that runs out of time goes anyway.
//!
//! Shutdown order: set the flag → wake the door through its eventfd → close what the door holds → wake
//! every waiter in the round (they answer `ERR SHUTDOWN`) → shut down the reading half of every
//! live socket (from the registry), so blocked reads end → after a grace period, both halves of
//! whatever is still open (a client that does not read our reply) → join every thread → sync
//! `bets.csv` → log.

pub(crate) mod auth;
pub(crate) mod door;
pub(crate) mod guest_log;
pub(crate) mod hangups;
pub(crate) mod metrics;
pub(crate) mod operator;
pub(crate) mod pool;
pub(crate) mod probes;
#[expect(
    dead_code,
    reason = "`Registry::len` and `is_empty` are used nowhere; registry.rs belongs to the door's rework"
)]
pub(crate) mod registry;
pub(crate) mod session;
pub(crate) mod suspects;
pub(crate) mod tls;

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use log::{debug, error, info};

use crate::config::ServerSettings;
use crate::ledger::Ledger;
use crate::wire::connection::Connection;
use crate::wire::transport::Transport;
use auth::AgencyKeys;
use guest_log::GuestLog;
use hangups::Hangups;
use metrics::Metrics;
use pool::Pool;
use registry::{GuestLimits, Registry};
use session::{Context, Session};
use tls::HandshakeGate;

/// Stack of a connection's thread: a session needs a few KiB; the default 2 MiB would only
/// reserve address space per connection.
pub(crate) const STACK_SIZE: usize = 128 * 1024;

/// Limits on what clients can hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Threads at once: the hard ceiling, past which a connection is turned away at the door.
    /// Never below `SERVER_AGENCIES + SERVER_MAX_GUESTS`, so that it cannot refuse the round's
    /// own agencies.
    pub max_connections: usize,
    pub idle_timeout: Duration,
    /// Connections not yet authenticated, at once and per address.
    pub guests: GuestLimits,
    /// How long a guest has to authenticate, or to finish its probe.
    pub hello_timeout: Duration,
}

impl Limits {
    /// The limits the settings give. The ceiling is `SERVER_MAX_CONNECTIONS`, raised to
    /// `SERVER_AGENCIES + SERVER_MAX_GUESTS` if it is lower: every agency may wait in
    /// `WINNERS` on a connection of its own while the guest places are full.
    pub(crate) fn from_settings(settings: &ServerSettings) -> Limits {
        let needed = (settings.agencies as usize).saturating_add(settings.max_guests);
        Limits {
            max_connections: settings.max_connections.max(needed),
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

impl Security {
    /// A peer held to the idle timeout rather than a guest's deadlines: in protected mode, one
    /// on loopback (a person typing the `nc` session on the server's own machine).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.keys.is_none() && auth::is_loopback(ip)
    }
}

/// Binds `ip:port` with the given listen backlog (std's `bind` fixes the backlog itself).
///
/// # Errors
/// The address cannot be bound.
pub(crate) fn bind(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Stops a running server from any thread (the signal handler's, a test's).
#[derive(Debug, Clone)]
pub(crate) struct ShutdownHandle {
    flag: Arc<AtomicBool>,
    /// An eventfd the door waits on beside the listener: a trigger wakes it whatever the
    /// network is doing (a connection of our own could wait behind a full listen queue).
    wake: Arc<OwnedFd>,
}

impl ShutdownHandle {
    /// A handle for a server yet to `run`.
    ///
    /// # Errors
    /// The eventfd cannot be made (out of file descriptors).
    pub(crate) fn new() -> io::Result<Self> {
        Ok(ShutdownHandle { flag: Arc::new(AtomicBool::new(false)), wake: Arc::new(door::wake_fd()?) })
    }

    /// Asks the server to stop: sets the flag, then wakes the door.
    pub(crate) fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        door::wake(&*self.wake);
    }

    pub(crate) fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub(crate) fn wake_fd(&self) -> &OwnedFd {
        &self.wake
    }
}

/// How long shutdown lets connections finish their last reply before cutting them off.
const GRACE: Duration = Duration::from_millis(500);

/// What the door and every connection's thread share.
pub(crate) struct Server {
    pub ledger: Arc<dyn Ledger>,
    pub security: Arc<Security>,
    pub registry: Registry,
    pub guest_log: GuestLog,
    pub gate: HandshakeGate,
    pub limits: Limits,
    /// What the operator's listener serves.
    pub metrics: Arc<Metrics>,
    /// The sockets of agencies waiting for the draw.
    pub hangups: Hangups,
}

/// Serves `listener` until `shutdown` is triggered, counting into `metrics` (what the
/// operator's listener serves), then shuts down in order and returns.
///
/// # Errors
/// Only an error that stops the whole server: `epoll` could not be set up at the start, or a
/// final sync of `bets.csv` failed.
pub(crate) fn run(
    listener: TcpListener,
    ledger: Arc<dyn Ledger>,
    limits: Limits,
    security: Arc<Security>,
    shutdown: &ShutdownHandle,
    metrics: Arc<Metrics>,
) -> io::Result<()> {
    let server = Arc::new(Server {
        ledger,
        security,
        registry: Registry::default(),
        guest_log: GuestLog::default(),
        gate: HandshakeGate::per_core(),
        limits,
        metrics,
        hangups: Hangups::new()?,
    });
    let mut pool = Pool::new(STACK_SIZE);
    let watcher = watch_hangups(&server, shutdown)?;
    let mut door = door::Door::new(&listener, shutdown, Arc::clone(&server))?;
    for handoff in door.by_ref() {
        if let Err(e) = serve_connection(&mut pool, handoff, Arc::clone(&server)) {
            error!("action: spawn_thread | result: fail | error: {e}");
        }
    }
    drop(door);
    drop(listener);
    info!("action: close_listener | result: success");
    server.ledger.begin_shutdown();
    let _ = watcher.join();
    server.registry.close_all(GRACE);
    let count = pool.join();
    info!("action: join_threads | result: success | threads: {count}");
    server.guest_log.flush();
    let synced = server.ledger.close();
    match &synced {
        Ok(()) => info!("action: close_storage | result: success | {}", server.ledger.describe()),
        Err(e) => error!("action: close_storage | result: fail | error: {e}"),
    }
    synced
}

/// The thread that watches the sockets of agencies waiting for the draw, until shutdown.
fn watch_hangups(server: &Arc<Server>, shutdown: &ShutdownHandle) -> io::Result<thread::JoinHandle<()>> {
    let (server, shutdown) = (Arc::clone(server), shutdown.clone());
    thread::Builder::new().name("hangups".into()).spawn(move || server.hangups.run(&*server.ledger, &shutdown))
}

/// Serves a guest that has said more than probes on a thread of `pool`.
fn serve_connection(pool: &mut Pool, handoff: door::Handoff, server: Arc<Server>) -> io::Result<()> {
    let id = handoff.guest.id;
    let registry_server = Arc::clone(&server);
    let spawned = pool.run(move || {
        let door::Handoff { guest, first_byte } = handoff;
        // Deregisters even if the session panics.
        let _registered = Registered { id: guest.id, server: Arc::clone(&server) };
        // Replies are single short lines: send each at once.
        let _ = guest.stream.set_nodelay(true);
        let limits = server.limits;
        let Some(transport) = open_transport(&server, &guest, first_byte) else { return };
        let mut conn = Connection::with_transport(transport, limits.idle_timeout);
        let context = Context {
            ledger: &*server.ledger,
            security: &server.security,
            registry: &server.registry,
            guest_log: &server.guest_log,
            peer: &guest.peer,
            id: guest.id,
            ip: guest.ip,
            idle_timeout: limits.idle_timeout,
            hello_timeout: limits.hello_timeout,
            guest_requests: guest.probes,
            metrics: &server.metrics,
            hangups: &server.hangups,
        };
        Session::new(context).run(&mut conn);
        server.metrics.closed(guest.id);
        debug!("action: close_connection | result: success | id: {}", guest.id);
    });
    if spawned.is_err() {
        registry_server.registry.remove(id);
    }
    spawned
}

/// The guest's transport, its TLS handshake (if it opened one) run to the end; `None` if that
/// failed. The door ends a handshake still under way at the hello timeout.
fn open_transport(server: &Server, guest: &door::Guest, first_byte: u8) -> Option<Transport<rustls::ServerConnection>> {
    let (id, limits) = (guest.id, server.limits);
    match tls::transport(Arc::clone(&guest.stream), server.security.tls.as_ref(), first_byte) {
        Ok(Transport::Tls(mut tls)) => {
            let by = guest.accepted + limits.idle_timeout;
            let suspect = server.registry.suspects().is_suspect(guest.ip);
            if let Err(e) = tls::handshake(&mut tls, &server.gate, by, &guest.peer, suspect) {
                server.metrics.tls_handshake(false);
                debug!("action: tls_handshake | result: fail | id: {id} | error: {e}");
                return None;
            }
            server.metrics.tls_handshake(true);
            Some(Transport::Tls(tls))
        }
        Ok(transport) => Some(transport),
        Err(e) => {
            debug!("action: accept_tls | result: fail | id: {id} | error: {e}");
            None
        }
    }
}

/// Removes a connection from the registry when its thread ends.
struct Registered {
    id: u64,
    server: Arc<Server>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.server.registry.remove(self.id);
    }
}
