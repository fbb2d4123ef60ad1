//! The file ledger, the default: `bets.csv` and its round file, and the state every connection
//! shares, behind one `Mutex`, with the two `Condvar`s that connections wait on.
//!
//! - `drawn` is the "winners ready" event: `WINNERS` waits on it until the draw is made (or the
//!   server shuts down). The predicate lives in the state, so no wake-up is lost.
//! - `synced` is group commit: a connection appends its rows (or its `DONE`, a line of the round
//!   file) under the lock, then either waits for a sync already running or runs one itself with
//!   the lock released; one `fdatasync` per file acknowledges everything appended to it before
//!   the sync started, bets and `DONE`s alike (`bets.csv` is synced before the round file, so a
//!   durable `DONE` never outruns its agency's bets).
//!
//! No socket is touched here, and no lock is held across one: connections call these methods
//! between reading a request and writing its reply.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::config::ServerSettings;
use crate::ledger::free_space::FreeSpace;
use crate::ledger::round_file::{self, RoundFile};
use crate::ledger::stats::LedgerStats;
use crate::ledger::store::{self, BetFile, Recovered, Store, StoreError, StoreErrorKind};
use crate::ledger::{self, AgencyNow, Appended, Ledger, Rows, shutting_down};
use crate::sync::lock_unpoisoned;
use crate::wire::protocol::{self, ErrorCode, ProtocolError, Status};

/// When an `OK` is sent for stored bets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// After the rows are synced to disk (`fdatasync`): an `OK` survives a power loss.
    Always,
    /// After the rows are written to the OS: an `OK` survives a crash of the server, not of the
    /// machine. For throw-away benchmarks.
    Never,
}

/// What a round needs to know at start.
#[derive(Debug, Clone)]
pub(crate) struct FileConfig {
    pub agencies: u32,
    pub storage_path: PathBuf,
    pub sync: SyncMode,
    /// Share one sync among all the rows appended while it runs (`SERVER_GROUP_COMMIT`). Off,
    /// every write syncs on its own, holding the lock: only for measuring what group commit buys.
    pub group_commit: bool,
    /// Most bets one agency may store (`SERVER_MAX_BETS_PER_AGENCY`).
    pub max_bets_per_agency: u64,
    /// Bytes that must stay free on the storage's filesystem (`SERVER_MIN_FREE_BYTES`; 0: off).
    pub min_free_bytes: u64,
}

impl FileConfig {
    /// The round the server's settings describe.
    pub(crate) fn from_settings(settings: &ServerSettings) -> FileConfig {
        FileConfig {
            agencies: settings.agencies,
            storage_path: settings.storage_path.clone(),
            sync: settings.sync,
            group_commit: settings.group_commit,
            max_bets_per_agency: settings.max_bets_per_agency,
            min_free_bytes: settings.min_free_bytes,
        }
    }
}

/// The shared state of one round kept in `bets.csv`.
pub(crate) struct FileLedger {
    config: FileConfig,
    state: Mutex<RoundState>,
    drawn: Condvar,
    synced: Condvar,
    /// Set at shutdown, read without the lock by a draw in progress so that it gives up.
    stopping: AtomicBool,
    /// What `STATUS` says, kept beside the state (written under the lock, read without it):
    /// strangers may ask as often as they like without ever queueing before an agency's append.
    status_bets: AtomicU64,
    status_done: AtomicU32,
    status_drawn: AtomicBool,
    stats: LedgerStats,
}

/// Everything the Mutex guards.
struct RoundState {
    store: Store,
    /// The round file's append end: one line per `DONE`, one at the draw.
    journal: Store,
    /// Bets held per agency (index 0 is agency 1): where each agency resumes.
    stored: Vec<u64>,
    done: Vec<bool>,
    /// How many of `done` are set: a `DONE` asks whether all are, and must not look at each.
    done_count: usize,
    phase: Phase,
    shutting_down: bool,
    /// How far `store` and `journal` are durable.
    synced: Mark,
    /// A connection is syncing with the lock released.
    syncing: bool,
    /// A sync failed: what was written since may not be on disk, so nothing more is
    /// acknowledged until the server restarts and recounts from the file.
    broken: Option<String>,
    free_space: FreeSpace,
}

enum Phase {
    Open,
    /// The last agency said `DONE`; one thread is reading `bets.csv` back.
    Drawing,
    /// Each agency's `WINNERS` reply line (index 0 is agency 1), encoded once at the draw and
    /// shared by every request for it: a reply of millions of winners costs its memory once.
    Drawn(Vec<Arc<[u8]>>),
}

/// A length of each of the two files: how far they are written, or synced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Mark {
    bets: u64,
    journal: u64,
}

impl Mark {
    /// Whether everything up to `want` is within this mark.
    fn covers(self, want: Mark) -> bool {
        self.bets >= want.bets && self.journal >= want.journal
    }
}

/// What start-up found, for the log.
#[derive(Debug)]
pub(crate) struct Resumed {
    pub bets: u64,
    pub truncated: u64,
    pub agencies_done: usize,
    pub drawn: bool,
}

impl FileLedger {
    /// Opens the bets file and the round file, recovering what a previous run left, and makes
    /// the draw if every agency had already said `DONE`.
    ///
    /// # Errors
    /// A file cannot be read or written, or does not belong to a round of `config.agencies`.
    pub(crate) fn open(config: FileConfig) -> Result<(FileLedger, Resumed), StoreError> {
        let round_path = round_file::path_for(&config.storage_path);
        let had_bets = fs::symlink_metadata(&config.storage_path).is_ok();
        let saved = match RoundFile::read(&round_path)? {
            Some(_) if !had_bets => {
                warn!("action: recover | result: success | detail: a round file without its bets file; new round");
                None
            }
            saved => saved,
        };
        if let Some((round, _)) = &saved
            && round.agencies != config.agencies
        {
            let why = format!("a round of {} agencies, as {} says", round.agencies, round_path.display());
            return Err(another_round(&config, &why));
        }
        let (store, recovered) = Store::open(&config.storage_path, config.agencies).map_err(|e| match &e.kind {
            StoreErrorKind::ForeignAgency { .. } if saved.is_none() => foreign_rows(&config, &e),
            _ => e,
        })?;
        let (journal, saved) = match saved {
            Some((round, whole)) => (RoundFile::append_end(&round_path, whole)?, round),
            None => (RoundFile::create(&round_path, config.agencies)?, RoundFile::new(config.agencies)),
        };
        FileLedger::resume(config, store, journal, recovered, &saved)
    }

    /// [`FileLedger::open`] over files already open (tests give it files that fail).
    fn resume(
        config: FileConfig,
        store: Store,
        journal: Store,
        recovered: Recovered,
        saved: &RoundFile,
    ) -> Result<(FileLedger, Resumed), StoreError> {
        let phase = if saved.drawn { Phase::Drawn(replies(&recovered.winners)) } else { Phase::Open };
        let resumed = Resumed {
            bets: recovered.stored.iter().sum(),
            truncated: recovered.truncated,
            agencies_done: saved.done.len(),
            drawn: saved.drawn,
        };
        let done = saved.done_flags();
        let state = RoundState {
            synced: Mark { bets: store.len(), journal: journal.len() },
            store,
            journal,
            stored: recovered.stored,
            done_count: done.iter().filter(|&&d| d).count(),
            done,
            phase,
            shutting_down: false,
            syncing: false,
            broken: None,
            free_space: FreeSpace::new(&config.storage_path, config.min_free_bytes),
        };
        let ledger = FileLedger {
            config,
            state: Mutex::new(state),
            drawn: Condvar::new(),
            synced: Condvar::new(),
            stopping: AtomicBool::new(false),
            status_bets: AtomicU64::new(resumed.bets),
            status_done: AtomicU32::new(resumed.agencies_done as u32),
            status_drawn: AtomicBool::new(resumed.drawn),
            stats: LedgerStats::default(),
        };
        // The last DONE was saved, but the server died before the draw was: make it now.
        if ledger.start_draw_if_all_done(lock_unpoisoned(&ledger.state)) {
            ledger.draw();
        }
        Ok((ledger, resumed))
    }

    pub(crate) fn storage_path(&self) -> &Path {
        &self.config.storage_path
    }

    /// `agency` as an index, if it is one of this round's.
    ///
    /// # Errors
    /// `BAD_AGENCY` outside `1..=agencies`.
    fn index(&self, agency: u32) -> Result<usize, ProtocolError> {
        self.check_agency(agency).map(|()| agency as usize - 1)
    }

    /// Returns once the files are durable up to `want` (as the sync mode promises), with the
    /// lock again.
    fn wait_durable<'a>(
        &'a self,
        mut st: MutexGuard<'a, RoundState>,
        want: Mark,
    ) -> Result<MutexGuard<'a, RoundState>, ProtocolError> {
        match (self.config.sync, self.config.group_commit) {
            (SyncMode::Never, _) => return Ok(st),
            (SyncMode::Always, false) if !st.synced.covers(want) => {
                let (upto, files) = st.behind();
                let syncing = self.stats.sync_begins();
                let result = sync(files);
                self.stats.sync_ended(&syncing);
                self.after_sync(&mut st, upto, result);
            }
            _ => {}
        }
        while !st.synced.covers(want) {
            if let Some(why) = &st.broken {
                return Err(ProtocolError::new(ErrorCode::Storage, why.clone()));
            }
            if st.syncing {
                st = self.synced.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // Nobody is syncing: this thread syncs everything appended so far, for everyone.
            st.syncing = true;
            let (upto, files) = st.behind();
            let syncing = self.stats.sync_begins();
            drop(st);
            let result = sync(files);
            self.stats.sync_ended(&syncing);
            st = lock_unpoisoned(&self.state);
            st.syncing = false;
            self.after_sync(&mut st, upto, result);
            self.synced.notify_all();
        }
        Ok(st)
    }

    fn after_sync(&self, st: &mut RoundState, upto: Mark, result: Result<(), (Which, io::Error)>) {
        match result {
            Ok(()) => {
                st.synced.bets = st.synced.bets.max(upto.bets);
                st.synced.journal = st.synced.journal.max(upto.journal);
            }
            Err((which, e)) => {
                let path = match which {
                    Which::Bets => self.storage_path().to_owned(),
                    Which::Journal => round_file::path_for(self.storage_path()),
                };
                let why = format!("cannot sync {}: {e}; restart the server", path.display());
                error!("action: sync | result: fail | error: {why}");
                st.broken = Some(why);
            }
        }
    }

    /// Appends `line` to the round file and returns once it is durable, with the lock again.
    fn record<'a>(
        &'a self,
        mut st: MutexGuard<'a, RoundState>,
        line: &[u8],
    ) -> Result<MutexGuard<'a, RoundState>, ProtocolError> {
        if let Some(why) = &st.broken {
            return Err(ProtocolError::new(ErrorCode::Storage, why.clone()));
        }
        if let Err(e) = st.journal.append(line) {
            let why = format!("cannot write {}: {e}", round_file::path_for(self.storage_path()).display());
            return Err(ProtocolError::new(ErrorCode::Storage, why));
        }
        let want = Mark { bets: 0, journal: st.journal.len() };
        self.wait_durable(st, want)
    }

    /// Moves an open round whose agencies are all done to `Drawing`; true if the caller must
    /// now make the draw.
    fn start_draw_if_all_done(&self, mut st: MutexGuard<'_, RoundState>) -> bool {
        let ready = matches!(st.phase, Phase::Open) && st.done_count == st.done.len();
        if ready {
            st.phase = Phase::Drawing;
        }
        ready
    }

    /// Reads `bets.csv` back with the lock released, then publishes the winners.
    fn draw(&self) {
        let began = Instant::now();
        let result = store::winners(self.storage_path(), self.config.agencies, Some(&self.stopping));
        let mut st = lock_unpoisoned(&self.state);
        match result {
            Ok(Some(winners)) => {
                // Durable before it is logged: a crash in between loses a log line, never a draw.
                st = self.record(st, round_file::DRAWN_LINE).unwrap_or_else(|e| {
                    error!("action: sorteo | result: fail | error: {}; the next start draws again", e.message);
                    lock_unpoisoned(&self.state)
                });
                st.phase = Phase::Drawn(replies(&winners));
                self.status_drawn.store(true, Ordering::Relaxed);
                self.stats.drawn(began);
                info!("action: sorteo | result: success");
            }
            Ok(None) => st.phase = Phase::Open,
            Err(e) => {
                error!("action: sorteo | result: fail | error: {e}");
                st.phase = Phase::Open;
            }
        }
        self.drawn.notify_all();
    }
}

impl RoundState {
    /// How far the files are written, and those of them that are not synced that far.
    fn behind(&self) -> (Mark, [Option<Arc<dyn BetFile>>; 2]) {
        let upto = Mark { bets: self.store.len(), journal: self.journal.len() };
        let bets = (self.synced.bets < upto.bets).then(|| self.store.file());
        let journal = (self.synced.journal < upto.journal).then(|| self.journal.file());
        (upto, [bets, journal])
    }
}

impl Ledger for FileLedger {
    fn agencies(&self) -> u32 {
        self.config.agencies
    }

    /// How many of `agency`'s bets are held durably (the reply to `HELLO`): it waits for a
    /// sync in progress, so that an agency never resumes past rows a power loss could take. An
    /// agency with no bets held has nothing to wait for: each agency's first `HELLO` of a round
    /// would otherwise wait for the others' batches to be synced.
    ///
    /// # Errors
    /// `BAD_AGENCY` outside `1..=agencies`; `STORAGE` if that sync failed.
    fn hello(&self, agency: u32) -> Result<u64, ProtocolError> {
        let i = self.index(agency)?;
        let st = lock_unpoisoned(&self.state);
        let (stored, end) = (st.stored[i], st.store.len());
        if stored == 0 {
            return Ok(0);
        }
        self.wait_durable(st, Mark { bets: end, journal: 0 }).map(|_| stored)
    }

    /// The first half of [`FileLedger::store`]: appends the rows not held yet, without waiting for
    /// them to be durable. They must not be acknowledged before [`FileLedger::make_durable`] of
    /// `end` returns; a connection that has more requests queued appends those first, so that
    /// one sync covers them all.
    ///
    /// # Errors
    /// `BAD_REQUEST` for an offset past what is held, `CLOSED` after the draw or the agency's
    /// `DONE`, `STORAGE` if the file could not be written, `SHUTDOWN`.
    fn append(&self, agency: u32, offset: Option<u64>, rows: &Rows) -> Result<Appended, ProtocolError> {
        let i = self.index(agency)?;
        let count = rows.ends.len() as u64;
        let mut st = lock_unpoisoned(&self.state);
        if st.shutting_down {
            return Err(shutting_down());
        }
        if let Some(why) = &st.broken {
            return Err(ProtocolError::new(ErrorCode::Storage, why.clone()));
        }
        let now = AgencyNow {
            agency,
            held: st.stored[i],
            done: st.done[i],
            drawn: !matches!(st.phase, Phase::Open),
            max_bets: self.config.max_bets_per_agency,
        };
        let skip = ledger::admit_batch(&now, offset, count)?;
        if skip < count {
            let (len, adding) = (st.store.len(), rows.bytes_from(skip as usize).len() as u64);
            if let Err(why) = st.free_space.check(len, adding) {
                warn!("action: store | result: fail | error: {why}");
                return Err(ProtocolError::new(ErrorCode::Storage, why));
            }
            if let Err(e) = st.store.append(rows.bytes_from(skip as usize)) {
                let why = format!("cannot write {}: {e}", self.storage_path().display());
                error!("action: store | result: fail | error: {why}");
                return Err(ProtocolError::new(ErrorCode::Storage, why));
            }
            st.stored[i] += count - skip;
            self.stats.appended(count - skip, adding);
            self.status_bets.fetch_add(count - skip, Ordering::Relaxed);
        }
        // Even rows that were all held already are acknowledged only once durable: another
        // connection may have appended them and still be syncing.
        Ok(Appended { stored: st.stored[i], end: st.store.len() })
    }

    /// Returns once `bets.csv` is durable up to `end`, as the sync mode promises.
    ///
    /// # Errors
    /// `STORAGE` if a sync failed.
    fn make_durable(&self, end: u64) -> Result<(), ProtocolError> {
        self.wait_durable(lock_unpoisoned(&self.state), Mark { bets: end, journal: 0 }).map(|_| ())
    }

    fn pipelines(&self) -> bool {
        self.config.group_commit
    }

    /// Records that `agency` has sent everything (a line appended to the round file, made
    /// durable by the group commit); the last distinct agency's `DONE` makes the draw, in this
    /// thread, before it returns.
    ///
    /// # Errors
    /// `BAD_AGENCY`, `STORAGE` if the round file could not be written or synced, `SHUTDOWN`.
    fn done(&self, agency: u32) -> Result<(), ProtocolError> {
        let i = self.index(agency)?;
        let mut st = lock_unpoisoned(&self.state);
        if st.shutting_down {
            return Err(shutting_down());
        }
        if st.done[i] {
            // Said before, maybe on a connection still syncing it: acknowledged once durable.
            let want = Mark { bets: 0, journal: st.journal.len() };
            return self.wait_durable(st, want).map(|_| ());
        }
        st.done[i] = true;
        st.done_count += 1;
        let st = match self.record(st, round_file::done_line(agency).as_bytes()) {
            Ok(st) => st,
            Err(e) => {
                error!("action: done | result: fail | error: {}", e.message);
                // Not written at all: the agency is not done. Written but not synced: nothing more
                // is acknowledged until a restart, which reads the file again.
                let mut st = lock_unpoisoned(&self.state);
                if st.broken.is_none() {
                    st.done[i] = false;
                    st.done_count -= 1;
                }
                return Err(e);
            }
        };
        self.status_done.fetch_add(1, Ordering::Relaxed);
        if self.start_draw_if_all_done(st) {
            self.draw();
        }
        Ok(())
    }

    /// Waits for the draw at most `wait`, then returns `agency`'s `WINNERS` reply line (its own
    /// winners only), or `None` if the draw is not made yet (the caller looks at its client,
    /// then waits again).
    ///
    /// # Errors
    /// `BAD_AGENCY`, or `SHUTDOWN` if the server stops first.
    fn winners(&self, agency: u32, wait: Duration, hung_up: &AtomicBool) -> Result<Option<Arc<[u8]>>, ProtocolError> {
        let i = self.index(agency)?;
        let st = lock_unpoisoned(&self.state);
        let waiting = |s: &mut RoundState| {
            !matches!(s.phase, Phase::Drawn(_)) && !s.shutting_down && !hung_up.load(Ordering::SeqCst)
        };
        let (st, _) = self.drawn.wait_timeout_while(st, wait, waiting).unwrap_or_else(PoisonError::into_inner);
        match &st.phase {
            Phase::Drawn(replies) => Ok(Some(Arc::clone(&replies[i]))),
            _ if st.shutting_down => Err(shutting_down()),
            _ => Ok(None),
        }
    }

    /// Takes the lock, so that a waiter between looking at its flag and waiting cannot miss it.
    fn wake_waiters(&self) {
        let _st = lock_unpoisoned(&self.state);
        self.drawn.notify_all();
    }

    /// The round's figures, without taking the lock.
    fn status(&self) -> Result<Status, ProtocolError> {
        Ok(Status {
            agencies_done: self.status_done.load(Ordering::Relaxed),
            agencies: self.config.agencies,
            bets: self.status_bets.load(Ordering::Relaxed),
            drawn: self.status_drawn.load(Ordering::Relaxed),
        })
    }

    /// Refuses every new request and wakes every waiter: the first step of shutdown.
    fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        lock_unpoisoned(&self.state).shutting_down = true;
        self.drawn.notify_all();
        self.synced.notify_all();
    }

    fn is_shutting_down(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Syncs the bets file: the last step of shutdown, after every connection is joined.
    ///
    /// # Errors
    /// The sync error.
    fn close(&self) -> io::Result<()> {
        let st = lock_unpoisoned(&self.state);
        st.store.file().sync()?;
        st.journal.file().sync()
    }

    fn describe(&self) -> String {
        format!("path: {}", self.storage_path().display())
    }

    fn stats(&self) -> Option<&LedgerStats> {
        Some(&self.stats)
    }
}

/// Each agency's `WINNERS` line, from its documents joined by commas.
fn replies(winners: &[String]) -> Vec<Arc<[u8]>> {
    winners.iter().map(|joined| Arc::from(protocol::winners_line(joined))).collect()
}

/// Writes the whole rows of the bets file at `path` to `out` (a torn last line is left out),
/// without opening the round; returns how many. `bets.csv` is already in the export's format.
///
/// # Errors
/// `path` cannot be read, or `out` cannot be written.
pub(crate) fn export(path: &Path, out: &mut dyn Write) -> Result<u64, String> {
    let file = File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let (mut line, mut rows) = (Vec::new(), 0);
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return Ok(rows),
            Ok(_) if line.ends_with(b"\n") => {
                out.write_all(&line).map_err(|e| e.to_string())?;
                rows += 1;
            }
            Ok(_) => return Ok(rows),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
    }
}

/// One of the ledger's two files.
#[derive(Debug, Clone, Copy)]
enum Which {
    Bets,
    Journal,
}

/// Syncs each file given, `bets.csv` first: a `DONE` is never durable before the bets it follows.
fn sync([bets, journal]: [Option<Arc<dyn BetFile>>; 2]) -> Result<(), (Which, io::Error)> {
    bets.map_or(Ok(()), |f| f.sync()).map_err(|e| (Which::Bets, e))?;
    journal.map_or(Ok(()), |f| f.sync()).map_err(|e| (Which::Journal, e))
}

/// The refusal of a storage that holds another round than the one configured.
fn another_round(config: &FileConfig, what: &str) -> StoreError {
    let path = &config.storage_path;
    let round = round_file::path_for(path);
    let why = format!(
        "holds another round's bets ({what}), and SERVER_AGENCIES is {}; to start a new round, move {} and {} away or set SERVER_STORAGE_PATH to a new file",
        config.agencies,
        path.display(),
        round.display()
    );
    StoreError::bad(path, None, why)
}

/// [`another_round`] for a bets file without a round file whose rows name agencies past this
/// round's: how many the round had, at least, is its highest agency.
fn foreign_rows(config: &FileConfig, error: &StoreError) -> StoreError {
    let mut highest = 0;
    let _ = store::scan(&config.storage_path, u32::MAX, None, |agency, _, _| highest = highest.max(agency));
    let line = error.line.map(|l| format!(" from line {l}")).unwrap_or_default();
    if highest == 0 {
        return another_round(config, &format!("agencies past {}{line}", config.agencies));
    }
    another_round(config, &format!("a round of at least {highest} agencies{line}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::store::testing::FailingFile;
    use std::sync::Arc;

    /// A round of one agency over an in-memory bets file (and a round file that never fails).
    fn ledger(file: &Arc<FailingFile>, dir: &Path) -> FileLedger {
        ledger_with(file, &Arc::new(FailingFile::new(None, None)), dir)
    }

    /// A round of one agency over an in-memory bets file and round file.
    fn ledger_with(file: &Arc<FailingFile>, journal: &Arc<FailingFile>, dir: &Path) -> FileLedger {
        let config = FileConfig {
            agencies: 1,
            storage_path: dir.join("bets.csv"),
            sync: SyncMode::Always,
            group_commit: true,
            max_bets_per_agency: 6,
            min_free_bytes: 0,
        };
        let store = Store::with_file(Arc::clone(file) as Arc<dyn store::BetFile>, 0);
        let journal = Store::with_file(Arc::clone(journal) as Arc<dyn store::BetFile>, 0);
        let recovered = Recovered { stored: vec![0], truncated: 0, winners: vec![String::new()] };
        FileLedger::resume(config, store, journal, recovered, &RoundFile::new(1)).unwrap().0
    }

    fn rows(count: usize) -> Rows {
        let mut rows = Rows::default();
        for i in 0..count {
            rows.bytes.extend_from_slice(format!("1,Ana,Paz,{i},1990-01-01,7574\n").as_bytes());
            rows.ends.push(rows.bytes.len());
        }
        rows
    }

    #[test]
    fn a_write_error_is_answered_storage_and_the_round_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(FailingFile::new(Some(2), None));
        let ledger = ledger(&file, dir.path());
        assert_eq!(ledger.store(1, Some(0), &rows(2)), Ok(2));
        let err = ledger.store(1, Some(2), &rows(3)).unwrap_err();
        assert_eq!(err.code, ErrorCode::Storage);
        assert!(err.message.contains("no space left"), "{}", err.message);
        // Nothing of the failed batch is held or in the file, which still ends on a whole row.
        assert_eq!(ledger.hello(1), Ok(2));
        assert_eq!(file.data.lock().unwrap().iter().filter(|&&b| b == b'\n').count(), 2);
        assert!(file.data.lock().unwrap().ends_with(b"\n"));
        // The retry is stored.
        assert_eq!(ledger.store(1, Some(2), &rows(3)), Ok(5));
        assert_eq!(file.data.lock().unwrap().len(), rows(2).bytes.len() + rows(3).bytes.len());
    }

    #[test]
    fn an_agency_with_no_bets_held_is_answered_without_waiting_for_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(FailingFile::new(None, None));
        let ledger = Arc::new(ledger(&file, dir.path()));
        {
            // Another agency's row appended, and its sync under way (one that never ends here).
            let mut st = lock_unpoisoned(&ledger.state);
            st.store.append(b"2,Eva,Sol,1,1980-02-02,1\n").unwrap();
            st.syncing = true;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let asking = Arc::clone(&ledger);
        std::thread::spawn(move || tx.send(asking.hello(1)));
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(60)), Ok(Ok(0)));
    }

    #[test]
    fn past_the_quota_a_batch_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(FailingFile::new(None, None));
        let ledger = ledger(&file, dir.path());
        assert_eq!(ledger.store(1, Some(0), &rows(4)), Ok(4));
        let err = ledger.store(1, Some(4), &rows(3)).unwrap_err();
        assert_eq!(err.code, ErrorCode::Quota);
        assert_eq!(ledger.hello(1), Ok(4));
        // A retry of what is held is still acknowledged, and the quota may be filled exactly.
        assert_eq!(ledger.store(1, Some(0), &rows(4)), Ok(4));
        assert_eq!(ledger.store(1, Some(4), &rows(2)), Ok(6));
    }

    #[test]
    fn the_export_of_a_bets_file_is_its_whole_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        std::fs::write(&path, "1,Ana,Paz,1,1990-01-01,7574\n1,\"Eva, la\",Sol,2,1980-02-02,1\n1,Torn,Li").unwrap();
        let mut out = Vec::new();
        assert_eq!(export(&path, &mut out), Ok(2));
        assert_eq!(out, b"1,Ana,Paz,1,1990-01-01,7574\n1,\"Eva, la\",Sol,2,1980-02-02,1\n");
        assert!(export(&dir.path().join("none.csv"), &mut out).unwrap_err().contains("cannot read"));
    }

    #[test]
    fn a_sync_error_refuses_every_write_until_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(FailingFile::new(None, Some(1)));
        let ledger = ledger(&file, dir.path());
        assert_eq!(ledger.store(1, Some(0), &rows(1)).unwrap_err().code, ErrorCode::Storage);
        assert_eq!(ledger.store(1, Some(1), &rows(1)).unwrap_err().code, ErrorCode::Storage);
        // The round still answers what needs no write.
        assert_eq!(ledger.status().unwrap().bets, 1);
        assert_eq!(ledger.hello(1).unwrap_err().code, ErrorCode::Storage);
    }

    #[test]
    fn a_done_is_a_line_of_the_round_file_and_is_acknowledged_once_synced() {
        let dir = tempfile::tempdir().unwrap();
        let (bets, journal) = (Arc::new(FailingFile::new(None, None)), Arc::new(FailingFile::new(None, Some(1))));
        let ledger = ledger_with(&bets, &journal, dir.path());
        assert_eq!(ledger.store(1, Some(0), &rows(1)), Ok(1));
        let err = ledger.done(1).unwrap_err();
        assert_eq!(err.code, ErrorCode::Storage);
        assert!(err.message.contains("cannot sync") && err.message.contains("bets.csv.round"), "{}", err.message);
        assert_eq!(*journal.data.lock().unwrap(), b"done = 1\n");
        // Written, not known durable: saying it again is not acknowledged either, and no draw.
        assert_eq!(ledger.done(1).unwrap_err().code, ErrorCode::Storage);
        assert!(!ledger.status().unwrap().drawn);
    }

    #[test]
    fn the_last_done_draws_and_the_draw_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (bets, journal) = (Arc::new(FailingFile::new(None, None)), Arc::new(FailingFile::new(None, None)));
        let ledger = ledger_with(&bets, &journal, dir.path());
        // The draw reads bets.csv back from its path.
        std::fs::write(dir.path().join("bets.csv"), "1,Ana,Paz,7,1990-01-01,7574\n").unwrap();
        assert_eq!(ledger.done(1), Ok(()));
        assert_eq!(ledger.done(1), Ok(()));
        assert_eq!(*journal.data.lock().unwrap(), b"done = 1\ndrawn = true\n");
        let reply = ledger.winners(1, Duration::ZERO, &AtomicBool::new(false)).unwrap().unwrap();
        assert_eq!(&*reply, b"WINNERS 1 7\n");
    }

    fn config(dir: &Path, agencies: u32) -> FileConfig {
        FileConfig {
            agencies,
            storage_path: dir.join("bets.csv"),
            sync: SyncMode::Always,
            group_commit: true,
            max_bets_per_agency: 100,
            min_free_bytes: 0,
        }
    }

    #[test]
    fn the_files_of_the_earlier_format_load_and_the_round_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let bets = "1,Ana,Paz,1,1990-01-01,7574\n2,Eva,Sol,2,1980-02-02,7574\n3,Li,Wu,3,1970-03-03,1\n";
        std::fs::write(dir.path().join("bets.csv"), bets).unwrap();
        let old = "# lottery round state, written by lottery-server; delete it with bets.csv to start a new round\n\
                   agencies = 3\ndone = 1,3\ndrawn = false\n";
        std::fs::write(dir.path().join("bets.csv.round"), old).unwrap();
        let (ledger, resumed) = FileLedger::open(config(dir.path(), 3)).unwrap();
        assert_eq!((resumed.bets, resumed.agencies_done, resumed.drawn), (3, 2, false));
        assert_eq!(ledger.hello(2), Ok(1));
        assert_eq!(ledger.done(2), Ok(()));
        assert_eq!(&*ledger.winners(2, Duration::ZERO, &AtomicBool::new(false)).unwrap().unwrap(), b"WINNERS 1 2\n");
        drop(ledger);
        let (ledger, resumed) = FileLedger::open(config(dir.path(), 3)).unwrap();
        assert_eq!((resumed.agencies_done, resumed.drawn), (3, true));
        assert_eq!(&*ledger.winners(1, Duration::ZERO, &AtomicBool::new(false)).unwrap().unwrap(), b"WINNERS 1 1\n");
    }

    #[test]
    fn another_rounds_storage_is_named_so_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bets.csv"), "1,Ana,Paz,1,1990-01-01,1\n5,Eva,Sol,2,1980-02-02,1\n").unwrap();
        // Without a round file (an earlier version's, before any DONE): from the rows.
        let err = FileLedger::open(config(dir.path(), 1)).err().unwrap().to_string();
        assert!(err.contains("holds another round's bets (a round of at least 5 agencies from line 2)"), "{err}");
        assert!(err.contains("SERVER_AGENCIES is 1; to start a new round, move"), "{err}");
        assert!(err.contains("SERVER_STORAGE_PATH"), "{err}");
        // With one: from it, before a byte of the bets file is read.
        let (ledger, _) = FileLedger::open(config(dir.path(), 5)).unwrap();
        drop(ledger);
        let err = FileLedger::open(config(dir.path(), 7)).err().unwrap().to_string();
        assert!(err.contains("holds another round's bets (a round of 5 agencies, as "), "{err}");
        assert!(err.contains("bets.csv.round says), and SERVER_AGENCIES is 7"), "{err}");
    }

    #[test]
    fn the_ledgers_files_are_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (ledger, _) = FileLedger::open(config(dir.path(), 2)).unwrap();
        drop(ledger);
        for name in ["bets.csv", "bets.csv.round"] {
            let mode = std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
        }
    }
}
