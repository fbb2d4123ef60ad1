//! Log lines about guests (connections not yet authenticated), kept small under attack: up to
//! [`LINES_PER_SECOND`] of them are logged each second as they are; past that they are only
//! counted, and the counts are logged as one `action: guests` line when the next second's first
//! guest event comes (or at shutdown). Connection churn then costs a few kilobytes of log a
//! second, not megabytes, and a normal round's lines are unchanged.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::info;

/// Guest lines logged as they are, each second.
pub const LINES_PER_SECOND: u32 = 50;

/// What happened to a guest.
#[derive(Debug, Clone, Copy)]
pub enum GuestEvent {
    Accepted,
    /// Turned away at the door: the server runs `SERVER_MAX_CONNECTIONS` threads.
    Refused,
    /// Closed to make room for a newer guest.
    Evicted,
    /// No `HELLO` (or no end to its probe) within `SERVER_HELLO_TIMEOUT_MS`.
    TimedOut,
    /// A `HELLO` refused with `ERR AUTH`.
    AuthFailed,
}

#[derive(Default)]
struct Counts {
    accepted: u64,
    refused: u64,
    evicted: u64,
    timed_out: u64,
    auth_failed: u64,
}

impl Counts {
    fn add(&mut self, event: GuestEvent) {
        *match event {
            GuestEvent::Accepted => &mut self.accepted,
            GuestEvent::Refused => &mut self.refused,
            GuestEvent::Evicted => &mut self.evicted,
            GuestEvent::TimedOut => &mut self.timed_out,
            GuestEvent::AuthFailed => &mut self.auth_failed,
        } += 1;
    }

    fn total(&self) -> u64 {
        self.accepted + self.refused + self.evicted + self.timed_out + self.auth_failed
    }
}

struct State {
    window: Instant,
    logged: u32,
    unlogged: Counts,
}

/// The rate limit on guest lines, shared by the accept loop and every connection.
pub struct GuestLog {
    state: Mutex<State>,
}

impl Default for GuestLog {
    fn default() -> Self {
        GuestLog { state: Mutex::new(State { window: Instant::now(), logged: 0, unlogged: Counts::default() }) }
    }
}

impl GuestLog {
    /// Logs `event` by calling `line` if this second's budget allows, else counts it.
    pub fn event(&self, event: GuestEvent, line: impl FnOnce()) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.window.elapsed() >= Duration::from_secs(1) {
            summarise(&mut st);
            st.window = Instant::now();
            st.logged = 0;
        }
        if st.logged < LINES_PER_SECOND {
            st.logged += 1;
            drop(st);
            line();
        } else {
            st.unlogged.add(event);
        }
    }

    /// Logs what is counted and not yet said (at shutdown).
    pub fn flush(&self) {
        summarise(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

fn summarise(st: &mut State) {
    let c = std::mem::take(&mut st.unlogged);
    if c.total() > 0 {
        info!(
            "action: guests | result: fail | accepted: {} | refused: {} | evicted: {} | timed_out: {} | auth_failed: {} | detail: more than {LINES_PER_SECOND} guest lines in a second; these were counted, not logged",
            c.accepted, c.refused, c.evicted, c.timed_out, c.auth_failed
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_budget_events_are_counted_not_logged() {
        let log = GuestLog::default();
        let mut lines = 0;
        for _ in 0..LINES_PER_SECOND + 30 {
            log.event(GuestEvent::Accepted, || lines += 1);
        }
        assert_eq!(lines, LINES_PER_SECOND);
        let st = log.state.lock().unwrap();
        assert_eq!(st.unlogged.accepted, 30);
    }
}
