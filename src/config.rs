//! Settings: built-in defaults, then `config.ini` (or the file named by `LOTTERY_CONFIG`), then
//! environment variables, read in one place into typed values.
//!
//! The `config` crate reads the file, through a format of our own (`config/ini.rs`, the
//! course's dialect of INI) that knows the line of every value: the crate's own INI format
//! reports errors as Rust debug text, on the wrong line, and drops the line of every value, so
//! that every error here can say the file, the line and what was expected. Every key has one name, the same in the file
//! and in the environment (case-insensitive in the file). A value that does not parse is an
//! error naming the key and where it came from.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::LevelFilter;

use crate::ledger::file::SyncMode;
use crate::wire::protocol::MAX_BATCH_ROWS;

mod ini;

/// Every key, with its built-in default (`None`: no default).
pub const KEYS: &[(&str, Option<&str>)] = &[
    ("SERVER_IP", Some("0.0.0.0")),
    ("SERVER_PORT", Some("12345")),
    ("SERVER_LISTEN_BACKLOG", Some("128")),
    ("SERVER_AGENCIES", Some("5")),
    ("SERVER_STORAGE_PATH", Some("./bets.csv")),
    ("SERVER_MAX_CONNECTIONS", Some("1024")),
    ("SERVER_IDLE_TIMEOUT_MS", Some("30000")),
    ("SERVER_MAX_GUESTS", Some("256")),
    ("SERVER_MAX_GUESTS_PER_IP", Some("64")),
    ("SERVER_HELLO_TIMEOUT_MS", Some("5000")),
    ("SERVER_MAX_BETS_PER_AGENCY", Some("10000000")),
    ("SERVER_MIN_FREE_BYTES", Some("268435456")),
    ("SERVER_SYNC", Some("always")),
    ("SERVER_GROUP_COMMIT", Some("true")),
    ("SERVER_DATABASE_URL", Some("")),
    ("SERVER_METRICS_ADDRESS", Some(DEFAULT_METRICS_ADDRESS)),
    ("LOGGING_LEVEL", Some("INFO")),
    ("SERVER_AGENCY_KEYS", Some(".secrets/agencies.keys")),
    ("SERVER_TLS_CERT", Some(".secrets/server.pem")),
    ("SERVER_TLS_KEY", Some(".secrets/server.key")),
    ("SERVER_TLS_NAMES", Some("")),
    ("CLI_ID", None),
    ("CLI_SERVER_ADDRESS", Some("server:12345")),
    ("CLI_BATCH_MAXAMOUNT", Some("100")),
    ("CLI_DATA_PATH", Some(".data/agency-{CLI_ID}.csv")),
    ("CLI_RETRY_TIMEOUT_MS", Some("30000")),
    ("CLI_LOG_LEVEL", Some("INFO")),
    ("CLI_TOKEN_FILE", Some(".secrets/agency-{CLI_ID}.token")),
    ("CLI_TLS_CA", Some(".secrets/ca.pem")),
    ("CLI_TLS_NAME", Some("")),
];

/// Where the operator's HTTP listener binds unless told otherwise.
pub(crate) const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9745";

/// `SERVER_METRICS_ADDRESS`: where the operator's HTTP listener binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MetricsAddress {
    pub(crate) addr: std::net::SocketAddr,
    /// Not the default: an address that cannot be bound is a start-up error, not a warning.
    pub(crate) required: bool,
}

/// The five variables of the agency's extra bet, in field order.
pub const BET_VARS: [&str; 5] = ["NOMBRE", "APELLIDO", "DOCUMENTO", "NACIMIENTO", "NUMERO"];

/// A setting that could not be read, said for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigError(pub(crate) String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "configuration: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The merged settings, as text with where each came from, before typing.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    values: HashMap<&'static str, (String, String)>,
    env: HashMap<String, String>,
}

/// The server's typed settings.
#[derive(Debug, Clone)]
pub(crate) struct ServerSettings {
    pub(crate) ip: IpAddr,
    pub(crate) port: u16,
    pub(crate) backlog: i32,
    pub(crate) agencies: u32,
    pub(crate) storage_path: PathBuf,
    pub(crate) max_connections: usize,
    pub(crate) idle_timeout: Duration,
    /// Connections not yet authenticated, at once, and per source address.
    pub(crate) max_guests: usize,
    pub(crate) max_guests_per_ip: usize,
    /// How long a guest has to authenticate (or finish its probe).
    pub(crate) hello_timeout: Duration,
    pub(crate) max_bets_per_agency: u64,
    pub(crate) min_free_bytes: u64,
    pub(crate) sync: SyncMode,
    pub(crate) group_commit: bool,
    /// `SERVER_DATABASE_URL`: the round lives in that PostgreSQL database; `None`: in `bets.csv`.
    pub(crate) database_url: Option<String>,
    pub(crate) log_level: LevelFilter,
    /// `agencies.keys`; `None`: protected mode.
    pub(crate) agency_keys: Option<PathBuf>,
    /// The certificate chain and key; `None`: no TLS.
    pub(crate) tls: Option<(PathBuf, PathBuf)>,
    /// Extra names for the certificate `--make-keys` writes.
    pub(crate) tls_names: Vec<String>,
    /// `SERVER_METRICS_ADDRESS`; `None`: off.
    pub(crate) metrics: Option<MetricsAddress>,
}

/// An agency's typed settings.
#[derive(Debug, Clone)]
pub(crate) struct AgencySettings {
    pub(crate) id: u32,
    pub(crate) server_address: String,
    pub(crate) batch_max: usize,
    pub(crate) data_path: PathBuf,
    pub(crate) retry_timeout: Duration,
    pub(crate) log_level: LevelFilter,
    /// `NOMBRE`, `APELLIDO`, `DOCUMENTO`, `NACIMIENTO`, `NUMERO`, when all five are set.
    pub(crate) extra_bet: Option<[String; 5]>,
    /// The file holding its token; `None`: `HELLO` without one (a server in protected mode).
    pub(crate) token_file: Option<PathBuf>,
    /// The CA to trust; `None`: plain text.
    pub(crate) tls_ca: Option<PathBuf>,
    /// The name to verify instead of the host part of the address.
    pub(crate) tls_name: Option<String>,
}

impl Settings {
    /// Reads `config.ini` (or `LOTTERY_CONFIG`) and overlays `env`, which the binaries take
    /// from the process and tests pass as a map.
    ///
    /// # Errors
    /// `LOTTERY_CONFIG` names a missing file, the file is not INI, or it has an unknown key.
    pub(crate) fn load(env: HashMap<String, String>) -> Result<Settings, ConfigError> {
        let (path, required) = match env.get("LOTTERY_CONFIG") {
            Some(path) => (PathBuf::from(path), true),
            None => (PathBuf::from("config.ini"), false),
        };
        if required && !path.is_file() {
            return Err(ConfigError(format!("LOTTERY_CONFIG names {}, which is not a file", path.display())));
        }
        let file = read_ini(&path, required)?;
        let mut values = HashMap::new();
        for &(key, default) in KEYS {
            let value = match (env.get(key), file.get(key)) {
                (Some(v), _) => Some((v.clone(), format!("environment variable {key}"))),
                (None, Some((value, origin))) => Some((value.clone(), format!("{origin}: {key}"))),
                (None, None) => default.map(|d| (d.to_owned(), format!("{key} (built-in default)"))),
            };
            if let Some(value) = value {
                values.insert(key, value);
            }
        }
        Ok(Settings { values, env })
    }

    /// Reads the process's own environment and configuration file.
    ///
    /// # Errors
    /// As [`Settings::load`].
    pub(crate) fn from_process() -> Result<Settings, ConfigError> {
        Settings::load(std::env::vars().collect())
    }

    fn raw(&self, key: &str) -> Result<&(String, String), ConfigError> {
        self.values.get(key).ok_or_else(|| ConfigError(format!("{key} is required and not set")))
    }

    /// The value of `key`, parsed by `parse`; `what` says what a good value is.
    fn get<T>(&self, key: &str, what: &str, parse: impl Fn(&str) -> Option<T>) -> Result<T, ConfigError> {
        let (value, origin) = self.raw(key)?;
        parse(value.trim()).ok_or_else(|| ConfigError(format!("{origin} = {value:?} is not {what}")))
    }

    fn number<T: std::str::FromStr + PartialOrd>(
        &self,
        key: &str,
        min: T,
        max: T,
        what: &str,
    ) -> Result<T, ConfigError> {
        self.get(key, what, |v| v.parse().ok().filter(|n| *n >= min && *n <= max))
    }

    fn millis(&self, key: &str) -> Result<Duration, ConfigError> {
        self.number(key, 1, u64::MAX, "a number of milliseconds, at least 1").map(Duration::from_millis)
    }

    /// A value that may be empty (`None`), such as a path to a file that is not used.
    fn optional(&self, key: &str) -> Result<Option<String>, ConfigError> {
        self.get(key, "text", |v| Some(Some(v.to_owned()).filter(|v| !v.is_empty())))
    }

    fn level(&self, key: &str) -> Result<LevelFilter, ConfigError> {
        self.get(key, "a log level (ERROR, WARN, INFO, DEBUG, TRACE or OFF)", |v| v.parse().ok())
    }

    /// The server's settings.
    ///
    /// # Errors
    /// The first value that does not parse, naming its key.
    pub(crate) fn server(&self) -> Result<ServerSettings, ConfigError> {
        // SERVER_MAX_CONNECTIONS below SERVER_AGENCIES + SERVER_MAX_GUESTS is raised to it
        // (`server::Limits::from_settings`): the ceiling never refuses the round's agencies.
        self.server_unchecked()
    }

    /// The server's settings, each checked on its own but not against each other: for
    /// `--make-keys`, which needs only `SERVER_AGENCIES` and `SERVER_TLS_NAMES`.
    ///
    /// # Errors
    /// As [`Settings::server`], but for the room left by `SERVER_MAX_CONNECTIONS`.
    pub(crate) fn server_unchecked(&self) -> Result<ServerSettings, ConfigError> {
        Ok(ServerSettings {
            ip: self.get("SERVER_IP", "an IP address, nor a host name this machine resolves", resolve_ip)?,
            port: self.number("SERVER_PORT", 0, u16::MAX, "a port 0..=65535")?,
            backlog: self.number("SERVER_LISTEN_BACKLOG", 1, 65535, "a backlog 1..=65535")?,
            agencies: self.number("SERVER_AGENCIES", 1, 100_000, "a number of agencies 1..=100000")?,
            storage_path: self
                .get("SERVER_STORAGE_PATH", "a path", |v| Some(v).filter(|v| !v.is_empty()).map(PathBuf::from))?,
            max_connections: self.number("SERVER_MAX_CONNECTIONS", 1, 1_000_000, "a number 1..=1000000")?,
            idle_timeout: self.millis("SERVER_IDLE_TIMEOUT_MS")?,
            max_guests: self.number("SERVER_MAX_GUESTS", 1, 1_000_000, "a number 1..=1000000")?,
            max_guests_per_ip: self.number("SERVER_MAX_GUESTS_PER_IP", 1, 1_000_000, "a number 1..=1000000")?,
            hello_timeout: self.millis("SERVER_HELLO_TIMEOUT_MS")?,
            max_bets_per_agency: self.number(
                "SERVER_MAX_BETS_PER_AGENCY",
                1,
                u64::MAX,
                "a number of bets, at least 1",
            )?,
            min_free_bytes: self.number("SERVER_MIN_FREE_BYTES", 0, u64::MAX, "a number of bytes")?,
            sync: self.get("SERVER_SYNC", "always or never", |v| match v.to_ascii_lowercase().as_str() {
                "always" => Some(SyncMode::Always),
                "never" => Some(SyncMode::Never),
                _ => None,
            })?,
            group_commit: self.get("SERVER_GROUP_COMMIT", "true or false", |v| v.to_ascii_lowercase().parse().ok())?,
            database_url: self.database_url()?,
            log_level: self.level("LOGGING_LEVEL")?,
            agency_keys: self.optional("SERVER_AGENCY_KEYS")?.map(PathBuf::from),
            tls: match (self.optional("SERVER_TLS_CERT")?, self.optional("SERVER_TLS_KEY")?) {
                (Some(cert), Some(key)) => Some((cert.into(), key.into())),
                (None, None) => None,
                _ => {
                    let why = "SERVER_TLS_CERT and SERVER_TLS_KEY must be both set (TLS) or both empty (no TLS)";
                    return Err(ConfigError(why.into()));
                }
            },
            tls_names: self
                .optional("SERVER_TLS_NAMES")?
                .map(|names| names.split(',').map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()).collect())
                .unwrap_or_default(),
            metrics: self.metrics_address()?,
        })
    }

    /// `SERVER_METRICS_ADDRESS`: `ip:port`, or empty for none.
    ///
    /// # Errors
    /// It is neither empty nor `ip:port`.
    fn metrics_address(&self) -> Result<Option<MetricsAddress>, ConfigError> {
        self.get("SERVER_METRICS_ADDRESS", "ip:port (e.g. 127.0.0.1:9745), or empty for none", |v| match v {
            "" => Some(None),
            v => v.parse().ok().map(|addr| Some(MetricsAddress { addr, required: v != DEFAULT_METRICS_ADDRESS })),
        })
    }

    /// An agency's settings.
    ///
    /// # Errors
    /// The first value that does not parse, naming its key; `CLI_ID` unset; only some of the
    /// extra bet's five variables set.
    pub(crate) fn agency(&self) -> Result<AgencySettings, ConfigError> {
        let id = self.number("CLI_ID", 1, u32::MAX, "an agency number, at least 1")?;
        self.agency_with_id(id)
    }

    /// The settings of agency `id`, whatever `CLI_ID` says (for `lottery-round`'s agencies).
    ///
    /// # Errors
    /// As [`Settings::agency`], but for `CLI_ID`.
    pub(crate) fn agency_with_id(&self, id: u32) -> Result<AgencySettings, ConfigError> {
        let data_path = self.get("CLI_DATA_PATH", "a path", |v| Some(v.to_owned()).filter(|v| !v.is_empty()))?;
        Ok(AgencySettings {
            id,
            server_address: self.server_address()?,
            batch_max: self.batch_max()?,
            data_path: PathBuf::from(data_path.replace("{CLI_ID}", &id.to_string())),
            retry_timeout: self.retry_timeout()?,
            log_level: self.level("CLI_LOG_LEVEL")?,
            extra_bet: self.extra_bet()?,
            token_file: self.optional("CLI_TOKEN_FILE")?.map(|f| PathBuf::from(f.replace("{CLI_ID}", &id.to_string()))),
            tls_ca: self.optional("CLI_TLS_CA")?.map(PathBuf::from),
            tls_name: self.optional("CLI_TLS_NAME")?,
        })
    }

    /// `SERVER_DATABASE_URL`, if set and not empty.
    ///
    /// # Errors
    /// It is not a `postgres://` URL. The message does not quote it: it may hold a password.
    fn database_url(&self) -> Result<Option<String>, ConfigError> {
        let (value, origin) = self.raw("SERVER_DATABASE_URL")?;
        match value.trim() {
            "" => Ok(None),
            url if url.starts_with("postgres://") || url.starts_with("postgresql://") => Ok(Some(url.to_owned())),
            _ => Err(ConfigError(format!("{origin} is not a postgres://… URL (its value is not shown)"))),
        }
    }

    /// `CLI_SERVER_ADDRESS`: the server's `host:port`, or several (`host:port,host:port`) for
    /// replicas of one round.
    ///
    /// # Errors
    /// One of them is not `host:port`.
    pub(crate) fn server_address(&self) -> Result<String, ConfigError> {
        self.get("CLI_SERVER_ADDRESS", "host:port, or several separated by commas", |v| {
            let valid = v.split(',').map(str::trim).all(|one| {
                one.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            });
            valid.then(|| v.to_owned())
        })
    }

    /// `CLI_BATCH_MAXAMOUNT`: most bets in one batch.
    ///
    /// # Errors
    /// It does not parse, or is not in `1..=431` (what 8 KiB can hold).
    pub(crate) fn batch_max(&self) -> Result<usize, ConfigError> {
        self.get("CLI_BATCH_MAXAMOUNT", BATCH_MAX_WHAT, parse_batch_max)
    }

    /// `CLI_RETRY_TIMEOUT_MS`: how long an agency keeps reconnecting.
    ///
    /// # Errors
    /// It is not a number of milliseconds.
    pub(crate) fn retry_timeout(&self) -> Result<Duration, ConfigError> {
        self.number("CLI_RETRY_TIMEOUT_MS", 0, u64::MAX, "a number of milliseconds").map(Duration::from_millis)
    }

    fn extra_bet(&self) -> Result<Option<[String; 5]>, ConfigError> {
        let set: Vec<&str> = BET_VARS.iter().copied().filter(|v| self.env.contains_key(*v)).collect();
        match set.len() {
            0 => Ok(None),
            5 => Ok(Some(BET_VARS.map(|v| self.env[v].clone()))),
            _ => Err(ConfigError(format!(
                "the extra bet needs all of {} or none; only {} set",
                BET_VARS.join(", "),
                set.join(", ")
            ))),
        }
    }
}

/// What a batch size (`CLI_BATCH_MAXAMOUNT`, `lottery-round --batch`) must be.
pub const BATCH_MAX_WHAT: &str = "a number of bets 1..=431 (what a batch of 8 KiB can hold)";

/// A batch size, if it is [`BATCH_MAX_WHAT`].
pub(crate) fn parse_batch_max(value: &str) -> Option<usize> {
    value.trim().parse().ok().filter(|n| (1..=MAX_BATCH_ROWS as usize).contains(n))
}

/// `SERVER_IP`: an IP address, or a host name resolved once, at start-up (the course's
/// `config.ini` says `SERVER_IP = server`, the container's own name); IPv4 first.
fn resolve_ip(value: &str) -> Option<IpAddr> {
    if let Ok(ip) = value.parse() {
        return Some(ip);
    }
    let addrs: Vec<IpAddr> = (value, 0).to_socket_addrs().ok()?.map(|a| a.ip()).collect();
    addrs.iter().find(|ip| ip.is_ipv4()).or(addrs.first()).copied()
}

/// The INI file's keys (upper-cased), values, and where each is (`path:line`); an absent
/// optional file is empty.
fn read_ini(path: &Path, required: bool) -> Result<HashMap<String, (String, String)>, ConfigError> {
    use config::Source as _;
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(HashMap::new()),
        Err(e) => return Err(ConfigError(format!("{}: cannot read it: {e}", path.display()))),
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        ConfigError(format!("{}:{line}: not UTF-8 text: expected a text file in UTF-8", path.display()))
    })?;
    let format = ini::CourseIni { path: path.display().to_string(), known: KEYS.iter().map(|(k, _)| *k).collect() };
    let table = config::File::from_str(&text, format).collect().map_err(|e| ConfigError(e.to_string()))?;
    let mut out = HashMap::new();
    for (key, value) in table {
        let origin = value.origin().unwrap_or_default().to_owned();
        let text = value.into_string().map_err(|e| ConfigError(format!("{origin}: {key}: {e}")))?;
        out.insert(key.to_ascii_uppercase(), (text, origin));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn with_file(text: &str, extra: &[(&str, &str)]) -> (tempfile::TempDir, Result<Settings, ConfigError>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.ini");
        std::fs::write(&path, text).unwrap();
        let mut vars = env(extra);
        vars.insert("LOTTERY_CONFIG".into(), path.display().to_string());
        let settings = Settings::load(vars);
        (dir, settings)
    }

    #[test]
    fn defaults_apply_without_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.ini");
        let settings = Settings::load(env(&[("LOTTERY_CONFIG", missing.to_str().unwrap())]));
        assert!(settings.unwrap_err().0.contains("which is not a file"));
        // No LOTTERY_CONFIG and no ./config.ini in the test's directory would need a chdir;
        // an empty file gives the same defaults.
        let (_dir, settings) = with_file("", &[]);
        let server = settings.unwrap().server().unwrap();
        assert_eq!((server.port, server.agencies, server.backlog), (12345, 5, 128));
        assert_eq!(server.sync, SyncMode::Always);
    }

    #[test]
    fn every_env_var_overrides_the_file() {
        let file = "SERVER_IP = 10.0.0.1\nSERVER_PORT = 1\nSERVER_LISTEN_BACKLOG = 1\nSERVER_AGENCIES = 1\n\
            SERVER_STORAGE_PATH = file.csv\nSERVER_MAX_CONNECTIONS = 2\nSERVER_IDLE_TIMEOUT_MS = 1\n\
            SERVER_MAX_GUESTS = 1\nSERVER_MAX_GUESTS_PER_IP = 1\nSERVER_HELLO_TIMEOUT_MS = 1\n\
            SERVER_MAX_BETS_PER_AGENCY = 1\nSERVER_MIN_FREE_BYTES = 1\n\
            SERVER_SYNC = always\nSERVER_GROUP_COMMIT = true\nSERVER_DATABASE_URL = postgres://file/db\n\
            LOGGING_LEVEL = ERROR\nCLI_ID = 1\n\
            CLI_SERVER_ADDRESS = file:1\nCLI_BATCH_MAXAMOUNT = 1\nCLI_DATA_PATH = file-{CLI_ID}.csv\n\
            CLI_RETRY_TIMEOUT_MS = 1\nCLI_LOG_LEVEL = ERROR\nSERVER_AGENCY_KEYS = f.keys\n\
            SERVER_TLS_CERT = f.pem\nSERVER_TLS_KEY = f.key\nSERVER_TLS_NAMES = f.example\n\
            CLI_TOKEN_FILE = f-{CLI_ID}.token\nCLI_TLS_CA = f-ca.pem\nCLI_TLS_NAME = f.example\n\
            SERVER_METRICS_ADDRESS = 127.0.0.1:9745\n";
        let overrides = [
            ("SERVER_IP", "127.0.0.2"),
            ("SERVER_PORT", "2"),
            ("SERVER_LISTEN_BACKLOG", "2"),
            ("SERVER_AGENCIES", "2"),
            ("SERVER_STORAGE_PATH", "env.csv"),
            ("SERVER_MAX_CONNECTIONS", "5"),
            ("SERVER_MAX_GUESTS", "3"),
            ("SERVER_MAX_GUESTS_PER_IP", "2"),
            ("SERVER_HELLO_TIMEOUT_MS", "7"),
            ("SERVER_MAX_BETS_PER_AGENCY", "9"),
            ("SERVER_MIN_FREE_BYTES", "0"),
            ("SERVER_IDLE_TIMEOUT_MS", "2"),
            ("SERVER_SYNC", "never"),
            ("SERVER_GROUP_COMMIT", "false"),
            ("SERVER_DATABASE_URL", "postgresql://env/db"),
            ("LOGGING_LEVEL", "DEBUG"),
            ("CLI_ID", "2"),
            ("CLI_SERVER_ADDRESS", "env:2"),
            ("CLI_BATCH_MAXAMOUNT", "2"),
            ("CLI_DATA_PATH", "env-{CLI_ID}.csv"),
            ("CLI_RETRY_TIMEOUT_MS", "2"),
            ("CLI_LOG_LEVEL", "DEBUG"),
            ("SERVER_AGENCY_KEYS", ""),
            ("SERVER_TLS_CERT", "e.pem"),
            ("SERVER_TLS_KEY", "e.key"),
            ("SERVER_TLS_NAMES", "a.example, b.example"),
            ("CLI_TOKEN_FILE", "e-{CLI_ID}.token"),
            ("CLI_TLS_CA", ""),
            ("CLI_TLS_NAME", "e.example"),
            ("SERVER_METRICS_ADDRESS", "0.0.0.0:0"),
        ];
        assert_eq!(overrides.len(), KEYS.len(), "a key is missing from this test");
        let (_dir, from_file) = with_file(file, &[]);
        let (s, a) = (from_file.as_ref().unwrap().server().unwrap(), from_file.unwrap().agency().unwrap());
        assert_eq!((s.port, s.agencies, s.log_level, a.id, a.batch_max), (1, 1, LevelFilter::Error, 1, 1));
        let (_dir, from_env) = with_file(file, &overrides);
        let (s, a) = (from_env.as_ref().unwrap().server().unwrap(), from_env.unwrap().agency().unwrap());
        assert_eq!(s.ip.to_string(), "127.0.0.2");
        assert_eq!((s.port, s.backlog, s.agencies, s.max_connections), (2, 2, 2, 5));
        assert_eq!((s.max_guests, s.max_guests_per_ip, s.hello_timeout), (3, 2, Duration::from_millis(7)));
        assert_eq!((s.max_bets_per_agency, s.min_free_bytes), (9, 0));
        assert_eq!((s.storage_path, s.idle_timeout), (PathBuf::from("env.csv"), Duration::from_millis(2)));
        assert_eq!((s.sync, s.group_commit, s.log_level), (SyncMode::Never, false, LevelFilter::Debug));
        assert_eq!(s.database_url.as_deref(), Some("postgresql://env/db"));
        assert_eq!((a.id, a.server_address.as_str(), a.batch_max), (2, "env:2", 2));
        assert_eq!((a.data_path, a.retry_timeout), (PathBuf::from("env-2.csv"), Duration::from_millis(2)));
        assert_eq!(a.log_level, LevelFilter::Debug);
        assert_eq!((s.agency_keys, s.tls), (None, Some(("e.pem".into(), "e.key".into()))));
        assert_eq!(s.tls_names, ["a.example", "b.example"]);
        assert_eq!((a.token_file, a.tls_ca), (Some(PathBuf::from("e-2.token")), None));
        assert_eq!(a.tls_name.as_deref(), Some("e.example"));
        assert_eq!(s.metrics, Some(MetricsAddress { addr: "0.0.0.0:0".parse().unwrap(), required: true }));
    }

    #[test]
    fn the_metrics_address_is_the_default_or_required_or_off() {
        let address = |v: &str| with_file("", &[("SERVER_METRICS_ADDRESS", v)]).1.unwrap().server().map(|s| s.metrics);
        let default = MetricsAddress { addr: "127.0.0.1:9745".parse().unwrap(), required: false };
        assert_eq!(with_file("", &[]).1.unwrap().server().unwrap().metrics, Some(default));
        assert_eq!(address("127.0.0.1:9745"), Ok(Some(default)));
        assert_eq!(address(""), Ok(None));
        assert_eq!(address("[::1]:0").unwrap().map(|m| m.required), Some(true));
        let err = address("localhost:9745").unwrap_err().0;
        assert!(err.contains("SERVER_METRICS_ADDRESS") && err.contains("ip:port"), "{err}");
    }

    #[test]
    fn tls_needs_both_its_files_or_neither() {
        let (_dir, settings) = with_file("", &[("SERVER_TLS_KEY", "")]);
        let err = settings.unwrap().server().unwrap_err().0;
        assert!(err.contains("both set"), "{err}");
        let (_dir, settings) = with_file("", &[("SERVER_TLS_KEY", ""), ("SERVER_TLS_CERT", "")]);
        assert_eq!(settings.unwrap().server().unwrap().tls, None);
    }

    #[test]
    fn a_bad_value_names_its_key_and_origin() {
        let (_dir, settings) = with_file("SERVER_PORT = 99999\n", &[]);
        let err = settings.unwrap().server().unwrap_err().to_string();
        assert!(err.contains("config.ini:1: SERVER_PORT = \"99999\" is not a port"), "{err}");
        let (_dir, settings) = with_file("", &[("SERVER_AGENCIES", "five")]);
        let err = settings.unwrap().server().unwrap_err().to_string();
        assert!(err.contains("environment variable SERVER_AGENCIES = \"five\""), "{err}");
        let (_dir, settings) = with_file("", &[("SERVER_DATABASE_URL", "mysql://u:secret@h/db")]);
        let err = settings.unwrap().server().unwrap_err().to_string();
        assert!(err.contains("SERVER_DATABASE_URL is not a postgres") && !err.contains("secret"), "{err}");
        let (_dir, settings) = with_file("", &[("SERVER_DATABASE_URL", "")]);
        assert_eq!(settings.unwrap().server().unwrap().database_url, None);
        let (_dir, settings) = with_file("", &[("CLI_SERVER_ADDRESS", "a:1, b:2")]);
        assert_eq!(settings.unwrap().server_address().unwrap(), "a:1, b:2");
        let (_dir, settings) = with_file("", &[("CLI_SERVER_ADDRESS", "a:1,b")]);
        assert!(settings.unwrap().server_address().unwrap_err().0.contains("separated by commas"));
        let (_dir, settings) = with_file("SERVER_PROT = 1\n", &[]);
        assert!(settings.unwrap_err().0.contains("config.ini:1: unknown key"));
    }

    #[test]
    fn the_course_config_ini_is_accepted_with_a_host_name() {
        let course =
            "[DEFAULT]\nSERVER_PORT = 12345\nSERVER_IP = localhost\nSERVER_LISTEN_BACKLOG = 5\nLOGGING_LEVEL = INFO\n";
        let (_dir, settings) = with_file(course, &[]);
        let server = settings.unwrap().server().unwrap();
        assert!(server.ip.is_loopback(), "{}", server.ip);
        assert_eq!((server.port, server.backlog, server.log_level), (12345, 5, LevelFilter::Info));
        let (_dir, settings) = with_file("\nSERVER_IP = no-such-host.invalid\n", &[]);
        let err = settings.unwrap().server().unwrap_err().to_string();
        assert!(err.contains("config.ini:2: SERVER_IP = \"no-such-host.invalid\" is not an IP address"), "{err}");
    }

    #[test]
    fn a_batch_size_is_checked_in_one_place() {
        assert_eq!((parse_batch_max("1"), parse_batch_max("431")), (Some(1), Some(431)));
        assert_eq!((parse_batch_max("0"), parse_batch_max("432"), parse_batch_max("x")), (None, None, None));
        let (_dir, settings) = with_file("", &[("CLI_BATCH_MAXAMOUNT", "1000")]);
        let err = settings.unwrap().batch_max().unwrap_err().to_string();
        assert!(err.ends_with(&format!("CLI_BATCH_MAXAMOUNT = \"1000\" is not {BATCH_MAX_WHAT}")), "{err}");
    }

    #[test]
    fn the_agency_needs_an_id_and_all_or_none_of_the_extra_bet() {
        let (_dir, settings) = with_file("", &[]);
        assert!(settings.unwrap().agency().unwrap_err().0.contains("CLI_ID is required"));
        let (_dir, settings) = with_file("", &[("CLI_ID", "3"), ("NOMBRE", "Ana")]);
        assert!(settings.unwrap().agency().unwrap_err().0.contains("only NOMBRE set"));
        let bet =
            [("NOMBRE", "Ana"), ("APELLIDO", "Paz"), ("DOCUMENTO", "1"), ("NACIMIENTO", "2000-01-01"), ("NUMERO", "7")];
        let (_dir, settings) = with_file("", &[&[("CLI_ID", "3")], &bet[..]].concat());
        let agency = settings.unwrap().agency().unwrap();
        assert_eq!(agency.data_path, PathBuf::from(".data/agency-3.csv"));
        assert_eq!(agency.extra_bet.unwrap()[4], "7");
    }
}
