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
//! - **`DONE`** marks its agency done in a transaction of its own, durable at its commit, that
//!   holds only its agency's row lock (so it waits for that agency's batches in flight, and for
//!   nothing else); the commits of `DONE`s arriving together share the database's WAL flushes.
//!   It then asks whether any agency is not done (a partial index makes that one probe, not a
//!   scan). Only if none is does it make the draw.
//! - **The draw is exactly once** by a row lock, not by `SERIALIZABLE`: it locks the one row of
//!   `lottery_round` (`FOR UPDATE`), and only then looks at `drawn` and at the agencies not done.
//!   Under `READ COMMITTED` each statement sees what was committed before it began, so of two
//!   last `DONE`s committed together on two replicas, the later one's question sees the other's
//!   `DONE`; whichever gets the lock first draws, the other finds `drawn`. A replica that dies
//!   between a `DONE` and the draw has not answered it: its agency asks again, and every
//!   replica's watcher also draws a round whose agencies are all done.
//! - **`WINNERS`** waits on a local `Condvar`. A thread per replica (the watcher) `LISTEN`s on
//!   `lottery_drawn`, which the draw `NOTIFY`s at its commit, and also reads the round every
//!   second, so that a notification lost with a broken connection cannot strand a waiter.
//! - **`STATUS`** answers the figures the watcher read last (at most about a second old), never
//!   the database itself: the door answers a stranger's `STATUS` on its own thread, and must not
//!   wait on a database that may be down.
//! - **No reply names the database**: a failure is `ERR STORAGE the database is unavailable; try
//!   again later`, and the log line says which database and why.
//! - **At start-up** the server checks that its role holds every privilege it needs and can run
//!   every statement it will (in a transaction rolled back), and says which is missing.

mod columns;
mod error;
mod export;
mod pool;
mod privileges;
mod watch;

pub(crate) use error::OpenError;
pub(crate) use export::export;

use std::io;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{error, info};
use postgres::types::Type;
use postgres::{Client, Config, NoTls, SimpleQueryMessage};
use r2d2::{Pool, PooledConnection};

use crate::ledger::{self, AgencyNow, Appended, Ledger, Rows, shutting_down};
use crate::wire::bet::WINNING_NUMBER;
use crate::wire::protocol::{self, ErrorCode, ProtocolError, Status};

/// The schema, created or migrated at start-up if any of its relations is missing.
const SCHEMA: &str = include_str!("schema.sql");

/// Every relation [`SCHEMA`] creates: when all are there, a role without `CREATE` (tables made
/// by an administrator) may serve the round.
const RELATIONS: [&str; 4] = ["lottery_round", "lottery_agency", "lottery_bet", "lottery_agency_not_done"];

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

/// Whether every agency is done: one probe of the partial index on the agencies not done.
const ALL_DONE: &str = "SELECT NOT EXISTS (SELECT 1 FROM lottery_agency WHERE NOT done)";

/// The figures of `STATUS`.
const FIGURES: &str = "SELECT count(*) FILTER (WHERE done), coalesce(sum(stored), 0)::bigint, \
                       (SELECT drawn FROM lottery_round WHERE id = 1) FROM lottery_agency";

/// Connections one replica keeps at most; a request finding none free waits for one.
const POOL_SIZE: u32 = 32;

/// How long a request waits for a connection before it is answered `ERR STORAGE`.
const POOL_WAIT: Duration = Duration::from_secs(10);

/// How long opening a connection may take, unless `SERVER_DATABASE_URL` says
/// (`connect_timeout`): an unreachable host is said at start-up, not after the system's minutes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What every reply says of a database failure: the client learns nothing of where it is.
const UNAVAILABLE: &str = "the database is unavailable; try again later";

use crate::sync::lock_unpoisoned;
use pool::Manager;

/// Every agency's `WINNERS` reply line, encoded once when the winners are loaded.
type Replies = Arc<Vec<Arc<[u8]>>>;

/// What start-up found, for the log.
#[derive(Debug)]
pub(crate) struct Opened {
    pub bets: u64,
    pub agencies_done: u32,
    pub drawn: bool,
}

/// The round in a PostgreSQL database.
pub(crate) struct PgLedger {
    agencies: u32,
    /// `SERVER_MAX_BETS_PER_AGENCY`.
    max_bets: u64,
    pool: Pool<Manager>,
    shared: Arc<ReplicaState>,
    watcher: Mutex<Option<JoinHandle<()>>>,
    /// `host:port/database`, for the log: never the password, never in a reply.
    place: String,
}

/// What this replica's connections share with its watcher.
struct ReplicaState {
    agencies: u32,
    state: Mutex<Watch>,
    drawn: Condvar,
    stopping: AtomicBool,
    /// The figures of `STATUS` as the watcher last read them.
    agencies_done: AtomicU32,
    bets: AtomicU64,
    /// Set with the winners, so that `STATUS` says `drawn=true` as soon as a waiter could know.
    is_drawn: AtomicBool,
}

#[derive(Default)]
struct Watch {
    /// Every agency's `WINNERS` line (index 0 is agency 1), once the draw is made.
    winners: Option<Replies>,
    shutting_down: bool,
}

impl ReplicaState {
    /// Makes the winners known to this replica's waiters, and wakes them.
    fn publish(&self, winners: Replies) {
        lock_unpoisoned(&self.state).winners.get_or_insert(winners);
        self.is_drawn.store(true, Ordering::Relaxed);
        self.drawn.notify_all();
    }

    /// This replica made the draw: it says so, and makes it known.
    fn drew(&self, (winners, figures): (Replies, Status)) {
        info!("action: sorteo | result: success");
        self.set_figures(&figures);
        self.publish(winners);
    }

    fn is_drawn(&self) -> bool {
        self.is_drawn.load(Ordering::Relaxed)
    }

    /// Keeps the figures the database holds, for `STATUS`.
    fn set_figures(&self, status: &Status) {
        self.agencies_done.store(status.agencies_done, Ordering::Relaxed);
        self.bets.store(status.bets, Ordering::Relaxed);
    }

    fn figures(&self) -> Status {
        Status {
            agencies_done: self.agencies_done.load(Ordering::Relaxed),
            agencies: self.agencies,
            bets: self.bets.load(Ordering::Relaxed),
            drawn: self.is_drawn(),
        }
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
fn parse_url(url: &str) -> Result<Config, OpenError> {
    let mut config = Config::from_str(url).map_err(|e| OpenError::BadUrl(error::detail(&e)))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    Ok(config)
}

/// Connects for start-up, saying which failure it met if it could not.
fn connect(config: &Config, place: &str) -> Result<Client, OpenError> {
    config.connect(NoTls).map_err(|e| error::classify(&e, place, config.get_user().unwrap_or("(none)")))
}

impl PgLedger {
    /// Connects to the database at `url`, creates or migrates the schema, checks that the role
    /// may do all the server will do, and opens (or goes on with) the round of `agencies`
    /// agencies it holds.
    ///
    /// # Errors
    /// The database cannot be reached, the role lacks a privilege, or the database holds a
    /// round of another number of agencies: each said in one line with what to do.
    pub(crate) fn open(url: &str, agencies: u32, max_bets: u64) -> Result<(PgLedger, Opened), OpenError> {
        let config = parse_url(url)?;
        let place = place(&config);
        let mut client = connect(&config, &place)?;
        let other = |e: postgres::Error| error::classify(&e, &place, "");
        privileges::migrate(&mut client, agencies, &place)?;
        privileges::dry_run(&mut client, &place)?;
        let pool = Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(0))
            .test_on_check_out(false)
            .connection_timeout(POOL_WAIT)
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(Manager { config: config.clone() });
        let shared = Arc::new(ReplicaState {
            agencies,
            state: Mutex::default(),
            drawn: Condvar::new(),
            stopping: AtomicBool::new(false),
            agencies_done: AtomicU32::new(0),
            bets: AtomicU64::new(0),
            is_drawn: AtomicBool::new(false),
        });
        let status = read_figures(&mut client, agencies).map_err(other)?;
        shared.set_figures(&status);
        if status.drawn {
            shared.publish(load_winners(&mut client).map_err(other)?);
        }
        let watcher = watch::spawn(config, Arc::clone(&shared)).map_err(OpenError::Thread)?;
        let ledger = PgLedger { agencies, max_bets, pool, shared, watcher: Mutex::new(Some(watcher)), place };
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
        self.pool.get().map_err(|e| self.unavailable(&e.to_string()))
    }

    /// `ERR STORAGE` for a database error: the log says which database and why, the reply
    /// neither.
    fn storage(&self, e: &postgres::Error) -> ProtocolError {
        self.unavailable(&error::detail(e))
    }

    fn unavailable(&self, why: &str) -> ProtocolError {
        let why = format!("database {}: {why}", self.place);
        error!("action: database | result: fail | error: {}", crate::logging::field(&why));
        ProtocolError::new(ErrorCode::Storage, UNAVAILABLE)
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
        Ok(self.refusal(agency, offset.map(|o| o as u64), count as u64, (held as u64, done, drawn)))
    }

    /// Which refusal, if any, the batch statement applied, from what it found: the statement
    /// stored the rows exactly when none applies, and then the agency holds what this returns.
    fn refusal(
        &self,
        agency: i32,
        offset: Option<u64>,
        count: u64,
        (held, done, drawn): (u64, bool, bool),
    ) -> Result<u64, ProtocolError> {
        let now = AgencyNow { agency: agency as u32, held, done, drawn, max_bets: self.max_bets };
        let already = ledger::admit_batch(&now, offset, count)?;
        Ok(held + (count - already))
    }
}

/// Marks `agency` done, durable at its commit (which holds only that agency's row lock), and
/// says whether every agency is now done. One round trip.
fn mark_done(client: &mut Client, agency: i32) -> Result<bool, postgres::Error> {
    let messages = in_transaction(client, |client| {
        client.simple_query(&format!(
            "BEGIN; SET LOCAL synchronous_commit = on; \
             UPDATE lottery_agency SET done = true WHERE agency = {agency}; COMMIT; {ALL_DONE}"
        ))
    })?;
    Ok(messages.iter().any(|m| matches!(m, SimpleQueryMessage::Row(row) if row.get(0) == Some("t"))))
}

/// Makes the draw if every agency is done and no replica has made it: the winners and the
/// round's final figures if this call made it.
fn draw(client: &mut Client, agencies: u32) -> Result<Option<(Replies, Status)>, postgres::Error> {
    let mut tx = client.transaction()?;
    // Durable at its commit, by itself: the draw is in it.
    tx.batch_execute("SET LOCAL synchronous_commit = on")?;
    // The round's row lock: one draw at a time from here to its commit, on every replica.
    let drawn: bool = tx.query_typed_one("SELECT drawn FROM lottery_round WHERE id = 1 FOR UPDATE", &[])?.get(0);
    // A new statement, so a new snapshot: it sees every DONE committed before the lock.
    let all_done: bool = tx.query_typed_one(ALL_DONE, &[])?.get(0);
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
    let figures = read_figures(&mut tx, agencies)?;
    tx.commit()?;
    Ok(Some((winners, figures)))
}

/// Runs `run`, which opens a transaction block with `BEGIN` in a multi-statement query: if it
/// fails midway the block would stay open and aborted, and the pooled connection useless.
fn in_transaction<T>(
    client: &mut Client,
    run: impl FnOnce(&mut Client) -> Result<T, postgres::Error>,
) -> Result<T, postgres::Error> {
    run(client).inspect_err(|_| {
        let _ = client.batch_execute("ROLLBACK");
    })
}

/// The figures of `STATUS`, as the database holds them now.
fn read_figures(client: &mut impl postgres::GenericClient, agencies: u32) -> Result<Status, postgres::Error> {
    let row = client.query_typed_one(FIGURES, &[])?;
    Ok(Status {
        agencies_done: row.get::<_, i64>(0) as u32,
        agencies,
        bets: row.get::<_, i64>(1) as u64,
        drawn: row.get(2),
    })
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
        if self.shared.is_drawn() {
            // Every agency said DONE before the draw.
            return Ok(());
        }
        let mut conn = self.client()?;
        if !mark_done(&mut conn.client, agency).map_err(|e| self.storage(&e))? {
            return Ok(());
        }
        if let Some(drawn) = draw(&mut conn.client, self.agencies).map_err(|e| self.storage(&e))? {
            self.shared.drew(drawn);
        }
        Ok(())
    }

    fn winners(&self, agency: u32, wait: Duration, hung_up: &AtomicBool) -> Result<Option<Arc<[u8]>>, ProtocolError> {
        let i = self.key(agency)? as usize - 1;
        let st = lock_unpoisoned(&self.shared.state);
        let waiting = |s: &mut Watch| s.winners.is_none() && !s.shutting_down && !hung_up.load(Ordering::SeqCst);
        let (st, _) = self.shared.drawn.wait_timeout_while(st, wait, waiting).unwrap_or_else(PoisonError::into_inner);
        match &st.winners {
            Some(winners) => Ok(Some(Arc::clone(&winners[i]))),
            None if st.shutting_down => Err(shutting_down()),
            None => Ok(None),
        }
    }

    /// The figures the watcher read last: at most about a second old, and never a wait.
    fn status(&self) -> Result<Status, ProtocolError> {
        Ok(self.shared.figures())
    }

    /// Takes the lock, so that a waiter between looking at its flag and waiting cannot miss it.
    fn wake_waiters(&self) {
        let _st = lock_unpoisoned(&self.shared.state);
        self.shared.drawn.notify_all();
    }

    fn begin_shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        lock_unpoisoned(&self.shared.state).shutting_down = true;
        self.shared.drawn.notify_all();
    }

    fn is_shutting_down(&self) -> bool {
        self.shared.stopping()
    }

    /// Every acknowledged batch was committed already; this stops the watcher.
    fn close(&self) -> io::Result<()> {
        self.begin_shutdown();
        if let Some(watcher) = lock_unpoisoned(&self.watcher).take() {
            watcher.join().map_err(|_| io::Error::other("the thread watching the round panicked"))?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("database: {}", self.place)
    }
}

/// Returns once every transaction committed before it is on disk. A commit waits for the WAL
/// to be flushed up to its own record only if it wrote to the WAL: a transactional logical
/// message is the smallest such write, and touches no row another session could be holding.
fn flush(client: &mut Client) -> Result<(), postgres::Error> {
    in_transaction(client, |client| {
        client.batch_execute(
            "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_logical_emit_message(true, 'lottery', 'durable'); COMMIT",
        )
    })
}

/// Every agency's winners, as the draw stored them.
fn load_winners(client: &mut impl postgres::GenericClient) -> Result<Replies, postgres::Error> {
    let rows = client.query_typed("SELECT winners FROM lottery_agency ORDER BY agency", &[])?;
    Ok(Arc::new(rows.iter().map(|row| Arc::from(protocol::winners_line(row.get(0)))).collect()))
}
