//! The live connections: their sockets, so that shutdown can unblock their threads; which
//! connection speaks for each agency, so that a newer session of an agency ends the older one;
//! and which are still *guests* (not yet authenticated), so that strangers never take more than
//! their share of the server: past `SERVER_MAX_GUESTS` (or `SERVER_MAX_GUESTS_PER_IP` from one
//! address, an IPv6 address counted as its /64) a guest that has *stalled* is evicted to make
//! room for the newcomer, and while none has, the newcomer waits. An authenticated agency is no
//! guest at all.
//!
//! The one rule: **progressing guests stay, stalled guests go**. A guest is judged by its
//! progress (the last time it sent something the server was waiting for), never by its age:
//! a crowd of agencies connecting at once (a round's start, a restart, a thousand behind one
//! NAT) is all progressing and waits its turn, while a stranger that sent a TLS hello and then
//! nothing has stalled after [`UNDERWAY_STALLED_AFTER`] (one the door holds, silent or done
//! probing, after [`HELD_STALLED_AFTER`]) and goes first. For a newcomer from the guest's own
//! address, if that address is no suspect, the guest has [`STALLED_AFTER`]: a crowd behind one
//! address shares its CPU and link, and replacing one of it with another gains nothing.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use log::info;

use crate::server::suspects::{self, Suspects};

/// Why a connection was told to end by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Still on.
    No,
    /// A newer connection of the same agency took over.
    Replaced,
    /// A stalled guest evicted to make room for a newer one.
    Evicted,
    /// A guest that did not authenticate within the hello timeout.
    TimedOut,
}

/// How far a guest has got. Among the guests that have stalled, one that was already answered
/// a probe (`PING`, `STATUS`: it has had its service) goes first, then one that has sent
/// nothing, then one mid-way (a TLS handshake, a `HELLO` arriving), the longest stalled first
/// within each. A guest waiting for its turn to compute its TLS handshake ([`Stage::Queued`])
/// is never evicted: the wait is the server's, not the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Probed = 0,
    Silent = 1,
    Underway = 2,
    Queued = 3,
}

/// How long a guest may go without progress before a newcomer from its own address may take
/// its place. A crowd of agencies behind one address (a NAT, one machine) connecting at once
/// shares that machine's CPU and link: 300 handshaking in one process on 2 shared cores, in
/// `tests/limits.rs`, wait hundreds of milliseconds for the CPU. Replacing one of them with
/// another of the same crowd gains nothing.
pub const STALLED_AFTER: Duration = Duration::from_secs(1);

/// How long a guest the door holds without a thread (silent, probing, or part of a line) may
/// go without progress before a newcomer from another address may take its place. An agency
/// opens with its TLS hello (or its `HELLO`) as soon as it connects.
pub const HELD_STALLED_AFTER: Duration = Duration::from_millis(150);

/// How long a guest on a thread of its own (its TLS handshake, or its `HELLO`, under way) may go
/// without progress before a newcomer from another address may take its place: the client's
/// answer to the server's flight is a round trip and a millisecond or two of its CPU away
/// (measured on this loaded 2-core machine, 2,000 agencies of one `lottery-round` handshaking
/// at once: median 4 ms, 90th percentile 100 ms, 99th 534 ms; a crowd from one address has
/// [`STALLED_AFTER`]).
pub const UNDERWAY_STALLED_AFTER: Duration = Duration::from_millis(300);

/// What became of a connection at the door.
pub enum Admission {
    /// A guest now.
    Admitted(Arc<Peer>),
    /// Every guest place is taken by a guest that is progressing: it may wait for one.
    NoGuestPlace,
    /// Every guest place of its address is taken by a guest that is progressing.
    NoPlaceForAddress,
    /// The server serves as many connections as it may.
    AtCeiling,
}

/// One live connection, as others may need to reach it.
pub struct Peer {
    pub stream: Arc<TcpStream>,
    ended: AtomicU8,
    stage: AtomicU8,
    /// When it came, and its last progress as milliseconds since then.
    came: Instant,
    progress_ms: AtomicU64,
}

impl Peer {
    /// A connection that arrived at `came` (it may have waited for its place since), whose
    /// last progress was then.
    fn new(stream: Arc<TcpStream>, stage: Stage, came: Instant) -> Peer {
        let (ended, progress_ms) = (AtomicU8::new(0), AtomicU64::new(0));
        Peer { stream, ended, stage: AtomicU8::new(stage as u8), came, progress_ms }
    }

    /// Notes how far the guest has got; reaching a stage is progress.
    pub fn set_stage(&self, stage: Stage) {
        self.set_stage_without_progress(stage);
        self.advanced();
    }

    /// Notes the stage only: a wait of the server's own (for a permit to compute) begins or
    /// ends, which says nothing of the client.
    pub fn set_stage_without_progress(&self, stage: Stage) {
        self.stage.store(stage as u8, Ordering::Relaxed);
    }

    /// The guest sent something whole that the server was waiting for: a line, a TLS record
    /// that moved its handshake on. Part of one is no progress.
    pub fn advanced(&self) {
        let ms = u64::try_from(self.came.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.progress_ms.store(ms, Ordering::Relaxed);
    }

    /// When it last made progress.
    fn last_progress(&self) -> Instant {
        self.came + Duration::from_millis(self.progress_ms.load(Ordering::Relaxed))
    }

    fn stage(&self) -> Stage {
        match self.stage.load(Ordering::Relaxed) {
            0 => Stage::Probed,
            1 => Stage::Silent,
            2 => Stage::Underway,
            _ => Stage::Queued,
        }
    }

    /// Whether a newcomer may take its place at `now`; `same_crowd`: the newcomer is from the
    /// guest's own address, and that address is no suspect.
    fn has_stalled(&self, now: Instant, same_crowd: bool) -> bool {
        let after = match self.stage() {
            Stage::Queued => return false,
            _ if same_crowd => STALLED_AFTER,
            Stage::Probed | Stage::Silent => HELD_STALLED_AFTER,
            Stage::Underway => UNDERWAY_STALLED_AFTER,
        };
        now.saturating_duration_since(self.last_progress()) >= after
    }

    pub fn ended(&self) -> Ended {
        match self.ended.load(Ordering::SeqCst) {
            1 => Ended::Replaced,
            2 => Ended::Evicted,
            3 => Ended::TimedOut,
            _ => Ended::No,
        }
    }

    /// Marks the connection ended for `why` and wakes its thread from any read, so that it
    /// can still say why. (A thread blocked writing to a client that does not read ends at
    /// its write deadline: for a guest, its hello deadline.)
    fn end(&self, why: Ended) {
        let code = match why {
            Ended::No => 0,
            Ended::Replaced => 1,
            Ended::Evicted => 2,
            Ended::TimedOut => 3,
        };
        self.ended.store(code, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Read);
    }
}

/// What an evicted guest is told, by whichever thread holds it.
pub const EVICTED: &str =
    "the server is full of connections that have not said HELLO; this one had stalled and makes room";

/// What a guest out of time is told, by whichever thread holds it: the door owns the hello
/// timeout, for the guests it holds and for those on threads of their own.
pub fn hello_timed_out(hello_timeout: Duration) -> String {
    format!("no HELLO (or end to a probe) within {} ms", hello_timeout.as_millis())
}

/// How many guests may be at once.
#[derive(Debug, Clone, Copy)]
pub struct GuestLimits {
    pub total: usize,
    /// Per address, an IPv6 address counted as its /64.
    pub per_ip: usize,
}

#[derive(Default)]
struct Live {
    peers: HashMap<u64, Arc<Peer>>,
    /// The connection that speaks for each agency.
    agencies: HashMap<u32, u64>,
    /// The agencies each connection has said `HELLO` for: what to forget when it ends, without
    /// a look at every agency.
    claims: HashMap<u64, Vec<u32>>,
    /// The guests, oldest (smallest id) first, with their addresses.
    guests: BTreeMap<u64, IpAddr>,
    /// Guests per address, as [`suspects::origin`] counts addresses.
    guests_per_origin: HashMap<IpAddr, usize>,
    /// Peers told to end whose threads have not yet: they are on their way out.
    ending: usize,
}

impl Live {
    fn forget_guest(&mut self, id: u64) -> Option<IpAddr> {
        let ip = self.guests.remove(&id)?;
        if let Some(n) = self.guests_per_origin.get_mut(&suspects::origin(ip)) {
            *n -= 1;
            if *n == 0 {
                self.guests_per_origin.remove(&suspects::origin(ip));
            }
        }
        Some(ip)
    }

    /// Why a guest from `ip` may not come in now, the evictions done; `None` if it may.
    fn refusal(&self, ip: IpAddr, limits: GuestLimits, ceiling: usize) -> Option<Admission> {
        // Guest places come first: when they are full, a guest leaving frees a place under the
        // ceiling too, so the newcomer waits rather than being turned away.
        if self.guests.len() >= limits.total {
            Some(Admission::NoGuestPlace)
        } else if self.guests_from(ip) >= limits.per_ip {
            Some(Admission::NoPlaceForAddress)
        } else if self.peers.len() - self.ending >= ceiling || self.peers.len() >= 2 * ceiling {
            // Those told to end are leaving within a fraction of a second, but a pile of them
            // counts too: threads are what the ceiling bounds.
            Some(Admission::AtCeiling)
        } else {
            None
        }
    }

    fn guests_from(&self, ip: IpAddr) -> usize {
        self.guests_per_origin.get(&suspects::origin(ip)).copied().unwrap_or(0)
    }

    /// Evicts a guest that has stalled, for a newcomer from `ip` (of `ip`'s origin only, if
    /// `own`): of the first [`Stage`] that has one, the longest stalled; its address, if there
    /// was one. A guest from the newcomer's own address has [`STALLED_AFTER`] if that address
    /// is `clear` (no suspect): an address whose guests fail more than they succeed is no crowd
    /// of agencies to be patient with, and at a place a second for it, 2,000 strangers' TLS
    /// hellos from the agencies' own address kept an agency that came after them waiting 30 s.
    fn evict_stalled(&mut self, ip: IpAddr, own: bool, clear: bool) -> Option<IpAddr> {
        let now = Instant::now();
        let origin = suspects::origin(ip);
        let id = self
            .guests
            .iter()
            .filter_map(|(id, guest_ip)| {
                let same = suspects::origin(*guest_ip) == origin;
                let peer = self.peers.get(id)?;
                ((same || !own) && peer.has_stalled(now, same && clear)).then_some((*id, peer))
            })
            .min_by_key(|(_, peer)| (peer.stage(), peer.last_progress()))
            .map(|(id, _)| id)?;
        let evicted = self.forget_guest(id);
        if let Some(peer) = self.peers.get(&id) {
            peer.end(Ended::Evicted);
            self.ending += 1;
        }
        evicted
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

    /// Admits connection `id` from `ip`, which `arrived` then and has `spoken` (sent a byte) or
    /// not, as a guest: one that has said nothing since it arrived has made no progress since.
    /// First evicts a stalled guest of that
    /// address, then of all, as the guest limits require; an eviction counts against the
    /// evicted guest's address. It is not admitted if the guests are still too many (all
    /// progressing: it may wait) or if the connections being served reach `ceiling`. Also
    /// returns how many guests were evicted.
    pub fn admit(
        &self,
        id: u64,
        ip: IpAddr,
        (stream, arrived, spoken): (Arc<TcpStream>, Instant, bool),
        stage: Stage,
        limits: GuestLimits,
        ceiling: usize,
    ) -> (Admission, usize) {
        let clear = !self.suspects.is_suspect(ip);
        let mut live = self.lock();
        let mut evicted = Vec::new();
        while live.guests_from(ip) >= limits.per_ip
            && let Some(from) = live.evict_stalled(ip, true, clear)
        {
            evicted.push(from);
        }
        while live.guests.len() >= limits.total
            && let Some(from) = live.evict_stalled(ip, false, clear)
        {
            evicted.push(from);
        }
        let admission = live.refusal(ip, limits, ceiling).unwrap_or_else(|| {
            let peer = Arc::new(Peer::new(stream, stage, arrived));
            if spoken {
                peer.advanced();
            }
            live.peers.insert(id, Arc::clone(&peer));
            live.guests.insert(id, ip);
            *live.guests_per_origin.entry(suspects::origin(ip)).or_default() += 1;
            Admission::Admitted(peer)
        });
        drop(live);
        self.count_evictions(&evicted);
        (admission, evicted.len())
    }

    fn count_evictions(&self, from: &[IpAddr]) {
        for &ip in from {
            self.suspects.failed(ip);
        }
    }

    /// Ends connection `id` for its hello timeout if it is still a guest (its thread says why);
    /// its address, if it was.
    pub fn time_out(&self, id: u64) -> Option<IpAddr> {
        let mut live = self.lock();
        let ip = live.forget_guest(id)?;
        if let Some(peer) = live.peers.get(&id).map(Arc::clone) {
            if peer.ended() == Ended::No {
                live.ending += 1;
            }
            peer.end(Ended::TimedOut);
        }
        Some(ip)
    }

    /// Forgets connection `id`, any agency it spoke for, and its guest place.
    pub fn remove(&self, id: u64) {
        let mut live = self.lock();
        if live.peers.remove(&id).is_some_and(|p| p.ended() != Ended::No) {
            live.ending -= 1;
        }
        for agency in live.claims.remove(&id).unwrap_or_default() {
            if live.agencies.get(&agency) == Some(&id) {
                live.agencies.remove(&agency);
            }
        }
        live.forget_guest(id);
        drop(live);
        self.ended.notify_all();
    }

    /// Makes connection `id`, now authenticated, the one that speaks for `agency`: it leaves
    /// the guests. The connection that spoke for the agency before, if any, is told it was
    /// replaced and its reading half shut, so that its thread wakes from any read and ends
    /// with `ERR REPLACED`; true if there was one.
    /// The agency's address is credited with a success (see [`Suspects`]).
    pub fn claim(&self, agency: u32, id: u64) -> bool {
        let mut live = self.lock();
        if let Some(ip) = live.forget_guest(id) {
            self.suspects.succeeded(ip);
        }
        let previous = live.agencies.insert(agency, id);
        if previous != Some(id) {
            live.claims.entry(id).or_default().push(agency);
        }
        let previous = previous.filter(|&old| old != id);
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

    const LIMITS: GuestLimits = GuestLimits { total: 3, per_ip: 2 };

    fn try_admit(registry: &Registry, id: u64, ip: IpAddr, listener: &TcpListener) -> (Admission, usize) {
        let stream = Arc::new(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
        registry.admit(id, ip, (stream, Instant::now(), false), Stage::Silent, LIMITS, 100)
    }

    fn admit(registry: &Registry, id: u64, ip: IpAddr, listener: &TcpListener) -> (Arc<Peer>, usize) {
        match try_admit(registry, id, ip, listener) {
            (Admission::Admitted(peer), evicted) => (peer, evicted),
            _ => panic!("no room for {id}"),
        }
    }

    /// Makes `peer` look as if its last progress was long ago.
    fn stall(peer: &Peer) {
        peer.progress_ms.store(0, Ordering::Relaxed);
        while peer.came.elapsed() < STALLED_AFTER {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn an_ended_connection_lets_go_of_the_agencies_it_still_speaks_for_only() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let registry = Registry::default();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let (one, _) = admit(&registry, 1, a, &listener);
        let (_two, _) = admit(&registry, 2, a, &listener);
        assert!(!registry.claim(7, 1) && !registry.claim(8, 1));
        // Connection 2 takes agency 7 over; 1 is told to end, still speaking for 8 till it does.
        assert!(registry.claim(7, 2));
        assert_eq!(one.ended(), Ended::Replaced);
        registry.remove(1);
        let held = |agency| registry.lock().agencies.get(&agency).copied();
        assert_eq!((held(7), held(8)), (Some(2), None));
        registry.remove(2);
        assert_eq!(held(7), None);
        assert!(registry.lock().claims.is_empty());
    }

    #[test]
    fn a_progressing_guest_stays_and_the_newcomer_waits() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let registry = Registry::default();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let (p1, _) = admit(&registry, 1, a, &listener);
        let (p2, _) = admit(&registry, 2, a, &listener);
        assert!(matches!(try_admit(&registry, 3, a, &listener), (Admission::NoPlaceForAddress, 0)));
        assert_eq!((p1.ended(), p2.ended()), (Ended::No, Ended::No));
        // A third address's guest fits overall; a fourth finds every place progressing.
        let (_, evicted) = admit(&registry, 4, "127.0.0.3".parse().unwrap(), &listener);
        assert_eq!(evicted, 0);
        assert!(matches!(
            try_admit(&registry, 5, "127.0.0.4".parse().unwrap(), &listener),
            (Admission::NoGuestPlace, 0)
        ));
        assert!(!registry.suspects().is_suspect(a), "waiting is no failure");
    }

    #[test]
    fn a_stalled_guest_goes_counted_against_its_address_and_agencies_are_no_guests() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let registry = Registry::default();
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let (p1, _) = admit(&registry, 1, a, &listener);
        let (p2, _) = admit(&registry, 2, a, &listener);
        p1.set_stage(Stage::Underway);
        stall(&p2);
        let (p3, evicted) = admit(&registry, 3, a, &listener);
        assert_eq!((evicted, p1.ended(), p2.ended()), (1, Ended::No, Ended::Evicted));
        assert!(registry.suspects().is_suspect(a), "a stall counts as a failure");
        // Authenticated, 1 is no guest, and its success outweighs that failure.
        assert!(!registry.claim(1, 1));
        assert!(!registry.suspects().is_suspect(a));
        registry.remove(2);
        let (_, evicted) = admit(&registry, 4, b, &listener);
        assert_eq!((evicted, p3.ended()), (0, Ended::No));
        // A second session of agency 1 replaces the first.
        assert!(registry.claim(1, 4));
        assert_eq!(p1.ended(), Ended::Replaced);
    }

    #[test]
    fn a_newcomer_from_a_suspect_address_takes_the_place_of_its_stalled_guest_as_a_stranger_would() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let registry = Registry::default();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        // Two handshakes under way from `a`, with no progress since they came, a stranger's
        // stall limit ago (and however much longer the machine's load makes it).
        let came = Instant::now() - UNDERWAY_STALLED_AFTER;
        let peers: Vec<Arc<Peer>> = (1..=2)
            .map(|id| {
                let stream = Arc::new(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
                match registry.admit(id, a, (stream, came, false), Stage::Underway, LIMITS, 100) {
                    (Admission::Admitted(peer), _) => peer,
                    _ => panic!("no room for {id}"),
                }
            })
            .collect();
        for _ in 0..3 {
            registry.suspects().failed(a);
        }
        let (_, evicted) = admit(&registry, 3, a, &listener);
        assert_eq!(evicted, 1);
        assert_eq!(peers.iter().filter(|p| p.ended() == Ended::Evicted).count(), 1);
    }

    #[test]
    fn a_guest_has_stalled_sooner_for_a_newcomer_from_another_address_than_from_its_own() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = Arc::new(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
        let came = Instant::now();
        let peer = Peer::new(stream, Stage::Silent, came);
        // Judged at chosen instants, not by sleeping: the rule, whatever the machine's load.
        let after = |d: Duration| came + d;
        let between = (HELD_STALLED_AFTER + UNDERWAY_STALLED_AFTER) / 2;
        assert!(peer.has_stalled(after(HELD_STALLED_AFTER), false), "held and silent: gone for a stranger");
        assert!(!peer.has_stalled(after(HELD_STALLED_AFTER), true), "but not for its own address");
        assert!(peer.has_stalled(after(STALLED_AFTER), true));
        peer.set_stage_without_progress(Stage::Underway);
        assert!(!peer.has_stalled(after(between), false), "a handshake under way has longer");
        assert!(peer.has_stalled(after(UNDERWAY_STALLED_AFTER), false));
        assert!(!peer.has_stalled(after(UNDERWAY_STALLED_AFTER), true));
        peer.set_stage_without_progress(Stage::Queued);
        assert!(!peer.has_stalled(after(STALLED_AFTER * 10), false), "the server's own wait is no stall");
    }

    #[test]
    fn a_guest_waiting_for_its_turn_to_compute_is_never_evicted_and_ipv6_counts_by_64() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let registry = Registry::default();
        let (p1, _) = admit(&registry, 1, "2001:db8::1".parse().unwrap(), &listener);
        let (p2, _) = admit(&registry, 2, "2001:db8::2".parse().unwrap(), &listener);
        stall(&p1);
        stall(&p2);
        p1.stage.store(Stage::Queued as u8, Ordering::Relaxed);
        // Another host of the same /64 is the same address: the stalled one of that /64 goes.
        let (_, evicted) = admit(&registry, 3, "2001:db8::ffff:3".parse().unwrap(), &listener);
        assert_eq!((evicted, p1.ended(), p2.ended()), (1, Ended::No, Ended::Evicted));
    }
}
