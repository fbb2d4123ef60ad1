//! `lottery-round`: a whole round on one machine. The server and N agencies run in this process
//! over loopback TCP, on `.data/` if it holds the agency files, else on a generated data set;
//! it prints the winners per agency and the throughput.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use log::LevelFilter;

use crate::agency::{self, AgencyError, Outcome, Stop};
use crate::config::{self, AgencySettings, BATCH_MAX_WHAT, ServerSettings, Settings};
use crate::ledger::file::{FileConfig, FileLedger, SyncMode};
use crate::logging;
use crate::output;
use crate::server::auth::AgencyKeys;
use crate::server::{self, Limits, Security, ShutdownHandle, tls};
use crate::tools::attack_round;
use crate::tools::attacks::{Attack, Sources};
use crate::tools::botnet;
use crate::tools::dataset;
use crate::tools::hostile;
use crate::tools::keys;
use crate::tools::progress::{Progress, Sample};
use crate::tools::report::{STOPPED_BY, count_lines, count_winners, report, report_hostile};
use crate::wire::protocol::{Reply, Status};

const HELP: &str = "\
lottery-round: a whole lottery round on this machine: the server and N agencies over loopback TCP.
Uses .data/agency-{1..N}.csv if they are all there (and no --bets-per-agency or --seed is
given), else a generated data set. Prints the bets and winners of each agency, then, if the
round completed, the wall time and bets per second; a failed or interrupted round says what
failed on stderr and exits 1. Progress goes to stderr: a bar on a terminal, else a line a second.

Usage: lottery-round [OPTIONS]

Options:
  --agencies N          agencies in the round (default 5)
  --bets-per-agency M   bets per agency: generate a data set of this size, even if .data is
                        complete (default 20000, when there is no .data)
  --batch B             most bets per batch, 1..=431 (default: CLI_BATCH_MAXAMOUNT, 100)
  --data DIR            read agency-{1..N}.csv from DIR (default .data, if complete)
  --generate DIR        only write a generated data set (N files of M bets) into DIR and exit
  --seed S              generate the data set from this seed, even if .data is complete
                        (default 75740)
  --keep DIR            keep bets.csv (and its round file) in DIR instead of a temporary one
  --server ADDR         run only the agencies, against the lottery-server at ADDR (ip:port),
                        started with SERVER_AGENCIES=N; they retry for CLI_RETRY_TIMEOUT_MS
  --hostile K           also run K misbehaving clients of mixed kinds (idle, slowloris, oversized
                        lines, garbage, half batches, bad bets, out-of-range requests) and report
                        what they got; the round's own server then cuts idle clients after 1 s
  --attack KIND[,KIND…]|all
                        measure attacks: a round without, then a round beside N attackers of
                        each kind (impersonate, park, refresh, trickle, churn, flood, noread,
                        hangup-waiter, stall); prints each round's time against the first
  --attackers N         attacker connections of each kind (default 200)
  --attack-from spread|same
                        attackers from addresses of their own in 127.1.0.0/16, as a botnet
                        (default), or all from 127.0.0.1, the agencies' own address
  --plaintext           no TLS and no agency tokens (the server in protected mode), to measure
                        what they cost; by default the round makes throw-away keys in its
                        temporary directory and runs TLS + tokens
  --verbose             print the server's and agencies' log lines
  -h, --help            this text

Settings (SERVER_SYNC, SERVER_GROUP_COMMIT, CLI_BATCH_MAXAMOUNT, CLI_RETRY_TIMEOUT_MS, ...) come
from config.ini and the environment.";

/// Bets per agency in a generated data set, unless `--bets-per-agency` says otherwise.
const DEFAULT_BETS: u64 = 20_000;
/// The generated data set's seed, unless `--seed` says otherwise.
const DEFAULT_SEED: u64 = 75_740;

/// The options of `lottery-round`.
#[derive(Debug, Clone)]
pub struct Options {
    pub agencies: u32,
    /// Given: generate a data set of this size rather than use `.data`.
    pub bets_per_agency: Option<u64>,
    pub batch: Option<usize>,
    pub data: Option<PathBuf>,
    pub generate: Option<PathBuf>,
    /// Given: generate a data set from this seed rather than use `.data`.
    pub seed: Option<u64>,
    pub keep: Option<PathBuf>,
    /// Run the agencies against this server instead of one in this process.
    pub server: Option<SocketAddr>,
    /// Hostile clients to run beside the agencies.
    pub hostile: u32,
    /// Attacks to measure, each in a round of its own after one without.
    pub attacks: Vec<Attack>,
    /// Attacker connections of each kind.
    pub attackers: usize,
    pub attack_from: Sources,
    /// No TLS, no tokens.
    pub plaintext: bool,
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            agencies: 5,
            bets_per_agency: None,
            batch: None,
            data: None,
            generate: None,
            seed: None,
            keep: None,
            server: None,
            hostile: 0,
            attacks: Vec::new(),
            attackers: 200,
            attack_from: Sources::Spread,
            plaintext: false,
            verbose: false,
        }
    }
}

impl Options {
    /// Bets per agency in a generated data set.
    fn bets(&self) -> u64 {
        self.bets_per_agency.unwrap_or(DEFAULT_BETS)
    }

    /// The seed of a generated data set.
    fn seed(&self) -> u64 {
        self.seed.unwrap_or(DEFAULT_SEED)
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
            Long("bets-per-agency") => {
                opts.bets_per_agency = Some(parser.value().map_err(wrap)?.parse().map_err(wrap)?)
            }
            Long("batch") => {
                let value = parser.value().map_err(wrap)?.string().map_err(wrap)?;
                let batch = config::parse_batch_max(&value);
                opts.batch = Some(batch.ok_or_else(|| format!("--batch {value:?} is not {BATCH_MAX_WHAT}"))?);
            }
            Long("data") => opts.data = Some(parser.value().map_err(wrap)?.into()),
            Long("generate") => opts.generate = Some(parser.value().map_err(wrap)?.into()),
            Long("seed") => opts.seed = Some(parser.value().map_err(wrap)?.parse().map_err(wrap)?),
            Long("keep") => opts.keep = Some(parser.value().map_err(wrap)?.into()),
            Long("server") => opts.server = Some(parser.value().map_err(wrap)?.parse().map_err(wrap)?),
            Long("hostile") => opts.hostile = parser.value().map_err(wrap)?.parse().map_err(wrap)?,
            Long("attack") => {
                opts.attacks = Attack::parse_list(&parser.value().map_err(wrap)?.string().map_err(wrap)?)?
            }
            Long("attackers") => opts.attackers = parser.value().map_err(wrap)?.parse().map_err(wrap)?,
            Long("attack-from") => {
                opts.attack_from = match parser.value().map_err(wrap)?.string().map_err(wrap)?.as_str() {
                    "spread" => Sources::Spread,
                    "same" => Sources::Same,
                    other => return Err(format!("--attack-from {other:?} is not spread or same")),
                }
            }
            Long("plaintext") => opts.plaintext = true,
            Long("verbose") => opts.verbose = true,
            Short('h') | Long("help") => return Ok(None),
            other => return Err(other.unexpected().to_string()),
        }
    }
    if opts.agencies == 0 {
        return Err("--agencies must be at least 1".into());
    }
    if opts.data.is_some() && (opts.bets_per_agency.is_some() || opts.seed.is_some()) {
        return Err(
            "--bets-per-agency and --seed shape a generated data set; --data uses DIR's files as they are".into()
        );
    }
    if !opts.attacks.is_empty() && (opts.plaintext || opts.server.is_some() || opts.hostile > 0) {
        return Err("--attack runs rounds of its own, on TLS with agency tokens: not with --plaintext (every \
                    loopback client is trusted then), --server or --hostile"
            .into());
    }
    if opts.server.is_some() && opts.keep.is_some() {
        return Err("--keep names where the round's own server stores; with --server there is none".into());
    }
    Ok(Some(opts))
}

/// `lottery-round`'s main.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == botnet::WORKER) {
        return botnet::worker(&args[1..]);
    }
    let opts = match parse_args(args) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            output::line(format_args!("{HELP}"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            output::err_line(format_args!("lottery-round: {e}; see lottery-round --help"));
            return ExitCode::from(2);
        }
    };
    let result = run(&opts);
    match (result, output::closed()) {
        // The reader went away (`| head`): no error of ours, and nowhere to report the round.
        (_, Some(io::ErrorKind::BrokenPipe)) => ExitCode::SUCCESS,
        (_, Some(kind)) => {
            output::err_line(format_args!("lottery-round: cannot write to stdout: {}", io::Error::from(kind)));
            ExitCode::FAILURE
        }
        (Ok(()), None) => ExitCode::SUCCESS,
        (Err(e), None) => {
            output::err_line(format_args!("lottery-round: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// Runs the round (or only generates data).
///
/// # Errors
/// Set-up failed (settings, data, the work directory, the server's files or socket), an agency
/// failed or got the wrong winners, or the round was interrupted: said for a person.
pub fn run(opts: &Options) -> Result<(), String> {
    if let Some(dir) = &opts.generate {
        let files = generate(dir, opts)?;
        output::line(format_args!("wrote {} files of {} bets into {}", files.len(), opts.bets(), dir.display()));
        return Ok(());
    }
    let settings = Settings::from_process().map_err(|e| e.to_string())?;
    let server_settings = settings.server().map_err(|e| e.to_string())?;
    let batch_max = match opts.batch {
        Some(b) => b,
        None => settings.batch_max().map_err(|e| e.to_string())?,
    };
    // Under attack the server warns of every stranger it refuses (within its rate limit): the
    // table says what they got, so only errors are shown unless asked.
    let quiet = if opts.attacks.is_empty() { LevelFilter::Warn } else { LevelFilter::Error };
    logging::init(if opts.verbose { LevelFilter::Info } else { quiet });
    crate::app::raise_open_files_limit();

    let scratch = tempfile_dir()?;
    let data = data_dir(opts, scratch.path())?;
    let files: Vec<PathBuf> = (1..=opts.agencies).map(|id| dataset::agency_file(&data, id)).collect();
    let total = files.iter().map(|f| count_lines(f)).sum::<io::Result<u64>>().map_err(|e| e.to_string())?;
    let credentials = credentials(opts, &settings, scratch.path())?;
    if !opts.attacks.is_empty() {
        let round = attack_round::Suite { opts, settings: &server_settings, batch_max, files: &files, total };
        return round.run(&credentials, scratch.path());
    }
    let local = match &opts.server {
        Some(_) => None,
        None => {
            let dir = work_dir(opts, scratch.path())?;
            Some(LocalServer::start(opts, &server_settings, &dir, credentials.security.clone())?)
        }
    };
    let addr = match (&local, &opts.server) {
        (Some(server), _) => server.addr,
        (None, Some(addr)) => *addr,
        (None, None) => unreachable!("a local server is started when no --server is given"),
    };
    let sync = if server_settings.sync == SyncMode::Always { "always" } else { "never" };
    let (stops, interrupted) = stop_on_interrupt(files.len(), local.as_ref());
    output::line(format_args!(
        "round: {} agencies, {total} bets from {}, server {addr}",
        opts.agencies,
        data.display()
    ));
    if let Some(server) = &local {
        output::line(format_args!("bets.csv in {}, SERVER_SYNC={sync}", server.dir.display()));
    }
    output::line(format_args!("security: {}", credentials.said));
    let started = Instant::now();
    let progress = round_progress(addr, total, !opts.verbose);
    let hostile = run_hostile(opts, addr);
    let outcomes = run_agencies(&files, addr, batch_max, &credentials.agencies, &stops);
    let elapsed = started.elapsed();
    progress.finish();
    let hostile: Vec<hostile::Report> = hostile.and_then(|h| h.join().ok()).unwrap_or_default();
    if let Some(server) = local {
        server.stop()?;
    }
    if interrupted.load(Ordering::SeqCst) {
        let finished = outcomes.iter().filter(|o| o.is_ok()).count();
        return Err(format!("interrupted: {finished} of {} agencies had their winners", outcomes.len()));
    }
    let expected = files.iter().map(|f| count_winners(f)).collect::<io::Result<Vec<_>>>().map_err(|e| e.to_string())?;
    let verdict = report(&outcomes, &expected, total, elapsed);
    report_hostile(&hostile);
    verdict
}

/// A `Stop` per agency (one closes only the socket it last watched), triggered with the local
/// server's shutdown by Ctrl-C, SIGTERM, or a stdout nobody reads any more (`| head`); and
/// whether that happened.
fn stop_on_interrupt(agencies: usize, local: Option<&LocalServer>) -> (Vec<Stop>, Arc<AtomicBool>) {
    let stops: Vec<Stop> = (0..agencies).map(|_| Stop::default()).collect();
    let interrupted = Arc::new(AtomicBool::new(false));
    let (on_signal, shutdown, flag) = (stops.clone(), local.map(|s| s.shutdown.clone()), Arc::clone(&interrupted));
    let interrupt = move || {
        flag.store(true, Ordering::SeqCst);
        on_signal.iter().for_each(Stop::trigger);
        shutdown.iter().for_each(ShutdownHandle::trigger);
    };
    output::on_close(interrupt.clone());
    let _ = ctrlc::set_handler(interrupt);
    (stops, interrupted)
}

/// The agency the hostile clients speak for: in protected mode (`--plaintext`) loopback is
/// trusted, so they get one of their own, after the real ones, or they would take over a real
/// agency's session; over TLS they are refused at the door whatever agency they name.
fn hostile_agency(opts: &Options) -> Option<u32> {
    (opts.plaintext && opts.hostile > 0 && opts.server.is_none()).then_some(opts.agencies + 1)
}

/// Runs the hostile clients in a thread of their own; once they are all dealt with, says
/// `DONE` for their agency so that the draw can happen.
fn run_hostile(opts: &Options, addr: SocketAddr) -> Option<thread::JoinHandle<Vec<hostile::Report>>> {
    if opts.hostile == 0 {
        return None;
    }
    let (count, first_seed, agency) = (opts.hostile, opts.seed(), hostile_agency(opts));
    let run = move || {
        let clients: Vec<_> = (0..count)
            .map(|i| {
                let (kind, seed) = (hostile::Kind::nth(i as usize), first_seed + u64::from(i));
                let agency = agency.unwrap_or(1);
                thread::Builder::new().stack_size(64 * 1024).spawn(move || hostile::run(kind, addr, seed, agency))
            })
            .collect();
        let reports = clients.into_iter().filter_map(|h| h.ok()?.join().ok()).collect();
        if let Some(agency) = agency {
            say_done(addr, agency);
        }
        reports
    };
    thread::Builder::new().name("hostile".into()).spawn(run).ok()
}

/// `HELLO <agency>` and `DONE` over plain text from loopback (protected mode).
fn say_done(addr: SocketAddr, agency: u32) {
    let said = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).and_then(|mut stream| {
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.write_all(format!("HELLO {agency}\nDONE\nQUIT\n").as_bytes())?;
        let mut replies = String::new();
        BufReader::new(stream).read_to_string(&mut replies)?;
        Ok(replies)
    });
    if !said.as_ref().is_ok_and(|r| r.lines().nth(1) == Some("OK")) {
        output::err_line(format_args!(
            "lottery-round: the hostile clients' agency {agency} could not say DONE: {said:?}"
        ));
    }
}

/// Where `bets.csv` goes: `--keep DIR` (which must not hold one yet) or the scratch directory.
fn work_dir(opts: &Options, scratch: &Path) -> Result<PathBuf, String> {
    let Some(dir) = &opts.keep else { return Ok(scratch.to_owned()) };
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let bets = dir.join("bets.csv");
    if bets.exists() {
        return Err(format!("{} exists: remove it, or choose another --keep directory", bets.display()));
    }
    Ok(dir.clone())
}

/// How the round's agencies and server prove and check who they are.
pub(crate) struct RoundCredentials {
    /// For the round's own server.
    pub(crate) security: Arc<Security>,
    /// For each agency (index 0 is agency 1): its token file, CA and name to check.
    pub(crate) agencies: Vec<AgencySettings>,
    /// For the report.
    said: String,
}

/// Throw-away keys for a round of our own, the configured ones for `--server`, or none with
/// `--plaintext`.
fn credentials(opts: &Options, settings: &Settings, scratch: &Path) -> Result<RoundCredentials, String> {
    let mut agencies: Vec<AgencySettings> = (1..=opts.agencies)
        .map(|id| settings.agency_with_id(id).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    if opts.plaintext {
        agencies.iter_mut().for_each(|a| (a.token_file, a.tls_ca, a.tls_name) = (None, None, None));
        let said = "plain text, no tokens (--plaintext; the server in protected mode)".to_owned();
        return Ok(RoundCredentials { security: Arc::new(Security::default()), agencies, said });
    }
    if opts.server.is_some() {
        let said = "TLS and tokens as CLI_TLS_CA and CLI_TOKEN_FILE say".to_owned();
        return Ok(RoundCredentials { security: Arc::new(Security::default()), agencies, said });
    }
    let dir = scratch.join("keys");
    keys::make_keys(&dir, opts.agencies, &[])?;
    let config = tls::server_config(&dir.join("server.pem"), &dir.join("server.key"))?;
    let keys = AgencyKeys::load(&dir.join("agencies.keys"), opts.agencies)?;
    for (id, agency) in (1..).zip(agencies.iter_mut()) {
        agency.token_file = Some(dir.join(format!("agency-{id}.token")));
        agency.tls_ca = Some(dir.join("ca.pem"));
        agency.tls_name = None;
    }
    let said = format!("TLS + agency tokens, throw-away keys in {}", dir.display());
    Ok(RoundCredentials { security: Arc::new(Security { tls: Some(config), keys: Some(keys) }), agencies, said })
}

/// The server, in this process, on a free loopback port.
pub(crate) struct LocalServer {
    pub(crate) addr: SocketAddr,
    dir: PathBuf,
    shutdown: ShutdownHandle,
    thread: thread::JoinHandle<io::Result<()>>,
}

impl LocalServer {
    pub(crate) fn start(
        opts: &Options,
        settings: &ServerSettings,
        dir: &Path,
        security: Arc<Security>,
    ) -> Result<LocalServer, String> {
        let config = FileConfig {
            agencies: opts.agencies + u32::from(hostile_agency(opts).is_some()),
            storage_path: dir.join("bets.csv"),
            sync: settings.sync,
            group_commit: settings.group_commit,
            max_bets_per_agency: settings.max_bets_per_agency,
            min_free_bytes: settings.min_free_bytes,
        };
        let (round, _) = FileLedger::open(config).map_err(|e| e.to_string())?;
        let listener = server::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), 1024).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let shutdown = ShutdownHandle::new().map_err(|e| e.to_string())?;
        let mut limits = Limits::from_settings(settings);
        // Room for every agency besides the guests (the progress probe, hostile clients).
        limits.max_connections = limits.max_connections.max(opts.agencies as usize + 1 + limits.guests.total);
        if opts.hostile > 0 {
            // Hostile clients are cut off quickly, so that the round is not kept waiting.
            limits.idle_timeout = Duration::from_secs(1);
        }
        let handle = shutdown.clone();
        let thread = thread::Builder::new()
            .name("server".into())
            .spawn(move || server::run(listener, Arc::new(round), limits, security, &handle))
            .map_err(|e| format!("cannot start the server thread: {e}"))?;
        Ok(LocalServer { addr, dir: dir.to_owned(), shutdown, thread })
    }

    pub(crate) fn stop(self) -> Result<(), String> {
        self.shutdown.trigger();
        match self.thread.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("server: {e}")),
            Err(_) => Err("the server thread panicked".into()),
        }
    }
}

/// Runs one agency thread per file and waits for them all.
/// `configured` holds each agency's settings (`CLI_RETRY_TIMEOUT_MS` among them) and
/// credentials; `stops` a `Stop` for each.
///
/// An agency that fails for good stops the others: without it the server never draws, and
/// they would wait for their winners forever. They are reported as stopped, naming it.
pub(crate) fn run_agencies(
    files: &[PathBuf],
    addr: SocketAddr,
    batch_max: usize,
    configured: &[AgencySettings],
    stops: &[Stop],
) -> Vec<Result<Outcome, String>> {
    let first_failed: Arc<OnceLock<u32>> = Arc::default();
    let all: Arc<[Stop]> = stops.into();
    let agencies: Vec<_> = files
        .iter()
        .zip(configured)
        .zip(stops)
        .map(|((file, configured), stop)| {
            let id = configured.id;
            let settings = AgencySettings {
                server_address: addr.to_string(),
                batch_max,
                data_path: file.clone(),
                log_level: LevelFilter::Info,
                extra_bet: None,
                ..configured.clone()
            };
            let (stop, all, first_failed) = (stop.clone(), Arc::clone(&all), Arc::clone(&first_failed));
            thread::Builder::new().name(format!("agency-{id}")).stack_size(256 * 1024).spawn(move || {
                let outcome = agency::run(&settings, &stop);
                match &outcome {
                    Err(AgencyError::Stopped) => {}
                    Err(_) if first_failed.set(id).is_ok() => all.iter().for_each(Stop::trigger),
                    _ => {}
                }
                outcome
            })
        })
        .collect();
    agencies
        .into_iter()
        .map(|spawned| match spawned {
            Ok(handle) => match handle.join() {
                Ok(Err(AgencyError::Stopped)) if first_failed.get().is_some() => {
                    Err(format!("{STOPPED_BY} {} failed", first_failed.get().copied().unwrap_or_default()))
                }
                Ok(outcome) => outcome.map_err(|e| e.to_string()),
                Err(_) => Err("the agency thread panicked".into()),
            },
            Err(e) => Err(format!("cannot start the agency thread: {e}")),
        })
        .collect()
}

/// The progress of sending (the bets the server holds) and of the draw (every agency done, no
/// winners yet), from `STATUS`.
fn round_progress(addr: SocketAddr, total: u64, live: bool) -> Progress {
    let started = Instant::now();
    Progress::start(live, move || {
        let status = query_status(addr).filter(|s| !s.drawn)?;
        if status.agencies_done == status.agencies {
            return Some(Sample { phase: "draw", done: 0, total: None, detail: "reading bets.csv back".into() });
        }
        let rate = status.bets as f64 / started.elapsed().as_secs_f64();
        let detail = format!("{}/{} agencies done, {rate:.0} bets/s", status.agencies_done, status.agencies);
        Some(Sample { phase: "send", done: status.bets, total: Some(total), detail })
    })
}

/// Writes the data set the options ask for into `dir`, showing how far it is.
fn generate(dir: &Path, opts: &Options) -> Result<Vec<PathBuf>, String> {
    let written = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&written);
    let total = u64::from(opts.agencies) * opts.bets();
    let progress = Progress::start(!opts.verbose, move || {
        let done = count.load(Ordering::Relaxed);
        Some(Sample { phase: "generate", done, total: Some(total), detail: String::new() })
    });
    let files = dataset::generate_counted(dir, opts.agencies, opts.bets(), opts.seed(), &written);
    progress.finish();
    files.map_err(|e| format!("cannot write a data set into {}: {e}", dir.display()))
}

/// One `STATUS` over a fresh connection; `None` if the server did not answer one.
fn query_status(addr: SocketAddr) -> Option<Status> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream.write_all(b"STATUS\nQUIT\n").ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    match Reply::parse(line.trim_end()) {
        Ok(Reply::Status(status)) => Some(status),
        _ => None,
    }
}

/// The directory of the agency files: `--data`; else `.data` if complete and no size or seed
/// was asked for; else generated.
fn data_dir(opts: &Options, scratch: &Path) -> Result<PathBuf, String> {
    let complete = |dir: &Path| (1..=opts.agencies).all(|id| dataset::agency_file(dir, id).is_file());
    let asked = opts.bets_per_agency.is_some() || opts.seed.is_some();
    match &opts.data {
        Some(dir) if complete(dir) => Ok(dir.clone()),
        Some(dir) => Err(format!("{} lacks some of agency-1.csv … agency-{}.csv", dir.display(), opts.agencies)),
        None if !asked && complete(Path::new(".data")) => Ok(PathBuf::from(".data")),
        None => {
            let dir = scratch.join("data");
            generate(&dir, opts)?;
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
