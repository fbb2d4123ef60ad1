//! The watcher: the thread that keeps this replica's view of the round.
//!
//! It holds a connection of its own that `LISTEN`s on the draw's channel, and reads the round's
//! figures at every notification and every [`RECHECK`]: they are what `STATUS` answers (so
//! `STATUS` never waits on the database, and is at most about a second old), and a notification
//! lost (the connection broke, the replica started listening after the draw) cannot leave a
//! `WINNERS` waiting forever. A round whose agencies are all done and that nobody drew (the
//! replica of the last `DONE` died before drawing) it draws. It ends once the draw is known and
//! its figures read, or at shutdown. While the database is down, `STATUS` says the last
//! figures read.

use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::warn;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Config, NoTls};

use super::error::detail;
use super::{CHANNEL, ReplicaState, draw, load_winners, read_figures};
use crate::logging::field;

/// How often the round is read even without a notification.
const RECHECK: Duration = Duration::from_secs(1);

/// How long one wait for a notification lasts, so that shutdown is seen quickly.
const SLICE: Duration = Duration::from_millis(100);

/// The longest a connection attempt may keep shutdown waiting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) fn spawn(mut config: Config, shared: Arc<ReplicaState>) -> io::Result<JoinHandle<()>> {
    if config.get_connect_timeout().is_none_or(|&t| t > CONNECT_TIMEOUT) {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    thread::Builder::new().name("round-watch".into()).spawn(move || run(&config, &shared))
}

fn run(config: &Config, shared: &ReplicaState) {
    let mut failing = false;
    while !shared.stopping() {
        let result = config.connect(NoTls).and_then(|mut client| {
            client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
            failing = false;
            listen(&mut client, shared)
        });
        match result {
            Ok(()) => return,
            Err(e) => {
                // Said once per outage, not once per attempt.
                if !failing {
                    warn!("action: watch_round | result: in_progress | error: {}", field(&detail(&e)));
                }
                failing = true;
                pause(shared, RECHECK);
            }
        }
    }
}

/// Reads the round now and every [`RECHECK`] or notification after, until the draw is known and
/// the figures final, or shutdown.
fn listen(client: &mut Client, shared: &ReplicaState) -> Result<(), postgres::Error> {
    let mut next_check = Instant::now();
    while !shared.stopping() {
        if Instant::now() >= next_check {
            if check(client, shared)? {
                return Ok(());
            }
            next_check = Instant::now() + RECHECK;
        }
        if client.notifications().timeout_iter(SLICE).next()?.is_some() {
            next_check = Instant::now();
        }
    }
    Ok(())
}

/// Reads the figures, and the winners once drawn (drawing a round left undrawn): whether the
/// round is over and its figures final.
fn check(client: &mut Client, shared: &ReplicaState) -> Result<bool, postgres::Error> {
    let status = read_figures(client, shared.agencies)?;
    shared.set_figures(&status);
    if !status.drawn && status.agencies_done == shared.agencies {
        if let Some(drawn) = draw(client, shared.agencies)? {
            shared.drew(drawn);
        }
        // Its figures are read again, drawn, at once.
        return Ok(false);
    }
    if status.drawn && !shared.is_drawn() {
        shared.publish(load_winners(client)?);
    }
    Ok(status.drawn)
}

/// Sleeps for `time` in short steps, returning early at shutdown.
fn pause(shared: &ReplicaState, time: Duration) {
    let until = Instant::now() + time;
    while !shared.stopping() && Instant::now() < until {
        thread::sleep(SLICE);
    }
}
