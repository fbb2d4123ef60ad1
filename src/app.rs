//! What `lottery-server` and `lottery-agency` run: flags, settings, logger, signal handler,
//! run, exit code. The binaries call these and nothing else.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use log::{debug, error, info, warn};

use crate::agency::{self, AgencyError, Stop};
use crate::config::{ServerSettings, Settings};
use crate::ledger::Ledger;
use crate::ledger::file::{self, FileConfig, FileLedger};
use crate::ledger::lock::StorageLock;
use crate::ledger::postgres::{self as pg, PgLedger};
use crate::logging;
use crate::output;
use crate::server::auth::AgencyKeys;
use crate::server::operator::Operator;
use crate::server::{self, Limits, Security, ShutdownHandle, tls};
use crate::tools::keys;

mod start_error;
pub(crate) use start_error::{StartError, one_line};

const SERVER_HELP: &str = "\
lottery-server: the lottery central. Takes bets from agencies over TCP, stores them in bets.csv,
makes the draw when every agency is done, and tells each agency its winners.

Usage: lottery-server [--help]
       lottery-server --make-keys DIR   write a CA, the server's certificate and key, one token
                                        per agency (SERVER_AGENCIES) and agencies.keys into DIR;
                                        never overwrites a file
       lottery-server --export-bets FILE  write the round's bets to FILE (a new file) in the
                                        bets.csv format, from SERVER_DATABASE_URL if set, else
                                        from SERVER_STORAGE_PATH

Settings come from ./config.ini (or the file named by LOTTERY_CONFIG), then the environment;
a value that does not parse stops it at start, naming the key. Defaults in brackets.
  SERVER_IP                   address to bind [0.0.0.0]
  SERVER_PORT                 port; 0 = any free port, logged [12345]
  SERVER_LISTEN_BACKLOG       listen backlog [128]
  SERVER_AGENCIES             agencies that must say DONE before the draw [5]
  SERVER_STORAGE_PATH         the bets file; its round state and lock sit beside it [./bets.csv]
  SERVER_SYNC                 always: a batch is acknowledged once on disk; never: at once [always]
  SERVER_GROUP_COMMIT         share one sync among the batches that arrive meanwhile [true]
  SERVER_DATABASE_URL         postgres://…: the round lives in that database, shared by every
                              server on it; empty = bets.csv [empty]
  SERVER_MAX_CONNECTIONS      connections at once; one more gets ERR BUSY [1024]
  SERVER_IDLE_TIMEOUT_MS      a connection silent this long (not waiting for the draw) is
                              closed [30000]
  SERVER_MAX_GUESTS           connections not yet authenticated, at once [256]
  SERVER_MAX_GUESTS_PER_IP    the same, per source address [64]
  SERVER_HELLO_TIMEOUT_MS     a guest must authenticate within this [5000]
  SERVER_MAX_BETS_PER_AGENCY  past it, ERR QUOTA [10000000]
  SERVER_MIN_FREE_BYTES       below this free on the storage's filesystem, ERR STORAGE
                              [268435456]
  SERVER_AGENCY_KEYS          the agencies' token hashes; empty = protected mode, HELLO only
                              from loopback [.secrets/agencies.keys]
  SERVER_TLS_CERT             PEM certificate chain; empty (with the key) = no TLS
                              [.secrets/server.pem]
  SERVER_TLS_KEY              PEM private key [.secrets/server.key]
  SERVER_TLS_NAMES            extra names for the certificate --make-keys writes [empty]
  SERVER_METRICS_ADDRESS      ip:port of the operators' HTTP listener (/metrics, /round.json, /);
                              empty = off [127.0.0.1:9745]
  LOGGING_LEVEL               ERROR, WARN, INFO, DEBUG or TRACE [INFO]
  LOTTERY_CONFIG              the settings file instead of ./config.ini [config.ini]

SIGTERM or SIGINT shuts it down cleanly.";

const AGENCY_HELP: &str = "\
lottery-agency: one betting agency. Sends its bets file to the server in batches, says DONE,
waits for the draw and logs how many of its bets won.

Usage: lottery-agency [--help]
       lottery-agency --ping [HOST:PORT]   check that a server answers PING (default:
                                           CLI_SERVER_ADDRESS); exit 0 on PONG, else 1

Settings come from ./config.ini (or the file named by LOTTERY_CONFIG), then the environment;
a value that does not parse stops it at start, naming the key. Defaults in brackets.
  CLI_ID                 the agency's number, 1..=SERVER_AGENCIES [required]
  CLI_SERVER_ADDRESS     host:port of the server, or several, comma-separated, tried in turn
                         [server:12345, the server's name inside docker compose]
  CLI_BATCH_MAXAMOUNT    most bets in one batch, 1..=431; a batch is also at most 8 KiB [100]
  CLI_DATA_PATH          the agency's bets file [.data/agency-{CLI_ID}.csv]
  CLI_RETRY_TIMEOUT_MS   how long it keeps trying since its last progress (a HELLO answered,
                         a batch acknowledged) before it gives up, exit 1 [30000]
  CLI_LOG_LEVEL          ERROR, WARN, INFO, DEBUG or TRACE [INFO]
  CLI_TOKEN_FILE         the agency's token [.secrets/agency-{CLI_ID}.token]
  CLI_TLS_CA             PEM of the CA it trusts; empty = plain text, to a loopback address
                         only [.secrets/ca.pem]
  CLI_TLS_NAME           the name to check in the server's certificate; empty = the host of
                         CLI_SERVER_ADDRESS [empty]
  NOMBRE, APELLIDO, DOCUMENTO, NACIMIENTO, NUMERO
                         one extra bet, sent before the file's; all five or none [unset]
  LOTTERY_CONFIG         the settings file instead of ./config.ini [config.ini]

Exits 0 once it has its winners, or on SIGTERM; 1 with one line on a final failure.";

/// Handles the only flag the two daemons take. `Some` is the exit code when there is nothing
/// more to do.
pub(crate) fn help_only(name: &str, help: &str) -> Option<ExitCode> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => None,
        Some("-h" | "--help") => {
            output::line(format_args!("{help}"));
            Some(ExitCode::SUCCESS)
        }
        Some(other) => {
            output::err_line(format_args!("{name}: unknown argument {other:?}; see {name} --help"));
            Some(ExitCode::from(2))
        }
    }
}

/// Raises the soft limit on open files to the hard one, as the Go runtime does: every
/// connection is a descriptor, and a common default of 1,024 would cap `SERVER_MAX_CONNECTIONS`
/// (and a `lottery-round` of 1,000 agencies) below what the system allows.
pub(crate) fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => debug!("action: open_files_limit | result: success | limit: {limit}"),
        Err(e) => warn!("action: open_files_limit | result: fail | error: {e}"),
    }
}

/// Prints a start-up error as one line and returns the failure code.
fn fail(name: &str, error: &dyn std::fmt::Display) -> ExitCode {
    output::err_line(format_args!("{name}: {error}"));
    ExitCode::FAILURE
}

/// `lottery-server --make-keys DIR`.
fn make_keys(dir: &str) -> ExitCode {
    const NAME: &str = "lottery-server";
    let settings = match Settings::from_process().and_then(|s| s.server_unchecked()) {
        Ok(s) => s,
        Err(e) => return fail(NAME, &e),
    };
    match keys::make_keys(Path::new(dir), settings.agencies, &settings.tls_names) {
        Ok(made) => {
            output::line(format_args!(
                "wrote {} into {}: give each agency its agency-<k>.token and ca.pem; server.key, agencies.keys and the tokens are mode 0600",
                made.files.join(", "),
                made.dir.display()
            ));
            ExitCode::SUCCESS
        }
        Err(e) => fail(NAME, &e),
    }
}

/// `lottery-server`'s main.
pub fn server_main() -> ExitCode {
    const NAME: &str = "lottery-server";
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["--make-keys", dir] => return make_keys(dir),
        ["--make-keys"] => return fail(NAME, &"--make-keys needs a directory, e.g. --make-keys .secrets"),
        ["--export-bets", path] => return export_bets(Path::new(path)),
        _ => {}
    }
    if let Some(code) = help_only(NAME, SERVER_HELP) {
        return code;
    }
    let settings = match Settings::from_process().and_then(|s| s.server()) {
        Ok(s) => s,
        Err(e) => return fail(NAME, &e),
    };
    logging::init(settings.log_level);
    let limits = Limits::from_settings(&settings);
    // While this is the only thread: resizing the table later waits for every thread to leave it.
    crate::sync::size_futex_hash(limits.max_connections);
    raise_open_files_limit();
    let Started { listener, ledger, security, shutdown, operator, _lock } = match start_server(&settings) {
        Ok(started) => started,
        Err(e) => return fail(NAME, &one_line(&e)),
    };
    let served = server::run(listener, ledger, limits, Arc::new(security), &shutdown, operator.metrics());
    operator.stop();
    match served {
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

/// What the server has once it may serve.
struct Started {
    listener: TcpListener,
    ledger: Arc<dyn Ledger>,
    security: Security,
    shutdown: ShutdownHandle,
    operator: Operator,
    /// The file ledger's; replicas on one database share it by design, and take none.
    _lock: Option<StorageLock>,
}

/// The TLS configuration and agency keys the settings name, with a `WARN` for each that is
/// off. A named file that is missing is an error that says how to make it.
///
/// # Errors
/// A key file is missing or unusable.
pub(crate) fn load_security(settings: &ServerSettings) -> Result<Security, String> {
    let how = "; make the keys with `lottery-server --make-keys .secrets` (see the README, \"Security\")";
    let exists = |path: &Path, key: &str| {
        if path.exists() { Ok(()) } else { Err(format!("{key} = {} does not exist{how}", path.display())) }
    };
    let tls = match &settings.tls {
        Some((cert, key)) => {
            exists(cert, "SERVER_TLS_CERT")?;
            exists(key, "SERVER_TLS_KEY")?;
            Some(tls::server_config(cert, key)?)
        }
        None => {
            warn!(
                "action: tls | result: success | enabled: false | warning: SERVER_TLS_CERT and SERVER_TLS_KEY are empty, so bets and winners cross the network in clear"
            );
            None
        }
    };
    let keys = match &settings.agency_keys {
        Some(path) => {
            exists(path, "SERVER_AGENCY_KEYS")?;
            Some(AgencyKeys::load(path, settings.agencies)?)
        }
        None => {
            warn!(
                "action: agency_keys | result: success | enabled: false | warning: SERVER_AGENCY_KEYS is empty, so the server is in protected mode and takes HELLO only from loopback"
            );
            None
        }
    };
    Ok(Security { tls, keys })
}

/// Everything before serving: the storage locked, the round recovered from its files, the
/// keys, the listener, the signal handler. An error here is said in one line, and nothing has
/// been served.
fn start_server(settings: &ServerSettings) -> Result<Started, StartError> {
    let security = load_security(settings).map_err(StartError::Security)?;
    let (ledger, lock) = open_ledger(settings)?;
    let addr = SocketAddr::new(settings.ip, settings.port);
    let listener = server::bind(addr, settings.backlog).map_err(|source| StartError::Listen { addr, source })?;
    let shutdown = ShutdownHandle::new().map_err(StartError::Shutdown)?;
    let on_signal = shutdown.clone();
    ctrlc::set_handler(move || on_signal.trigger()).map_err(StartError::Signals)?;
    // A log that nobody reads any more (`lottery-server | head`) stops the server as SIGTERM does.
    let on_close = shutdown.clone();
    output::on_close(move || on_close.trigger());
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(
        "action: listen | result: success | address: {local} | agencies: {} | tls: {} | agency_keys: {}",
        settings.agencies,
        security.tls.is_some(),
        security.keys.is_some()
    );
    let operator = Operator::start(settings.metrics, Arc::clone(&ledger)).map_err(StartError::Metrics)?;
    Ok(Started { listener, ledger, security, shutdown, operator, _lock: lock })
}

/// The round's ledger: the database of `SERVER_DATABASE_URL` if set, else `bets.csv`, locked.
fn open_ledger(settings: &ServerSettings) -> Result<(Arc<dyn Ledger>, Option<StorageLock>), StartError> {
    if let Some(url) = &settings.database_url {
        let (ledger, opened) = PgLedger::open(url, settings.agencies, settings.max_bets_per_agency)?;
        info!(
            "action: open_storage | result: success | {} | bets: {} | agencies_done: {} | drawn: {}",
            ledger.describe(),
            opened.bets,
            opened.agencies_done,
            opened.drawn
        );
        return Ok((Arc::new(ledger), None));
    }
    let lock = StorageLock::acquire(&settings.storage_path).map_err(StartError::Lock)?;
    let (ledger, resumed) = FileLedger::open(FileConfig::from_settings(settings))?;
    info!(
        "action: open_storage | result: success | path: {} | bets: {} | truncated_bytes: {} | agencies_done: {} | drawn: {}",
        settings.storage_path.display(),
        resumed.bets,
        resumed.truncated,
        resumed.agencies_done,
        resumed.drawn
    );
    Ok((Arc::new(ledger), Some(lock)))
}

/// `lottery-server --export-bets FILE`: the round's bets into a new file (mode 0600, never
/// through a link), or to standard output (`-`), or to a character device such as /dev/stdout.
fn export_bets(path: &Path) -> ExitCode {
    const NAME: &str = "lottery-server";
    let settings = match Settings::from_process().and_then(|s| s.server()) {
        Ok(s) => s,
        Err(e) => return fail(NAME, &e),
    };
    let target = match ExportTarget::open(path) {
        Ok(target) => target,
        Err(e) => return fail(NAME, &e),
    };
    let new_file = matches!(target, ExportTarget::NewFile(_));
    let mut out = std::io::BufWriter::new(target);
    let written = match &settings.database_url {
        Some(url) => pg::export(url, &mut out),
        None => file::export(&settings.storage_path, &mut out),
    };
    let written = written.and_then(|n| std::io::Write::flush(&mut out).map(|()| n).map_err(|e| e.to_string()));
    if out.get_ref().reader_left() {
        // `--export-bets - | head`: the reader took what it wanted, as with any other filter.
        return ExitCode::SUCCESS;
    }
    let flushed = written.and_then(|n| {
        let target = out.into_inner().map_err(|e| e.error().to_string())?;
        target.finish().map(|()| n).map_err(|e| e.to_string())
    });
    match flushed {
        // The summary goes where the bets do not.
        Ok(n) if new_file => output::line(format_args!("{NAME}: wrote {n} bets to {}", path.display())),
        Ok(n) => output::err_line(format_args!("{NAME}: wrote {n} bets to {}", path.display())),
        Err(e) => {
            // Half an export is worse than none: it would read as a smaller round.
            if new_file {
                let _ = std::fs::remove_file(path);
            }
            return fail(NAME, &format!("{}: {e}", path.display()));
        }
    }
    ExitCode::SUCCESS
}

/// Where an export goes.
enum ExportTarget {
    /// Standard output, and whether its reader has gone (a broken pipe).
    Stdout(std::io::Stdout, bool),
    Device(std::fs::File),
    NewFile(std::fs::File),
}

impl ExportTarget {
    /// `-`: standard output; an existing character device or pipe: that; else a new file,
    /// created 0600 (bettors' names and DNIs), never an existing one and never through a link.
    fn open(path: &Path) -> Result<ExportTarget, String> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        if path.as_os_str() == "-" {
            return Ok(ExportTarget::Stdout(std::io::stdout(), false));
        }
        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device() || m.file_type().is_fifo()) {
            let device = std::fs::OpenOptions::new().write(true).open(path);
            return device.map(ExportTarget::Device).map_err(|e| format!("cannot write {}: {e}", path.display()));
        }
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path);
        created.map(ExportTarget::NewFile).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                format!(
                    "{} exists: the export never replaces a file; name a new one, or - for standard output",
                    path.display()
                )
            }
            _ => format!("cannot create {}: {e}", path.display()),
        })
    }

    /// Whether standard output's reader has gone.
    fn reader_left(&self) -> bool {
        matches!(self, ExportTarget::Stdout(_, true))
    }

    /// Makes a new file durable; a stream or a device only needs its writes.
    fn finish(self) -> std::io::Result<()> {
        match self {
            ExportTarget::NewFile(file) => file.sync_all(),
            ExportTarget::Stdout(mut out, _) => std::io::Write::flush(&mut out),
            ExportTarget::Device(_) => Ok(()),
        }
    }
}

impl std::io::Write for ExportTarget {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ExportTarget::Stdout(out, reader_left) => out.write(buf).inspect_err(|e| {
                *reader_left |= e.kind() == std::io::ErrorKind::BrokenPipe;
            }),
            ExportTarget::Device(file) | ExportTarget::NewFile(file) => file.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ExportTarget::Stdout(out, _) => out.flush(),
            ExportTarget::Device(file) | ExportTarget::NewFile(file) => file.flush(),
        }
    }
}

/// `lottery-agency --ping`: exit 0 if the server answers `PONG`.
fn ping(address: Result<String, String>) -> ExitCode {
    match address.and_then(|a| agency::ping(&a, Duration::from_secs(2)).map(|()| a)) {
        Ok(address) => {
            output::line(format_args!("PONG from {address}"));
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
    let on_close = stop.clone();
    output::on_close(move || on_close.trigger());
    match agency::run(&settings, &stop) {
        Ok(_) => ExitCode::SUCCESS,
        Err(AgencyError::Stopped) => {
            info!("action: shutdown | result: success");
            ExitCode::SUCCESS
        }
        Err(e) => {
            // Logged, and said on stderr as one line: a final failure, not to be retried.
            error!("action: round | result: fail | error: {}", logging::field(&e.to_string()));
            fail(NAME, &e)
        }
    }
}
