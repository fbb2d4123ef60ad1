//! TLS on the server's one port: the certificate and key loaded into a rustls configuration,
//! and a connection's first byte telling a TLS client (a handshake record) from a plain one.

use std::io;
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use crate::server::registry::{Ended, Peer, Stage};
use crate::wire::transport::{Arrived, Socket, Transport, peek_now};

/// The first byte of every TLS connection: a record of type "handshake".
pub const TLS_HANDSHAKE: u8 = 0x16;

/// A rustls server configuration from a PEM certificate chain and its PEM private key.
///
/// # Errors
/// A file cannot be read or holds no certificate or key, or they do not match, said with the
/// path (never the key's bytes).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: cannot read a PEM certificate chain: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: cannot read a PEM private key: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| format!("{} and {} do not make a usable certificate: {e}", cert.display(), key.display()))?;
    Ok(Arc::new(config))
}

/// The connection's transport, from the client's `first` byte (still unread): TLS if `tls` is
/// set and that byte opens a handshake, else plain text. The handshake itself runs later,
/// under its deadline.
///
/// # Errors
/// rustls cannot start a connection with this configuration.
pub fn transport(
    stream: Arc<TcpStream>,
    tls: Option<&Arc<ServerConfig>>,
    first: u8,
) -> io::Result<Transport<ServerConnection>> {
    match tls {
        Some(tls) if first == TLS_HANDSHAKE => {
            let conn = ServerConnection::new(Arc::clone(tls)).map_err(io::Error::other)?;
            Ok(Transport::Tls(Box::new(StreamOwned::new(conn, Socket::new(stream)))))
        }
        _ => Ok(Transport::Plain(Socket::new(stream))),
    }
}

/// Rations the CPU that TLS handshakes take: at most as many run their cryptography at once as
/// there are cores. A handshake costs the server a key exchange and a signature, a fraction of
/// a millisecond; strangers opening handshakes as fast as they can would otherwise put a
/// runnable thread each beside the agencies' few, and take the CPU by their number. Waiting
/// for a permit costs nothing but the wait, and a guest evicted meanwhile gives up its turn.
pub struct HandshakeGate {
    free: Mutex<usize>,
    freed: Condvar,
}

/// A permit to compute; given back on drop.
struct Permit<'a>(&'a HandshakeGate);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.0.freed.notify_one();
    }
}

/// How often a waiting handshake looks whether it was evicted.
const GATE_CHECK: Duration = Duration::from_millis(50);

impl HandshakeGate {
    /// A gate of one permit per core.
    pub fn per_core() -> HandshakeGate {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        HandshakeGate { free: Mutex::new(cores), freed: Condvar::new() }
    }

    /// Waits for a permit until `deadline`, or until `gone()` says the connection was ended.
    fn acquire(&self, deadline: Instant, gone: &dyn Fn() -> bool) -> Option<Permit<'_>> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if *free > 0 {
                *free -= 1;
                return Some(Permit(self));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || gone() {
                return None;
            }
            free = self.freed.wait_timeout(free, left.min(GATE_CHECK)).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

/// Runs the server's side of a TLS handshake to its end before `deadline`: reading and writing
/// freely, computing only with a permit of `gate`, while `peer` is [`Stage::Queued`].
///
/// # Errors
/// The deadline passed, the peer hung up or was ended, or the handshake failed (an alert is
/// sent first when there is one to send).
pub fn handshake(
    tls: &mut StreamOwned<ServerConnection, Socket>,
    gate: &HandshakeGate,
    deadline: Instant,
    peer: &Peer,
) -> io::Result<()> {
    // Ended by the server, or hung up by the client while waiting for its turn.
    let gone = || peer.ended() != Ended::No || peek_now(&peer.stream) == Arrived::Closed;
    tls.sock.read_deadline = Some(deadline);
    tls.sock.write_deadline = Some(deadline);
    while tls.conn.is_handshaking() {
        while tls.conn.wants_write() {
            tls.conn.write_tls(&mut tls.sock)?;
        }
        if !tls.conn.is_handshaking() {
            break;
        }
        if tls.conn.read_tls(&mut tls.sock)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer hung up during the handshake"));
        }
        peer.set_stage(Stage::Queued);
        let permit = gate.acquire(deadline, &gone);
        peer.set_stage(Stage::Underway);
        // A client that left while we waited is not worth the computation.
        let Some(_permit) = permit.filter(|_| !gone()) else {
            let why =
                if gone() { "ended while waiting for its turn" } else { "no turn to compute before the deadline" };
            return Err(io::Error::new(io::ErrorKind::TimedOut, why));
        };
        if let Err(e) = tls.conn.process_new_packets() {
            let _ = tls.conn.write_tls(&mut tls.sock);
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
    while tls.conn.wants_write() {
        tls.conn.write_tls(&mut tls.sock)?;
    }
    Ok(())
}
