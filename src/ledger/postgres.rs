//! The PostgreSQL ledger (`SERVER_DATABASE_URL`): the round in a database that any number of
//! `lottery-server` replicas share, so that an agency may resume on any of them.
//!
//! - **Bets** go in `lottery_bet`, keyed by `(agency, seq)`. A batch is one statement, so one
//!   round trip and one transaction: it locks its agency's row (`SELECT … FOR UPDATE`), skips
//!   the rows already held, inserts the rest (`INSERT … SELECT FROM unnest(…) ON CONFLICT DO
//!   NOTHING`) and raises the agency's count. Two sessions of one agency on two replicas take
//!   turns on that row lock, so a retried batch is acknowledged, never stored twice.
//! - **Group commit**: batches commit without waiting for the disk, and a connection makes them
//!   durable together before it answers them ([`Ledger::make_durable`]: one transaction that
//!   waits for the WAL flush, which covers every commit before it); `OK` only after that.
//! - **The draw is exactly once** by a row lock, not by `SERIALIZABLE`: every `DONE` marks its
//!   agency done, then locks the one row of `lottery_round` (`FOR UPDATE`), and only then counts
//!   the agencies that are done. Under `READ COMMITTED` each statement sees what was committed
//!   before it began, so of two last `DONE`s arriving together on two replicas, the second to
//!   get the lock sees the first one's `DONE` and `drawn = false`, or the first one's draw: one of
//!   them draws, inside its own transaction. `SERIALIZABLE` would also be correct, but one of the
//!   two would fail with a serialization error and have to be retried; the lock makes it wait.
//! - **`WINNERS`** waits on a local `Condvar`. A thread per replica `LISTEN`s on
//!   `lottery_drawn`, which the draw `NOTIFY`s at its commit, and also looks at the round every
//!   second, so that a notification lost with a broken connection cannot strand a waiter.
//! - **`STATUS`** and `HELLO` read the database: it is the truth, whichever replica wrote it.

mod columns;
mod export;
mod pool;
mod watch;

pub use export::export;

use std::io;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info};
use postgres::types::Type;
use postgres::{Client, Config, NoTls};
use r2d2::{Pool, PooledConnection};

use crate::ledger::{Appended, Ledger, Rows};
use crate::wire::bet::WINNING_NUMBER;
use crate::wire::protocol::{self, ErrorCode, ProtocolError, Status};

/// The schema, created or migrated at every start-up.
const SCHEMA: &str = include_str!("schema.sql");

/// The channel the draw notifies, at its commit.
const CHANNEL: &str = "lottery_drawn";

/// Key of the advisory lock that serialises replicas applying the schema at the same instant.
const SCHEMA_LOCK: i64 = 7574_0001;

/// A batch, all or none, in one statement. `a` locks the agency's row, so that its batches and
/// its `DONE` take turns on every replica; `ok` is one row if the batch may be stored (the same
/// rules as the file's: not drawn, not past what is held, nothing new after `DONE`, not past
/// the quota `SERVER_MAX_BETS_PER_AGENCY`), none
/// otherwise; the rows already held are skipped, so a retry is acknowledged and not stored
/// twice (the key `(agency, seq)` would refuse a duplicate anyway). It returns what it found,
/// from which the caller tells which refusal, if any, applied.
const BATCH: &str = "\
WITH a AS (SELECT stored, done FROM lottery_agency WHERE agency = $1 FOR UPDATE),
     r AS (SELECT drawn FROM lottery_round WHERE id = 1),
     ok AS (SELECT a.stored, coalesce($2, a.stored) AS first FROM a, r
            WHERE NOT r.drawn AND coalesce($2, a.stored) <= a.stored
              AND (NOT a.done OR coalesce($2, a.stored) + $3 <= a.stored)
              AND greatest(a.stored, coalesce($2, a.stored) + $3) <= $9),
     ins AS (INSERT INTO lottery_bet (agency, seq, first_name, last_name, document, birthdate, number)
             SELECT $1, ok.first + t.i - 1, t.f, t.l, t.d, t.b::date, t.n
             FROM ok, unnest($4::text[], $5::text[], $6::text[], $7::text[], $8::int2[])
                      WITH ORDINALITY AS t(f, l, d, b, n, i)
             WHERE ok.first + t.i - 1 >= ok.stored
             ON CONFLICT DO NOTHING),
     upd AS (UPDATE lottery_agency SET stored = greatest(ok.stored, ok.first + $3) FROM ok WHERE agency = $1)
SELECT a.stored, a.done, r.drawn FROM a, r";

/// Connections one replica keeps at most; a request finding none free waits for one.
const POOL_SIZE: u32 = 32;

/// How old a `STATUS` may be: at most one reading of the database per replica this often.
const STATUS_AGE: Duration = Duration::from_millis(100);

/// How long a request waits for a connection before it is answered `ERR STORAGE`.
const POOL_WAIT: Duration = Duration::from_secs(10);

use pool::Manager;

/// Every agency's `WINNERS` reply line, encoded once when the winners are loaded.
type Replies = Arc<Vec<Arc<[u8]>>>;

/// What start-up found, for the log.
#[derive(Debug)]
pub struct Opened {
    pub bets: u64,
    pub agencies_done: u32,
    pub drawn: bool,
}

/// The round in a PostgreSQL database.
pub struct PgLedger {
    agencies: u32,
    /// `SERVER_MAX_BETS_PER_AGENCY`.
    max_bets: u64,
    pool: Pool<Manager>,
    shared: Arc<Shared>,
    watcher: Mutex<Option<JoinHandle<()>>>,
    /// The last `STATUS` read and when: anyone may ask for it, at any rate, and each reading
    /// takes a connection the agencies' batches need.
    status: Mutex<Option<(Instant, Status)>>,
    /// `host:port/database`, for the log: never the password.
    place: String,
}

/// What this replica's waiters share with the thread that watches for the draw.
struct Shared {
    state: Mutex<Watch>,
    drawn: Condvar,
    stopping: AtomicBool,
}

#[derive(Default)]
struct Watch {
    /// Every agency's winners (index 0 is agency 1), once the draw is made.
    /// Every agency's `WINNERS` line (index 0 is agency 1), once the draw is made.
    winners: Option<Replies>,
    shutting_down: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Watch> {
        // Only whole assignments happen under this lock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the winners known to this replica's waiters, and wakes them.
    fn publish(&self, winners: Replies) {
        self.lock().winners.get_or_insert(winners);
        self.drawn.notify_all();
    }

    fn is_drawn(&self) -> bool {
        self.lock().winners.is_some()
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}

/// `host:port/database` of a connection string, without user or password.
fn place(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(host)) => host.clone(),
        Some(postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or(config.get_user().unwrap_or("")))
}

/// Parses `url` without ever quoting it back: it may hold a password.
fn parse_url(url: &str) -> Result<Config, String> {
    Config::from_str(url).map_err(|e| format!("SERVER_DATABASE_URL is not a connection string: {e}"))
}

impl PgLedger {
    /// Connects to the database at `url`, creates or migrates the schema, and opens (or goes
    /// on with) the round of `agencies` agencies it holds.
    ///
    /// # Errors
    /// The database cannot be reached, or holds a round of another number of agencies.
    pub fn open(url: &str, agencies: u32, max_bets: u64) -> Result<(PgLedger, Opened), String> {
        let config = parse_url(url)?;
        let place = place(&config);
        let fail = |e: postgres::Error| format!("database {place}: {e}");
        let mut client = config.connect(NoTls).map_err(fail)?;
        migrate(&mut client, agencies).map_err(fail)?.map_err(|why| format!("database {place}: {why}"))?;
        let pool = Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(0))
            .test_on_check_out(false)
            .connection_timeout(POOL_WAIT)
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(Manager { config: config.clone() });
        let shared =
            Arc::new(Shared { state: Mutex::default(), drawn: Condvar::new(), stopping: AtomicBool::new(false) });
        let ledger = PgLedger {
            agencies,
            max_bets,
            pool,
            shared,
            watcher: Mutex::new(None),
            status: Mutex::new(None),
            place: place.clone(),
        };
        let status = ledger.read_status(&mut client).map_err(fail)?;
        if status.drawn {
            ledger.shared.publish(load_winners(&mut client).map_err(fail)?);
        }
        let watcher =
            watch::spawn(config, Arc::clone(&ledger.shared)).map_err(|e| format!("cannot start a thread: {e}"))?;
        *ledger.watcher.lock().unwrap_or_else(PoisonError::into_inner) = Some(watcher);
        let opened = Opened { bets: status.bets, agencies_done: status.agencies_done, drawn: status.drawn };
        Ok((ledger, opened))
    }

    /// `agency` as the database's key, if it is one of this round's.
    ///
    /// # Errors
    /// `BAD_AGENCY` outside `1..=agencies`.
    fn key(&self, agency: u32) -> Result<i32, ProtocolError> {
        self.check_agency(agency).map(|()| agency as i32)
    }

    /// A connection from the pool.
    ///
    /// # Errors
    /// `STORAGE` if none is free, and none can be opened, within [`POOL_WAIT`].
    fn client(&self) -> Result<PooledConnection<Manager>, ProtocolError> {
        self.pool.get().map_err(|e| self.storage(&e))
    }

    /// `ERR STORAGE` for a database error, logged.
    fn storage(&self, e: &dyn std::fmt::Display) -> ProtocolError {
        let why = format!("database {}: {e}", self.place);
        error!("action: database | result: fail | error: {}", crate::logging::field(&why));
        ProtocolError::new(ErrorCode::Storage, why)
    }

    fn read_status(&self, client: &mut Client) -> Result<Status, postgres::Error> {
        let row = client.query_typed_one(
            "SELECT count(*) FILTER (WHERE done), sum(stored)::bigint, (SELECT drawn FROM lottery_round WHERE id = 1) \
             FROM lottery_agency",
            &[],
        )?;
        Ok(Status {
            agencies_done: row.get::<_, i64>(0) as u32,
            agencies: self.agencies,
            bets: row.get::<_, i64>(1) as u64,
            drawn: row.get(2),
        })
    }

    /// The batch, as one statement (one round trip, its own transaction); the inner error is a
    /// refusal, after which nothing was stored.
    fn append_tx(
        &self,
        conn: &mut pool::Conn,
        agency: i32,
        offset: Option<u64>,
        rows: &Rows,
    ) -> Result<Result<u64, ProtocolError>, postgres::Error> {
        let columns = match columns::Columns::of(rows) {
            Ok(columns) => columns,
            Err(why) => return Ok(Err(ProtocolError::new(ErrorCode::Storage, why))),
        };
        let count = rows.len() as i64;
        let offset = offset.map(|o| o as i64);
        let max = i64::try_from(self.max_bets).unwrap_or(i64::MAX);
        let row = conn.client.query_one(
            &conn.batch,
            &[
                &agency,
                &offset,
                &count,
                &columns.first_names,
                &columns.last_names,
                &columns.documents,
                &columns.birthdates,
                &columns.numbers,
                &max,
            ],
        )?;
        let (held, done, drawn): (i64, bool, bool) = (row.get(0), row.get(1), row.get(2));
        // The statement stored the rows exactly when none of these refusals applies.
        let (held, count) = (held as u64, count as u64);
        let offset = offset.map_or(held, |o| o as u64);
        if drawn {
            return Ok(Err(ProtocolError::new(ErrorCode::Closed, "the draw has been made")));
        }
        if offset > held {
            let why = format!("offset {offset} is past the {held} bets held for agency {agency}");
            return Ok(Err(ProtocolError::new(ErrorCode::BadRequest, why)));
        }
        let stored = held.max(offset + count);
        if done && stored > held {
            return Ok(Err(ProtocolError::new(ErrorCode::Closed, format!("agency {agency} already said DONE"))));
        }
        if stored > self.max_bets {
            let why = format!(
                "agency {agency} may store at most {} bets and holds {held}; nothing of this batch was stored",
                self.max_bets
            );
            return Ok(Err(ProtocolError::new(ErrorCode::Quota, why)));
        }
        Ok(Ok(stored))
    }

    /// The `DONE` transaction; the winners if this one made the draw.
    fn done_tx(client: &mut Client, agency: i32) -> Result<Option<Replies>, postgres::Error> {
        let mut tx = client.transaction()?;
        // Durable at its commit, by itself: the draw is in it.
        tx.batch_execute("SET LOCAL synchronous_commit = on")?;
        // Waits for the agency's batches in flight on any replica.
        tx.execute_typed("UPDATE lottery_agency SET done = true WHERE agency = $1", &[(&agency, Type::INT4)])?;
        // The round's row lock: one DONE at a time from here to its commit, on every replica.
        let drawn: bool = tx.query_typed_one("SELECT drawn FROM lottery_round WHERE id = 1 FOR UPDATE", &[])?.get(0);
        // A new statement, so a new snapshot: it sees every DONE committed before the lock.
        let all_done: bool = tx.query_typed_one("SELECT bool_and(done) FROM lottery_agency", &[])?.get(0);
        if drawn || !all_done {
            tx.commit()?;
            return Ok(None);
        }
        tx.batch_execute(&format!(
            "UPDATE lottery_agency a SET winners = w.joined \
               FROM (SELECT agency, string_agg(document, ',' ORDER BY seq) AS joined \
                     FROM lottery_bet WHERE number = {WINNING_NUMBER} GROUP BY agency) w \
              WHERE a.agency = w.agency; \
             UPDATE lottery_round SET drawn = true, drawn_at = now() WHERE id = 1; \
             NOTIFY {CHANNEL};"
        ))?;
        let winners = load_winners(&mut tx)?;
        tx.commit()?;
        Ok(Some(winners))
    }
}

impl Ledger for PgLedger {
    fn agencies(&self) -> u32 {
        self.agencies
    }

    fn hello(&self, agency: u32) -> Result<u64, ProtocolError> {
        let agency = self.key(agency)?;
        let mut conn = self.client()?;
        let stored = conn
            .client
            .query_typed_one("SELECT stored FROM lottery_agency WHERE agency = $1", &[(&agency, Type::INT4)])
            .map(|row| row.get::<_, i64>(0) as u64)
            .map_err(|e| self.storage(&e))?;
        // What it counted may include commits not on disk yet: an agency must never resume past
        // rows a crash of the database could take.
        flush(&mut conn.client).map_err(|e| self.storage(&e))?;
        Ok(stored)
    }

    /// One statement, committed before it returns but not waiting for the disk: the rows must
    /// not be acknowledged before [`Ledger::make_durable`].
    fn append(&self, agency: u32, offset: Option<u64>, rows: &Rows) -> Result<Appended, ProtocolError> {
        let agency = self.key(agency)?;
        if self.is_shutting_down() {
            return Err(shutting_down());
        }
        let mut conn = self.client()?;
        let stored = self.append_tx(&mut conn, agency, offset, rows).map_err(|e| self.storage(&e))??;
        Ok(Appended { stored, end: 0 })
    }

    /// Waits until every commit made so far is on disk, whatever `end`: one flush covers every
    /// batch committed before it, on any connection.
    fn make_durable(&self, _end: u64) -> Result<(), ProtocolError> {
        let mut conn = self.client()?;
        flush(&mut conn.client).map_err(|e| self.storage(&e))
    }

    fn pipelines(&self) -> bool {
        true
    }

    fn done(&self, agency: u32) -> Result<(), ProtocolError> {
        let agency = self.key(agency)?;
        if self.is_shutting_down() {
            return Err(shutting_down());
        }
        let mut conn = self.client()?;
        if let Some(winners) = PgLedger::done_tx(&mut conn.client, agency).map_err(|e| self.storage(&e))? {
            info!("action: sorteo | result: success");
            self.shared.publish(winners);
        }
        Ok(())
    }

    fn winners(&self, agency: u32, wait: Duration) -> Result<Option<Arc<[u8]>>, ProtocolError> {
        let i = self.key(agency)? as usize - 1;
        let st = self.shared.lock();
        let (st, _) = self
            .shared
            .drawn
            .wait_timeout_while(st, wait, |s| s.winners.is_none() && !s.shutting_down)
            .unwrap_or_else(PoisonError::into_inner);
        match &st.winners {
            Some(winners) => Ok(Some(Arc::clone(&winners[i]))),
            None if st.shutting_down => Err(shutting_down()),
            None => Ok(None),
        }
    }

    /// The database's figures, read at most every `STATUS_AGE`.
    fn status(&self) -> Result<Status, ProtocolError> {
        let mut cached = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, status)) = cached.filter(|(at, _)| at.elapsed() < STATUS_AGE) {
            return Ok(status);
        }
        let mut conn = self.client()?;
        let status = self.read_status(&mut conn.client).map_err(|e| self.storage(&e))?;
        *cached = Some((Instant::now(), status));
        Ok(status)
    }

    fn begin_shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        self.shared.lock().shutting_down = true;
        self.shared.drawn.notify_all();
    }

    fn is_shutting_down(&self) -> bool {
        self.shared.stopping()
    }

    /// Every acknowledged batch was committed already; this stops the watching thread.
    fn close(&self) -> io::Result<()> {
        self.begin_shutdown();
        if let Some(watcher) = self.watcher.lock().unwrap_or_else(PoisonError::into_inner).take() {
            watcher.join().map_err(|_| io::Error::other("the thread watching for the draw panicked"))?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("database: {}", self.place)
    }
}

/// Applies the schema and makes sure the round row and the agencies' rows exist. The inner
/// error: the database holds a round of another size.
fn migrate(client: &mut Client, agencies: u32) -> Result<Result<(), String>, postgres::Error> {
    let mut tx = client.transaction()?;
    // Without it, every `IF NOT EXISTS` that skips says so in a NOTICE, which the client logs.
    tx.batch_execute("SET LOCAL client_min_messages = warning")?;
    tx.execute_typed("SELECT pg_advisory_xact_lock($1)", &[(&SCHEMA_LOCK, Type::INT8)])?;
    tx.batch_execute(SCHEMA)?;
    let n = agencies as i32;
    tx.execute_typed(
        "INSERT INTO lottery_round (id, agencies) VALUES (1, $1) ON CONFLICT DO NOTHING",
        &[(&n, Type::INT4)],
    )?;
    let held: i32 = tx.query_typed_one("SELECT agencies FROM lottery_round WHERE id = 1", &[])?.get(0);
    if held != n {
        return Ok(Err(format!("this round has {held} agencies, SERVER_AGENCIES is {agencies}")));
    }
    tx.execute_typed(
        "INSERT INTO lottery_agency (agency) SELECT generate_series(1, $1) ON CONFLICT DO NOTHING",
        &[(&n, Type::INT4)],
    )?;
    tx.commit()?;
    Ok(Ok(()))
}

/// Returns once every transaction committed before it is on disk. A commit waits for the WAL
/// to be flushed up to its own record only if it wrote to the WAL: a transactional logical
/// message is the smallest such write, and touches no row another session could be holding.
fn flush(client: &mut Client) -> Result<(), postgres::Error> {
    client.batch_execute(
        "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_logical_emit_message(true, 'lottery', 'durable'); COMMIT",
    )
}

/// Every agency's winners, as the draw stored them.
fn load_winners(client: &mut impl postgres::GenericClient) -> Result<Replies, postgres::Error> {
    let rows = client.query_typed("SELECT winners FROM lottery_agency ORDER BY agency", &[])?;
    Ok(Arc::new(rows.iter().map(|row| Arc::from(protocol::winners_line(row.get(0)))).collect()))
}

fn shutting_down() -> ProtocolError {
    ProtocolError::new(ErrorCode::Shutdown, "the server is shutting down")
}
