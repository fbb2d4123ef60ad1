//! Why `lottery-server` could not start: one enum for every step before serving, so that `main`
//! says each failure the same way, as one line with its causes (see [`one_line`]).

use std::error::Error;
use std::fmt;
use std::io;
use std::net::SocketAddr;

use crate::config::ConfigError;
use crate::ledger::postgres::OpenError;
use crate::ledger::store::StoreError;

/// A step of the server's start-up that failed. Each variant's text says which step and
/// where; the cause, when there is one, is its [`Error::source`].
#[derive(Debug)]
pub(crate) enum StartError {
    /// A setting is missing or does not parse (the text names the key).
    Settings(ConfigError),
    /// The TLS certificate, its key or the agencies' key file is missing or unusable.
    Security(String),
    /// The storage's directory or lock refuses this server.
    Lock(String),
    /// `bets.csv` or its round file cannot be read, written or recovered.
    Storage(StoreError),
    /// The database of `SERVER_DATABASE_URL` cannot serve the round.
    Database(OpenError),
    /// The agencies' port cannot be bound.
    Listen { addr: SocketAddr, source: io::Error },
    /// The eventfd that wakes the door at shutdown cannot be made.
    Shutdown(io::Error),
    /// SIGTERM and SIGINT cannot be handled.
    Signals(ctrlc::Error),
    /// The operator's listener (`SERVER_METRICS_ADDRESS`) cannot be started.
    Metrics(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Settings(e) => write!(f, "{e}"),
            StartError::Storage(e) => write!(f, "{e}"),
            StartError::Database(e) => write!(f, "{e}"),
            StartError::Security(why) | StartError::Lock(why) | StartError::Metrics(why) => f.write_str(why),
            StartError::Listen { addr, .. } => write!(f, "cannot listen on {addr} (SERVER_IP, SERVER_PORT)"),
            StartError::Shutdown(_) => f.write_str("cannot make the shutdown handle"),
            StartError::Signals(_) => f.write_str("cannot handle SIGTERM and SIGINT"),
        }
    }
}

impl Error for StartError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            StartError::Listen { source, .. } | StartError::Shutdown(source) => Some(source),
            StartError::Signals(e) => Some(e),
            // The others' texts are whole sentences that already say their cause.
            _ => None,
        }
    }
}

impl From<ConfigError> for StartError {
    fn from(e: ConfigError) -> Self {
        StartError::Settings(e)
    }
}

impl From<StoreError> for StartError {
    fn from(e: StoreError) -> Self {
        StartError::Storage(e)
    }
}

impl From<OpenError> for StartError {
    fn from(e: OpenError) -> Self {
        StartError::Database(e)
    }
}

/// `error` and its causes as one line, `what: cause: cause's cause`, for a person.
pub(crate) fn one_line(error: &dyn Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        line.push_str(": ");
        line.push_str(&e.to_string());
        cause = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_and_its_causes_are_one_line() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let e =
            StartError::Listen { addr, source: io::Error::new(io::ErrorKind::PermissionDenied, "Permission denied") };
        assert_eq!(one_line(&e), "cannot listen on 127.0.0.1:1 (SERVER_IP, SERVER_PORT): Permission denied");
    }
}
