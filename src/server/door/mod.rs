//! The door: the one thread that accepts connections. It takes each connection as soon as it
//! arrives, so that an agency waits as little as it can behind strangers in the kernel's listen
//! queue, and holds it, with no thread of its own, until the client says something that is no
//! probe (a TLS hello, a `HELLO`); it answers the probes itself ([`crate::server::probes`]).
//! Only then does the connection get its thread. A stranger that connects and says nothing,
//! connects and hangs up thousands of times a second, or probes without end, costs the server a
//! socket, an entry in `epoll` and a few system calls, never a thread.
//!
//! Admission follows one rule (see [`crate::server::registry`]): progressing guests stay,
//! stalled guests go. When every guest place is taken by a guest that is progressing (a crowd
//! of agencies connecting at once), a newcomer waits in the [`waiting_room`] rather than
//! evicting anyone.
//!
//! The door also ends what it holds, without waiting on anyone ([`refusals`]): a guest that has
//! not said `HELLO` (or ended its probes) within the hello timeout (`ERR TIMEOUT`), one evicted
//! for a newcomer because it had stalled (`ERR BUSY`), one that hung up, one that waited for a
//! place for longer than a connection may be idle. It waits in `epoll` on the listener, the held
//! connections and the shutdown handle's eventfd, so that a shutdown wakes it whatever the
//! network is doing.

pub mod refusals;
pub mod waiting_room;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{info, warn};
use rustix::buffer::spare_capacity;
use rustix::event::{Timespec, epoll};
use rustix::io::Errno;

use crate::server::guest_log::GuestEvent;
use crate::server::probes::{self, Then};
use crate::server::registry::{self, Admission, Ended, Peer, Stage};
use crate::server::{Server, ShutdownHandle, tls};
use crate::wire::protocol::{ErrorCode, ProtocolError};
use crate::wire::transport::{consume_now, peek_all_now, send_now};
use waiting_room::{Turn, Waiter, WaitingRoom};

/// How long the door pauses after a failed `accept` or `epoll_wait`: a lasting failure (no file
/// descriptor frees up) must not spin it.
const ERROR_PAUSE: Duration = Duration::from_millis(20);

/// Most connections accepted in one go, before the door looks at what it holds again.
const ACCEPT_BURST: usize = 256;

/// How often the door looks whether a place has freed up (or a guest has stalled) while
/// someone waits for one.
const ROOM_TICK: Duration = Duration::from_millis(2);

/// Most bytes of a held connection looked at: more probes than a guest may make.
const PEEK: usize = 2048;

/// Most events taken from `epoll` in one wait.
const EVENTS: usize = 512;

/// The `epoll` keys of the listener and of the shutdown's eventfd; a held connection's key is
/// its id, which never reaches these.
const LISTENER: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;

/// A connection admitted as a guest: what its thread, or the door while it holds it, knows of it.
pub struct Guest {
    pub id: u64,
    pub stream: Arc<TcpStream>,
    pub ip: IpAddr,
    pub peer: Arc<Peer>,
    pub accepted: Instant,
    /// The probes the door answered for it.
    pub probes: u32,
}

/// A guest that has said more than probes, for a thread of its own.
pub struct Handoff {
    pub guest: Guest,
    /// Its first byte, still unread.
    pub first_byte: u8,
}

/// A guest the door holds while it says nothing but probes.
struct HeldGuest {
    guest: Guest,
    deadline: Instant,
    /// Whether it has sent plain text (probes, or part of a line): it can read a plain `ERR`.
    sent_plain_text: bool,
}

pub struct Door<'a> {
    listener: &'a TcpListener,
    shutdown: &'a ShutdownHandle,
    server: Arc<Server>,
    epoll: OwnedFd,
    held: HashMap<u64, HeldGuest>,
    room: WaitingRoom,
    /// Whether the listener is watched: not while the waiting room is full of the clear.
    accepting: bool,
    /// When each held connection's time is up, soonest first.
    deadlines: BTreeSet<(Instant, u64)>,
    /// When each guest handed to a thread must have authenticated, soonest first: the door owns
    /// every guest's hello timeout (an entry for one that has since authenticated or gone is
    /// dropped when due).
    handed_off_deadlines: BTreeSet<(Instant, u64)>,
    events: Vec<epoll::Event>,
    handoffs: VecDeque<Handoff>,
    next_id: u64,
    /// What a held connection has sent, peeked at.
    peeked: Vec<u8>,
}

impl<'a> Door<'a> {
    /// A door on `listener`, which it switches to non-blocking, woken by `shutdown`.
    ///
    /// # Errors
    /// `epoll` cannot be set up.
    pub fn new(listener: &'a TcpListener, shutdown: &'a ShutdownHandle, server: Arc<Server>) -> io::Result<Door<'a>> {
        listener.set_nonblocking(true)?;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        epoll::add(&epoll, listener, epoll::EventData::new_u64(LISTENER), epoll::EventFlags::IN)?;
        epoll::add(&epoll, shutdown.wake_fd(), epoll::EventData::new_u64(WAKE), epoll::EventFlags::IN)?;
        Ok(Door {
            listener,
            shutdown,
            server,
            epoll,
            held: HashMap::new(),
            room: WaitingRoom::default(),
            accepting: true,
            deadlines: BTreeSet::new(),
            handed_off_deadlines: BTreeSet::new(),
            events: Vec::with_capacity(EVENTS),
            handoffs: VecDeque::new(),
            next_id: 0,
            peeked: vec![0; PEEK],
        })
    }

    /// Waits for something to happen (or the next deadline), and deals with it.
    fn wait(&mut self) {
        let now = Instant::now();
        // Nothing due: wait for an event (a shutdown is one).
        let soonest = match (self.deadlines.first(), self.handed_off_deadlines.first()) {
            (Some(a), Some(b)) => Some(a.0.min(b.0)),
            (a, b) => a.or(b).map(|(d, _)| *d),
        };
        let mut timeout = soonest.map(|d| d.saturating_duration_since(now));
        if !self.room.is_empty() {
            timeout = Some(timeout.map_or(ROOM_TICK, |t| t.min(ROOM_TICK)));
        }
        // Rounded up to a whole millisecond, so that a deadline is never woken for just before it.
        let timeout = timeout.and_then(|t| Timespec::try_from(t + Duration::from_micros(999)).ok());
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        match epoll::wait(&self.epoll, spare_capacity(&mut events), timeout.as_ref()) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => {
                warn!("action: accept_connections | result: fail | error: {e}");
                thread::sleep(ERROR_PAUSE);
            }
        }
        for event in &events {
            match event.data.u64() {
                LISTENER => self.accept_burst(),
                WAKE => {}
                id => self.look(id),
            }
        }
        self.events = events;
        let now = Instant::now();
        self.seat(now);
        self.expire(now);
        self.pace_accepting();
    }

    /// Stops watching the listener while the waiting room is full of waiters that are no
    /// suspects (a crowd), and watches it again once there is room: the rest of the crowd waits
    /// in the kernel's listen queue instead of being accepted only to be turned away (10,000
    /// agencies connecting at once made 13,000 reconnects so). A room with suspects in it goes
    /// on accepting: a newcomer that is no suspect takes a suspect's place.
    fn pace_accepting(&mut self) {
        let accept = !self.room.is_full_of_the_clear();
        if accept == self.accepting {
            return;
        }
        let flags = if accept { epoll::EventFlags::IN } else { epoll::EventFlags::empty() };
        match epoll::modify(&self.epoll, self.listener, epoll::EventData::new_u64(LISTENER), flags) {
            Ok(()) => self.accepting = accept,
            Err(e) => warn!("action: accept_connections | result: fail | error: {e}"),
        }
    }

    fn accept_burst(&mut self) {
        for _ in 0..ACCEPT_BURST {
            if self.room.is_full_of_the_clear() {
                return;
            }
            match self.listener.accept() {
                Ok((stream, addr)) => self.arrive(stream, addr.ip()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors, a connection reset before accept: not fatal.
                    warn!("action: accept_connections | result: fail | error: {e}");
                    thread::sleep(ERROR_PAUSE);
                    return;
                }
            }
        }
    }

    /// A new connection: into the waiting room, to be seated with the others in their turn.
    fn arrive(&mut self, stream: TcpStream, ip: IpAddr) {
        let suspect = self.server.registry.suspects().is_suspect(ip);
        let waiter = Waiter { stream: Arc::new(stream), ip, arrived: Instant::now() };
        if let Some(Waiter { stream, ip, .. }) = self.room.enter(waiter, suspect) {
            refusals::turn_away(&self.server, &stream, ip);
        }
    }

    /// Gives guest places to those waiting, in their turn, as far as there are places (or
    /// stalled guests to make room). Those that waited longer than a connection may be idle are
    /// turned away: they keep a descriptor, and a client that waited that long has given up.
    fn seat(&mut self, now: Instant) {
        let limits = self.server.limits;
        for Waiter { stream, ip, .. } in self.room.waited_too_long(now, limits.idle_timeout.max(limits.hello_timeout)) {
            refusals::turn_away(&self.server, &stream, ip);
        }
        let mut room = std::mem::take(&mut self.room);
        room.seat(self.server.security.tls.is_some(), now, |waiter, first| self.admit(waiter, first));
        self.room = room;
    }

    /// Admits a waiting connection as a guest (or turns it away if the server is full), then
    /// hands it on at once if it has already spoken (a TLS client's hello usually has), else
    /// holds it.
    fn admit(&mut self, waiter: &Waiter, first: Option<u8>) -> Turn {
        let server = Arc::clone(&self.server);
        let (ip, stream) = (waiter.ip, Arc::clone(&waiter.stream));
        let tls_hello = server.security.tls.is_some() && first == Some(tls::TLS_HANDSHAKE);
        let stage = if tls_hello { Stage::Underway } else { Stage::Silent };
        let id = self.next_id + 1;
        let limits = server.limits;
        let arrival = (Arc::clone(&stream), waiter.arrived, first.is_some());
        let (admission, evicted) = server.registry.admit(id, ip, arrival, stage, limits.guests, limits.max_connections);
        for _ in 0..evicted {
            refusals::log_eviction(&server);
        }
        let peer = match admission {
            Admission::Admitted(peer) => peer,
            Admission::NoPlaceForAddress => return Turn::AddressFull,
            Admission::NoGuestPlace => return Turn::GuestsFull,
            Admission::AtCeiling => {
                refusals::turn_away(&server, &stream, ip);
                return Turn::Left;
            }
        };
        self.next_id = id;
        server.metrics.guest();
        server
            .guest_log
            .event(GuestEvent::Accepted, || info!("action: accept_connections | result: success | ip: {ip}"));
        let guest = Guest { id, stream, ip, peer, accepted: Instant::now(), probes: 0 };
        if tls_hello {
            self.hand_over(Handoff { guest, first_byte: tls::TLS_HANDSHAKE });
            return Turn::Left;
        }
        self.hold(guest, first.is_some());
        Turn::Left
    }

    /// Watches a guest that has said nothing yet, or only part of a line; `look` now if it has.
    fn hold(&mut self, guest: Guest, look: bool) {
        let Server { security, limits, registry, .. } = &*self.server;
        let (id, ip) = (guest.id, guest.ip);
        let deadline = guest.accepted + if security.trusts(ip) { limits.idle_timeout } else { limits.hello_timeout };
        // Edge-triggered: a line that has only partly arrived is looked at again when more does.
        let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ET;
        if let Err(e) = epoll::add(&self.epoll, &*guest.stream, epoll::EventData::new_u64(id), flags) {
            warn!("action: accept_connections | result: fail | ip: {ip} | error: {e}");
            registry.remove(id);
            return;
        }
        self.deadlines.insert((deadline, id));
        self.held.insert(id, HeldGuest { guest, deadline, sent_plain_text: false });
        if look {
            self.look(id);
        }
    }

    /// A held connection has something to say: probes (answered here), the request or TLS hello
    /// that its thread is to take, a hang-up, or an eviction (which shuts its reading half).
    fn look(&mut self, id: u64) {
        let Some(held) = self.held.get(&id) else { return };
        let guest = &held.guest;
        if guest.peer.ended() != Ended::No {
            if let Some(held) = self.release(id) {
                self.farewell(&held, ErrorCode::Busy, registry::EVICTED.to_owned());
            }
            return;
        }
        let Some(n) = peek_all_now(&guest.stream, &mut self.peeked) else { return };
        if n == 0 {
            // It hung up.
            self.close(id);
            return;
        }
        let data = &self.peeked[..n];
        if self.server.security.tls.is_some() && guest.probes == 0 && data[0] == tls::TLS_HANDSHAKE {
            // A TLS hello, however little of it has arrived: its thread takes it.
            self.hand_off(id, tls::TLS_HANDSHAKE, 0);
            return;
        }
        let ledger = &self.server.ledger;
        let answered = probes::answer(data, guest.probes, || ledger.status());
        let next = data.get(answered.consumed).copied();
        let taken = consume_now(&guest.stream, answered.consumed);
        let sent = answered.replies.is_empty() || send_now(&guest.stream, &answered.replies);
        let probes = guest.probes + answered.probes;
        self.server.metrics.probed(answered.probes);
        match (answered.then, next) {
            // It does not take its replies (or vanished): a guest is not waited for.
            _ if !taken || !sent => self.close(id),
            (Then::Close, _) => self.close(id),
            (Then::HandOff, Some(first)) => self.hand_off(id, first, probes),
            (Then::HandOff | Then::Wait, _) => self.probed(id, probes, answered.probes > 0),
        }
    }

    /// Passes a held connection to a thread of its own, `first_byte` being its next byte.
    fn hand_off(&mut self, id: u64, first_byte: u8, probes: u32) {
        if let Some(HeldGuest { mut guest, .. }) = self.release(id) {
            // A whole line (or a TLS hello begun): progress, and under way.
            guest.peer.set_stage(Stage::Underway);
            guest.probes = probes;
            self.hand_over(Handoff { guest, first_byte });
        }
    }

    /// Queues a guest for its thread, keeping its hello timeout (unless it is trusted).
    fn hand_over(&mut self, handoff: Handoff) {
        let guest = &handoff.guest;
        if !self.server.security.trusts(guest.ip) {
            self.handed_off_deadlines.insert((guest.accepted + self.server.limits.hello_timeout, guest.id));
        }
        self.handoffs.push_back(handoff);
    }

    /// A held connection has made `probes` probes so far, one or more of them now if `now`,
    /// and may have part of its next line sent: it has had its service, and has the time a guest
    /// has (or, trusted, the idle timeout for its next request, from its first byte on).
    fn probed(&mut self, id: u64, probes: u32, now: bool) {
        let Server { limits, security, .. } = &*self.server;
        let Some(held) = self.held.get_mut(&id) else { return };
        let began = now || !held.sent_plain_text;
        held.guest.probes = probes;
        held.sent_plain_text = true;
        if now {
            held.guest.peer.set_stage(Stage::Probed);
        }
        let deadline = match (security.trusts(held.guest.ip), began) {
            (true, true) => Instant::now() + limits.idle_timeout,
            (true, false) => held.deadline,
            (false, _) => held.guest.accepted + limits.hello_timeout,
        };
        if deadline != held.deadline {
            self.deadlines.remove(&(held.deadline, id));
            held.deadline = deadline;
            self.deadlines.insert((deadline, id));
        }
    }

    /// Closes a held connection, its last words (if any) already sent.
    fn close(&mut self, id: u64) {
        if let Some(held) = self.release(id) {
            let _ = held.guest.stream.shutdown(Shutdown::Both);
            self.server.registry.remove(id);
        }
    }

    /// Ends every guest whose time is up: those held here, and those on threads of their own
    /// (through the registry, which wakes the thread to say why).
    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, id)) = self.handed_off_deadlines.first()
            && deadline <= now
        {
            self.handed_off_deadlines.pop_first();
            if let Some(ip) = self.server.registry.time_out(id) {
                refusals::log_timeout(&self.server, ip);
            }
        }
        while let Some(&(deadline, id)) = self.deadlines.first()
            && deadline <= now
        {
            let Some(held) = self.release(id) else { continue };
            let ip = held.guest.ip;
            refusals::log_timeout(&self.server, ip);
            let waited = held.deadline.saturating_duration_since(held.guest.accepted).as_millis();
            let why = if !held.sent_plain_text {
                format!("nothing sent within {waited} ms")
            } else if self.server.security.trusts(ip) {
                format!("no complete request within {} ms", self.server.limits.idle_timeout.as_millis())
            } else {
                registry::hello_timed_out(self.server.limits.hello_timeout)
            };
            self.farewell(&held, ErrorCode::Timeout, why);
        }
    }

    /// Stops watching a held connection.
    fn release(&mut self, id: u64) -> Option<HeldGuest> {
        let held = self.held.remove(&id)?;
        self.deadlines.remove(&(held.deadline, id));
        let _ = epoll::delete(&self.epoll, &*held.guest.stream);
        Some(held)
    }

    /// Says why (if the client can read it) and closes.
    fn farewell(&self, held: &HeldGuest, code: ErrorCode, why: String) {
        self.server.metrics.refused(code);
        let error = ProtocolError::new(code, format!("{why}; closing"));
        // One that has spoken plain text reads a plain line; on a TLS server, one that has not
        // may be a TLS client.
        let quiet = self.server.security.tls.is_some() && !held.sent_plain_text;
        refusals::last_words(&held.guest.stream, error, quiet);
        self.server.registry.remove(held.guest.id);
    }
}

/// The guests that have said more than probes, in turn; the end once the server shuts down.
impl Iterator for Door<'_> {
    type Item = Handoff;

    fn next(&mut self) -> Option<Handoff> {
        loop {
            if self.shutdown.is_triggered() {
                return None;
            }
            if let Some(handoff) = self.handoffs.pop_front() {
                return Some(handoff);
            }
            self.wait();
        }
    }
}

impl Drop for Door<'_> {
    /// At shutdown: what was held or not yet handed on had said nothing worth an answer.
    fn drop(&mut self) {
        let ids: Vec<u64> = self.held.keys().copied().collect();
        for id in ids {
            self.close(id);
        }
        for waiter in self.room.drain() {
            let _ = waiter.stream.shutdown(Shutdown::Both);
        }
        for Handoff { guest, .. } in self.handoffs.drain(..) {
            let _ = guest.stream.shutdown(Shutdown::Both);
            self.server.registry.remove(guest.id);
        }
        let _ = self.listener.set_nonblocking(false);
    }
}

/// The shutdown handle's side of the door: an eventfd that a trigger makes readable.
pub fn wake_fd() -> io::Result<OwnedFd> {
    let flags = rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
    Ok(rustix::event::eventfd(0, flags)?)
}

/// Makes the door's `epoll_wait` return.
pub fn wake(fd: &impl AsFd) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}
