//! Where a round lives, behind one small trait, [`Ledger`], that the server talks to.
//!
//! Two ledgers implement it:
//! - [`file::FileLedger`] (the default): `bets.csv`, the round file beside it, and the shared
//!   state behind a Mutex with its "winners ready" and group-commit Condvars;
//! - [`postgres::PgLedger`] (`SERVER_DATABASE_URL`): the round in a PostgreSQL database, which
//!   any number of `lottery-server` replicas serve at once.
//!
//! The trait speaks the protocol's terms: its errors are the `ERR` replies the session sends.

pub(crate) mod file;
pub(crate) mod free_space;
pub(crate) mod lock;
pub(crate) mod postgres;
pub(crate) mod round_file;
mod scan;
pub(crate) mod stats;
pub(crate) mod store;

use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::wire::protocol::{ErrorCode, ProtocolError, Status};

/// What a ledger knows of an agency when a batch of it arrives.
pub(crate) struct AgencyNow {
    pub agency: u32,
    /// Its bets held.
    pub held: u64,
    pub done: bool,
    /// The round's draw is made.
    pub drawn: bool,
    /// `SERVER_MAX_BETS_PER_AGENCY`.
    pub max_bets: u64,
}

/// The one rule both ledgers refuse a batch by: `count` rows at `offset` (none: after the ones
/// held). Returns how many of them are held already, to be acknowledged and not stored again.
///
/// # Errors
/// `CLOSED` after the draw, or for new rows after the agency's `DONE`; `BAD_REQUEST` for an
/// offset past what is held; `QUOTA` for new rows past `max_bets`.
pub(crate) fn admit_batch(now: &AgencyNow, offset: Option<u64>, count: u64) -> Result<u64, ProtocolError> {
    let AgencyNow { agency, held, done, drawn, max_bets } = *now;
    if drawn {
        return Err(ProtocolError::new(ErrorCode::Closed, "the draw has been made"));
    }
    let offset = offset.unwrap_or(held);
    if offset > held {
        let why = format!("offset {offset} is past the {held} bets held for agency {agency}");
        return Err(ProtocolError::new(ErrorCode::BadRequest, why));
    }
    let already = (held - offset).min(count);
    let adding = count - already;
    if adding > 0 && done {
        return Err(ProtocolError::new(ErrorCode::Closed, format!("agency {agency} already said DONE")));
    }
    if adding > 0 && held + adding > max_bets {
        let why = format!(
            "agency {agency} may store at most {max_bets} bets and holds {held}; nothing of this batch was stored"
        );
        return Err(ProtocolError::new(ErrorCode::Quota, why));
    }
    Ok(already)
}

/// The reply to every request a ledger refuses once shutdown has begun.
pub(crate) fn shutting_down() -> ProtocolError {
    ProtocolError::new(ErrorCode::Shutdown, "the server is shutting down")
}

/// What the server needs of the storage of a round. Every method is called by a connection's
/// thread between reading a request and writing its reply; none touches a socket.
pub(crate) trait Ledger: Send + Sync {
    /// How many agencies the round has.
    fn agencies(&self) -> u32;

    /// Whether `agency` is one of the round's.
    ///
    /// # Errors
    /// `BAD_AGENCY` outside `1..=agencies`.
    fn check_agency(&self, agency: u32) -> Result<(), ProtocolError> {
        if (1..=self.agencies()).contains(&agency) {
            Ok(())
        } else {
            let why = format!("agency {agency} is not in 1..={}", self.agencies());
            Err(ProtocolError::new(ErrorCode::BadAgency, why))
        }
    }

    /// How many of `agency`'s bets are held durably: where it resumes (`HELLO`).
    ///
    /// # Errors
    /// `BAD_AGENCY` outside `1..=agencies`; `STORAGE` if the storage cannot say.
    fn hello(&self, agency: u32) -> Result<u64, ProtocolError>;

    /// Stores `rows` as `agency`'s bets `offset..offset + count` (with no offset, after the ones
    /// held), all or none; rows already held are acknowledged, not stored twice. They must not
    /// be acknowledged before [`Ledger::make_durable`] of the returned `end`: a connection with
    /// more requests queued appends those first, so that one sync covers them all.
    ///
    /// # Errors
    /// `BAD_REQUEST` for an offset past what is held, `CLOSED` after the draw or the agency's
    /// `DONE`, `STORAGE` if the rows could not be written, `SHUTDOWN`.
    fn append(&self, agency: u32, offset: Option<u64>, rows: &Rows) -> Result<Appended, ProtocolError>;

    /// Returns once everything appended up to `end` is as durable as the ledger promises.
    ///
    /// # Errors
    /// `STORAGE` if it could not be made durable.
    fn make_durable(&self, end: u64) -> Result<(), ProtocolError>;

    /// [`Ledger::append`] then [`Ledger::make_durable`]: the bets the agency then holds.
    ///
    /// # Errors
    /// As those two.
    fn store(&self, agency: u32, offset: Option<u64>, rows: &Rows) -> Result<u64, ProtocolError> {
        let appended = self.append(agency, offset, rows)?;
        self.make_durable(appended.end)?;
        Ok(appended.stored)
    }

    /// Whether a connection should append the batches its client pipelines back to back and
    /// make them durable together (the file's group commit); false: one by one.
    fn pipelines(&self) -> bool;

    /// Records that `agency` has sent everything; the last distinct agency's `DONE` makes the
    /// draw, exactly once, before it returns.
    ///
    /// # Errors
    /// `BAD_AGENCY`, `STORAGE`, `SHUTDOWN`.
    fn done(&self, agency: u32) -> Result<(), ProtocolError>;

    /// `agency`'s `WINNERS` reply line once the draw is made (encoded once, shared by every
    /// request), waiting for it at most `wait`, or until `hung_up` is set and
    /// [`Ledger::wake_waiters`] called: `None` if it is not made yet (the caller looks at its
    /// socket and asks again).
    ///
    /// # Errors
    /// `BAD_AGENCY`, `STORAGE`, or `SHUTDOWN` once the server is stopping.
    fn winners(&self, agency: u32, wait: Duration, hung_up: &AtomicBool) -> Result<Option<Arc<[u8]>>, ProtocolError>;

    /// Wakes every [`Ledger::winners`] waiter to look at its `hung_up` flag again.
    fn wake_waiters(&self);

    /// The figures of `STATUS`, as the storage holds them.
    ///
    /// # Errors
    /// `STORAGE` if the storage cannot say.
    fn status(&self) -> Result<Status, ProtocolError>;

    /// Refuses every new write and wakes every waiter (they answer `ERR SHUTDOWN`): the first
    /// step of shutdown.
    fn begin_shutdown(&self);

    fn is_shutting_down(&self) -> bool;

    /// Makes everything durable and lets go of the storage: the last step of shutdown, after
    /// every connection is joined.
    ///
    /// # Errors
    /// What could not be synced or closed.
    fn close(&self) -> io::Result<()>;

    /// Where the round lives, for the log (never a password).
    fn describe(&self) -> String;

    /// What the ledger counts for the operator, if it counts (the file ledger does).
    fn stats(&self) -> Option<&stats::LedgerStats> {
        None
    }
}

/// Rows appended by [`Ledger::append`] and not yet acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Appended {
    /// Bets the agency holds, counting these.
    pub stored: u64,
    /// The ledger must be durable up to here (a position in its log) before the rows are
    /// acknowledged.
    pub end: u64,
}

/// Bets to store, already validated and encoded as `bets.csv` rows.
#[derive(Debug, Default)]
pub(crate) struct Rows {
    pub bytes: Vec<u8>,
    /// `ends[i]` is where row `i` ends in `bytes`.
    pub ends: Vec<usize>,
}

impl Rows {
    /// The rows from `row` on.
    pub(crate) fn bytes_from(&self, row: usize) -> &[u8] {
        let start = if row == 0 { 0 } else { self.ends[row - 1] };
        &self.bytes[start..]
    }

    /// How many rows there are.
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }
}
