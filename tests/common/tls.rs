//! A TLS client speaking the protocol line by line.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};

use super::process::STEP;

/// A TLS client configuration that trusts the CA in the PEM file `ca`.
pub fn client_config(ca: &str) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("a CA certificate")).expect("a usable CA");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    std::sync::Arc::new(config)
}

/// A line-oriented TLS client that trusts the CA in `ca`, with timeouts on its socket.
pub struct TlsClient {
    stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    buf: Vec<u8>,
}

impl TlsClient {
    pub fn connect(port: u16, ca: &str) -> TlsClient {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let tcp = TcpStream::connect_timeout(&addr, STEP).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        tcp.set_read_timeout(Some(STEP)).expect("read timeout");
        tcp.set_write_timeout(Some(STEP)).expect("write timeout");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
        let conn = rustls::ClientConnection::new(client_config(ca), name).expect("a TLS client");
        TlsClient { stream: rustls::StreamOwned::new(conn, tcp), buf: Vec::new() }
    }

    /// Sends one request line (never echoed in a panic message: it may hold a token) and
    /// returns the reply line.
    pub fn send(&mut self, line: &str) -> String {
        self.write(format!("{line}\n").as_bytes()).unwrap_or_else(|e| panic!("send: {e}"));
        self.read_line().unwrap_or_else(|| panic!("the server closed the connection instead of replying"))
    }

    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).and_then(|()| self.stream.flush())
    }

    /// The next line, or `None` at the end of the stream (a close, with or without notice).
    pub fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(String::from_utf8_lossy(&line).trim_end_matches(['\n', '\r']).to_owned());
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof || e.kind() == io::ErrorKind::ConnectionReset => {
                    return None;
                }
                Err(e) => panic!("no reply: {e}"),
            }
        }
    }
}
