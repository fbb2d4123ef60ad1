//! TLS on the server's one port: the certificate and key loaded into a rustls configuration,
//! and a connection's first byte telling a TLS client (a handshake record) from a plain one.

use std::io;
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::NoServerSessionStorage;
use rustls::{CipherSuite, ServerConfig, ServerConnection, StreamOwned};

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
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM with SHA-256 first: the suite every TLS 1.3 peer must have, and on CPUs with
    // SHA-256 but no SHA-512 instructions (most x86 today) the handshake's hashing is a third
    // cheaper than AES-256-GCM's SHA-384, which ring computes in software.
    provider.cipher_suites.sort_by_key(|suite| suite.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| format!("{} and {} do not make a usable certificate: {e}", cert.display(), key.display()))?;
    config.ignore_client_order = true;
    // No session resumption: an agency connects once a round, so the two tickets rustls would
    // send after every handshake (random numbers, a key derivation, a record and a place in a
    // cache shared by every connection, behind its lock) would never be used.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
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
/// A guest from a suspect address (see [`crate::server::suspects`]) gets a permit only when
/// no other guest waits for one, and suspects never hold more than half the permits.
pub struct HandshakeGate {
    state: Mutex<GateState>,
    /// Where guests from addresses with no recent failure wait, and where suspects do.
    clear: Condvar,
    suspects: Condvar,
}

struct GateState {
    free: usize,
    /// Permits held by suspects, and the most they may hold: never all, so that a core is left
    /// for the agencies' work however many suspects wait.
    suspects_computing: usize,
    suspects_most: usize,
    /// Guests from addresses with no recent failure that wait for a permit.
    clear_waiting: usize,
}

impl GateState {
    /// Wakes whoever is next for a free permit.
    fn hand_on(&self, gate: &HandshakeGate) {
        if self.free == 0 {
            return;
        }
        let next = if self.suspect_may() { &gate.suspects } else { &gate.clear };
        next.notify_one();
    }

    /// Whether a suspect may take a free permit now.
    fn suspect_may(&self) -> bool {
        self.clear_waiting == 0 && self.suspects_computing < self.suspects_most
    }
}

/// A permit to compute; given back on drop.
struct Permit<'a> {
    gate: &'a HandshakeGate,
    /// Held by a guest from a suspect address.
    suspect: bool,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        st.free += 1;
        if self.suspect {
            st.suspects_computing -= 1;
        }
        st.hand_on(self.gate);
    }
}

/// How often a waiting handshake looks whether it was evicted.
const GATE_CHECK: Duration = Duration::from_millis(50);

impl HandshakeGate {
    /// A gate of one permit per core.
    pub fn per_core() -> HandshakeGate {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        HandshakeGate {
            state: Mutex::new(GateState {
                free: cores,
                suspects_computing: 0,
                suspects_most: (cores / 2).max(1),
                clear_waiting: 0,
            }),
            clear: Condvar::new(),
            suspects: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a permit until `deadline`, or until `gone()` says the connection was ended;
    /// a `suspect` only while no other guest waits.
    fn acquire(&self, deadline: Instant, gone: &dyn Fn() -> bool, suspect: bool) -> Option<Permit<'_>> {
        let mut st = self.lock();
        if !suspect {
            st.clear_waiting += 1;
        }
        let permit = loop {
            if st.free > 0 && (!suspect || st.suspect_may()) {
                st.free -= 1;
                st.suspects_computing += usize::from(suspect);
                break Some(Permit { gate: self, suspect });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || gone() {
                break None;
            }
            let queue = if suspect { &self.suspects } else { &self.clear };
            st = queue.wait_timeout(st, left.min(GATE_CHECK)).unwrap_or_else(PoisonError::into_inner).0;
        };
        if !suspect {
            st.clear_waiting -= 1;
            // The last of them gone without a permit: a suspect may have it.
            st.hand_on(self);
        }
        permit
    }
}

/// Runs the server's side of a TLS handshake to its end before `deadline`: reading and writing
/// freely, computing only with a permit of `gate` (behind the other guests if `suspect`), while `peer`
/// is [`Stage::Queued`] (never evicted). Progress is a flight of records that moved the
/// handshake on: half a record is none, so a client that sends part of its answer and stops
/// has stalled as surely as one that sends nothing.
///
/// # Errors
/// The deadline passed, the peer hung up or was ended, or the handshake failed (an alert is
/// sent first when there is one to send).
pub fn handshake(
    tls: &mut StreamOwned<ServerConnection, Socket>,
    gate: &HandshakeGate,
    deadline: Instant,
    peer: &Peer,
    suspect: bool,
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
        peer.set_stage_without_progress(Stage::Queued);
        let permit = gate.acquire(deadline, &gone, suspect);
        peer.set_stage_without_progress(Stage::Underway);
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
        // Whole records that moved the handshake on (an answer to send, or the end): progress.
        // Half a record moves nothing, and the time it took is the client's.
        if tls.conn.wants_write() || !tls.conn.is_handshaking() {
            peer.advanced();
        }
    }
    while tls.conn.wants_write() {
        tls.conn.write_tls(&mut tls.sock)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    #[test]
    fn a_freed_permit_goes_to_a_clear_guest_before_a_suspect() {
        let gate = HandshakeGate {
            state: Mutex::new(GateState { free: 1, clear_waiting: 0, suspects_computing: 0, suspects_most: 1 }),
            ..HandshakeGate::per_core()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let held = gate.acquire(deadline, &|| false, false).unwrap();
        let (got, order) = mpsc::channel();
        thread::scope(|s| {
            let suspect = s.spawn(|| {
                let _permit = gate.acquire(deadline, &|| false, true);
                got.send("suspect").unwrap();
            });
            // Whenever the suspect begins to wait, the one permit is held; then a clear guest comes.
            let clear = s.spawn(|| {
                let _permit = gate.acquire(deadline, &|| false, false);
                got.send("clear").unwrap();
            });
            while gate.lock().clear_waiting == 0 {
                thread::yield_now();
            }
            drop(held);
            clear.join().unwrap();
            suspect.join().unwrap();
        });
        assert_eq!(order.try_iter().collect::<Vec<_>>(), ["clear", "suspect"]);
    }

    #[test]
    fn the_server_chooses_aes_128_whatever_the_client_prefers() {
        let dir = tempfile::tempdir().unwrap();
        crate::tools::keys::write_server_keys(dir.path(), 1, &[]).unwrap();
        let server_config = server_config(&dir.path().join("server.pem"), &dir.path().join("server.key")).unwrap();
        // rustls's own order, as the agency uses it: AES-256 first.
        let client_config = crate::agency::credentials::client_config(&dir.path().join("ca.pem")).unwrap();
        let mut client = rustls::ClientConnection::new(client_config, "localhost".try_into().unwrap()).unwrap();
        let mut server = ServerConnection::new(server_config).unwrap();
        let mut wire = Vec::new();
        while client.is_handshaking() || server.is_handshaking() {
            wire.clear();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut &wire[..]).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut &wire[..]).unwrap();
            client.process_new_packets().unwrap();
        }
        let suite = server.negotiated_cipher_suite().map(|s| s.suite());
        assert_eq!(suite, Some(CipherSuite::TLS13_AES_128_GCM_SHA256));
    }

    #[test]
    fn suspects_never_hold_every_permit() {
        let state = GateState { free: 2, clear_waiting: 0, suspects_computing: 0, suspects_most: 1 };
        let gate = HandshakeGate { state: Mutex::new(state), ..HandshakeGate::per_core() };
        let soon = Instant::now() + Duration::from_millis(50);
        let first = gate.acquire(soon, &|| false, true);
        assert!(first.is_some());
        // A permit is free, but it is kept for a guest that is not a suspect.
        assert!(gate.acquire(soon, &|| false, true).is_none());
        assert!(gate.acquire(soon, &|| false, false).is_some());
        drop(first);
        assert!(gate.acquire(soon, &|| false, true).is_some());
    }
}
