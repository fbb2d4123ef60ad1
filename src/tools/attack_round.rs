//! `lottery-round --attack`: a round without attackers, then, for each kind, a round of the same
//! agencies and data beside N attackers of that kind, each on a server of its own (same keys,
//! fresh `bets.csv`). It prints each round's time against the first, whether every agency got
//! exactly its winners, what the attackers were answered, and how much log they made the server
//! write (bytes a second at `INFO`, beyond what the unattacked round logs).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use crate::agency::{Outcome, Stop};
use crate::config::ServerSettings;
use crate::logging;
use crate::output;
use crate::tools::attacks::{Attack, Report, Sources};
use crate::tools::botnet::{Botnet, Orders};
use crate::tools::crowd::run_agencies;
use crate::tools::local_server::{LocalServer, RoundCredentials};
use crate::tools::report::count_winners;
use crate::tools::round_options::Options;

/// How long the attackers run before the agencies start, so that they meet a server already
/// under attack rather than race it.
const HEAD_START: Duration = Duration::from_millis(500);

/// One invocation's rounds.
pub(crate) struct Suite<'a> {
    pub opts: &'a Options,
    pub settings: &'a ServerSettings,
    pub batch_max: usize,
    pub files: &'a [PathBuf],
    pub total: u64,
}

/// What one round gave.
struct Row {
    attack: Option<Attack>,
    elapsed: Duration,
    failed: Vec<String>,
    /// Times the agencies had to connect again, all together.
    reconnects: u32,
    /// Bytes the server logged (at `INFO`), from the attackers' start to the round's end, and
    /// how long that was.
    logged: (u64, Duration),
    report: Option<Report>,
}

impl Suite<'_> {
    /// Runs the rounds and prints the table.
    ///
    /// # Errors
    /// A round could not be set up, or an agency failed or got the wrong winners in any round.
    pub(crate) fn run(&self, credentials: &RoundCredentials, scratch: &Path) -> Result<(), String> {
        let expected: Vec<u64> =
            self.files.iter().map(|f| count_winners(f)).collect::<io::Result<_>>().map_err(|e| e.to_string())?;
        let sources = match self.opts.attack_from {
            Sources::Spread => "each from an address of its own (127.1.0.0/16)",
            Sources::Same => "all from 127.0.0.1, the agencies' own address",
        };
        output::line(format_args!(
            "attack rounds: {} agencies, {} bets; {} attackers of each kind, {sources}; TLS + agency tokens",
            self.opts.agencies, self.total, self.opts.attackers
        ));
        let attacks = std::iter::once(None).chain(self.opts.attacks.iter().copied().map(Some));
        let rows =
            attacks.map(|attack| self.round(attack, credentials, scratch, &expected)).collect::<Result<Vec<_>, _>>()?;
        print_rows(&rows);
        let failed: Vec<String> = rows
            .iter()
            .flat_map(|r| r.failed.iter().map(move |f| format!("{}: {f}", r.attack.map_or("none", Attack::name))))
            .collect();
        if failed.is_empty() { Ok(()) } else { Err(format!("the round failed under attack: {}", failed.join("; "))) }
    }

    /// One round beside `attack`'s attackers (none: the round to compare with).
    fn round(
        &self,
        attack: Option<Attack>,
        credentials: &RoundCredentials,
        scratch: &Path,
        expected: &[u64],
    ) -> Result<Row, String> {
        let first = credentials.agencies.first().ok_or("no agencies")?;
        let dir = scratch.join(format!("round-{}", attack.map_or("none", Attack::name)));
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let server = LocalServer::start(self.opts, self.settings, &dir, credentials.security.clone())?;
        let attackers = match attack {
            Some(kind) => Some(Botnet::launch(&Orders {
                kind,
                count: self.opts.attackers,
                // The `metrics` attackers go for the operator's port, the others for the agencies'.
                addr: if kind == Attack::Metrics { server.page().unwrap_or(server.addr) } else { server.addr },
                ca: first.tls_ca.as_deref(),
                agencies: self.opts.agencies,
                refresh_every: self.settings.hello_timeout.min(self.settings.idle_timeout).mul_f64(0.9),
                sources: self.opts.attack_from,
            })?),
            None => None,
        };
        let (log_start, log_bytes) = (Instant::now(), logging::SERVER_LOG_BYTES.load(Ordering::Relaxed));
        if attackers.is_some() {
            thread::sleep(HEAD_START);
        }
        let stops: Vec<Stop> = self.files.iter().map(|_| Stop::default()).collect();
        let started = Instant::now();
        let outcomes = run_agencies(self.files, server.addr, self.batch_max, &credentials.agencies, &stops);
        let elapsed = started.elapsed();
        let logged = (logging::SERVER_LOG_BYTES.load(Ordering::Relaxed) - log_bytes, log_start.elapsed());
        let report = attackers.map(Botnet::stop);
        server.stop()?;
        let failed = failures(&outcomes, expected);
        let reconnects = outcomes.iter().flatten().map(|o| o.reconnects).sum();
        Ok(Row { attack, elapsed, failed, reconnects, logged, report })
    }
}

/// What went wrong for each agency that failed or got the wrong number of winners.
fn failures(outcomes: &[Result<Outcome, String>], expected: &[u64]) -> Vec<String> {
    outcomes
        .iter()
        .zip(expected)
        .enumerate()
        .filter_map(|(i, (outcome, want))| match outcome {
            Ok(o) if o.winners.len() as u64 == *want => None,
            Ok(o) => Some(format!("agency {}: {} winners, not {want}", i + 1, o.winners.len())),
            Err(e) => Some(format!("agency {}: {e}", i + 1)),
        })
        .collect()
}

fn print_rows(rows: &[Row]) {
    let base = rows.first().map_or(1.0, |r| r.elapsed.as_secs_f64()).max(1e-9);
    output::line(format_args!(
        "{:>14} {:>9} {:>9} {:>8} {:>10} {:>9} {:>9}  attackers got",
        "attack", "round s", "vs none", "agencies", "reconnects", "log KB/s", "connects"
    ));
    // What the unattacked round logs (its agencies' lines) is not the attackers' doing.
    let base_logged = rows.first().map_or(0, |r| r.logged.0);
    for row in rows {
        let secs = row.elapsed.as_secs_f64();
        let attackers_log = match row.attack {
            Some(_) => format!(
                "{:.1}",
                row.logged.0.saturating_sub(base_logged) as f64 / 1000.0 / row.logged.1.as_secs_f64().max(1e-3)
            ),
            None => "-".to_owned(),
        };
        let agencies = if row.failed.is_empty() { "exact" } else { "FAILED" };
        let (connects, got) = match &row.report {
            Some(r) => (r.connections.to_string(), r.replies_text()),
            None => ("-".to_owned(), "-".to_owned()),
        };
        output::line(format_args!(
            "{:>14} {secs:>9.3} {:>8.2}x {agencies:>8} {:>10} {attackers_log:>9} {connects:>9}  {got}",
            row.attack.map_or("none", Attack::name),
            secs / base,
            row.reconnects,
        ));
    }
    if let Some(hwm) = peak_rss_kib() {
        output::line(format_args!(
            "peak RSS of this process (the server and the agencies; the attackers have a process of their own): {:.1} MB",
            hwm as f64 / 1024.0
        ));
    }
}

/// `VmHWM` of this process, in KiB (Linux).
fn peak_rss_kib() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
