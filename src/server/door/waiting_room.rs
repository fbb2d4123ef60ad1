//! Where a newcomer waits for a guest place while every place is taken by a guest that is
//! progressing: places go to those from addresses with no failure first (newest first), then
//! to those from suspect addresses (see [`crate::server::suspects`]) in their order of arrival,
//! so that an agency is never turned away to retry later while strangers who reconnect at once
//! take every place that frees up. (The
//! kernel's listen queue would keep that order too, but it is short, and a connection that finds
//! it full waits for its SYN to be sent again.)
//!
//! On a TLS server an agency opens with a TLS hello as soon as it connects; a waiter that
//! opens with plain text (it can only probe) or has said nothing for [`SILENT_FOR`] waits behind
//! the suspects' TLS clients, whatever its address. Without this, a first wave of strangers from
//! fresh addresses (no failure yet) that connected before the agencies would hold every place in
//! turn ahead of them, and probing strangers from the agencies' own address (a NAT) would stand
//! ahead of an agency that came after them: places free only as guests stall, a few hundred a
//! second, and for one address its `SERVER_MAX_GUESTS_PER_IP` a second.

use std::collections::VecDeque;
use std::net::{IpAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::server::suspects;
use crate::server::tls::TLS_HANDSHAKE;
use crate::wire::transport::{Arrived, peek_now};

/// Most connections waiting: each costs a file descriptor and a few bytes.
pub const CAPACITY: usize = 4096;

/// How often, at most, a full room looks for waiters that hung up: each look is a system call
/// per waiter, and a newcomer arrives at a full room as often as a flood connects.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// How long a waiter from an address with no failure may be passed over by newer ones; past
/// it, it goes first. Without it, strangers reconnecting from the agencies' own address (a
/// NAT) kept an agency that came before them waiting until it was turned away.
pub const PATIENCE: Duration = Duration::from_secs(1);

/// How long a waiter on a TLS server may say nothing before it waits behind the others.
pub const SILENT_FOR: Duration = Duration::from_millis(100);

/// A connection waiting for a guest place.
pub struct Waiter {
    pub stream: Arc<TcpStream>,
    pub ip: IpAddr,
    pub arrived: Instant,
}

/// What came of a waiter's turn.
pub enum Turn {
    /// It has left the room: admitted, or turned away.
    Left,
    /// Its address has no guest place free: it waits on, and so does the rest of that address.
    AddressFull,
    /// No guest place is free: everyone waits on.
    GuestsFull,
}

/// The waiters, each queue in its order of arrival: those from addresses that are no suspects,
/// those of them that have waited [`PATIENCE`], and the suspects'.
#[derive(Default)]
pub struct WaitingRoom {
    clear: VecDeque<Waiter>,
    aged: VecDeque<Waiter>,
    suspects: VecDeque<Waiter>,
    /// When the full room last looked for waiters that hung up.
    swept: Option<Instant>,
}

impl WaitingRoom {
    pub fn len(&self) -> usize {
        self.clear.len() + self.aged.len() + self.suspects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the room is full and no waiter in it is a suspect that a newcomer could take the
    /// place of: a crowd (ten thousand agencies connecting at once) fills it so. The door then
    /// leaves the rest of the crowd in the kernel's listen queue rather than turn it away.
    pub fn is_full_of_the_clear(&self) -> bool {
        self.len() >= CAPACITY && self.suspects.is_empty()
    }

    /// Lets `waiter` in at the back of its queue. When the room is full, those who gave up
    /// waiting leave first (a full room is mostly strangers'; looked for at most every
    /// [`SWEEP_EVERY`]), then a suspect makes room for one that is not. What could not stay is
    /// returned, to be turned away.
    pub fn enter(&mut self, waiter: Waiter, suspect: bool) -> Option<Waiter> {
        if self.len() >= CAPACITY && self.swept.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
            self.swept = Some(Instant::now());
            for queue in [&mut self.clear, &mut self.aged, &mut self.suspects] {
                queue.retain(|w| peek_now(&w.stream) != Arrived::Closed);
            }
        }
        if self.len() >= CAPACITY {
            if suspect {
                return Some(waiter);
            }
            let bumped = self.suspects.pop_back();
            if bumped.is_none() {
                return Some(waiter);
            }
            self.clear.push_back(waiter);
            return bumped;
        }
        if suspect {
            self.suspects.push_back(waiter)
        } else {
            self.clear.push_back(waiter)
        }
        None
    }

    /// Those that have waited `limit` or more, removed.
    pub fn waited_too_long(&mut self, now: Instant, limit: Duration) -> Vec<Waiter> {
        let mut gone = Vec::new();
        for queue in [&mut self.clear, &mut self.aged, &mut self.suspects] {
            while queue.front().is_some_and(|w| now.duration_since(w.arrived) >= limit) {
                gone.extend(queue.pop_front());
            }
        }
        gone
    }

    /// Gives each waiter its turn as long as `turn` finds guest places: first those from
    /// addresses with no failure that have waited [`PATIENCE`], oldest first; then the rest of
    /// them newest first (a first wave of strangers from fresh addresses that came before the
    /// agencies does not stand ahead of them, and each of its addresses is a suspect after its
    /// first failure); then the suspects oldest first. One whose address has no place left waits
    /// on without holding up the others. Those that hung up while waiting leave. On a `tls`
    /// server, the waiters that are no TLS client in a hurry (they can only probe) go last: the
    /// clear ones behind the suspects, and the suspects' behind the suspects' TLS clients. `turn`
    /// gets the waiter and its first byte, if it has sent one.
    pub fn seat(&mut self, tls: bool, now: Instant, mut turn: impl FnMut(&Waiter, Option<u8>) -> Turn) {
        while self.clear.front().is_some_and(|w| now.duration_since(w.arrived) >= PATIENCE) {
            self.aged.extend(self.clear.pop_front());
        }
        let mut seating = Seating { tls, now, crowded: Vec::new(), behind: Vec::new() };
        let full = seating.give_turns(&mut self.aged, Queue::Clear, Order::OldestFirst, &mut turn)
            || seating.give_turns(&mut self.clear, Queue::Clear, Order::NewestFirst, &mut turn);
        self.suspects.extend(seating.behind.drain(..));
        let full = full
            || (tls && seating.give_turns(&mut self.suspects, Queue::SuspectsInAHurry, Order::OldestFirst, &mut turn));
        if !full {
            seating.give_turns(&mut self.suspects, Queue::Suspects, Order::OldestFirst, &mut turn);
        }
    }

    /// Everyone, emptying the room.
    pub fn drain(&mut self) -> impl Iterator<Item = Waiter> + '_ {
        self.clear.drain(..).chain(self.aged.drain(..)).chain(self.suspects.drain(..))
    }
}

/// The order in which a queue's waiters get their turns.
#[derive(Clone, Copy)]
enum Order {
    OldestFirst,
    NewestFirst,
}

/// Which waiters of a queue get their turns.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Queue {
    /// Those from addresses with no failure; on a TLS server, those that are no TLS client in a
    /// hurry go behind the suspects.
    Clear,
    /// On a TLS server, the suspects' TLS clients in a hurry only: the others can only probe,
    /// and strangers probing from the agencies' own address (a NAT) kept an agency behind two
    /// thousand of them, a place a second each, until it was turned away.
    SuspectsInAHurry,
    /// Every suspect.
    Suspects,
}

/// One seating of the room: which addresses have no place left, and who goes behind.
struct Seating {
    tls: bool,
    now: Instant,
    crowded: Vec<IpAddr>,
    /// Waiters from addresses with no failure that are no TLS client in a hurry.
    behind: Vec<Waiter>,
}

/// What a waiter's look at its turn found.
enum Look {
    /// It hung up while waiting: there is no one to serve.
    HungUp,
    /// Not its turn in this pass: its address has no place left, or the pass is for others.
    PassedOver,
    /// It goes behind the suspects.
    Behind,
    /// Its turn, with its first byte if it has sent one.
    Ready(Option<u8>),
}

impl Seating {
    /// Gives the waiters of `queue` (those that `which` says) their turns in `order`. Whether
    /// every guest place is taken.
    fn give_turns(
        &mut self,
        queue: &mut VecDeque<Waiter>,
        which: Queue,
        order: Order,
        turn: &mut impl FnMut(&Waiter, Option<u8>) -> Turn,
    ) -> bool {
        // Waiters passed over so far, at the end their turns are given from.
        let mut passed = 0;
        while passed < queue.len() {
            let i = match order {
                Order::OldestFirst => passed,
                Order::NewestFirst => queue.len() - 1 - passed,
            };
            let waiter = &queue[i];
            match self.look(waiter, which) {
                Look::HungUp => drop(queue.remove(i)),
                Look::PassedOver => passed += 1,
                Look::Behind => self.behind.extend(queue.remove(i)),
                Look::Ready(first) => match turn(waiter, first) {
                    Turn::Left => drop(queue.remove(i)),
                    Turn::AddressFull => {
                        self.crowded.push(suspects::origin(waiter.ip));
                        passed += 1;
                    }
                    Turn::GuestsFull => return true,
                },
            }
        }
        false
    }

    /// Whether `waiter` has its turn in a pass over `which`.
    fn look(&self, waiter: &Waiter, which: Queue) -> Look {
        if self.crowded.contains(&suspects::origin(waiter.ip)) {
            return Look::PassedOver;
        }
        let first = match peek_now(&waiter.stream) {
            Arrived::Closed => return Look::HungUp,
            Arrived::Byte(b) => Some(b),
            Arrived::Nothing => None,
        };
        let hurried = first.map_or(self.now.duration_since(waiter.arrived) < SILENT_FOR, |b| b == TLS_HANDSHAKE);
        match which {
            Queue::Clear if self.tls && !hurried => Look::Behind,
            Queue::SuspectsInAHurry if !hurried => Look::PassedOver,
            _ => Look::Ready(first),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    /// A waiter whose client has sent `bytes`, seen by the server's side.
    fn waiter(listener: &TcpListener, bytes: &[u8]) -> (TcpStream, Waiter) {
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.write_all(bytes).unwrap();
        let (server, addr) = listener.accept().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !bytes.is_empty() && peek_now(&server) == Arrived::Nothing && Instant::now() < deadline {
            std::thread::yield_now();
        }
        (client, Waiter { stream: Arc::new(server), ip: addr.ip(), arrived: Instant::now() })
    }

    #[test]
    fn on_a_tls_server_tls_hellos_are_seated_newest_first_before_plain_text_and_silence() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut room = WaitingRoom::default();
        let mut clients = Vec::new();
        for bytes in [&[TLS_HANDSHAKE, 3, 1][..], b"PING\n", &[TLS_HANDSHAKE, 3, 3], b""] {
            let (client, waiter) = waiter(&listener, bytes);
            clients.push(client);
            assert!(room.enter(waiter, false).is_none());
        }
        let later = Instant::now() + SILENT_FOR;
        let mut order = Vec::new();
        room.seat(true, later, |waiter, first| {
            let mut version = [0u8; 3];
            if first == Some(TLS_HANDSHAKE) {
                let _ = waiter.stream.peek(&mut version);
            }
            order.push(first.map(|b| if b == TLS_HANDSHAKE { version[2] } else { b }));
            Turn::Left
        });
        // The newer TLS hello (version byte 3), then the older (1); then those put behind, in
        // the order they were passed over: the silent one (newest), the plain-text one.
        assert_eq!(order, [Some(3), Some(1), None, Some(b'P')]);
        assert!(room.is_empty());
    }

    #[test]
    fn a_waiter_passed_over_for_a_second_goes_before_newer_ones() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut room = WaitingRoom::default();
        let mut clients = Vec::new();
        let now = Instant::now();
        // Arrived 2 s, 1.5 s and 0 s before `now`, each opening a TLS handshake (version byte 1, 2, 3).
        for (version, ago) in [(1, 2_000), (2, 1_500), (3, 0)] {
            let (client, mut waiter) = waiter(&listener, &[TLS_HANDSHAKE, 3, version]);
            waiter.arrived = now - Duration::from_millis(ago);
            clients.push(client);
            assert!(room.enter(waiter, false).is_none());
        }
        let mut order = Vec::new();
        room.seat(true, now, |waiter, _| {
            let mut version = [0u8; 3];
            let _ = waiter.stream.peek(&mut version);
            order.push(version[2]);
            Turn::Left
        });
        // Those that waited past patience oldest first, then the rest newest first.
        assert_eq!(order, [1, 2, 3]);
    }

    #[test]
    fn on_a_tls_server_a_suspects_tls_hello_goes_before_older_suspects_that_can_only_probe() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut room = WaitingRoom::default();
        let mut clients = Vec::new();
        for bytes in [&b"PING\n"[..], b"", &[TLS_HANDSHAKE, 3, 1], &[TLS_HANDSHAKE, 3, 2]] {
            let (client, waiter) = waiter(&listener, bytes);
            clients.push(client);
            assert!(room.enter(waiter, true).is_none());
        }
        let later = Instant::now() + SILENT_FOR;
        let mut order = Vec::new();
        room.seat(true, later, |waiter, first| {
            let mut head = [0u8; 3];
            if first == Some(TLS_HANDSHAKE) {
                let _ = waiter.stream.peek(&mut head);
            }
            order.push(if first == Some(TLS_HANDSHAKE) { head[2] } else { first.unwrap_or(0) });
            Turn::Left
        });
        // The TLS hellos in their order of arrival, then the rest in theirs.
        assert_eq!(order, [1, 2, b'P', 0]);
        assert!(room.is_empty());
    }
}
