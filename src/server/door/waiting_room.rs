//! Where a newcomer waits for a guest place while every place is taken by a guest that is
//! progressing: places are given in the order of arrival, those from suspect addresses (see
//! [`crate::server::suspects`]) after the others, so that an agency is never turned away to
//! retry later while strangers who reconnect at once take every place that frees up. (The
//! kernel's listen queue would keep that order too, but it is short, and a connection that finds
//! it full waits for its SYN to be sent again.)

use std::collections::VecDeque;
use std::net::{IpAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::server::suspects;
use crate::wire::transport::{Arrived, peek_now};

/// Most connections waiting: each costs a file descriptor and a few bytes.
pub const CAPACITY: usize = 4096;

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

/// The waiters, in their order of arrival: those from addresses that are no suspects, then
/// the suspects'.
#[derive(Default)]
pub struct WaitingRoom {
    clear: VecDeque<Waiter>,
    suspects: VecDeque<Waiter>,
}

impl WaitingRoom {
    pub fn len(&self) -> usize {
        self.clear.len() + self.suspects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lets `waiter` in at the back of its queue. When the room is full, those who gave up
    /// waiting leave first (a full room is mostly strangers'), then a suspect makes room for one
    /// that is not. What could not stay is returned, to be turned away.
    pub fn enter(&mut self, waiter: Waiter, suspect: bool) -> Option<Waiter> {
        if self.len() >= CAPACITY {
            self.clear.retain(|w| peek_now(&w.stream) != Arrived::Closed);
            self.suspects.retain(|w| peek_now(&w.stream) != Arrived::Closed);
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
        for queue in [&mut self.clear, &mut self.suspects] {
            while queue.front().is_some_and(|w| now.duration_since(w.arrived) >= limit) {
                gone.extend(queue.pop_front());
            }
        }
        gone
    }

    /// Gives each waiter its turn, in order, as long as `turn` finds guest places: one whose
    /// address has no place left waits on without holding up the others. Those that hung up
    /// while waiting leave. `turn` gets the waiter and its first byte, if it has sent one.
    pub fn seat(&mut self, mut turn: impl FnMut(&Waiter, Option<u8>) -> Turn) {
        let mut crowded: Vec<IpAddr> = Vec::new();
        for queue in [&mut self.clear, &mut self.suspects] {
            let mut i = 0;
            while let Some(waiter) = queue.get(i) {
                let origin = suspects::origin(waiter.ip);
                if crowded.contains(&origin) {
                    i += 1;
                    continue;
                }
                let first = match peek_now(&waiter.stream) {
                    // Hung up while waiting: there is no one to serve.
                    Arrived::Closed => {
                        queue.remove(i);
                        continue;
                    }
                    Arrived::Byte(b) => Some(b),
                    Arrived::Nothing => None,
                };
                match turn(waiter, first) {
                    Turn::Left => {
                        queue.remove(i);
                    }
                    Turn::AddressFull => {
                        crowded.push(origin);
                        i += 1;
                    }
                    Turn::GuestsFull => return,
                }
            }
        }
    }

    /// Everyone, emptying the room.
    pub fn drain(&mut self) -> impl Iterator<Item = Waiter> + '_ {
        self.clear.drain(..).chain(self.suspects.drain(..))
    }
}
