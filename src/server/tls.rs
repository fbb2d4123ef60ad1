//! TLS on the server's one port: the certificate and key loaded into a rustls configuration,
//! and a connection's first byte telling a TLS client (a handshake record) from a plain one.

use std::io;
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use crate::wire::transport::{Socket, Transport};

/// The first byte of every TLS connection: a record of type "handshake".
const TLS_HANDSHAKE: u8 = 0x16;

/// Whether the first byte waiting on `stream` opens a TLS handshake (the socket may be
/// non-blocking; nothing is consumed).
pub fn opens_handshake(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first), Ok(1)) && first[0] == TLS_HANDSHAKE
}

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

/// The connection's transport: TLS if `tls` is set and the client's first byte opens a
/// handshake, else plain text. Waits for that first byte until `deadline`; `Ok(None)` if the
/// client hung up first. The handshake itself runs on the first read, under its deadline.
///
/// # Errors
/// The wait timed out (`TimedOut`/`WouldBlock`), or the socket failed.
pub fn accept(
    stream: Arc<TcpStream>,
    tls: Option<&Arc<ServerConfig>>,
    deadline: Instant,
) -> io::Result<Option<Transport<ServerConnection>>> {
    let Some(tls) = tls else { return Ok(Some(Transport::Plain(Socket::new(stream)))) };
    let mut first = [0u8; 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no first byte in time"));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.peek(&mut first) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if first[0] != TLS_HANDSHAKE {
        return Ok(Some(Transport::Plain(Socket::new(stream))));
    }
    let conn = ServerConnection::new(Arc::clone(tls)).map_err(io::Error::other)?;
    Ok(Some(Transport::Tls(Box::new(StreamOwned::new(conn, Socket::new(stream))))))
}
