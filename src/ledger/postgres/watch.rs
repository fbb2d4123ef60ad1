//! The thread that tells this replica's waiters when any replica has made the draw.
//!
//! It holds a connection of its own that `LISTEN`s on the draw's channel, and it also reads the
//! round every [`RECHECK`], so that a notification lost (the connection broke, the replica
//! started listening after the draw) cannot leave a `WINNERS` waiting forever. It ends once the
//! draw is known, or at shutdown.

use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::warn;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Config, NoTls};

use super::{CHANNEL, Shared, load_winners};
use crate::logging::field;

/// How often the round is read even without a notification.
const RECHECK: Duration = Duration::from_secs(1);

/// How long one wait for a notification lasts, so that shutdown is seen quickly.
const SLICE: Duration = Duration::from_millis(100);

pub(super) fn spawn(config: Config, shared: Arc<Shared>) -> io::Result<JoinHandle<()>> {
    thread::Builder::new().name("draw-watch".into()).spawn(move || run(&config, &shared))
}

fn run(config: &Config, shared: &Shared) {
    let mut failing = false;
    while !shared.stopping() && !shared.is_drawn() {
        let result = config.connect(NoTls).and_then(|mut client| {
            client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
            failing = false;
            listen(&mut client, shared)
        });
        if let Err(e) = result {
            // Said once per outage, not once per attempt.
            if !failing {
                warn!("action: watch_draw | result: in_progress | error: {}", field(&e.to_string()));
            }
            failing = true;
            pause(shared, RECHECK);
        }
    }
}

/// Reads the round now and every [`RECHECK`] or notification after, until the draw is known.
fn listen(client: &mut Client, shared: &Shared) -> Result<(), postgres::Error> {
    let mut next_check = Instant::now();
    while !shared.stopping() {
        if Instant::now() >= next_check {
            let drawn: bool = client.query_one("SELECT drawn FROM lottery_round WHERE id = 1", &[])?.get(0);
            if drawn {
                shared.publish(load_winners(client)?);
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

/// Sleeps for `time` in short steps, returning early at shutdown.
fn pause(shared: &Shared, time: Duration) {
    let until = Instant::now() + time;
    while !shared.stopping() && Instant::now() < until {
        thread::sleep(SLICE);
    }
}
