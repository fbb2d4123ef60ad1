//! How the door ends what it will not serve: a newcomer turned away (`ERR BUSY`), a guest out
//! of time (`ERR TIMEOUT`) or evicted (`ERR BUSY`). Each is told why if it can read a plain
//! line, and closed without waiting on it; each counts against its address (see
//! [`crate::server::suspects`]).

use std::net::{IpAddr, Shutdown, TcpStream};

use log::{info, warn};

use crate::server::Server;
use crate::server::guest_log::GuestEvent;
use crate::server::tls;
use crate::wire::protocol::{ErrorCode, ProtocolError, Reply};
use crate::wire::transport::{Arrived, peek_now, send_now};

/// Logs a refusal (counted past the guest log's rate), counts it against `ip`, and answers
/// `ERR BUSY`.
pub fn turn_away(server: &Server, stream: &TcpStream, ip: IpAddr) {
    server.metrics.refused(ErrorCode::Busy);
    server.guest_log.event(GuestEvent::Refused, || {
        warn!("action: accept_connections | result: fail | ip: {ip} | error: BUSY");
    });
    server.registry.suspects().failed(ip);
    refuse_busy(stream, server.limits.max_connections, server.security.tls.is_some());
}

/// Logs an eviction (counted past the guest log's rate).
pub fn log_eviction(server: &Server) {
    server.guest_log.event(GuestEvent::Evicted, || {
        info!("action: evict_guest | result: success | detail: a stalled guest made room for a newer one");
    });
}

/// Logs a guest out of time (counted past the guest log's rate) and counts it against `ip`.
pub fn log_timeout(server: &Server, ip: IpAddr) {
    server.registry.suspects().failed(ip);
    server.guest_log.event(GuestEvent::TimedOut, || {
        info!("action: hello | result: fail | ip: {ip} | error: TIMEOUT");
    });
}

/// Answers `ERR BUSY` and closes: the client is told at once, never queued. On a TLS server a
/// client that has begun (or may yet begin) a handshake is closed without a word (see
/// [`last_words`]).
fn refuse_busy(stream: &TcpStream, max: usize, tls: bool) {
    let plain = matches!(peek_now(stream), Arrived::Byte(b) if b != tls::TLS_HANDSHAKE);
    let why = format!("the server serves {max} connections at once; try again later");
    last_words(stream, ProtocolError::new(ErrorCode::Busy, why), tls && !plain);
}

/// Says `error` as far as the socket takes it without waiting, unless `quiet`, and closes. A
/// client that may speak TLS is closed quietly: a plain-text line would reach its TLS layer as a
/// broken record, which the agency must treat as final (it may be an attacker's on the way); a
/// bare close it retries.
pub fn last_words(stream: &TcpStream, error: ProtocolError, quiet: bool) {
    if !quiet {
        let mut out = Vec::new();
        Reply::Err(error).encode(&mut out);
        send_now(stream, &out);
    }
    let _ = stream.shutdown(Shutdown::Both);
}
