//! `lottery-round`: a whole round on one machine. The server and N agencies run in this process
//! over loopback TCP, on `.data/` if it holds the agency files, else on a generated data set;
//! it prints the winners per agency and the throughput.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ChildStdin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use log::LevelFilter;

use crate::agency::credentials;
use crate::agency::{self, Outcome, Stop};
use crate::config::{self, AgencySettings, BATCH_MAX_WHAT, MetricsAddress, ServerSettings, Settings};
use crate::ledger::Ledger;
use crate::ledger::file::{FileConfig, FileLedger, SyncMode};
use crate::logging;
use crate::output;
use crate::server::auth::AgencyKeys;
use crate::server::operator::Operator;
use crate::server::{self, Limits, Security, ShutdownHandle, tls};
use crate::sync::lock_unpoisoned;
use crate::tools::attack_round;
use crate::tools::attacks::{Attack, Sources};
use crate::tools::botnet;
use crate::tools::crowd::{self, Crowd, MachineLimits, Placement, RoundData};
use crate::tools::dataset;
use crate::tools::hostile;
use crate::tools::keys;
use crate::tools::progress::{Progress, Sample};
use crate::tools::report::{count_lines, report, report_hostile};
use crate::wire::protocol::{Reply, Status};
use crate::wire::token::Token;

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
                        hangup-waiter, stall, metrics: the operator's port); prints each
                        round's time against the first
  --attackers N         attacker connections of each kind (default 200)
  --attack-from spread|same
                        attackers from addresses of their own in 127.1.0.0/16, as a botnet
                        (default), or all from 127.0.0.1, the agencies' own address
  --plaintext           no TLS and no agency tokens (the server in protected mode), to measure
                        what they cost; by default the round makes throw-away keys in its
                        temporary directory and runs TLS + tokens
  --verbose             print the server's and agencies' log lines
  --watch               serve the round's page (and /metrics) on a free loopback port, print
                        its address, and keep it up after the round until Ctrl-C
  -h, --help            this text

Settings (SERVER_SYNC, SERVER_GROUP_COMMIT, CLI_BATCH_MAXAMOUNT, CLI_RETRY_TIMEOUT_MS, ...) come
from config.ini and the environment.

A generated data set is made in memory as each agency reads it, and the agencies' tokens are
kept in memory: no file per agency. Each agency holds a socket, and so does the server for it:
when one process cannot hold both (the open-files limit, raised to the hard one), the agencies
run in a process of their own; when even that does not fit, it says so before it starts.";

/// Bets per agency in a generated data set, unless `--bets-per-agency` says otherwise.
const DEFAULT_BETS: u64 = 20_000;
/// The generated data set's seed, unless `--seed` says otherwise.
const DEFAULT_SEED: u64 = 75_740;

/// The options of `lottery-round`.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) agencies: u32,
    /// Given: generate a data set of this size rather than use `.data`.
    pub(crate) bets_per_agency: Option<u64>,
    pub(crate) batch: Option<usize>,
    pub(crate) data: Option<PathBuf>,
    pub(crate) generate: Option<PathBuf>,
    /// Given: generate a data set from this seed rather than use `.data`.
    pub(crate) seed: Option<u64>,
    pub(crate) keep: Option<PathBuf>,
    /// Run the agencies against this server instead of one in this process.
    pub(crate) server: Option<SocketAddr>,
    /// Hostile clients to run beside the agencies.
    pub(crate) hostile: u32,
    /// Attacks to measure, each in a round of its own after one without.
    pub(crate) attacks: Vec<Attack>,
    /// Attacker connections of each kind.
    pub(crate) attackers: usize,
    pub(crate) attack_from: Sources,
    /// No TLS, no tokens.
    pub(crate) plaintext: bool,
    pub(crate) verbose: bool,
    /// Serve the round's page on a free loopback port, and keep it up after the round until
    /// Ctrl-C.
    pub(crate) watch: bool,
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
            watch: false,
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
pub(crate) fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Options>, String> {
    use lexopt::prelude::*;
    let mut opts = Options::default();
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("agencies") => opts.agencies = value(&mut parser)?,
            Long("bets-per-agency") => opts.bets_per_agency = Some(value(&mut parser)?),
            Long("batch") => {
                let text: String = value(&mut parser)?;
                let batch = config::parse_batch_max(&text);
                opts.batch = Some(batch.ok_or_else(|| format!("--batch {text:?} is not {BATCH_MAX_WHAT}"))?);
            }
            Long("data") => opts.data = Some(parser.value().map_err(|e| e.to_string())?.into()),
            Long("generate") => opts.generate = Some(parser.value().map_err(|e| e.to_string())?.into()),
            Long("seed") => opts.seed = Some(value(&mut parser)?),
            Long("keep") => opts.keep = Some(parser.value().map_err(|e| e.to_string())?.into()),
            Long("server") => opts.server = Some(value(&mut parser)?),
            Long("hostile") => opts.hostile = value(&mut parser)?,
            Long("attack") => opts.attacks = Attack::parse_list(&value::<String>(&mut parser)?)?,
            Long("attackers") => opts.attackers = value(&mut parser)?,
            Long("attack-from") => {
                opts.attack_from = match value::<String>(&mut parser)?.as_str() {
                    "spread" => Sources::Spread,
                    "same" => Sources::Same,
                    other => return Err(format!("--attack-from {other:?} is not spread or same")),
                }
            }
            Long("plaintext") => opts.plaintext = true,
            Long("verbose") => opts.verbose = true,
            Long("watch") => opts.watch = true,
            Short('h') | Long("help") => return Ok(None),
            other => return Err(other.unexpected().to_string()),
        }
    }
    opts.check()?;
    Ok(Some(opts))
}

/// The value of the flag just read, parsed.
fn value<T>(parser: &mut lexopt::Parser) -> Result<T, String>
where
    T: std::str::FromStr,
    T::Err: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
{
    use lexopt::prelude::*;
    parser.value().and_then(|v| v.parse()).map_err(|e| e.to_string())
}

impl Options {
    /// Refuses the flags that do not go together.
    fn check(&self) -> Result<(), String> {
        if self.agencies == 0 {
            return Err("--agencies must be at least 1".into());
        }
        if self.data.is_some() && (self.bets_per_agency.is_some() || self.seed.is_some()) {
            return Err(
                "--bets-per-agency and --seed shape a generated data set; --data uses DIR's files as they are".into()
            );
        }
        if !self.attacks.is_empty() && (self.plaintext || self.server.is_some() || self.hostile > 0) {
            return Err("--attack runs rounds of its own, on TLS with agency tokens: not with --plaintext (every \
                        loopback client is trusted then), --server or --hostile"
                .into());
        }
        if self.watch && (self.server.is_some() || !self.attacks.is_empty()) {
            return Err("--watch serves the page of the round's own server: not with --server or --attack".into());
        }
        if self.server.is_some() && self.keep.is_some() {
            return Err("--keep names where the round's own server stores; with --server there is none".into());
        }
        Ok(())
    }
}

/// `lottery-round`'s main.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == botnet::WORKER) {
        return botnet::worker(&args[1..]);
    }
    if args.first().is_some_and(|a| a == crowd::WORKER) {
        return crowd::worker(&args[1..]);
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
pub(crate) fn run(opts: &Options) -> Result<(), String> {
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
    let shown = match (opts.verbose, opts.attacks.is_empty()) {
        (true, _) => LevelFilter::Info,
        (false, true) => LevelFilter::Warn,
        (false, false) => LevelFilter::Error,
    };
    // An attack round counts what the server logs, shown or not, for the report's log rate.
    if opts.attacks.is_empty() {
        logging::init(shown)
    } else {
        logging::init_counting(shown)
    }
    crate::app::raise_open_files_limit();
    if !opts.attacks.is_empty() {
        return run_attacks(opts, &settings, &server_settings, batch_max);
    }
    let round = Round::set_up(opts, &settings, &server_settings, batch_max)?;
    round.play(opts, &settings, &server_settings)
}

/// A round set up: its data counted, its keys made, its server listening.
struct Round {
    crowd: Crowd,
    placement: Placement,
    local: Option<LocalServer>,
    /// Each agency's bets and winning bets, from its data.
    counts: Vec<(u64, u64)>,
    said: String,
    /// Holds the keys, the data and `bets.csv` (unless `--keep`) until the round is over.
    _scratch: tempfile::TempDir,
}

impl Round {
    /// Everything before the agencies start; a round that does not fit the machine's limits is
    /// refused first, before anything is written.
    fn set_up(opts: &Options, settings: &Settings, server: &ServerSettings, batch_max: usize) -> Result<Round, String> {
        let data = round_data(opts)?;
        let big_files = count_big_files(&data, opts.agencies);
        let guests = u64::from(opts.hostile) + 1;
        let placement = crowd::place(opts.agencies, guests, opts.server.is_none(), big_files, MachineLimits::here())?;
        let scratch = tempfile_dir()?;
        let counts: Vec<(u64, u64)> =
            (1..=opts.agencies).map(|id| data.counts(id)).collect::<io::Result<_>>().map_err(|e| e.to_string())?;
        let keys = round_keys(opts, settings, scratch.path())?;
        let local = match &opts.server {
            Some(_) => None,
            None => {
                let dir = work_dir(opts, scratch.path())?;
                Some(LocalServer::start(opts, server, &dir, keys.security.clone())?)
            }
        };
        let addr = match (&local, &opts.server) {
            (Some(server), _) => server.addr,
            (None, Some(addr)) => *addr,
            (None, None) => unreachable!("a local server is started when no --server is given"),
        };
        let crowd = Crowd {
            agencies: opts.agencies,
            addr,
            batch_max,
            data,
            ca: keys.ca,
            tokens: keys.tokens,
            tls_name: keys.tls_name,
            verbose: opts.verbose,
        };
        Ok(Round { crowd, placement, local, counts, said: keys.said, _scratch: scratch })
    }

    /// Says what the round is, runs it, stops the server, prints the report.
    /// Says what is about to run: the round, where it stores, its security, where its agencies run.
    fn announce(&self, opts: &Options, server: &ServerSettings, total: u64) {
        let addr = self.crowd.addr;
        output::line(format_args!(
            "round: {} agencies, {total} bets from {}, server {addr}",
            opts.agencies, self.crowd.data
        ));
        if let Some(local) = &self.local {
            let sync = if server.sync == SyncMode::Always { "always" } else { "never" };
            output::line(format_args!("bets.csv in {}, SERVER_SYNC={sync}", local.dir.display()));
            if let Some(page) = local.page() {
                output::line(format_args!("watch the round at http://{page}/"));
            }
        }
        output::line(format_args!("security: {}", self.said));
        if self.placement == Placement::Child {
            output::line(format_args!(
                "agencies: in a process of their own (one process cannot hold both ends of {} connections)",
                opts.agencies
            ));
        }
    }

    fn play(self, opts: &Options, settings: &Settings, server: &ServerSettings) -> Result<(), String> {
        let total = self.counts.iter().map(|c| c.0).sum::<u64>();
        self.announce(opts, server, total);
        let Round { crowd, placement, local, counts, said: _, _scratch } = self;
        let addr = crowd.addr;
        let interrupt = stop_on_interrupt(opts.agencies as usize, local.as_ref());
        let started = Instant::now();
        let progress = round_progress(addr, total, !opts.verbose);
        let hostile = run_hostile(opts, addr);
        let outcomes = match placement {
            Placement::Here => crowd.run_here(settings, &interrupt.stops),
            Placement::Child => crowd.run_in_child(&interrupt.child)?,
        };
        let elapsed = started.elapsed();
        progress.finish();
        let hostile: Vec<hostile::Report> = hostile.and_then(|h| h.join().ok()).unwrap_or_default();
        if interrupt.flag.load(Ordering::SeqCst) {
            if let Some(local) = local {
                local.stop()?;
            }
            let finished = outcomes.iter().filter(|o| o.is_ok()).count();
            return Err(format!("interrupted: {finished} of {} agencies had their winners", outcomes.len()));
        }
        let expected: Vec<u64> = counts.iter().map(|c| c.1).collect();
        let verdict = report(&outcomes, &expected, total, elapsed);
        report_hostile(&hostile);
        if let Some(local) = local {
            if let Some(page) = local.page() {
                output::line(format_args!("the page stays up at http://{page}/ until Ctrl-C"));
                interrupt.wait();
            }
            local.stop()?;
        }
        verdict
    }
}

/// `--attack`: rounds of their own, on files and key files (the attackers' process reads the CA).
fn run_attacks(opts: &Options, settings: &Settings, server: &ServerSettings, batch_max: usize) -> Result<(), String> {
    let scratch = tempfile_dir()?;
    let data = data_dir(opts, scratch.path())?;
    let files: Vec<PathBuf> = (1..=opts.agencies).map(|id| dataset::agency_file(&data, id)).collect();
    let total = files.iter().map(|f| count_lines(f)).sum::<io::Result<u64>>().map_err(|e| e.to_string())?;
    let credentials = credentials(opts, settings, scratch.path())?;
    let round = attack_round::Suite { opts, settings: server, batch_max, files: &files, total };
    round.run(&credentials, scratch.path())
}

/// The agency files larger than an agency reads whole: each is held open while it is sent.
fn count_big_files(data: &RoundData, agencies: u32) -> u64 {
    let RoundData::Files(dir) = data else { return 0 };
    let big = |id| fs::metadata(dataset::agency_file(dir, id)).is_ok_and(|m| m.len() > 1 << 20);
    (1..=agencies).filter(|&id| big(id)).count() as u64
}

/// The data of a round: `--data DIR`; else `.data` if complete and no size or seed was asked
/// for; else a data set made in memory.
fn round_data(opts: &Options) -> Result<RoundData, String> {
    let complete = |dir: &Path| (1..=opts.agencies).all(|id| dataset::agency_file(dir, id).is_file());
    let asked = opts.bets_per_agency.is_some() || opts.seed.is_some();
    match &opts.data {
        Some(dir) if complete(dir) => Ok(RoundData::Files(dir.clone())),
        Some(dir) => Err(format!("{} lacks some of agency-1.csv … agency-{}.csv", dir.display(), opts.agencies)),
        None if !asked && complete(Path::new(".data")) => Ok(RoundData::Files(PathBuf::from(".data"))),
        None => Ok(RoundData::Made { bets: opts.bets(), seed: opts.seed() }),
    }
}

/// What the agencies of a round (not an attack round) prove and check.
struct RoundKeys {
    security: Arc<Security>,
    ca: Option<PathBuf>,
    tokens: Vec<Option<Token>>,
    tls_name: Option<String>,
    said: String,
}

/// Throw-away keys for a round of our own (the tokens in memory, no file per agency), the
/// configured ones for `--server`, or none with `--plaintext`.
fn round_keys(opts: &Options, settings: &Settings, scratch: &Path) -> Result<RoundKeys, String> {
    let none = || (1..=opts.agencies).map(|_| None).collect();
    if opts.plaintext {
        let said = "plain text, no tokens (--plaintext; the server in protected mode)".to_owned();
        return Ok(RoundKeys { security: Arc::default(), ca: None, tokens: none(), tls_name: None, said });
    }
    if opts.server.is_some() {
        let first = settings.agency_with_id(1).map_err(|e| e.to_string())?;
        let tokens = (1..=opts.agencies)
            .map(|id| {
                let agency = settings.agency_with_id(id).map_err(|e| e.to_string())?;
                agency.token_file.as_deref().map(credentials::read_token).transpose()
            })
            .collect::<Result<_, _>>()?;
        let said = "TLS and tokens as CLI_TLS_CA and CLI_TOKEN_FILE say".to_owned();
        return Ok(RoundKeys { security: Arc::default(), ca: first.tls_ca, tokens, tls_name: first.tls_name, said });
    }
    let dir = scratch.join("keys");
    let tokens = keys::write_server_keys(&dir, opts.agencies, &[])?;
    let config = tls::server_config(&dir.join("server.pem"), &dir.join("server.key"))?;
    let agency_keys = AgencyKeys::load(&dir.join("agencies.keys"), opts.agencies)?;
    let security = Arc::new(Security { tls: Some(config), keys: Some(agency_keys) });
    let said = format!("TLS + agency tokens, throw-away keys in {} (the tokens in memory)", dir.display());
    Ok(RoundKeys {
        security,
        ca: Some(dir.join("ca.pem")),
        tokens: tokens.into_iter().map(Some).collect(),
        tls_name: None,
        said,
    })
}

/// What an interruption stops: a `Stop` per agency (one closes only the socket it last
/// watched) when they run here, their process's input when they run in one of their own.
struct Interrupt {
    stops: Vec<Stop>,
    child: Arc<Mutex<Option<ChildStdin>>>,
    /// Whether it happened.
    flag: Arc<AtomicBool>,
}

impl Interrupt {
    /// Returns once an interruption has happened: the `--watch` page stays up until then. A
    /// signal handler cannot notify a Condvar safely, so this looks at the flag a few times a
    /// second.
    fn wait(&self) {
        while !self.flag.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Stops the agencies with the local server's shutdown on Ctrl-C, SIGTERM, or a stdout nobody
/// reads any more (`| head`).
fn stop_on_interrupt(agencies: usize, local: Option<&LocalServer>) -> Interrupt {
    let stops: Vec<Stop> = (0..agencies).map(|_| Stop::default()).collect();
    let (flag, child) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(None::<ChildStdin>)));
    let (on_signal, shutdown) = (stops.clone(), local.map(|s| s.shutdown.clone()));
    let (set, input) = (Arc::clone(&flag), Arc::clone(&child));
    let interrupt = move || {
        set.store(true, Ordering::SeqCst);
        on_signal.iter().for_each(Stop::trigger);
        drop(lock_unpoisoned(&input).take());
        shutdown.iter().for_each(ShutdownHandle::trigger);
    };
    output::on_close(interrupt.clone());
    let _ = ctrlc::set_handler(interrupt);
    Interrupt { stops, child, flag }
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

/// How an attack round's agencies and server prove and check who they are.
pub(crate) struct RoundCredentials {
    /// For the round's own server.
    pub(crate) security: Arc<Security>,
    /// For each agency (index 0 is agency 1): its token file, CA and name to check.
    pub(crate) agencies: Vec<AgencySettings>,
}

/// Throw-away key files for an attack round (its attackers' process reads the CA).
fn credentials(opts: &Options, settings: &Settings, scratch: &Path) -> Result<RoundCredentials, String> {
    let mut agencies: Vec<AgencySettings> = (1..=opts.agencies)
        .map(|id| settings.agency_with_id(id).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let dir = scratch.join("keys");
    keys::make_keys(&dir, opts.agencies, &[])?;
    let config = tls::server_config(&dir.join("server.pem"), &dir.join("server.key"))?;
    let keys = AgencyKeys::load(&dir.join("agencies.keys"), opts.agencies)?;
    for (id, agency) in (1..).zip(agencies.iter_mut()) {
        agency.token_file = Some(dir.join(format!("agency-{id}.token")));
        agency.tls_ca = Some(dir.join("ca.pem"));
        agency.tls_name = None;
    }
    Ok(RoundCredentials { security: Arc::new(Security { tls: Some(config), keys: Some(keys) }), agencies })
}

/// The server, in this process, on a free loopback port.
pub(crate) struct LocalServer {
    pub(crate) addr: SocketAddr,
    dir: PathBuf,
    shutdown: ShutdownHandle,
    thread: thread::JoinHandle<io::Result<()>>,
    /// The round's page and metrics, served with `--watch`.
    operator: Operator,
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
            ..FileConfig::from_settings(settings)
        };
        let (ledger, _) = FileLedger::open(config).map_err(|e| e.to_string())?;
        // A crowd of agencies connects at once: room for all of them in the listen queue (the
        // kernel caps it at net.core.somaxconn).
        let backlog = i32::try_from(opts.agencies).unwrap_or(i32::MAX).saturating_add(64).max(1024);
        let listener = server::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), backlog).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let shutdown = ShutdownHandle::new().map_err(|e| e.to_string())?;
        let mut limits = Limits::from_settings(settings);
        // Room for every agency besides the guests (the progress probe, hostile clients).
        if opts.attacks.is_empty() && opts.hostile == 0 {
            // The round's own agencies all arrive at once from 127.0.0.1: none of them is a
            // stranger to shed while it connects (an attack round measures the configured door).
            let crowd = opts.agencies as usize + 64;
            limits.guests.total = limits.guests.total.max(crowd);
            limits.guests.per_ip = limits.guests.per_ip.max(crowd);
        }
        let others = 1 + opts.hostile as usize + limits.guests.total;
        limits.max_connections = limits.max_connections.max(opts.agencies as usize + others);
        if opts.hostile > 0 {
            // Hostile clients are cut off quickly, so that the round is not kept waiting.
            limits.idle_timeout = Duration::from_secs(1);
        }
        let ledger: Arc<dyn Ledger> = Arc::new(ledger);
        // The page, for a person to watch, or a target, for the `metrics` attack.
        let served = opts.watch || opts.attacks.contains(&Attack::Metrics);
        let page =
            served.then_some(MetricsAddress { addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), required: true });
        let operator = Operator::start(page, Arc::clone(&ledger))?;
        let (handle, metrics) = (shutdown.clone(), operator.metrics());
        let thread = thread::Builder::new()
            .name("server".into())
            .spawn(move || server::run(listener, ledger, limits, security, &handle, metrics))
            .map_err(|e| format!("cannot start the server thread: {e}"))?;
        Ok(LocalServer { addr, dir: dir.to_owned(), shutdown, thread, operator })
    }

    /// Where the round's page (and `/metrics`) is served, with `--watch` or `--attack metrics`.
    pub(crate) fn page(&self) -> Option<SocketAddr> {
        self.operator.address()
    }

    pub(crate) fn stop(self) -> Result<(), String> {
        self.shutdown.trigger();
        let joined = self.thread.join();
        self.operator.stop();
        match joined {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("server: {e}")),
            Err(_) => Err("the server thread panicked".into()),
        }
    }
}

/// Runs one agency thread per file, each loading the credentials its settings name, and
/// waits for them all. `configured` holds each agency's settings (`CLI_RETRY_TIMEOUT_MS` among
/// them) and credentials; `stops` a `Stop` for each. See [`crowd::run_all`].
pub(crate) fn run_agencies(
    files: &[PathBuf],
    addr: SocketAddr,
    batch_max: usize,
    configured: &[AgencySettings],
    stops: &[Stop],
) -> Vec<Result<Outcome, String>> {
    let jobs = files
        .iter()
        .zip(configured)
        .map(|(file, configured)| {
            let settings = AgencySettings {
                server_address: addr.to_string(),
                batch_max,
                data_path: file.clone(),
                log_level: LevelFilter::Info,
                extra_bet: None,
                ..configured.clone()
            };
            (settings.id, move |stop: &Stop| agency::run(&settings, stop))
        })
        .collect();
    crowd::run_all(jobs, stops)
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
