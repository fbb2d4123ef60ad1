//! What the server counts for the operator: connections, refusals, TLS handshakes, batches, and
//! each agency's state (not connected, connected, done, told its winners). Every figure is an
//! atomic the connection threads add to without a lock; the one lock here (which connection
//! speaks for which agency) is taken by connection threads at `HELLO` and at their end, never by
//! the operator's listener. The listener ([`crate::server::operator`]) only loads.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::sync::lock_unpoisoned;
use crate::wire::protocol::ErrorCode;

/// An agency's state, as the page colours it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum AgencyState {
    NotConnected = 0,
    Connected = 1,
    Done = 2,
    /// Its `WINNERS` reply was sent.
    Told = 3,
}

impl AgencyState {
    pub(crate) const ALL: [AgencyState; 4] =
        [AgencyState::NotConnected, AgencyState::Connected, AgencyState::Done, AgencyState::Told];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AgencyState::NotConnected => "not_connected",
            AgencyState::Connected => "connected",
            AgencyState::Done => "done",
            AgencyState::Told => "told",
        }
    }
}

/// The server's counters.
#[derive(Debug)]
pub(crate) struct Metrics {
    /// Live authenticated connections of each agency (index 0 is agency 1).
    sessions: Vec<AtomicU32>,
    done: Vec<AtomicBool>,
    told: Vec<AtomicBool>,
    /// Which agency each authenticated connection speaks for.
    speaks_for: Mutex<HashMap<u64, u32>>,
    /// Connections admitted by the door (every one begins as a guest).
    pub guests: AtomicU64,
    /// Connections that authenticated as an agency.
    pub agency_sessions: AtomicU64,
    /// Probes (`PING`, `STATUS`, `QUIT`) the door answered.
    pub probes: AtomicU64,
    refusals: [AtomicU64; ErrorCode::ALL.len()],
    pub tls_ok: AtomicU64,
    pub tls_failed: AtomicU64,
    /// Batches and bets acknowledged `OK`.
    pub batches: AtomicU64,
    pub bets: AtomicU64,
}

impl Metrics {
    /// Counters for a round of `agencies`.
    pub(crate) fn new(agencies: u32) -> Metrics {
        let n = agencies as usize;
        Metrics {
            sessions: (0..n).map(|_| AtomicU32::new(0)).collect(),
            done: (0..n).map(|_| AtomicBool::new(false)).collect(),
            told: (0..n).map(|_| AtomicBool::new(false)).collect(),
            speaks_for: Mutex::default(),
            guests: AtomicU64::new(0),
            agency_sessions: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            refusals: std::array::from_fn(|_| AtomicU64::new(0)),
            tls_ok: AtomicU64::new(0),
            tls_failed: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            bets: AtomicU64::new(0),
        }
    }

    pub(crate) fn agencies(&self) -> u32 {
        self.sessions.len() as u32
    }

    fn flag(flags: &[AtomicBool], agency: u32) -> Option<&AtomicBool> {
        flags.get((agency as usize).wrapping_sub(1))
    }

    /// The door admitted a connection.
    pub(crate) fn guest(&self) {
        self.guests.fetch_add(1, Ordering::Relaxed);
    }

    /// The door answered `n` probes.
    pub(crate) fn probed(&self, n: u32) {
        self.probes.fetch_add(u64::from(n), Ordering::Relaxed);
    }

    /// Connection `id` now speaks for `agency` (a successful `HELLO`).
    pub(crate) fn hello(&self, id: u64, agency: u32) {
        self.agency_sessions.fetch_add(1, Ordering::Relaxed);
        let before = lock_unpoisoned(&self.speaks_for).insert(id, agency);
        if let Some(before) = before {
            self.leave(before);
        }
        if let Some(n) = self.sessions.get((agency as usize).wrapping_sub(1)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Connection `id` has ended.
    pub(crate) fn closed(&self, id: u64) {
        let agency = lock_unpoisoned(&self.speaks_for).remove(&id);
        if let Some(agency) = agency {
            self.leave(agency);
        }
    }

    fn leave(&self, agency: u32) {
        if let Some(n) = self.sessions.get((agency as usize).wrapping_sub(1)) {
            let _ = n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        }
    }

    /// `agency` said `DONE` (and it was recorded).
    pub(crate) fn done(&self, agency: u32) {
        if let Some(flag) = Metrics::flag(&self.done, agency) {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// `agency` was sent its `WINNERS` reply.
    pub(crate) fn told(&self, agency: u32) {
        if let Some(flag) = Metrics::flag(&self.told, agency) {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// An `ERR <code>` reply was sent (or a connection was closed for that reason).
    pub(crate) fn refused(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|&c| c == code) {
            self.refusals[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn tls_handshake(&self, ok: bool) {
        let counter = if ok { &self.tls_ok } else { &self.tls_failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A batch of `bets` was acknowledged `OK` (a `BET` is a batch of one).
    pub(crate) fn stored(&self, bets: u32) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.bets.fetch_add(u64::from(bets), Ordering::Relaxed);
    }

    /// Refusals so far, by code, in the order of [`ErrorCode::ALL`].
    pub(crate) fn refusals(&self) -> [(ErrorCode, u64); ErrorCode::ALL.len()] {
        std::array::from_fn(|i| (ErrorCode::ALL[i], self.refusals[i].load(Ordering::Relaxed)))
    }

    pub(crate) fn refusals_total(&self) -> u64 {
        self.refusals.iter().map(|r| r.load(Ordering::Relaxed)).sum()
    }

    /// Each agency's state (index 0 is agency 1); once the draw is made, every agency is at
    /// least done (the draw needs them all, even those done before this server started).
    pub(crate) fn states(&self, drawn: bool) -> Vec<AgencyState> {
        (0..self.sessions.len())
            .map(|i| {
                if self.told[i].load(Ordering::Relaxed) {
                    AgencyState::Told
                } else if drawn || self.done[i].load(Ordering::Relaxed) {
                    AgencyState::Done
                } else if self.sessions[i].load(Ordering::Relaxed) > 0 {
                    AgencyState::Connected
                } else {
                    AgencyState::NotConnected
                }
            })
            .collect()
    }
}

/// Numbers as ranges: `[3, 4, 5, 9]` → `3-5, 9`.
pub(crate) fn ranges(numbers: impl IntoIterator<Item = u32>) -> String {
    let mut spans: Vec<(u32, u32)> = Vec::new();
    for n in numbers {
        match spans.last_mut() {
            Some((_, end)) if n == *end + 1 => *end = n,
            _ => spans.push((n, n)),
        }
    }
    let text: Vec<String> =
        spans.iter().map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
    text.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agency_is_connected_while_a_session_of_it_lives() {
        let m = Metrics::new(3);
        m.hello(10, 2);
        m.hello(11, 2);
        assert_eq!(m.states(false)[1], AgencyState::Connected);
        m.closed(10);
        assert_eq!(m.states(false)[1], AgencyState::Connected);
        m.closed(11);
        m.closed(99);
        assert_eq!(m.states(false), vec![AgencyState::NotConnected; 3]);
        m.done(1);
        m.told(3);
        m.hello(12, 9);
        assert_eq!(m.states(false), vec![AgencyState::Done, AgencyState::NotConnected, AgencyState::Told]);
        assert_eq!(m.states(true)[1], AgencyState::Done);
    }

    #[test]
    fn missing_agencies_read_as_ranges() {
        assert_eq!(ranges([3, 4, 5, 6, 17, 40, 41]), "3-6, 17, 40-41");
        assert_eq!(ranges([]), "");
    }
}
