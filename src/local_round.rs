//! `lottery-round`: a whole round on one machine. The server and N agencies run in this process
//! over loopback TCP, on `.data/` if it holds the agency files, else on a generated data set;
//! it prints the winners per agency and the throughput.

use std::fs;
use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use log::LevelFilter;

use crate::agency::{self, Outcome, Stop};
use crate::config::{AgencySettings, Settings};
use crate::dataset;
use crate::logging;
use crate::round::{Round, RoundConfig, SyncMode};
use crate::server::{self, Limits, ShutdownHandle};

const HELP: &str = "\
lottery-round: a whole lottery round on this machine: the server and N agencies over loopback TCP.
Uses .data/agency-{1..N}.csv if they are all there, else a generated data set. Prints the bets
and winners of each agency, then the wall time and bets per second.

Usage: lottery-round [OPTIONS]

Options:
  --agencies N          agencies in the round (default 5)
  --bets-per-agency M   bets per agency in a generated data set (default 20000)
  --batch B             most bets per batch (default: CLI_BATCH_MAXAMOUNT, 100)
  --data DIR            read agency-{1..N}.csv from DIR (default .data, if complete)
  --generate DIR        only write a generated data set (N files of M bets) into DIR and exit
  --seed S              seed of the generated data set (default 75740)
  --keep DIR            keep bets.csv (and its round file) in DIR instead of a temporary one
  --verbose             print the server's and agencies' log lines
  -h, --help            this text

Settings (SERVER_SYNC, SERVER_GROUP_COMMIT, ...) come from config.ini and the environment.";

/// The options of `lottery-round`.
#[derive(Debug, Clone)]
pub struct Options {
    pub agencies: u32,
    pub bets_per_agency: u64,
    pub batch: Option<usize>,
    pub data: Option<PathBuf>,
    pub generate: Option<PathBuf>,
    pub seed: u64,
    pub keep: Option<PathBuf>,
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            agencies: 5,
            bets_per_agency: 20_000,
            batch: None,
            data: None,
            generate: None,
            seed: 75_740,
            keep: None,
            verbose: false,
        }
    }
}

/// Parses the command line; `Ok(None)` after `--help`.
///
/// # Errors
/// An unknown flag or a value that does not parse, said for a person.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Options>, String> {
    use lexopt::prelude::*;
    let mut opts = Options::default();
    let mut parser = lexopt::Parser::from_args(args);
    let wrap = |e: lexopt::Error| e.to_string();
    while let Some(arg) = parser.next().map_err(wrap)? {
        match arg {
            Long("agencies") => opts.agencies = parser.value().map_err(wrap)?.parse().map_err(wrap)?,
            Long("bets-per-agency") => opts.bets_per_agency = parser.value().map_err(wrap)?.parse().map_err(wrap)?,
            Long("batch") => opts.batch = Some(parser.value().map_err(wrap)?.parse().map_err(wrap)?),
            Long("data") => opts.data = Some(parser.value().map_err(wrap)?.into()),
            Long("generate") => opts.generate = Some(parser.value().map_err(wrap)?.into()),
            Long("seed") => opts.seed = parser.value().map_err(wrap)?.parse().map_err(wrap)?,
            Long("keep") => opts.keep = Some(parser.value().map_err(wrap)?.into()),
            Long("verbose") => opts.verbose = true,
            Short('h') | Long("help") => return Ok(None),
            other => return Err(other.unexpected().to_string()),
        }
    }
    if opts.agencies == 0 {
        return Err("--agencies must be at least 1".into());
    }
    Ok(Some(opts))
}

/// `lottery-round`'s main.
pub fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("lottery-round: {e}; see lottery-round --help");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("lottery-round: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the round (or only generates data); `Ok(false)` if an agency failed.
///
/// # Errors
/// Set-up failed: settings, data, the work directory, the server's files or socket.
pub fn run(opts: &Options) -> Result<bool, String> {
    if let Some(dir) = &opts.generate {
        let files = dataset::generate(dir, opts.agencies, opts.bets_per_agency, opts.seed)
            .map_err(|e| format!("cannot write {}: {e}", dir.display()))?;
        println!("wrote {} files of {} bets into {}", files.len(), opts.bets_per_agency, dir.display());
        return Ok(true);
    }
    let settings = Settings::from_process().map_err(|e| e.to_string())?;
    let server_settings = settings.server().map_err(|e| e.to_string())?;
    logging::init(if opts.verbose { LevelFilter::Info } else { LevelFilter::Warn });

    let scratch = tempfile_dir()?;
    let data = data_dir(opts, scratch.path())?;
    let work = match &opts.keep {
        Some(dir) => {
            fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let bets = dir.join("bets.csv");
            if bets.exists() {
                return Err(format!("{} exists: remove it, or choose another --keep directory", bets.display()));
            }
            dir.clone()
        }
        None => scratch.path().to_owned(),
    };
    let files: Vec<PathBuf> = (1..=opts.agencies).map(|id| dataset::agency_file(&data, id)).collect();
    let total = files.iter().map(|f| count_lines(f)).sum::<io::Result<u64>>().map_err(|e| e.to_string())?;
    println!("round: {} agencies, {total} bets from {}, bets.csv in {}", opts.agencies, data.display(), work.display(),);

    let config = RoundConfig {
        agencies: opts.agencies,
        storage_path: work.join("bets.csv"),
        sync: server_settings.sync,
        group_commit: server_settings.group_commit,
    };
    let (round, _) = Round::open(config).map_err(|e| e.to_string())?;
    let round = Arc::new(round);
    let listener = server::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), 1024).map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let shutdown = ShutdownHandle::new(&listener).map_err(|e| e.to_string())?;
    let limits = Limits {
        max_connections: server_settings.max_connections.max(opts.agencies as usize + 16),
        idle_timeout: server_settings.idle_timeout,
    };
    let stop = Stop::default();
    {
        let (shutdown, stop) = (shutdown.clone(), stop.clone());
        let _ = ctrlc::set_handler(move || {
            stop.trigger();
            shutdown.trigger();
        });
    }
    let started = Instant::now();
    let server = {
        let (round, shutdown) = (Arc::clone(&round), shutdown.clone());
        thread::Builder::new()
            .name("server".into())
            .spawn(move || server::run(listener, round, limits, &shutdown))
            .map_err(|e| format!("cannot start the server thread: {e}"))?
    };
    let progress = Progress::start(Arc::clone(&round), total);
    let batch_max = match opts.batch {
        Some(b) => b,
        None => settings.batch_max().map_err(|e| e.to_string())?,
    };
    let agencies: Vec<_> = files
        .iter()
        .zip(1..)
        .map(|(file, id)| {
            let settings = AgencySettings {
                id,
                server_address: addr.to_string(),
                batch_max,
                data_path: file.clone(),
                retry_timeout: Duration::from_secs(30),
                log_level: LevelFilter::Info,
                extra_bet: None,
            };
            let stop = stop.clone();
            thread::Builder::new()
                .name(format!("agency-{id}"))
                .stack_size(256 * 1024)
                .spawn(move || agency::run(&settings, &stop))
        })
        .collect();
    let outcomes: Vec<Result<Outcome, String>> = agencies
        .into_iter()
        .map(|spawned| match spawned {
            Ok(handle) => match handle.join() {
                Ok(outcome) => outcome.map_err(|e| e.to_string()),
                Err(_) => Err("the agency thread panicked".into()),
            },
            Err(e) => Err(format!("cannot start the agency thread: {e}")),
        })
        .collect();
    let elapsed = started.elapsed();
    progress.finish();
    shutdown.trigger();
    match server.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("server: {e}")),
        Err(_) => return Err("the server thread panicked".into()),
    }
    let expected = files.iter().map(|f| count_winners(f)).collect::<io::Result<Vec<_>>>().map_err(|e| e.to_string())?;
    Ok(report(&outcomes, &expected, total, elapsed, server_settings.sync))
}

/// Prints the table and the throughput; true if every agency got exactly its expected winners.
fn report(
    outcomes: &[Result<Outcome, String>],
    expected: &[u64],
    total: u64,
    elapsed: Duration,
    sync: SyncMode,
) -> bool {
    println!("{:>7} {:>10} {:>8} {:>9}", "agency", "bets", "winners", "expected");
    let mut ok = true;
    for (id, (outcome, want)) in outcomes.iter().zip(expected).enumerate() {
        match outcome {
            Ok(o) => {
                let mark = if o.winners.len() as u64 == *want { "" } else { "  MISMATCH" };
                ok &= mark.is_empty();
                println!("{:>7} {:>10} {:>8} {:>9}{mark}", id + 1, o.stored, o.winners.len(), want);
            }
            Err(e) => {
                ok = false;
                println!("{:>7} failed: {e}", id + 1);
            }
        }
    }
    let winners: usize = outcomes.iter().flatten().map(|o| o.winners.len()).sum();
    println!("{:>7} {:>10} {:>8} {:>9}", "total", total, winners, expected.iter().sum::<u64>());
    let secs = elapsed.as_secs_f64();
    let rate = total as f64 / secs.max(1e-9);
    println!(
        "wall time {secs:.3} s, {rate:.0} bets/s (SERVER_SYNC={})",
        if sync == SyncMode::Always { "always" } else { "never" }
    );
    ok
}

/// Prints the round's progress to stderr once a second while it runs.
struct Progress {
    done: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Progress {
    fn start(round: Arc<Round>, total: u64) -> Progress {
        let done = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&done);
        let started = Instant::now();
        let thread = thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                loop {
                    thread::park_timeout(Duration::from_secs(1));
                    if flag.load(Ordering::SeqCst) {
                        return;
                    }
                    let status = round.status();
                    let rate = status.bets as f64 / started.elapsed().as_secs_f64();
                    let pct = 100.0 * status.bets as f64 / total.max(1) as f64;
                    eprintln!(
                        "progress: {}/{total} bets ({pct:.0}%), {rate:.0} bets/s, agencies done {}/{}",
                        status.bets, status.agencies_done, status.agencies
                    );
                }
            })
            .ok();
        Progress { done, thread }
    }

    fn finish(mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// The directory of the agency files: `--data`, else `.data` if complete, else generated.
fn data_dir(opts: &Options, scratch: &Path) -> Result<PathBuf, String> {
    let complete = |dir: &Path| (1..=opts.agencies).all(|id| dataset::agency_file(dir, id).is_file());
    match &opts.data {
        Some(dir) if complete(dir) => Ok(dir.clone()),
        Some(dir) => Err(format!("{} lacks some of agency-1.csv … agency-{}.csv", dir.display(), opts.agencies)),
        None if complete(Path::new(".data")) => Ok(PathBuf::from(".data")),
        None => {
            let dir = scratch.join("data");
            dataset::generate(&dir, opts.agencies, opts.bets_per_agency, opts.seed)
                .map_err(|e| format!("cannot generate data in {}: {e}", dir.display()))?;
            Ok(dir)
        }
    }
}

fn tempfile_dir() -> Result<tempfile::TempDir, String> {
    tempfile::Builder::new()
        .prefix("lottery-round-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))
}

/// Lines in a file: the bets an agency will send.
fn count_lines(path: &Path) -> io::Result<u64> {
    let mut reader = BufReader::with_capacity(1 << 20, fs::File::open(path)?);
    let mut lines = 0;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(lines);
        }
        lines += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        let n = buf.len();
        reader.consume(n);
    }
}

/// Winning bets in an agency file: rows whose number is 7574.
fn count_winners(path: &Path) -> io::Result<u64> {
    let reader = BufReader::with_capacity(1 << 20, fs::File::open(path)?);
    let mut winners = 0;
    for line in reader.split(b'\n') {
        let line = line?;
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        winners += u64::from(line.ends_with(b",7574"));
    }
    Ok(winners)
}
