//! The door: the one thread that accepts connections. It takes each connection as soon as it
//! arrives, so that an agency waits as little as it can behind strangers in the kernel's listen
//! queue, and holds it, with no thread of its own, until the client says something that is no
//! probe (a TLS hello, a `HELLO`); it answers the probes itself ([`crate::server::probes`]).
//! Only then does the connection get its thread. A stranger that connects and says nothing,
//! connects and hangs up thousands of times a second, or probes without end, costs the server a
//! socket, an entry in `epoll` and a few system calls, never a thread.
//!
//! When every guest place is taken by a guest that is young and under way (a crowd of TLS
//! handshakes), a newcomer waits in the door's *waiting room*, and places are given in the order
//! of arrival, those from suspect addresses (see [`crate::server::suspects`]) last: an agency is
//! never turned away to retry later while strangers who reconnect at once take every place that
//! frees up. (The kernel's listen queue would keep that order too, but it is short, and a
//! connection that finds it full waits for its SYN to be sent again.)
//!
//! The door also ends what it holds, without waiting on anyone: a guest that has not said
//! `HELLO` (or ended its probes) within the hello timeout (`ERR TIMEOUT`), one evicted to make room for a newer guest (`ERR BUSY`),
//! one that hung up, one that waited for a place for the whole hello timeout. It waits in
//! `epoll` on the listener, the held connections and the shutdown handle's eventfd, so that a
//! shutdown wakes it whatever the network is doing.

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

use crate::ledger::Ledger;
use crate::server::guest_log::{GuestEvent, GuestLog};
use crate::server::probes::{self, Then};
use crate::server::registry::{self, Admission, Crowd, Ended, Peer, Registry, Stage};
use crate::server::{Limits, Security, ShutdownHandle, tls};
use crate::wire::protocol::{ErrorCode, ProtocolError, Reply};
use crate::wire::transport::{Arrived, consume_now, peek_all_now, peek_now, send_now};

/// How long the door pauses after a failed `accept` or `epoll_wait`: a lasting failure (no file
/// descriptor frees up) must not spin it.
const ERROR_PAUSE: Duration = Duration::from_millis(20);

/// Most connections accepted in one go, before the door looks at what it holds again.
const ACCEPT_BURST: usize = 256;

/// Most connections in the waiting room: each costs a file descriptor and a few bytes.
const WAITING_ROOM: usize = 4096;

/// How often the door looks whether a place has freed up while someone waits for one.
const ROOM_TICK: Duration = Duration::from_millis(2);

/// The waiting rooms: of connections from addresses with no recent failure, and the others'.
const CLEAR: usize = 0;
const SUSPECT: usize = 1;

/// Most bytes of a held connection looked at: more probes than a guest may make.
const PEEK: usize = 2048;

/// Most events taken from `epoll` in one wait.
const EVENTS: usize = 512;

/// The `epoll` keys of the listener and of the shutdown's eventfd; a held connection's key is
/// its id, which never reaches these.
const LISTENER: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;

/// A connection that has said more than probes: its thread is to start.
pub struct Spoke {
    pub id: u64,
    pub stream: Arc<TcpStream>,
    pub ip: IpAddr,
    pub peer: Arc<Peer>,
    pub accepted: Instant,
    /// Its first byte, still unread.
    pub first: u8,
    /// The probes the door answered for it.
    pub requests: u32,
}

/// What came of a waiting connection's turn.
enum Seated {
    /// It has left the waiting room: admitted, or turned away.
    Yes,
    /// Its address has no guest place free: it waits on, and so does the rest of that address.
    NotThisAddress,
    /// No guest place is free: everyone waits on.
    NoPlace,
}

/// A connection that has said nothing yet but probes, answered by the door.
struct Held {
    stream: Arc<TcpStream>,
    ip: IpAddr,
    peer: Arc<Peer>,
    accepted: Instant,
    deadline: Instant,
    /// The probes answered.
    requests: u32,
    /// Whether it has sent plain text (probes, or part of a line): it can read a plain `ERR`.
    spoke: bool,
}

/// A connection waiting for a guest place.
struct Waiting {
    stream: Arc<TcpStream>,
    ip: IpAddr,
    arrived: Instant,
}

/// What a connection's admission needs to know of the server.
pub struct Rules<'a> {
    pub round: &'a dyn Ledger,
    pub registry: &'a Registry,
    pub guest_log: &'a GuestLog,
    pub security: &'a Security,
    pub limits: Limits,
    pub metrics: &'a crate::server::metrics::Metrics,
}

pub struct Door<'a> {
    listener: &'a TcpListener,
    shutdown: &'a ShutdownHandle,
    rules: Rules<'a>,
    epoll: OwnedFd,
    held: HashMap<u64, Held>,
    /// Connections waiting for a place, in their order of arrival: in [`CLEAR`] those from
    /// addresses with no recent failure, seated first; in [`SUSPECT`] the others.
    rooms: [VecDeque<Waiting>; 2],
    /// When each held connection's time is up, soonest first.
    deadlines: BTreeSet<(Instant, u64)>,
    events: Vec<epoll::Event>,
    spoke: VecDeque<Spoke>,
    next_id: u64,
    /// What a held connection has sent, peeked at.
    peeked: Vec<u8>,
}

impl<'a> Door<'a> {
    /// A door on `listener`, which it switches to non-blocking, woken by `shutdown`.
    ///
    /// # Errors
    /// `epoll` cannot be set up.
    pub fn new(listener: &'a TcpListener, shutdown: &'a ShutdownHandle, rules: Rules<'a>) -> io::Result<Door<'a>> {
        listener.set_nonblocking(true)?;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        epoll::add(&epoll, listener, epoll::EventData::new_u64(LISTENER), epoll::EventFlags::IN)?;
        epoll::add(&epoll, shutdown.wake_fd(), epoll::EventData::new_u64(WAKE), epoll::EventFlags::IN)?;
        Ok(Door {
            listener,
            shutdown,
            rules,
            epoll,
            held: HashMap::new(),
            rooms: [VecDeque::new(), VecDeque::new()],
            deadlines: BTreeSet::new(),
            events: Vec::with_capacity(EVENTS),
            spoke: VecDeque::new(),
            next_id: 0,
            peeked: vec![0; PEEK],
        })
    }

    /// Waits for something to happen (or the next deadline), and deals with it.
    fn wait(&mut self) {
        let now = Instant::now();
        // Nothing due: wait for an event (a shutdown is one).
        let mut timeout = self.deadlines.first().map(|(d, _)| d.saturating_duration_since(now));
        if self.waiting() > 0 {
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
    }

    fn accept_burst(&mut self) {
        for _ in 0..ACCEPT_BURST {
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
        let suspect = self.rules.registry.suspects().is_suspect(ip);
        if self.waiting() >= WAITING_ROOM {
            // Strangers that gave up waiting are only found when their turn comes: a full room
            // is mostly theirs, and an agency must not be turned away for them.
            for room in &mut self.rooms {
                room.retain(|w| peek_now(&w.stream) != Arrived::Closed);
            }
        }
        if self.waiting() >= WAITING_ROOM
            && !suspect
            && let Some(Waiting { stream, ip, .. }) = self.rooms[SUSPECT].pop_back()
        {
            // A suspect's place goes to a newcomer that is not one.
            self.turn_away(&stream, ip);
        }
        if self.waiting() >= WAITING_ROOM {
            self.turn_away(&stream, ip);
            return;
        }
        let room = if suspect { SUSPECT } else { CLEAR };
        self.rooms[room].push_back(Waiting { stream: Arc::new(stream), ip, arrived: Instant::now() });
    }

    fn waiting(&self) -> usize {
        self.rooms.iter().map(VecDeque::len).sum()
    }

    /// Gives guest places to those waiting, in their order of arrival (those from addresses
    /// with no recent failure first), as far as there are places; one whose own address has no
    /// place left waits on without holding up the others. Those that hung up while waiting
    /// leave, and those that waited the whole hello timeout are turned away.
    fn seat(&mut self, now: Instant) {
        let hello_timeout = self.rules.limits.hello_timeout;
        for room in [CLEAR, SUSPECT] {
            while let Some(first) = self.rooms[room].front()
                && now.duration_since(first.arrived) >= hello_timeout
            {
                if let Some(Waiting { stream, ip, .. }) = self.rooms[room].pop_front() {
                    self.turn_away(&stream, ip);
                }
            }
        }
        let mut crowded: Vec<IpAddr> = Vec::new();
        for room in [CLEAR, SUSPECT] {
            let mut i = 0;
            while let Some(waiting) = self.rooms[room].get(i) {
                let ip = waiting.ip;
                if crowded.contains(&ip) {
                    i += 1;
                    continue;
                }
                let first = match peek_now(&waiting.stream) {
                    // Hung up while waiting: there is no one to serve.
                    Arrived::Closed => {
                        self.rooms[room].remove(i);
                        continue;
                    }
                    Arrived::Byte(b) => Some(b),
                    Arrived::Nothing => None,
                };
                match self.admit(room, i, first) {
                    Seated::Yes => {}
                    Seated::NotThisAddress => {
                        crowded.push(ip);
                        i += 1;
                    }
                    Seated::NoPlace => return,
                }
            }
        }
    }

    /// Admits the `i`th waiting connection as a guest (or turns it away if the server is
    /// full), then hands it on at once if it has already spoken (a TLS client's hello usually
    /// has), else holds it.
    fn admit(&mut self, room: usize, i: usize, first: Option<u8>) -> Seated {
        let Rules { registry, guest_log, limits, security, .. } = self.rules;
        let Some(waiting) = self.rooms[room].get(i) else { return Seated::NoPlace };
        let (ip, stream) = (waiting.ip, Arc::clone(&waiting.stream));
        let tls = security.tls.is_some();
        let stage = if tls && first == Some(tls::TLS_HANDSHAKE) { Stage::Underway } else { Stage::Silent };
        let id = self.next_id + 1;
        let (admission, evicted) =
            registry.admit(id, ip, Arc::clone(&stream), stage, limits.guests, limits.max_connections);
        for _ in 0..evicted {
            guest_log.event(GuestEvent::Evicted, || {
                info!("action: evict_guest | result: success | detail: the oldest guest made room for a newer one");
            });
        }
        let peer = match admission {
            Admission::Admitted(peer) => peer,
            Admission::Crowded(Crowd::Address) => return Seated::NotThisAddress,
            Admission::Crowded(Crowd::All) => return Seated::NoPlace,
            Admission::Full => {
                self.rooms[room].remove(i);
                self.turn_away(&stream, ip);
                return Seated::Yes;
            }
        };
        self.rooms[room].remove(i);
        self.next_id = id;
        self.rules.metrics.guest();
        guest_log.event(GuestEvent::Accepted, || info!("action: accept_connections | result: success | ip: {ip}"));
        let accepted = Instant::now();
        if tls && first == Some(tls::TLS_HANDSHAKE) {
            self.spoke.push_back(Spoke { id, stream, ip, peer, accepted, first: tls::TLS_HANDSHAKE, requests: 0 });
            return Seated::Yes;
        }
        let deadline =
            if security.trusts(ip) { accepted + limits.idle_timeout } else { accepted + limits.hello_timeout };
        // Edge-triggered: a line that has only partly arrived is looked at again when more does.
        let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ET;
        if let Err(e) = epoll::add(&self.epoll, &*stream, epoll::EventData::new_u64(id), flags) {
            warn!("action: accept_connections | result: fail | ip: {ip} | error: {e}");
            registry.remove(id);
            return Seated::Yes;
        }
        self.deadlines.insert((deadline, id));
        self.held.insert(id, Held { stream, ip, peer, accepted, deadline, requests: 0, spoke: false });
        if first.is_some() {
            self.look(id);
        }
        Seated::Yes
    }

    /// A held connection has something to say: probes (answered here), the request or TLS hello
    /// that its thread is to take, a hang-up, or an eviction (which shuts its reading half).
    fn look(&mut self, id: u64) {
        let Some(held) = self.held.get(&id) else { return };
        if held.peer.ended() != Ended::No {
            if let Some(held) = self.release(id) {
                self.farewell(id, &held, ErrorCode::Busy, registry::EVICTED.to_owned());
            }
            return;
        }
        let Some(n) = peek_all_now(&held.stream, &mut self.peeked) else { return };
        if n == 0 {
            // It hung up.
            self.close(id);
            return;
        }
        let data = &self.peeked[..n];
        if self.rules.security.tls.is_some() && held.requests == 0 && data[0] == tls::TLS_HANDSHAKE {
            // A TLS hello, however little of it has arrived: its thread takes it.
            self.hand_off(id, tls::TLS_HANDSHAKE, 0);
            return;
        }
        let round = self.rules.round;
        let answered = probes::answer(data, held.requests, || round.status());
        let next = data.get(answered.consumed).copied();
        let taken = consume_now(&held.stream, answered.consumed);
        let sent = answered.replies.is_empty() || send_now(&held.stream, &answered.replies);
        let requests = held.requests + answered.probes;
        self.rules.metrics.probed(answered.probes);
        match (answered.then, next) {
            // It does not take its replies (or vanished): a guest is not waited for.
            _ if !taken || !sent => self.close(id),
            (Then::Close, _) => self.close(id),
            (Then::HandOff, Some(first)) => self.hand_off(id, first, requests),
            (Then::HandOff | Then::Wait, _) => self.probed(id, requests, answered.probes > 0),
        }
    }

    /// Passes a held connection to a thread of its own, `first` being its next byte.
    fn hand_off(&mut self, id: u64, first: u8, requests: u32) {
        if let Some(Held { stream, ip, peer, accepted, .. }) = self.release(id) {
            self.spoke.push_back(Spoke { id, stream, ip, peer, accepted, first, requests });
        }
    }

    /// A held connection has made `requests` probes so far, one or more of them now if `now`,
    /// and may have part of its next line sent: it has had its service, and has the time a guest
    /// has (or, trusted, the idle timeout for its next request, from its first byte on).
    fn probed(&mut self, id: u64, requests: u32, now: bool) {
        let Rules { limits, security, .. } = self.rules;
        let Some(held) = self.held.get_mut(&id) else { return };
        let began = now || !held.spoke;
        held.requests = requests;
        held.spoke = true;
        if now {
            held.peer.set_stage(Stage::Probed);
        }
        let deadline = match (security.trusts(held.ip), began) {
            (true, true) => Instant::now() + limits.idle_timeout,
            (true, false) => held.deadline,
            (false, _) => held.accepted + limits.hello_timeout,
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
            let _ = held.stream.shutdown(Shutdown::Both);
            self.rules.registry.remove(id);
        }
    }

    /// Ends every held connection whose time is up.
    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, id)) = self.deadlines.first()
            && deadline <= now
        {
            let Some(held) = self.release(id) else { continue };
            let ip = held.ip;
            self.rules.registry.suspects().failed(ip);
            self.rules.guest_log.event(GuestEvent::TimedOut, || {
                info!("action: hello | result: fail | ip: {ip} | error: TIMEOUT");
            });
            let waited = held.deadline.saturating_duration_since(held.accepted).as_millis();
            let why = if !held.spoke {
                format!("nothing sent within {waited} ms")
            } else if self.rules.security.trusts(ip) {
                format!("no complete request within {} ms", self.rules.limits.idle_timeout.as_millis())
            } else {
                format!("no HELLO (or end to a probe) within {waited} ms")
            };
            self.farewell(id, &held, ErrorCode::Timeout, why);
        }
    }

    /// Logs a refusal (counted past the guest log's rate) and answers `ERR BUSY`.
    fn turn_away(&self, stream: &TcpStream, ip: IpAddr) {
        let Rules { guest_log, limits, security, .. } = self.rules;
        self.rules.metrics.refused(ErrorCode::Busy);
        guest_log.event(GuestEvent::Refused, || {
            warn!("action: accept_connections | result: fail | ip: {ip} | error: BUSY");
        });
        refuse_busy(stream, limits.max_connections, security.tls.is_some());
    }

    /// Stops watching a held connection.
    fn release(&mut self, id: u64) -> Option<Held> {
        let held = self.held.remove(&id)?;
        self.deadlines.remove(&(held.deadline, id));
        let _ = epoll::delete(&self.epoll, &*held.stream);
        Some(held)
    }

    /// Says why (if the client can read it) and closes.
    fn farewell(&self, id: u64, held: &Held, code: ErrorCode, why: String) {
        self.rules.metrics.refused(code);
        let error = ProtocolError::new(code, format!("{why}; closing"));
        // One that has spoken plain text reads a plain line; on a TLS server, one that has not
        // may be a TLS client.
        let quiet = self.rules.security.tls.is_some() && !held.spoke;
        last_words(&held.stream, error, quiet);
        self.rules.registry.remove(id);
    }
}

/// The connections that have said more than probes, in turn; the end once the server shuts down.
impl Iterator for Door<'_> {
    type Item = Spoke;

    fn next(&mut self) -> Option<Spoke> {
        loop {
            if self.shutdown.is_triggered() {
                return None;
            }
            if let Some(spoke) = self.spoke.pop_front() {
                return Some(spoke);
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
            if let Some(held) = self.release(id) {
                let _ = held.stream.shutdown(Shutdown::Both);
                self.rules.registry.remove(id);
            }
        }
        for waiting in self.rooms.iter_mut().flat_map(|room| room.drain(..)) {
            let _ = waiting.stream.shutdown(Shutdown::Both);
        }
        for spoke in self.spoke.drain(..) {
            let _ = spoke.stream.shutdown(Shutdown::Both);
            self.rules.registry.remove(spoke.id);
        }
        let _ = self.listener.set_nonblocking(false);
    }
}

/// Answers `ERR BUSY` and closes: the client is told at once, never queued. On a TLS server a
/// client that has begun (or may yet begin) a handshake is closed without a word (see
/// [`last_words`]).
fn refuse_busy(stream: &TcpStream, max: usize, tls: bool) {
    let plain = matches!(peek_now(stream), Arrived::Byte(b) if b != tls::TLS_HANDSHAKE);
    let why = format!("the server serves {max} connections at once; try again later");
    last_words(stream, ProtocolError::new(ErrorCode::Busy, why), tls && !plain);
}

/// Says `error` as far as the socket takes it without waiting, unless `quiet`, and closes. A
/// client that may speak TLS is closed quietly: a plain-text line would reach its TLS layer as a
/// broken record, which the agency must treat as final (it may be an attacker's on the way); a
/// bare close it retries.
fn last_words(stream: &TcpStream, error: ProtocolError, quiet: bool) {
    if !quiet {
        let mut out = Vec::new();
        Reply::Err(error).encode(&mut out);
        send_now(stream, &out);
    }
    let _ = stream.shutdown(Shutdown::Both);
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
