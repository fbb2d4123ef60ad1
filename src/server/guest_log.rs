//! The lines a peer can make the server log, kept to a bounded rate whatever the peer does.
//!
//! Guests (connections not yet authenticated), all together: up to [`LINES_PER_SECOND`] of their
//! lines are logged each second as they are; past that they are only counted, and the counts
//! are logged as one `action: guests` line when the next second's first guest event comes (or
//! at shutdown). Each agency, on its own: up to [`REFUSALS_PER_SECOND`] of its refusals (a batch
//! refused or cut short, a sync that failed, a session replaced) are logged each second as they
//! are, the rest counted into one `action: refusals | result: fail | agency: <k> | count: <n> |
//! error: <codes>` line, in the same way. Connection churn or a stream of bad batches then
//! costs a few kilobytes of log a second, not megabytes, and a normal round's lines (which hold
//! no refusal) are unchanged. An agency's stored batches are not limited: each stores at least
//! one bet, so the agency's quota bounds them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock_unpoisoned;
use log::info;

/// Guest lines logged as they are, each second.
pub(crate) const LINES_PER_SECOND: u32 = 50;

/// An agency's refusal lines logged as they are, each second.
pub(crate) const REFUSALS_PER_SECOND: u32 = 5;

/// What happened to a guest.
#[derive(Debug, Clone, Copy)]
pub(crate) enum GuestEvent {
    Accepted,
    /// Turned away at the door: the server runs `SERVER_MAX_CONNECTIONS` threads.
    Refused,
    /// Closed to make room for a newer guest.
    Evicted,
    /// No `HELLO` (or no end to its probe) within `SERVER_HELLO_TIMEOUT_MS`.
    TimedOut,
    /// A `HELLO` refused with `ERR AUTH`.
    AuthFailed,
    /// A `BATCH` before `HELLO`: refused (`NO_AGENCY`), or cut short.
    Batch,
}

#[derive(Default)]
struct Counts {
    accepted: u64,
    refused: u64,
    evicted: u64,
    timed_out: u64,
    auth_failed: u64,
    batches: u64,
}

impl Counts {
    fn add(&mut self, event: GuestEvent) {
        *match event {
            GuestEvent::Accepted => &mut self.accepted,
            GuestEvent::Refused => &mut self.refused,
            GuestEvent::Evicted => &mut self.evicted,
            GuestEvent::TimedOut => &mut self.timed_out,
            GuestEvent::AuthFailed => &mut self.auth_failed,
            GuestEvent::Batch => &mut self.batches,
        } += 1;
    }

    fn total(&self) -> u64 {
        self.accepted + self.refused + self.evicted + self.timed_out + self.auth_failed + self.batches
    }

    /// Nothing but connections taken in: a crowd, no failure.
    fn only_accepted(&self) -> bool {
        self.total() == self.accepted
    }
}

/// One second's budget of lines logged as they are.
struct LineBudget {
    second: Instant,
    logged: u32,
}

impl LineBudget {
    fn new() -> LineBudget {
        LineBudget { second: Instant::now(), logged: 0 }
    }

    /// Whether a new second has begun, starting it: what the last one counted is then to be said.
    fn roll(&mut self) -> bool {
        let rolled = self.second.elapsed() >= Duration::from_secs(1);
        if rolled {
            *self = LineBudget::new();
        }
        rolled
    }

    /// Takes a line from this second's `per_second`, if any is left.
    fn take(&mut self, per_second: u32) -> bool {
        let left = self.logged < per_second;
        self.logged += u32::from(left);
        left
    }
}

struct GuestWindow {
    budget: LineBudget,
    unlogged: Counts,
}

/// One agency's refusals in the current second.
struct Refusals {
    budget: LineBudget,
    unlogged: u64,
    /// The error of each refusal counted, not logged; each once, in the order first seen.
    errors: Vec<&'static str>,
}

/// The rate limits on the lines peers cause: guests', shared by the accept loop and every
/// connection, and each agency's refusals.
pub(crate) struct GuestLog {
    state: Mutex<GuestWindow>,
    agencies: Mutex<HashMap<u32, Refusals>>,
}

impl Default for GuestLog {
    fn default() -> Self {
        GuestLog {
            state: Mutex::new(GuestWindow { budget: LineBudget::new(), unlogged: Counts::default() }),
            agencies: Mutex::new(HashMap::new()),
        }
    }
}

impl GuestLog {
    /// Logs `event` by calling `line` if this second's budget allows, else counts it.
    pub(crate) fn event(&self, event: GuestEvent, line: impl FnOnce()) {
        let mut st = lock_unpoisoned(&self.state);
        if st.budget.roll() {
            summarise(&mut st.unlogged);
        }
        if st.budget.take(LINES_PER_SECOND) {
            drop(st);
            line();
        } else {
            st.unlogged.add(event);
        }
    }

    /// Logs one of `agency`'s refusals, whose error is `error`, by calling `line` if this
    /// second's budget for the agency allows, else counts it.
    pub(crate) fn refusal(&self, agency: u32, error: &'static str, line: impl FnOnce()) {
        let mut agencies = lock_unpoisoned(&self.agencies);
        let refusals = agencies.entry(agency).or_insert_with(|| Refusals {
            budget: LineBudget::new(),
            unlogged: 0,
            errors: Vec::new(),
        });
        if refusals.budget.roll() {
            summarise_refusals(agency, refusals);
        }
        if refusals.budget.take(REFUSALS_PER_SECOND) {
            drop(agencies);
            line();
        } else {
            refusals.unlogged += 1;
            if !refusals.errors.contains(&error) {
                refusals.errors.push(error);
            }
        }
    }

    /// Logs what is counted and not yet said (at shutdown).
    pub(crate) fn flush(&self) {
        summarise(&mut lock_unpoisoned(&self.state).unlogged);
        let mut agencies = lock_unpoisoned(&self.agencies);
        let mut agencies: Vec<_> = agencies.iter_mut().collect();
        agencies.sort_by_key(|(agency, _)| **agency);
        for (agency, refusals) in agencies {
            summarise_refusals(*agency, refusals);
        }
    }
}

fn summarise_refusals(agency: u32, refusals: &mut Refusals) {
    if refusals.unlogged > 0 {
        let count = std::mem::take(&mut refusals.unlogged);
        let errors = std::mem::take(&mut refusals.errors).join(",");
        info!(
            "action: refusals | result: fail | agency: {agency} | count: {count} | error: {errors} | detail: more than {REFUSALS_PER_SECOND} refusals in a second; these were counted, not logged"
        );
    }
}

fn summarise(unlogged: &mut Counts) {
    let c = std::mem::take(unlogged);
    if c.total() > 0 {
        // A crowd of agencies connecting at once is counted too, and fails nothing: a normal
        // round logs no `fail`, however many agencies it has.
        let result = if c.only_accepted() { "success" } else { "fail" };
        info!(
            "action: guests | result: {result} | accepted: {} | refused: {} | evicted: {} | timed_out: {} | auth_failed: {} | batches: {} | detail: more than {LINES_PER_SECOND} guest lines in a second; these were counted, not logged",
            c.accepted, c.refused, c.evicted, c.timed_out, c.auth_failed, c.batches
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
        assert!(st.unlogged.only_accepted(), "a crowd of accepted connections is no failure");
    }

    #[test]
    fn past_the_budget_an_agencys_refusals_are_counted_per_agency() {
        let log = GuestLog::default();
        let mut lines = 0;
        for _ in 0..REFUSALS_PER_SECOND + 7 {
            log.refusal(1, "BAD_BET", || lines += 1);
        }
        log.refusal(1, "QUOTA", || lines += 1);
        log.refusal(2, "BAD_BET", || lines += 1);
        assert_eq!(lines, REFUSALS_PER_SECOND + 1);
        let agencies = log.agencies.lock().unwrap();
        assert_eq!(agencies[&1].unlogged, 8);
        assert_eq!(agencies[&1].errors, ["BAD_BET", "QUOTA"]);
        assert_eq!(agencies[&2].unlogged, 0);
    }
}
