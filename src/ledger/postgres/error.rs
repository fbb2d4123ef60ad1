//! What can go wrong with the round's database, said for the person who runs the server: which
//! failure it is and what to do, in one line, never with the password, never with the library's
//! Debug text. A reply to a client says none of it (see [`super::PgLedger`]'s `storage`).

use std::error::Error;
use std::fmt;
use std::io;

use postgres::error::SqlState;

/// Why the server could not open the round's database (or export it).
#[derive(Debug)]
pub enum OpenError {
    /// `SERVER_DATABASE_URL` is not a connection string.
    BadUrl(String),
    /// The database server refused the user or its password.
    Authentication { place: String, user: String, said: String },
    /// The database named in the URL does not exist on that server.
    NoDatabase { place: String },
    /// Nothing listens at the URL's host and port.
    Refused { place: String },
    /// The host cannot be reached, or its name cannot be resolved, or it did not answer in time.
    Unreachable { place: String, said: String },
    /// The role lacks table privileges the server needs, each as `UPDATE on table lottery_agency`.
    MissingPrivileges { user: String, missing: Vec<String> },
    /// The role cannot run one of the server's statements (for a reason other than a table
    /// privilege: a function, a policy, the schema).
    CannotRun { user: String, what: &'static str, said: String, advice: &'static str },
    /// The database holds a round of another number of agencies.
    OtherRound { held: i32, agencies: u32 },
    /// Any other failure of the database, as it said it.
    Database { place: String, said: String },
    /// The thread that watches the round could not start.
    Thread(io::Error),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::BadUrl(why) => write!(
                f,
                "SERVER_DATABASE_URL is not a connection string ({why}); write it as postgres://USER:PASSWORD@HOST:PORT/DATABASE"
            ),
            OpenError::Authentication { place, user, said } => write!(
                f,
                "database {place}: authentication failed for user {user} ({said}); check the user and password in SERVER_DATABASE_URL, and the server's pg_hba.conf"
            ),
            OpenError::NoDatabase { place } => write!(
                f,
                "database {place} does not exist; create it (createdb, or CREATE DATABASE) or name an existing one in SERVER_DATABASE_URL"
            ),
            OpenError::Refused { place } => write!(
                f,
                "database {place}: connection refused (is PostgreSQL running and listening on that address and port?)"
            ),
            OpenError::Unreachable { place, said } => write!(
                f,
                "database {place}: the host cannot be reached ({said}); check the host in SERVER_DATABASE_URL and the network"
            ),
            OpenError::MissingPrivileges { user, missing } => write!(
                f,
                "database role {user} lacks {}; grant it (GRANT … TO {user}) or use another role",
                missing.join(", ")
            ),
            OpenError::CannotRun { user, what, said, advice } => {
                write!(f, "database role {user} cannot {what} ({said}); {advice}")
            }
            OpenError::OtherRound { held, agencies } => write!(
                f,
                "this round has {held} agencies, SERVER_AGENCIES is {agencies}: set SERVER_AGENCIES={held}, or name another database in SERVER_DATABASE_URL"
            ),
            OpenError::Database { place, said } => write!(f, "database {place}: {said}"),
            OpenError::Thread(e) => write!(f, "cannot start the thread that watches the round: {e}"),
        }
    }
}

/// A leaf: what the library would add as a source is said above, in one line (its own chain
/// reads `db error`, and a server's message may span lines).
impl Error for OpenError {}

/// For the callers that still pass start-up errors as strings.
impl From<OpenError> for String {
    fn from(e: OpenError) -> String {
        e.to_string()
    }
}

/// Which failure a connection attempt (or the first statements on it) met.
pub(super) fn classify(e: &postgres::Error, place: &str, user: &str) -> OpenError {
    let place = place.to_owned();
    let said = detail(e);
    match e.code() {
        Some(code) if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            return OpenError::Authentication { place, user: user.to_owned(), said };
        }
        Some(code) if *code == SqlState::INVALID_CATALOG_NAME => return OpenError::NoDatabase { place },
        _ => {}
    }
    if said.ends_with("password missing") {
        return OpenError::Authentication {
            place,
            user: user.to_owned(),
            said: "the server asks for a password and the URL has none".into(),
        };
    }
    match io_kind(e) {
        Some(io::ErrorKind::ConnectionRefused) => OpenError::Refused { place },
        Some(
            io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::TimedOut
            | io::ErrorKind::AddrNotAvailable,
        ) => OpenError::Unreachable { place, said },
        _ if said.contains("failed to lookup address") || said.starts_with("timeout") => {
            OpenError::Unreachable { place, said }
        }
        _ => OpenError::Database { place, said },
    }
}

/// The kind of the first I/O error in `e`'s chain.
fn io_kind(e: &postgres::Error) -> Option<io::ErrorKind> {
    let mut next: Option<&(dyn Error + 'static)> = e.source();
    while let Some(cause) = next {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        next = cause.source();
    }
    None
}

/// `e` in one line, for the log and the start-up message: the database's own message and code
/// when it sent one, else the library's words and their causes.
pub(super) fn detail(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return one_line(&format!("{} {}: {}", db.severity(), db.code().code(), db.message()));
    }
    let mut said = e.to_string();
    let mut next: Option<&(dyn Error + 'static)> = e.source();
    while let Some(cause) = next {
        said.push_str(": ");
        said.push_str(&cause.to_string());
        next = cause.source();
    }
    one_line(&said)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn connect(url: &str) -> postgres::Error {
        let config = postgres::Config::from_str(url).unwrap();
        config.connect(postgres::NoTls).err().unwrap()
    }

    #[test]
    fn a_port_nobody_listens_on_is_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = connect(&format!("postgres://u:secret@127.0.0.1:{port}/db"));
        let said = classify(&e, "127.0.0.1/db", "u");
        assert!(matches!(said, OpenError::Refused { .. }), "{said:?}");
        assert!(!said.to_string().contains("secret"));
    }

    #[test]
    fn a_name_that_does_not_resolve_is_unreachable() {
        let e = connect("postgres://u@no-such-host.invalid:5432/db?connect_timeout=5");
        let said = classify(&e, "no-such-host.invalid:5432/db", "u");
        assert!(matches!(said, OpenError::Unreachable { .. }), "{said:?}");
    }

    #[test]
    fn every_message_is_one_line() {
        let said = OpenError::MissingPrivileges { user: "r".into(), missing: vec!["UPDATE on table t".into()] };
        assert_eq!(
            said.to_string(),
            "database role r lacks UPDATE on table t; grant it (GRANT … TO r) or use another role"
        );
        assert_eq!(one_line("FATAL: a\nDETAIL: b"), "FATAL: a DETAIL: b");
    }
}
