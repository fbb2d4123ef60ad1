//! `lottery-round`'s options: its flags, their defaults, and which do not go together.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::{self, BATCH_MAX_WHAT};
use crate::tools::attacks::{Attack, Sources};

pub(crate) const HELP: &str = "\
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
    pub(crate) fn bets(&self) -> u64 {
        self.bets_per_agency.unwrap_or(DEFAULT_BETS)
    }

    /// The seed of a generated data set.
    pub(crate) fn seed(&self) -> u64 {
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
    pub(crate) fn check(&self) -> Result<(), String> {
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

    /// The agency the hostile clients speak for: in protected mode (`--plaintext`) loopback is
    /// trusted, so they get one of their own, after the real ones, or they would take over a real
    /// agency's session; over TLS they are refused at the door whatever agency they name.
    pub(crate) fn hostile_agency(&self) -> Option<u32> {
        (self.plaintext && self.hostile > 0 && self.server.is_none()).then_some(self.agencies + 1)
    }
}
