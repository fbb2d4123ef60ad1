//! `lottery-round`'s agencies: a thread each, in this process or, when one process cannot hold
//! a socket for the server's side and one for the agency's of every agency (the open-files
//! limit), in a child process of their own (`lottery-round --agency-worker`, not in `--help`).
//!
//! Their data are made in memory when the data set is generated (no file per agency), their
//! tokens kept in memory (no key file per agency), and one TLS configuration is shared by all.
//! The child gets its tokens on its standard input, one a line, and stops its agencies when that
//! input closes; it prints each agency's outcome on its standard output, one line each, among
//! the agencies' log lines, which the parent passes on.

use std::io::{self, BufRead, BufReader, Cursor, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ChildStdin, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;

use log::LevelFilter;
use rustls::ClientConfig;

use crate::agency::credentials::{Credentials, client_config};
use crate::agency::{self, AgencyError, BetData, MakeRows, Outcome, Stop};
use crate::config::{AgencySettings, Settings};
use crate::logging;
use crate::output;
use crate::sync::lock_unpoisoned;
use crate::tools::dataset;
use crate::tools::report::{STOPPED_BY, count_lines, count_winners};
use crate::wire::token::Token;

/// The hidden first argument that makes `lottery-round` run agencies for its parent.
pub(crate) const WORKER: &str = "--agency-worker";

/// What begins a line of the worker's that is an outcome, not a log line.
const OUTCOME: &str = "\u{1e}outcome ";

/// Where the agencies' bets come from.
#[derive(Debug, Clone)]
pub(crate) enum RoundData {
    /// `agency-{id}.csv` in this directory.
    Files(PathBuf),
    /// A generated data set, made in memory: ahead of the round up to [`MADE_AHEAD_MOST`] bets
    /// in all, else as each agency reads it.
    Made { bets: u64, seed: u64 },
}

/// Most bets of a generated data set made ahead of the round, in all (about 45 bytes each):
/// past it, each agency makes its rows as it reads them, and the making is in the round's time.
const MADE_AHEAD_MOST: u64 = 2_000_000;

impl RoundData {
    /// Agency `id`'s bets, of a round of `agencies` agencies.
    pub(crate) fn bets_of(&self, id: u32, agencies: u32) -> BetData {
        match self {
            RoundData::Files(dir) => BetData::File(dataset::agency_file(dir, id)),
            &RoundData::Made { bets, seed } => BetData::Made {
                name: PathBuf::from(format!("generated agency-{id}.csv")),
                rows: made_rows(id, bets, seed, bets.saturating_mul(u64::from(agencies)) <= MADE_AHEAD_MOST),
            },
        }
    }

    /// Agency `id`'s bets and winning bets, counted from its data.
    ///
    /// # Errors
    /// A file cannot be read.
    pub(crate) fn counts(&self, id: u32) -> io::Result<(u64, u64)> {
        match self {
            RoundData::Files(dir) => {
                let file = dataset::agency_file(dir, id);
                Ok((count_lines(&file)?, count_winners(&file)?))
            }
            &RoundData::Made { bets, seed } => Ok((bets, dataset::winners(id, bets, seed))),
        }
    }

    /// How it is said on the worker's command line.
    fn arg(&self) -> String {
        match self {
            RoundData::Files(dir) => format!("dir:{}", dir.display()),
            RoundData::Made { bets, seed } => format!("made:{bets}:{seed}"),
        }
    }

    fn parse(arg: &str) -> Result<RoundData, String> {
        if let Some(dir) = arg.strip_prefix("dir:") {
            return Ok(RoundData::Files(PathBuf::from(dir)));
        }
        let made = arg.strip_prefix("made:").and_then(|m| m.split_once(':'));
        match made.map(|(b, s)| (b.parse(), s.parse())) {
            Some((Ok(bets), Ok(seed))) => Ok(RoundData::Made { bets, seed }),
            _ => Err(format!("DATA {arg:?} is neither dir:PATH nor made:BETS:SEED")),
        }
    }
}

/// Agency `id`'s `bets` generated rows from `seed`: made now if `ahead`, so that a round's wall
/// time is not the generator's, else as they are read.
fn made_rows(id: u32, bets: u64, seed: u64, ahead: bool) -> MakeRows {
    if !ahead {
        return Arc::new(move || Box::new(dataset::Rows::new(id, bets, seed)));
    }
    let mut made = Vec::new();
    // Reading rows made in memory cannot fail.
    let _ = dataset::Rows::new(id, bets, seed).read_to_end(&mut made);
    let made: Arc<[u8]> = made.into();
    Arc::new(move || Box::new(Cursor::new(Arc::clone(&made))))
}

impl std::fmt::Display for RoundData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoundData::Files(dir) => write!(f, "{}", dir.display()),
            RoundData::Made { seed, .. } => write!(f, "a data set generated in memory (seed {seed})"),
        }
    }
}

/// The agencies of a round and what they need.
pub(crate) struct Crowd {
    pub agencies: u32,
    pub addr: SocketAddr,
    pub batch_max: usize,
    pub data: RoundData,
    /// The CA they trust; `None`: plain text.
    pub ca: Option<PathBuf>,
    /// Agency k's token at k - 1; `None`: `HELLO` without one.
    pub tokens: Vec<Option<Token>>,
    /// The name to check in the server's certificate instead of the address's host.
    pub tls_name: Option<String>,
    pub verbose: bool,
}

impl Crowd {
    /// Each agency's settings and credentials, sharing one TLS configuration.
    fn prepare(&self, settings: &Settings) -> Result<Vec<(AgencySettings, Credentials)>, String> {
        let tls: Option<Arc<ClientConfig>> = self.ca.as_deref().map(client_config).transpose()?;
        (1..=self.agencies)
            .zip(&self.tokens)
            .map(|(id, token)| {
                let configured = settings.agency_with_id(id).map_err(|e| e.to_string())?;
                let level = if self.verbose { LevelFilter::Info } else { LevelFilter::Warn };
                let agency = AgencySettings {
                    server_address: self.addr.to_string(),
                    batch_max: self.batch_max,
                    log_level: level,
                    extra_bet: None,
                    ..configured
                };
                let credentials =
                    Credentials { token: token.clone(), tls: tls.clone(), tls_name: self.tls_name.clone() };
                Ok((agency, credentials))
            })
            .collect()
    }

    /// Every agency's settings, credentials and bets, ready to run in this process.
    ///
    /// # Errors
    /// An agency's settings or the CA's file are wrong.
    pub(crate) fn ready(&self, settings: &Settings) -> Result<ReadyAgencies, String> {
        let prepared = self.prepare(settings)?;
        Ok(ReadyAgencies(
            prepared
                .into_iter()
                .map(|(agency, credentials)| {
                    let data = self.data.bets_of(agency.id, self.agencies);
                    (agency, credentials, data)
                })
                .collect(),
        ))
    }

    /// Runs every agency in a thread of this process; `stops` holds one `Stop` each.
    pub(crate) fn run_here(&self, settings: &Settings, stops: &[Stop]) -> Vec<Result<Outcome, String>> {
        match self.ready(settings) {
            Ok(ready) => ready.run(stops),
            Err(e) => (0..self.agencies).map(|_| Err(e.clone())).collect(),
        }
    }

    /// Runs every agency in a child process; `input` receives the child's standard input, which
    /// the caller drops (from a signal handler, say) to stop them.
    ///
    /// # Errors
    /// The child cannot be started or fed; an agency's failure is its outcome, not an error.
    pub(crate) fn run_in_child(
        &self,
        input: &Mutex<Option<ChildStdin>>,
    ) -> Result<Vec<Result<Outcome, String>>, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this program to run agencies: {e}"))?;
        let ca = self.ca.as_ref().map_or_else(|| "-".to_owned(), |p| p.display().to_string());
        let name = self.tls_name.clone().unwrap_or_else(|| "-".to_owned());
        let mut child = Command::new(exe)
            .args([WORKER, &self.addr.to_string(), &self.batch_max.to_string(), &self.agencies.to_string()])
            .args([self.data.arg(), ca, name, if self.verbose { "verbose" } else { "quiet" }.to_owned()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the agencies' process: {e}"))?;
        let mut stdin = child.stdin.take().ok_or("the agencies' process has no input")?;
        let mut tokens = String::new();
        for token in &self.tokens {
            tokens.push_str(token.as_ref().map_or("-", Token::expose));
            tokens.push('\n');
        }
        let fed = stdin.write_all(tokens.as_bytes()).and_then(|()| stdin.flush());
        *lock_unpoisoned(input) = Some(stdin);
        fed.map_err(|e| format!("cannot give the agencies' process its tokens: {e}"))?;
        let mut outcomes: Vec<Result<Outcome, String>> =
            (0..self.agencies).map(|_| Err("the agencies' process ended without its outcome".into())).collect();
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                match line.strip_prefix(OUTCOME).and_then(decode) {
                    Some((id, outcome)) if (1..=self.agencies).contains(&id) => outcomes[id as usize - 1] = outcome,
                    _ => output::line(format_args!("{line}")),
                }
            }
        }
        drop(lock_unpoisoned(input).take());
        let _ = child.wait();
        Ok(outcomes)
    }
}

/// The agencies of a round, ready to run in this process.
pub(crate) struct ReadyAgencies(Vec<(AgencySettings, Credentials, BetData)>);

impl ReadyAgencies {
    /// Runs each in a thread of this process; `stops` holds one `Stop` each.
    pub(crate) fn run(self, stops: &[Stop]) -> Vec<Result<Outcome, String>> {
        let jobs = self.0.into_iter().map(|(agency, credentials, data)| {
            (agency.id, move |stop: &Stop| agency::run_with(&agency, &credentials, &data, stop))
        });
        run_all(jobs.collect(), stops)
    }
}

/// Runs the agencies' jobs, a thread each, and waits for them all. An agency that fails for
/// good stops the others: without it the server never draws, and they would wait for their
/// winners forever. They are reported as stopped, naming it.
pub(crate) fn run_all<F>(jobs: Vec<(u32, F)>, stops: &[Stop]) -> Vec<Result<Outcome, String>>
where
    F: FnOnce(&Stop) -> Result<Outcome, AgencyError> + Send + 'static,
{
    let first_failed: Arc<OnceLock<u32>> = Arc::default();
    let all: Arc<[Stop]> = stops.into();
    let threads: Vec<_> = jobs
        .into_iter()
        .zip(stops)
        .map(|((id, job), stop)| {
            let (stop, all, first_failed) = (stop.clone(), Arc::clone(&all), Arc::clone(&first_failed));
            thread::Builder::new().name(format!("agency-{id}")).stack_size(256 * 1024).spawn(move || {
                let outcome = job(&stop);
                match &outcome {
                    Err(AgencyError::Stopped) => {}
                    Err(_) if first_failed.set(id).is_ok() => all.iter().for_each(Stop::trigger),
                    _ => {}
                }
                outcome
            })
        })
        .collect();
    threads
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

/// `ID ok STORED RECONNECTS DNI,DNI,…` or `ID err MESSAGE`.
fn encode(id: u32, outcome: &Result<Outcome, String>) -> String {
    match outcome {
        Ok(o) => format!("{id} ok {} {} {}", o.stored, o.reconnects, o.winners.join(",")),
        Err(e) => format!("{id} err {}", e.replace('\n', " ")),
    }
}

fn decode(line: &str) -> Option<(u32, Result<Outcome, String>)> {
    let (id, rest) = line.split_once(' ')?;
    let id = id.parse().ok()?;
    if let Some(e) = rest.strip_prefix("err ") {
        return Some((id, Err(e.to_owned())));
    }
    let mut fields = rest.strip_prefix("ok ")?.splitn(3, ' ');
    let (stored, reconnects) = (fields.next()?.parse().ok()?, fields.next()?.parse().ok()?);
    let winners = fields.next().unwrap_or("").split(',').filter(|w| !w.is_empty()).map(str::to_owned).collect();
    Some((id, Ok(Outcome { winners, stored, reconnects })))
}

/// The agencies' process: `lottery-round --agency-worker ADDR BATCH AGENCIES DATA CA|- NAME|-
/// verbose|quiet`.
pub(crate) fn worker(args: &[String]) -> ExitCode {
    match run_worker(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output::err_line(format_args!("lottery-round {WORKER}: {e}"));
            ExitCode::from(2)
        }
    }
}

fn run_worker(args: &[String]) -> Result<(), String> {
    let [addr, batch, agencies, data, ca, name, verbose] = args else {
        return Err("usage: ADDR BATCH AGENCIES DATA CA|- NAME|- verbose|quiet".into());
    };
    let verbose = verbose == "verbose";
    logging::init(if verbose { LevelFilter::Info } else { LevelFilter::Warn });
    crate::app::raise_open_files_limit();
    let agencies: u32 = agencies.parse().map_err(|e| format!("AGENCIES {agencies:?}: {e}"))?;
    crate::sync::size_futex_hash(agencies as usize);
    let mut crowd = Crowd {
        agencies,
        addr: addr.parse().map_err(|e| format!("ADDR {addr:?}: {e}"))?,
        batch_max: batch.parse().map_err(|e| format!("BATCH {batch:?}: {e}"))?,
        data: RoundData::parse(data)?,
        ca: (ca != "-").then(|| PathBuf::from(ca)),
        tokens: Vec::new(),
        tls_name: (name != "-").then(|| name.clone()),
        verbose,
    };
    let mut input = io::stdin().lock();
    for _ in 0..agencies {
        let mut line = String::new();
        input.read_line(&mut line).map_err(|e| format!("reading the tokens: {e}"))?;
        crowd.tokens.push(Token::new(line.trim()).filter(|_| line.trim() != "-"));
    }
    drop(input);
    let settings = Settings::from_process().map_err(|e| e.to_string())?;
    let stops: Vec<Stop> = (0..agencies).map(|_| Stop::default()).collect();
    stop_when_input_closes(&stops);
    let outcomes = crowd.run_here(&settings, &stops);
    for (id, outcome) in (1..).zip(&outcomes) {
        output::line(format_args!("{OUTCOME}{}", encode(id, outcome)));
    }
    Ok(())
}

/// Stops the agencies once the parent closes our standard input (it was stopped, or died).
fn stop_when_input_closes(stops: &[Stop]) {
    let stops = stops.to_vec();
    let on_signal = stops.clone();
    let _ = ctrlc::set_handler(move || on_signal.iter().for_each(Stop::trigger));
    let _ = thread::Builder::new().name("parent".into()).spawn(move || {
        let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
        stops.iter().for_each(Stop::trigger);
    });
}

/// Descriptors a process of the round holds besides its connections: standard streams, the
/// listener, epoll, eventfds, the progress probe, the storage and its lock, libraries.
const BASE_FILES: u64 = 64;

/// Where the agencies run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    Here,
    Child,
}

/// What one process may hold: its open-files limit (soft, once raised to the hard one) and the
/// threads the system allows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MachineLimits {
    pub open_files: u64,
    pub threads: u64,
}

impl MachineLimits {
    /// This machine's, after [`crate::app::raise_open_files_limit`].
    pub(crate) fn here() -> MachineLimits {
        let open_files = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(u64::MAX, |(soft, _)| soft);
        let read = |path: &str| std::fs::read_to_string(path).ok().and_then(|t| t.trim().parse::<u64>().ok());
        let threads = [read("/proc/sys/kernel/pid_max"), read("/proc/sys/kernel/threads-max")]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(u64::MAX);
        MachineLimits { open_files, threads }
    }
}

/// Where `agencies` agencies fit: with the server in this process (`local_server`, which also
/// holds `guests` other connections), each agency costs two descriptors, one on each side; if
/// that is more than one process may hold, the agencies go to a child process. Agencies that
/// read a file larger than can be read whole hold it open while they send (`big_files`).
///
/// # Errors
/// Even split in two the round does not fit: one line with what it needs, the limit, and what
/// to do.
pub(crate) fn place(
    agencies: u32,
    guests: u64,
    local_server: bool,
    big_files: u64,
    limits: MachineLimits,
) -> Result<Placement, String> {
    let n = u64::from(agencies);
    let threads = n * if local_server { 2 } else { 1 } + 200;
    if threads > limits.threads {
        return Err(format!(
            "{agencies} agencies need about {} threads and the system allows {} (kernel.pid_max, kernel.threads-max); raise them (sysctl) or ask for fewer agencies",
            thousands(threads),
            thousands(limits.threads)
        ));
    }
    let agency_side = n + big_files + BASE_FILES;
    let server_side = if local_server { n + guests + BASE_FILES } else { 0 };
    if agency_side + server_side <= limits.open_files {
        return Ok(Placement::Here);
    }
    let needed = agency_side.max(server_side);
    if local_server && needed <= limits.open_files {
        return Ok(Placement::Child);
    }
    Err(format!(
        "{agencies} agencies need about {} open files and the hard limit is {}; raise it (ulimit -Hn) or ask for fewer agencies",
        thousands(needed),
        thousands(limits.open_files)
    ))
}

/// `24100` as `24,100`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Runs one agency thread per file, each loading the credentials its settings name, and
/// waits for them all. `configured` holds each agency's settings (`CLI_RETRY_TIMEOUT_MS` among
/// them) and credentials; `stops` a `Stop` for each. See [`run_all`].
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
    run_all(jobs, stops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_cross_the_pipe_whole() {
        let ok = Ok(Outcome { winners: vec!["1".into(), "22".into()], stored: 7, reconnects: 2 });
        let none = Ok(Outcome { winners: Vec::new(), stored: 0, reconnects: 0 });
        let failed: Result<Outcome, String> = Err("no server at x: refused".into());
        for outcome in [ok, none, failed] {
            assert_eq!(decode(&encode(3, &outcome)), Some((3, outcome)));
        }
        assert!(matches!(RoundData::parse("made:10:75740"), Ok(RoundData::Made { bets: 10, seed: 75740 })));
        assert!(RoundData::parse("made:x").is_err());
    }

    #[test]
    fn agencies_go_to_a_child_when_one_process_cannot_hold_both_sides() {
        let limits = MachineLimits { open_files: 20_000, threads: 32_768 };
        assert_eq!(place(2_000, 0, true, 0, limits), Ok(Placement::Here));
        assert_eq!(place(10_000, 0, true, 0, limits), Ok(Placement::Child));
        assert_eq!(place(10_000, 0, false, 0, limits), Ok(Placement::Here));
        let err = place(25_000, 0, false, 0, MachineLimits { threads: 100_000, ..limits }).unwrap_err();
        assert_eq!(
            err,
            "25000 agencies need about 25,064 open files and the hard limit is 20,000; raise it (ulimit -Hn) or ask for fewer agencies"
        );
        assert!(place(20_000, 0, true, 0, limits).unwrap_err().contains("threads"));
    }
}
