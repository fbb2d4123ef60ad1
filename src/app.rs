//! What `lottery-server` and `lottery-agency` run: flags, settings, logger, signal handler,
//! run, exit code. The binaries call these and nothing else.

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use log::{debug, error, info, warn};

use crate::agency::{self, AgencyError, Stop};
use crate::config::{ServerSettings, Settings};
use crate::ledger::round::{Round, RoundConfig};
use crate::logging;
use crate::server::{self, Limits, ShutdownHandle};

const SERVER_HELP: &str = "\
lottery-server: the lottery central. Takes bets from agencies over TCP, stores them in bets.csv,
makes the draw when every agency is done, and tells each agency its winners.

Usage: lottery-server [--help]

Settings come from ./config.ini (or the file named by LOTTERY_CONFIG), then environment
variables: SERVER_IP, SERVER_PORT, SERVER_LISTEN_BACKLOG, SERVER_AGENCIES, SERVER_STORAGE_PATH,
SERVER_MAX_CONNECTIONS, SERVER_IDLE_TIMEOUT_MS, SERVER_SYNC, SERVER_GROUP_COMMIT, LOGGING_LEVEL.
SIGTERM or SIGINT shuts it down cleanly.";

const AGENCY_HELP: &str = "\
lottery-agency: one betting agency. Sends its bets file to the server in batches, says DONE,
waits for the draw and logs how many of its bets won.

Usage: lottery-agency [--help]
       lottery-agency --ping [HOST:PORT]   check that a server answers PING (default:
                                           CLI_SERVER_ADDRESS); exit 0 on PONG, else 1

Settings come from ./config.ini (or the file named by LOTTERY_CONFIG), then environment
variables: CLI_ID (required), CLI_SERVER_ADDRESS, CLI_BATCH_MAXAMOUNT, CLI_DATA_PATH,
CLI_RETRY_TIMEOUT_MS, CLI_LOG_LEVEL; and NOMBRE, APELLIDO, DOCUMENTO, NACIMIENTO, NUMERO for
one extra bet sent before the file's. Exits 0 once it has its winners, or on SIGTERM.";

/// Handles the only flag the two daemons take. `Some` is the exit code when there is nothing
/// more to do.
pub fn help_only(name: &str, help: &str) -> Option<ExitCode> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => None,
        Some("-h" | "--help") => {
            println!("{help}");
            Some(ExitCode::SUCCESS)
        }
        Some(other) => {
            eprintln!("{name}: unknown argument {other:?}; see {name} --help");
            Some(ExitCode::from(2))
        }
    }
}

/// Raises the soft limit on open files to the hard one, as the Go runtime does: every
/// connection is a descriptor, and a common default of 1,024 would cap `SERVER_MAX_CONNECTIONS`
/// (and a `lottery-round` of 1,000 agencies) below what the system allows.
pub fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => debug!("action: open_files_limit | result: success | limit: {limit}"),
        Err(e) => warn!("action: open_files_limit | result: fail | error: {e}"),
    }
}

/// Prints a start-up error as one line and returns the failure code.
fn fail(name: &str, error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("{name}: {error}");
    ExitCode::FAILURE
}

/// `lottery-server`'s main.
pub fn server_main() -> ExitCode {
    const NAME: &str = "lottery-server";
    if let Some(code) = help_only(NAME, SERVER_HELP) {
        return code;
    }
    let settings = match Settings::from_process().and_then(|s| s.server()) {
        Ok(s) => s,
        Err(e) => return fail(NAME, &e),
    };
    logging::init(settings.log_level);
    raise_open_files_limit();
    let (listener, round, shutdown) = match start_server(&settings) {
        Ok(started) => started,
        Err(e) => return fail(NAME, &e),
    };
    let limits = Limits { max_connections: settings.max_connections, idle_timeout: settings.idle_timeout };
    match server::run(listener, Arc::new(round), limits, &shutdown) {
        Ok(()) => {
            info!("action: shutdown | result: success");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("action: shutdown | result: fail | error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Everything before serving: the round recovered from its files, the listener, the signal
/// handler. An error here is said in one line, and nothing has been served.
fn start_server(settings: &ServerSettings) -> Result<(TcpListener, Round, ShutdownHandle), String> {
    let config = RoundConfig {
        agencies: settings.agencies,
        storage_path: settings.storage_path.clone(),
        sync: settings.sync,
        group_commit: settings.group_commit,
    };
    let (round, resumed) = Round::open(config).map_err(|e| e.to_string())?;
    info!(
        "action: open_storage | result: success | path: {} | bets: {} | truncated_bytes: {} | agencies_done: {} | drawn: {}",
        settings.storage_path.display(),
        resumed.bets,
        resumed.truncated,
        resumed.agencies_done,
        resumed.drawn
    );
    let addr = SocketAddr::new(settings.ip, settings.port);
    let listener = server::bind(addr, settings.backlog).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let shutdown = ShutdownHandle::new(&listener).map_err(|e| e.to_string())?;
    let on_signal = shutdown.clone();
    ctrlc::set_handler(move || on_signal.trigger()).map_err(|e| format!("cannot handle signals: {e}"))?;
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!("action: listen | result: success | address: {local} | agencies: {}", settings.agencies);
    Ok((listener, round, shutdown))
}

/// `lottery-agency --ping`: exit 0 if the server answers `PONG`.
fn ping(address: Result<String, String>) -> ExitCode {
    match address.and_then(|a| agency::ping(&a, Duration::from_secs(2)).map(|()| a)) {
        Ok(address) => {
            println!("PONG from {address}");
            ExitCode::SUCCESS
        }
        Err(e) => fail("lottery-agency", &e),
    }
}

/// `lottery-agency`'s main.
pub fn agency_main() -> ExitCode {
    const NAME: &str = "lottery-agency";
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["--ping"] => {
            return ping(Settings::from_process().and_then(|s| s.server_address()).map_err(|e| e.to_string()));
        }
        ["--ping", address] => return ping(Ok(address.to_string())),
        _ => {}
    }
    if let Some(code) = help_only(NAME, AGENCY_HELP) {
        return code;
    }
    let settings = match Settings::from_process().and_then(|s| s.agency()) {
        Ok(s) => s,
        Err(e) => return fail(NAME, &e),
    };
    logging::init(settings.log_level);
    let stop = Stop::default();
    let on_signal = stop.clone();
    if let Err(e) = ctrlc::set_handler(move || on_signal.trigger()) {
        return fail(NAME, &format!("cannot handle signals: {e}"));
    }
    match agency::run(&settings, &stop) {
        Ok(_) => ExitCode::SUCCESS,
        Err(AgencyError::Stopped) => {
            info!("action: shutdown | result: success");
            ExitCode::SUCCESS
        }
        Err(e @ AgencyError::Data { .. }) if !stop.is_triggered() => {
            // A data problem found before any connection: said on stderr too, as a start-up error.
            error!("action: round | result: fail | error: {}", logging::field(&e.to_string()));
            fail(NAME, &e)
        }
        Err(e) => {
            error!("action: round | result: fail | error: {}", logging::field(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}
