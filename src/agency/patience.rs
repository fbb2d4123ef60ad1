//! How long an agency keeps trying, and how long it pauses between tries.
//!
//! The rule: an agency gives up only when `CLI_RETRY_TIMEOUT_MS` has passed since its *last
//! progress* (a `HELLO` answered `OK`, a bet, batch or `DONE` acknowledged, its winners) with
//! the server down or refusing to store. A server that is up but turns the agency away before
//! its `HELLO` is answered (`ERR BUSY`, a guest evicted for a newcomer, a handshake cut short:
//! a crowd, a flood of strangers) is not a reason to give up: the agency keeps trying as long as
//! the server keeps accepting its connections. One that answers `HELLO` and then cannot store
//! (`ERR STORAGE`) does not earn that `HELLO` as progress, or the agency would loop for ever.
//!
//! Pauses are jittered (half the step, plus a random part of the other half), so that agencies
//! turned away together do not come back together, and grow: from 50 ms to 500 ms for a
//! connection that failed or broke (a server that sheds its oldest guests should see the agency
//! again soon), and to 5 s for a server that cannot store.

use std::time::{Duration, Instant};

use log::info;

use crate::agency::{AgencyError, Stop};
use crate::logging::field;

/// Why the agency is about to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Setback {
    /// No connection (refused, timed out, no such name).
    Connect,
    /// A connection that broke or was turned away (`ERR BUSY`, `ERR SHUTDOWN`, closed).
    Broken,
    /// The server is up but could not store (`ERR STORAGE`).
    Storage,
}

impl Setback {
    fn longest_pause(self) -> Duration {
        match self {
            Setback::Connect | Setback::Broken => Duration::from_millis(500),
            Setback::Storage => Duration::from_secs(5),
        }
    }
}

/// How often failed connections are summed up in one log line.
const SUMMARY_EVERY: Duration = Duration::from_secs(5);

/// The agency's retry window and backoff.
///
/// It also sets how long one attempt waits for the server to answer the connection (its
/// *patience*): 100 ms at first, doubling after each attempt that timed out, up to 5 s. A
/// connection request lost on the way (a server's listen queue overflowing under a flood of
/// connections drops it) is otherwise sent again by the kernel only after a second, then
/// three; a far server only costs the first attempts' 300 ms.
pub(crate) struct Patience {
    address: String,
    limit: Duration,
    last_progress: Instant,
    /// The last progress before this connection's `HELLO`: it stands again if the connection
    /// ends in `ERR STORAGE` before anything was stored.
    before_hello: Option<Instant>,
    step: Duration,
    pub(crate) connect_timeout: Duration,
    last_setback: Option<Setback>,
    /// Whether the server answered `HELLO` on the connection now open.
    answered: bool,
    /// Connection failures since the last line about them, and when that line was.
    unlogged: u32,
    logged_at: Option<Instant>,
    random: u64,
}

impl Patience {
    const FIRST_STEP: Duration = Duration::from_millis(50);
    const FIRST_CONNECT_TIMEOUT: Duration = Duration::from_millis(100);
    const LAST_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    pub(crate) fn new(address: &str, limit: Duration, seed: u64) -> Patience {
        let mut random = [0u8; 8];
        let random = match getrandom::fill(&mut random) {
            Ok(()) => u64::from_le_bytes(random) | 1,
            Err(_) => seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        };
        Patience {
            address: address.to_owned(),
            limit,
            last_progress: Instant::now(),
            before_hello: None,
            step: Self::FIRST_STEP,
            connect_timeout: Self::FIRST_CONNECT_TIMEOUT,
            last_setback: None,
            answered: false,
            unlogged: 0,
            logged_at: None,
            random,
        }
    }

    /// Something was stored or answered: the window starts again, and so do the pauses.
    pub(crate) fn progress(&mut self) {
        self.last_progress = Instant::now();
        self.before_hello = None;
        self.step = Self::FIRST_STEP;
        self.last_setback = None;
    }

    /// A connection is open: the server is up.
    pub(crate) fn connected(&mut self) {
        self.answered = false;
    }

    /// The server answered `HELLO` with `OK`.
    pub(crate) fn hello_answered(&mut self) {
        self.answered = true;
        self.connect_timeout = Self::FIRST_CONNECT_TIMEOUT;
        if self.unlogged > 0 || self.logged_at.is_some() {
            self.unlogged = 0;
            self.logged_at = None;
        }
        if self.last_setback == Some(Setback::Storage) {
            // Not progress yet: the last connection got this far too, and stored nothing.
            return;
        }
        let before = self.last_progress;
        self.progress();
        self.before_hello = Some(before);
    }

    /// Waits longer for the next connection, after one that was not answered in time.
    pub(crate) fn lose_patience(&mut self) {
        self.connect_timeout = (self.connect_timeout * 2).min(Self::LAST_CONNECT_TIMEOUT);
    }

    /// Logs the setback (see [`Patience::log`]) and waits before the next attempt.
    ///
    /// # Errors
    /// `Unreachable` / `NoProgress` once the window has closed, `Stopped` if a stop is asked
    /// meanwhile.
    pub(crate) fn wait(&mut self, stop: &Stop, setback: Setback, why: &str) -> Result<(), AgencyError> {
        if setback == Setback::Storage
            && let Some(before) = self.before_hello.take()
        {
            self.last_progress = before;
        }
        // Turned away by a server that is up: it is waited for, not given up on.
        let turned_away = setback == Setback::Broken && !self.answered;
        if self.last_progress.elapsed() >= self.limit && !turned_away {
            return Err(self.give_up(setback, why));
        }
        if self.last_setback.is_some_and(|last| last != setback) {
            self.step = Self::FIRST_STEP.max(self.step.min(setback.longest_pause()));
        }
        self.last_setback = Some(setback);
        let pause = self.jittered();
        self.log(setback, why, pause);
        if stop.sleep(pause) {
            return Err(AgencyError::Stopped);
        }
        self.step = (self.step * 2).min(setback.longest_pause());
        Ok(())
    }

    fn give_up(&self, setback: Setback, why: &str) -> AgencyError {
        let (address, why) = (self.address.clone(), why.to_owned());
        match setback {
            Setback::Connect => AgencyError::Unreachable { address, why },
            Setback::Broken | Setback::Storage => AgencyError::NoProgress { address, waited: self.limit, why },
        }
    }

    /// Half the step, plus up to the other half at random (xorshift: enough to spread agencies).
    fn jittered(&mut self) -> Duration {
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        let half = self.step / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_nanos(self.random % nanos)
    }

    /// Says why the agency waits. A server that cannot be reached is said once, then summed
    /// up every few seconds; a broken connection or a refusal to store, each time (their
    /// pauses are longer, or the connection worked).
    fn log(&mut self, setback: Setback, why: &str, pause: Duration) {
        let (address, why_field, ms) = (&self.address, field(why), pause.as_millis());
        match setback {
            Setback::Connect => {
                self.unlogged += 1;
                match self.logged_at {
                    None => info!("action: connect | result: in_progress | address: {address} | error: {why_field}"),
                    Some(at) if at.elapsed() >= SUMMARY_EVERY => info!(
                        "action: connect | result: in_progress | address: {address} | attempts: {} | waiting_s: {} | error: {why_field}",
                        self.unlogged,
                        self.last_progress.elapsed().as_secs()
                    ),
                    Some(_) => return,
                }
                self.logged_at = Some(Instant::now());
                self.unlogged = 0;
            }
            Setback::Broken => {
                info!("action: reconnect | result: in_progress | retry_in_ms: {ms} | error: {why_field}")
            }
            Setback::Storage => info!(
                "action: reconnect | result: in_progress | retry_in_ms: {ms} | waiting_s: {} | error: {why_field}",
                self.last_progress.elapsed().as_secs()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_are_jittered_and_grow_to_their_cap() {
        let stop = Stop::default();
        let mut patience = Patience::new("x:1", Duration::from_secs(60), 1);
        assert_eq!(patience.step, Duration::from_millis(50));
        for _ in 0..8 {
            let step = patience.step;
            let pause = patience.jittered();
            assert!(pause >= step / 2 && pause <= step, "{pause:?} for {step:?}");
            patience.step = (step * 2).min(Setback::Storage.longest_pause());
        }
        assert_eq!(patience.step, Duration::from_secs(5));
        patience.progress();
        assert_eq!(patience.step, Duration::from_millis(50));
        assert!(!stop.is_triggered());
    }

    #[test]
    fn a_hello_followed_by_storage_refusals_is_not_progress() {
        let stop = Stop::default();
        let mut patience = Patience::new("x:1", Duration::from_millis(30), 1);
        let start = patience.last_progress;
        std::thread::sleep(Duration::from_millis(40));
        patience.hello_answered();
        assert!(patience.last_progress > start);
        // The batch after it is refused: the window is the one before the HELLO, now closed.
        let err = patience.wait(&stop, Setback::Storage, "ERR STORAGE full").unwrap_err();
        assert!(matches!(err, AgencyError::NoProgress { .. }), "{err}");
        // A later HELLO does not open it again either.
        patience.hello_answered();
        assert!(patience.wait(&stop, Setback::Storage, "ERR STORAGE full").is_err());
        // A batch acknowledged does.
        patience.progress();
        assert!(patience.last_progress.elapsed() < Duration::from_millis(30));
    }
}
