//! The server: the door (which accepts every connection, answers its probes, and holds it until
//! it says more), a thread (from a pool) per connection that has, and an orderly shutdown.
//!
//! Shutdown order: set the flag → wake the door through its eventfd → close what the door holds → wake
//! every waiter in the round (they answer `ERR SHUTDOWN`) → shut down the reading half of every
//! live socket (from the registry), so blocked reads end → after a grace period, both halves of
//! whatever is still open (a client that does not read our reply) → join every thread → sync
//! `bets.csv` → log.

pub mod auth;
pub mod door;
pub mod guest_log;
pub mod hangups;
pub mod metrics;
pub mod operator;
pub mod pool;
pub mod probes;
pub mod registry;
pub mod session;
pub mod suspects;
pub mod tls;

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
use registry::{GuestLimits, Registry, Stage};
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
    /// An eventfd the door waits on beside the listener: a trigger wakes it whatever the
    /// network is doing (a connection of our own could wait behind a full listen queue).
    wake: Arc<OwnedFd>,
}

impl ShutdownHandle {
    /// A handle for a server yet to `run`.
    ///
    /// # Errors
    /// The eventfd cannot be made (out of file descriptors).
    pub fn new() -> io::Result<Self> {
        Ok(ShutdownHandle { flag: Arc::new(AtomicBool::new(false)), wake: Arc::new(door::wake_fd()?) })
    }

    /// Asks the server to stop: sets the flag, then wakes the door.
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        door::wake(&*self.wake);
    }

    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub(crate) fn wake_fd(&self) -> &OwnedFd {
        &self.wake
    }
}

/// How long shutdown lets connections finish their last reply before cutting them off.
const GRACE: Duration = Duration::from_millis(500);

/// Serves `listener` until `shutdown` is triggered, then shuts down in order and returns.
///
/// # Errors
/// Only an error that stops the whole server: `epoll` could not be set up at the start, or a
/// final sync of `bets.csv` failed.
pub fn run(
    listener: TcpListener,
    round: Arc<dyn Ledger>,
    limits: Limits,
    security: Arc<Security>,
    shutdown: &ShutdownHandle,
) -> io::Result<()> {
    let metrics = Arc::new(Metrics::new(round.agencies()));
    run_counted(listener, round, limits, security, shutdown, metrics)
}

/// [`run`], counting into `metrics` (what the operator's listener serves).
///
/// # Errors
/// As [`run`].
pub fn run_counted(
    listener: TcpListener,
    round: Arc<dyn Ledger>,
    limits: Limits,
    security: Arc<Security>,
    shutdown: &ShutdownHandle,
    metrics: Arc<Metrics>,
) -> io::Result<()> {
    let registry = Arc::new(Registry::default());
    let guest_log = Arc::new(GuestLog::default());
    let gate = Arc::new(tls::HandshakeGate::per_core());
    let mut pool = Pool::new(STACK_SIZE);
    let hangups = Arc::new(Hangups::new()?);
    let watcher = watch_hangups(&hangups, &round, shutdown)?;
    let rules = door::Rules {
        round: &*round,
        registry: &registry,
        guest_log: &guest_log,
        security: &security,
        limits,
        metrics: &metrics,
    };
    let mut door = door::Door::new(&listener, shutdown, rules)?;
    for spoke in door.by_ref() {
        let shared = Shared {
            round: Arc::clone(&round),
            security: Arc::clone(&security),
            registry: Arc::clone(&registry),
            guest_log: Arc::clone(&guest_log),
            gate: Arc::clone(&gate),
            metrics: Arc::clone(&metrics),
            hangups: Arc::clone(&hangups),
        };
        if let Err(e) = serve_connection(&mut pool, spoke, shared, limits) {
            error!("action: spawn_thread | result: fail | error: {e}");
        }
    }
    drop(door);
    drop(listener);
    info!("action: close_listener | result: success");
    round.begin_shutdown();
    let _ = watcher.join();
    registry.close_all(GRACE);
    let count = pool.join();
    info!("action: join_threads | result: success | threads: {count}");
    guest_log.flush();
    let synced = round.close();
    match &synced {
        Ok(()) => info!("action: close_storage | result: success | {}", round.describe()),
        Err(e) => error!("action: close_storage | result: fail | error: {e}"),
    }
    synced
}

/// What every connection's thread shares.
struct Shared {
    round: Arc<dyn Ledger>,
    security: Arc<Security>,
    registry: Arc<Registry>,
    guest_log: Arc<GuestLog>,
    gate: Arc<tls::HandshakeGate>,
    metrics: Arc<Metrics>,
    hangups: Arc<Hangups>,
}

/// The thread that watches the sockets of agencies waiting for the draw, until shutdown.
fn watch_hangups(
    hangups: &Arc<Hangups>,
    round: &Arc<dyn Ledger>,
    shutdown: &ShutdownHandle,
) -> io::Result<thread::JoinHandle<()>> {
    let (hangups, round, shutdown) = (Arc::clone(hangups), Arc::clone(round), shutdown.clone());
    thread::Builder::new().name("hangups".into()).spawn(move || hangups.run(&*round, &shutdown))
}

/// Serves a connection that has spoken on a thread of `pool`.
fn serve_connection(pool: &mut Pool, spoke: door::Spoke, shared: Shared, limits: Limits) -> io::Result<()> {
    let door::Spoke { id, stream, ip, peer, accepted, first, requests } = spoke;
    let registry = Arc::clone(&shared.registry);
    let spawned = pool.run(move || {
        // Deregisters even if the session panics.
        let _registered = Registered { id, registry: Arc::clone(&shared.registry) };
        // Replies are single short lines: send each at once.
        let _ = stream.set_nodelay(true);
        // A guest must authenticate within the hello timeout, unless trusted.
        let guest_deadline = (!shared.security.trusts(ip)).then(|| accepted + limits.hello_timeout);
        let transport = match tls::transport(Arc::clone(&stream), shared.security.tls.as_ref(), first) {
            Ok(Transport::Tls(mut tls)) => {
                // A handshake has begun: under way, among the last guests to be evicted.
                peer.set_stage(Stage::Underway);
                let by =
                    guest_deadline.map_or(accepted + limits.idle_timeout, |d| d.min(accepted + limits.idle_timeout));
                let suspect = shared.registry.suspects().is_suspect(ip);
                if let Err(e) = tls::handshake(&mut tls, &shared.gate, by, &peer, suspect) {
                    shared.metrics.tls_handshake(false);
                    debug!("action: tls_handshake | result: fail | id: {id} | error: {e}");
                    return;
                }
                shared.metrics.tls_handshake(true);
                Transport::Tls(tls)
            }
            Ok(transport) => transport,
            Err(e) => {
                debug!("action: accept_tls | result: fail | id: {id} | error: {e}");
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
            guest_requests: requests,
            metrics: &shared.metrics,
            hangups: &shared.hangups,
        };
        Session::new(context).run(&mut conn);
        shared.metrics.closed(id);
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
