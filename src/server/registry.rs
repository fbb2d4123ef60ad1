//! The live connections: their sockets, so that shutdown can unblock their threads; which
//! connection speaks for each agency, so that a newer session of an agency ends the older one;
//! and which are still *guests* (not yet authenticated), so that strangers never take more than
//! their share of the server: past `SERVER_MAX_GUESTS` (or `SERVER_MAX_GUESTS_PER_IP` from one
//! address) the oldest guest is evicted to make room for the newcomer, and an authenticated
//! agency is no guest at all.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use log::info;

use crate::server::suspects::Suspects;

/// Why a connection was told to end by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Still on.
    No,
    /// A newer connection of the same agency took over.
    Replaced,
    /// A guest evicted to make room for a newer one.
    Evicted,
}

/// How far a guest has got, which decides who is evicted first when guests are too many:
/// a guest that was already answered a probe (`PING`, `STATUS`: it has had its service), then
/// one that has sent nothing, and only then one that is mid-way (a TLS handshake, a `HELLO`
/// arriving) for longer than [`UNDERWAY_GRACE`], oldest first within each. An agency
/// connecting is mid-way for milliseconds; most attackers are never mid-way, and one that
/// stalls mid-way is evicted once its grace is over. When every guest is young and mid-way,
/// the newcomer waits at the door for a place, in turn: closing a busy guest would only make a
/// crowd of agencies (a thousand behind one address) close each other in turn. A guest waiting
/// for its turn to compute its TLS handshake ([`Stage::Queued`]) is never evicted: the wait is
/// the server's, not the client's, and evicting it would throw away the place in the queue of
/// the agency that waits longest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Probed = 0,
    Silent = 1,
    Underway = 2,
    Queued = 3,
}

/// What became of a connection at the door.
pub enum Admission {
    /// A guest now.
    Admitted(Arc<Peer>),
    /// Every guest place (of all, or of its address) is taken by a guest that is young and
    /// under way: it may wait for one.
    Crowded(Crowd),
    /// The server serves as many connections as it may.
    Full,
}

/// Which guest places are all taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crowd {
    All,
    Address,
}

/// One live connection, as others may need to reach it.
pub struct Peer {
    pub stream: Arc<TcpStream>,
    ended: AtomicU8,
    stage: AtomicU8,
}

impl Peer {
    pub fn set_stage(&self, stage: Stage) {
        self.stage.store(stage as u8, Ordering::Relaxed);
    }

    fn stage(&self) -> Stage {
        match self.stage.load(Ordering::Relaxed) {
            0 => Stage::Probed,
            1 => Stage::Silent,
            2 => Stage::Underway,
            _ => Stage::Queued,
        }
    }

    pub fn ended(&self) -> Ended {
        match self.ended.load(Ordering::SeqCst) {
            1 => Ended::Replaced,
            2 => Ended::Evicted,
            _ => Ended::No,
        }
    }

    /// Marks the connection ended for `why` and wakes its thread from any read, so that it
    /// can still say why. (A thread blocked writing to a client that does not read ends at
    /// its write deadline: for a guest, its hello deadline.)
    fn end(&self, why: Ended) {
        self.ended.store(if why == Ended::Replaced { 1 } else { 2 }, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Read);
    }
}

/// What an evicted guest is told, by whichever thread holds it.
pub const EVICTED: &str = "the server is full of connections that have not said HELLO; this, the oldest, makes room";

/// How many guests may be at once.
#[derive(Debug, Clone, Copy)]
pub struct GuestLimits {
    pub total: usize,
    pub per_ip: usize,
}

/// How long a guest under way is spared eviction.
pub const UNDERWAY_GRACE: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Live {
    peers: HashMap<u64, Arc<Peer>>,
    /// The connection that speaks for each agency.
    agencies: HashMap<u32, u64>,
    /// The guests, oldest (smallest id) first, with their addresses and when they came.
    guests: BTreeMap<u64, (IpAddr, Instant)>,
    guests_per_ip: HashMap<IpAddr, usize>,
    /// Peers told to end whose threads have not yet: they are on their way out.
    ending: usize,
}

impl Live {
    fn forget_guest(&mut self, id: u64) {
        if let Some((ip, _)) = self.guests.remove(&id)
            && let Some(n) = self.guests_per_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                self.guests_per_ip.remove(&ip);
            }
        }
    }

    /// Evicts a guest (from `ip` only, if given): the oldest of the first [`Stage`] that has
    /// one, a guest under way only past its grace; true if there was one.
    fn evict_oldest(&mut self, ip: Option<IpAddr>) -> bool {
        let now = Instant::now();
        let stage = |id: &u64| self.peers.get(id).map_or(Stage::Probed, |p| p.stage());
        let candidates = self.guests.iter().filter(|(_, (g, _))| ip.is_none_or(|ip| *g == ip)).filter(
            |(id, (_, came))| match stage(id) {
                Stage::Probed | Stage::Silent => true,
                Stage::Underway => now.duration_since(*came) >= UNDERWAY_GRACE,
                Stage::Queued => false,
            },
        );
        // `min_by_key` keeps the first of equals: the oldest, as `guests` is ordered by id.
        let Some(id) = candidates.map(|(&id, _)| id).min_by_key(stage) else { return false };
        self.forget_guest(id);
        if let Some(peer) = self.peers.get(&id) {
            peer.end(Ended::Evicted);
            self.ending += 1;
        }
        true
    }
}

/// Every live connection, and a `Condvar` signalled whenever one ends.
#[derive(Default)]
pub struct Registry {
    live: Mutex<Live>,
    ended: Condvar,
    suspects: Suspects,
}

impl Registry {
    /// The addresses whose guests failed lately.
    pub fn suspects(&self) -> &Suspects {
        &self.suspects
    }

    fn lock(&self) -> MutexGuard<'_, Live> {
        // The maps stay consistent whatever a panicking thread did: inserts and removes are whole.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections whose threads are running (guests, agencies, and those told to end).
    pub fn len(&self) -> usize {
        self.lock().peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Admits connection `id` from `ip` as a guest, first evicting the oldest guest of that
    /// address, then the oldest of all, as the guest limits require. It is not admitted if the
    /// guests are still too many (all young and under way: [`Admission::Crowded`]) or if the
    /// connections being served reach `ceiling` ([`Admission::Full`]). Also returns how many
    /// guests were evicted.
    pub fn admit(
        &self,
        id: u64,
        ip: IpAddr,
        stream: Arc<TcpStream>,
        stage: Stage,
        limits: GuestLimits,
        ceiling: usize,
    ) -> (Admission, usize) {
        let mut live = self.lock();
        let mut evicted = 0;
        while live.guests_per_ip.get(&ip).copied().unwrap_or(0) >= limits.per_ip && live.evict_oldest(Some(ip)) {
            evicted += 1;
        }
        while live.guests.len() >= limits.total && live.evict_oldest(None) {
            evicted += 1;
        }
        // Those told to end are leaving within a fraction of a second, but a pile of them
        // counts too: threads are what the ceiling bounds.
        if live.peers.len() - live.ending >= ceiling || live.peers.len() >= 2 * ceiling {
            return (Admission::Full, evicted);
        }
        if live.guests.len() >= limits.total {
            return (Admission::Crowded(Crowd::All), evicted);
        }
        if live.guests_per_ip.get(&ip).copied().unwrap_or(0) >= limits.per_ip {
            return (Admission::Crowded(Crowd::Address), evicted);
        }
        let peer = Arc::new(Peer { stream, ended: AtomicU8::new(0), stage: AtomicU8::new(stage as u8) });
        live.peers.insert(id, Arc::clone(&peer));
        live.guests.insert(id, (ip, Instant::now()));
        *live.guests_per_ip.entry(ip).or_default() += 1;
        (Admission::Admitted(peer), evicted)
    }

    /// Forgets connection `id`, any agency it spoke for, and its guest place.
    pub fn remove(&self, id: u64) {
        let mut live = self.lock();
        if live.peers.remove(&id).is_some_and(|p| p.ended() != Ended::No) {
            live.ending -= 1;
        }
        live.agencies.retain(|_, holder| *holder != id);
        live.forget_guest(id);
        drop(live);
        self.ended.notify_all();
    }

    /// Makes connection `id`, now authenticated, the one that speaks for `agency`: it leaves
    /// the guests. The connection that spoke for the agency before, if any, is told it was
    /// replaced and its reading half shut, so that its thread wakes from any read and ends
    /// with `ERR REPLACED`; true if there was one.
    pub fn claim(&self, agency: u32, id: u64) -> bool {
        let mut live = self.lock();
        live.forget_guest(id);
        let previous = live.agencies.insert(agency, id).filter(|&old| old != id);
        let Some(old) = previous.and_then(|old| live.peers.get(&old)).map(Arc::clone) else { return false };
        if old.ended() == Ended::No {
            live.ending += 1;
        }
        old.end(Ended::Replaced);
        true
    }

    /// Shuts down every live socket: its reading half, then, after `grace`, both.
    pub fn close_all(&self, grace: Duration) {
        let live = self.lock();
        let count = live.peers.len();
        for peer in live.peers.values() {
            let _ = peer.stream.shutdown(Shutdown::Read);
        }
        let (live, _) = self
            .ended
            .wait_timeout_while(live, grace, |live| !live.peers.is_empty())
            .unwrap_or_else(PoisonError::into_inner);
        for peer in live.peers.values() {
            let _ = peer.stream.shutdown(Shutdown::Both);
        }
        info!("action: close_connections | result: success | connections: {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn admit(registry: &Registry, id: u64, ip: IpAddr, listener: &TcpListener) -> (Arc<Peer>, usize) {
        let stream = Arc::new(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
        match registry.admit(id, ip, stream, Stage::Silent, GuestLimits { total: 3, per_ip: 2 }, 100) {
            (Admission::Admitted(peer), evicted) => (peer, evicted),
            _ => panic!("no room for {id}"),
        }
    }

    #[test]
    fn the_oldest_guest_makes_room_per_address_first_then_overall_and_agencies_are_no_guests() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let registry = Registry::default();
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let (p1, _) = admit(&registry, 1, a, &listener);
        let (p2, _) = admit(&registry, 2, a, &listener);
        let (p3, evicted) = admit(&registry, 3, a, &listener);
        assert_eq!((evicted, p1.ended(), p2.ended()), (1, Ended::Evicted, Ended::No));
        // 2 and 3 from a; 4 from b fits; 5 from b makes the oldest of all (2) go.
        let (p4, evicted) = admit(&registry, 4, b, &listener);
        assert_eq!(evicted, 0);
        let (_, evicted) = admit(&registry, 5, b, &listener);
        assert_eq!((evicted, p2.ended(), p3.ended(), p4.ended()), (1, Ended::Evicted, Ended::No, Ended::No));
        // Authenticated, 3 is no guest: room for two more before anyone is evicted.
        assert!(!registry.claim(1, 3));
        registry.remove(1);
        registry.remove(2);
        let (_, evicted) = admit(&registry, 6, a, &listener);
        assert_eq!((evicted, p3.ended()), (0, Ended::No));
        // A second session of agency 1 replaces the first.
        assert!(registry.claim(1, 6));
        assert_eq!(p3.ended(), Ended::Replaced);
    }

    #[test]
    fn a_guest_under_way_is_evicted_last() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let registry = Registry::default();
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let (underway, _) = admit(&registry, 1, ip, &listener);
        underway.set_stage(Stage::Underway);
        let (silent, _) = admit(&registry, 2, ip, &listener);
        let (_, evicted) = admit(&registry, 3, ip, &listener);
        assert_eq!((evicted, underway.ended(), silent.ended()), (1, Ended::No, Ended::Evicted));
    }
}
