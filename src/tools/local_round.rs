//! `lottery-round`: a whole round on one machine. The server and N agencies run in this process
//! over loopback TCP, on `.data/` if it holds the agency files, else on a generated data set;
//! it prints the winners per agency and the throughput.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::ChildStdin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use log::LevelFilter;

use crate::agency::Stop;
use crate::agency::credentials;
use crate::config::{AgencySettings, ServerSettings, Settings};
use crate::ledger::file::SyncMode;
use crate::logging;
use crate::output;
use crate::server::auth::AgencyKeys;
use crate::server::{Security, ShutdownHandle, tls};
use crate::sync::lock_unpoisoned;
use crate::tools::attack_round;
use crate::tools::botnet;
use crate::tools::crowd::{self, Crowd, MachineLimits, Placement, RoundData};
use crate::tools::dataset;
use crate::tools::hostile;
use crate::tools::keys;
use crate::tools::local_server::{LocalServer, RoundCredentials};
use crate::tools::progress::{Progress, Sample};
use crate::tools::report::{count_lines, report, report_hostile};
use crate::tools::round_options::{HELP, Options, parse_args};
use crate::wire::protocol::{Reply, Status};
use crate::wire::token::Token;

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
    // While this is the only thread: the agencies', and in a local round the server's.
    crate::sync::size_futex_hash(2 * opts.agencies as usize + 512);
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
        // Made before the clock starts: the round's time is the round's, not its data's.
        let ready = match placement {
            Placement::Here => Some(crowd.ready(settings)?),
            Placement::Child => None,
        };
        let started = Instant::now();
        let progress = round_progress(addr, total, !opts.verbose);
        let hostile = run_hostile(opts, addr);
        let outcomes = match ready {
            Some(ready) => ready.run(&interrupt.stops),
            None => crowd.run_in_child(&interrupt.child)?,
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

/// Runs the hostile clients in a thread of their own; once they are all dealt with, says
/// `DONE` for their agency so that the draw can happen.
fn run_hostile(opts: &Options, addr: SocketAddr) -> Option<thread::JoinHandle<Vec<hostile::Report>>> {
    if opts.hostile == 0 {
        return None;
    }
    let (count, first_seed, agency) = (opts.hostile, opts.seed(), opts.hostile_agency());
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
