//! `lottery-round`: a whole round on one machine. The server and N agencies run in this process
//! over loopback TCP, on `.data/` if it holds the agency files, else on a generated data set;
//! it prints the winners per agency and the throughput.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use log::LevelFilter;

use crate::agency::{self, Outcome, Stop};
use crate::config::{AgencySettings, ServerSettings, Settings};
use crate::ledger::round::{Round, RoundConfig, SyncMode};
use crate::logging;
use crate::server::auth::AgencyKeys;
use crate::server::{self, Limits, Security, ShutdownHandle, tls};
use crate::tools::dataset;
use crate::tools::hostile;
use crate::tools::keys;
use crate::wire::protocol::{Reply, Status};

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
  --server ADDR         run only the agencies, against the lottery-server at ADDR (ip:port),
                        started with SERVER_AGENCIES=N
  --hostile K           also run K misbehaving clients of mixed kinds (idle, slowloris, oversized
                        lines, garbage, half batches, bad bets, out-of-range requests) and report
                        what they got; the round's own server then cuts idle clients after 1 s
  --plaintext           no TLS and no agency tokens (the server in protected mode), to measure
                        what they cost; by default the round makes throw-away keys in its
                        temporary directory and runs TLS + tokens
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
    /// Run the agencies against this server instead of one in this process.
    pub server: Option<SocketAddr>,
    /// Hostile clients to run beside the agencies.
    pub hostile: u32,
    /// No TLS, no tokens.
    pub plaintext: bool,
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
            server: None,
            hostile: 0,
            plaintext: false,
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
            Long("server") => opts.server = Some(parser.value().map_err(wrap)?.parse().map_err(wrap)?),
            Long("hostile") => opts.hostile = parser.value().map_err(wrap)?.parse().map_err(wrap)?,
            Long("plaintext") => opts.plaintext = true,
            Long("verbose") => opts.verbose = true,
            Short('h') | Long("help") => return Ok(None),
            other => return Err(other.unexpected().to_string()),
        }
    }
    if opts.agencies == 0 {
        return Err("--agencies must be at least 1".into());
    }
    if opts.server.is_some() && opts.keep.is_some() {
        return Err("--keep names where the round's own server stores; with --server there is none".into());
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

/// Runs the round (or only generates data); `Ok(false)` if an agency failed or got the
/// wrong winners.
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
    let batch_max = match opts.batch {
        Some(b) => b,
        None => settings.batch_max().map_err(|e| e.to_string())?,
    };
    logging::init(if opts.verbose { LevelFilter::Info } else { LevelFilter::Warn });
    crate::app::raise_open_files_limit();

    let scratch = tempfile_dir()?;
    let data = data_dir(opts, scratch.path())?;
    let files: Vec<PathBuf> = (1..=opts.agencies).map(|id| dataset::agency_file(&data, id)).collect();
    let total = files.iter().map(|f| count_lines(f)).sum::<io::Result<u64>>().map_err(|e| e.to_string())?;
    let credentials = credentials(opts, &settings, scratch.path())?;
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
    println!("round: {} agencies, {total} bets from {}, server {addr}", opts.agencies, data.display());
    if let Some(server) = &local {
        println!("bets.csv in {}, SERVER_SYNC={sync}", server.dir.display());
    }
    println!("security: {}", credentials.said);

    let stop = Stop::default();
    {
        let stop = stop.clone();
        let shutdown = local.as_ref().map(|s| s.shutdown.clone());
        let _ = ctrlc::set_handler(move || {
            stop.trigger();
            shutdown.iter().for_each(ShutdownHandle::trigger);
        });
    }
    let started = Instant::now();
    let progress = Progress::start(addr, total);
    let hostile = run_hostile(opts, addr);
    let outcomes = run_agencies(&files, addr, batch_max, &credentials.agencies, &stop);
    let elapsed = started.elapsed();
    progress.finish();
    let hostile: Vec<hostile::Report> = hostile.and_then(|h| h.join().ok()).unwrap_or_default();
    if let Some(server) = local {
        server.stop()?;
    }
    let expected = files.iter().map(|f| count_winners(f)).collect::<io::Result<Vec<_>>>().map_err(|e| e.to_string())?;
    let ok = report(&outcomes, &expected, total, elapsed);
    report_hostile(&hostile);
    Ok(ok)
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
    let (count, first_seed, agency) = (opts.hostile, opts.seed, hostile_agency(opts));
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
        eprintln!("lottery-round: the hostile clients' agency {agency} could not say DONE: {said:?}");
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
struct RoundCredentials {
    /// For the round's own server.
    security: Arc<Security>,
    /// For each agency (index 0 is agency 1): its token file, CA and name to check.
    agencies: Vec<AgencySettings>,
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
struct LocalServer {
    addr: SocketAddr,
    dir: PathBuf,
    shutdown: ShutdownHandle,
    thread: thread::JoinHandle<io::Result<()>>,
}

impl LocalServer {
    fn start(
        opts: &Options,
        settings: &ServerSettings,
        dir: &Path,
        security: Arc<Security>,
    ) -> Result<LocalServer, String> {
        let config = RoundConfig {
            agencies: opts.agencies + u32::from(hostile_agency(opts).is_some()),
            storage_path: dir.join("bets.csv"),
            sync: settings.sync,
            group_commit: settings.group_commit,
            max_bets_per_agency: settings.max_bets_per_agency,
            min_free_bytes: settings.min_free_bytes,
        };
        let (round, _) = Round::open(config).map_err(|e| e.to_string())?;
        let listener = server::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), 1024).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let shutdown = ShutdownHandle::new(&listener).map_err(|e| e.to_string())?;
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

    fn stop(self) -> Result<(), String> {
        self.shutdown.trigger();
        match self.thread.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("server: {e}")),
            Err(_) => Err("the server thread panicked".into()),
        }
    }
}

/// Runs one agency thread per file and waits for them all.
fn run_agencies(
    files: &[PathBuf],
    addr: SocketAddr,
    batch_max: usize,
    configured: &[AgencySettings],
    stop: &Stop,
) -> Vec<Result<Outcome, String>> {
    let agencies: Vec<_> = files
        .iter()
        .zip(configured)
        .map(|(file, configured)| {
            let id = configured.id;
            let settings = AgencySettings {
                server_address: addr.to_string(),
                batch_max,
                data_path: file.clone(),
                retry_timeout: Duration::from_secs(30),
                log_level: LevelFilter::Info,
                extra_bet: None,
                ..configured.clone()
            };
            let stop = stop.clone();
            thread::Builder::new()
                .name(format!("agency-{id}"))
                .stack_size(256 * 1024)
                .spawn(move || agency::run(&settings, &stop))
        })
        .collect();
    agencies
        .into_iter()
        .map(|spawned| match spawned {
            Ok(handle) => match handle.join() {
                Ok(outcome) => outcome.map_err(|e| e.to_string()),
                Err(_) => Err("the agency thread panicked".into()),
            },
            Err(e) => Err(format!("cannot start the agency thread: {e}")),
        })
        .collect()
}

/// Prints the table and the throughput; true if every agency got exactly its expected winners.
fn report(outcomes: &[Result<Outcome, String>], expected: &[u64], total: u64, elapsed: Duration) -> bool {
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
    println!("wall time {secs:.3} s, {:.0} bets/s", total as f64 / secs.max(1e-9));
    ok
}

/// Prints, per kind of hostile client, what the server answered them.
fn report_hostile(reports: &[hostile::Report]) {
    if reports.is_empty() {
        return;
    }
    let mut by_kind: BTreeMap<hostile::Kind, (usize, usize, BTreeMap<String, usize>)> = BTreeMap::new();
    for r in reports {
        let entry = by_kind.entry(r.kind).or_default();
        entry.0 += 1;
        entry.1 += usize::from(r.closed_by_server);
        for reply in &r.replies {
            *entry.2.entry(reply.clone()).or_default() += 1;
        }
    }
    println!("{:>11} {:>7} {:>7}  replies", "hostile", "clients", "closed");
    for (kind, (clients, closed, replies)) in by_kind {
        let replies: Vec<String> = replies.iter().map(|(r, n)| format!("{r} x{n}")).collect();
        println!("{:>11} {clients:>7} {closed:>7}  {}", kind.to_string(), replies.join(", "));
    }
}

/// Prints the round's progress to stderr once a second while it runs, from `STATUS`.
struct Progress {
    done: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Progress {
    fn start(addr: SocketAddr, total: u64) -> Progress {
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
                    let Some(status) = query_status(addr) else { continue };
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
