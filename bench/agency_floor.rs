//! The least CPU an agency can cost a server on this machine: a server with no thread per
//! connection, no lock, no disk and no log line, serving one agency after another on one thread.
//! Each agency's exchange is the one `lottery-agency` makes with ten bets: a TLS handshake (the
//! server's choices: AES-128-GCM, no session tickets, an ECDSA P-256 certificate from a CA),
//! `HELLO` and a batch in one write, two replies, `DONE`, `STATUS` and `WINNERS` in one write,
//! three replies, and the close. The agencies run on a second thread, one at a time.
//!
//! Prints the server thread's CPU (user + system, from `getrusage(RUSAGE_THREAD)`) per agency,
//! and the agency thread's. What `lottery-server` spends above this floor is its shape: a thread,
//! the round's lock and its waits, the disk and the log.
//!
//!   cargo run --release --example agency_floor [AGENCIES] [tls|plain|memory] [x25519|p256]
//!
//! `memory` is TLS without sockets: each agency's records passed to the server in memory, the
//! CPU of the server's calls into rustls alone (`CLOCK_THREAD_CPUTIME_ID`).
//! The third argument is the key exchange the agencies offer first (the server takes the
//! client's choice): X25519, as rustls offers by default, or NIST P-256.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::crypto::ring::{default_provider, kx_group};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::NoServerSessionStorage;
use rustls::{CipherSuite, ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned};

/// What an agency with ten bets sends, in its two writes, and how many reply lines each gets.
const FIRST_WRITE: &[u8] = b"HELLO 17 0123456789abcdef0123456789abcdef0123456789abcdef\nBATCH 0 10\n\
Santiago Lionel,Lorca,30904465,1999-03-17,7574\nJuan,Perez,20123456,1980-01-01,1234\n\
Ana,Gomez,30111222,1990-05-05,4321\nLuis,Diaz,25111333,1985-07-07,1111\n\
Maria,Lopez,28111444,1988-08-08,2222\nPedro,Sosa,31111555,1992-09-09,3333\n\
Laura,Ruiz,32111666,1993-10-10,4444\nDiego,Vega,33111777,1994-11-11,5555\n\
Sofia,Rios,34111888,1995-12-12,6666\nPablo,Mena,35111999,1996-02-02,7777\n";
const FIRST_LINES: usize = 12;
const FIRST_REPLIES: &[u8] = b"OK 0\nOK 10\n";
const SECOND_WRITE: &[u8] = b"DONE\nSTATUS\nWINNERS\n";
const SECOND_LINES: usize = 3;
const SECOND_REPLIES: &[u8] = b"OK\nSTATUS agencies_done=1/1 bets=10 drawn=true\nWINNERS 1 30904465\n";

type Error = Box<dyn std::error::Error + Send + Sync>;

/// This thread's CPU so far (user + system), in seconds.
fn thread_cpu() -> f64 {
    // SAFETY: getrusage writes one `rusage` through the pointer it is given, which is valid.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_THREAD, &raw mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// This thread's CPU clock, in seconds: finer than `getrusage`, for the short spans of
/// [`in_memory`].
fn thread_clock() -> f64 {
    // SAFETY: clock_gettime writes one `timespec` through the pointer it is given, which is valid.
    let now = unsafe {
        let mut now = std::mem::zeroed::<libc::timespec>();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut now);
        now
    };
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

/// A client and a server connection joined in memory, with the CPU each side has taken.
struct Pair {
    server: ServerConnection,
    client: ClientConnection,
    server_cpu: f64,
    client_cpu: f64,
}

impl Pair {
    /// Runs `f` on the server's side, counting its CPU.
    fn on_server<T>(&mut self, f: impl FnOnce(&mut ServerConnection) -> Result<T, Error>) -> Result<T, Error> {
        let began = thread_clock();
        let result = f(&mut self.server);
        self.server_cpu += thread_clock() - began;
        result
    }

    /// Runs `f` on the client's side, counting its CPU.
    fn on_client<T>(&mut self, f: impl FnOnce(&mut ClientConnection) -> Result<T, Error>) -> Result<T, Error> {
        let began = thread_clock();
        let result = f(&mut self.client);
        self.client_cpu += thread_clock() - began;
        result
    }

    /// Carries what the client has to send to the server, and the server's answer back.
    fn round_trip(&mut self) -> Result<(), Error> {
        let mut wire = Vec::new();
        self.on_client(|c| {
            while c.wants_write() {
                c.write_tls(&mut wire)?;
            }
            Ok(())
        })?;
        self.on_server(|s| {
            let mut rest = wire.as_slice();
            while !rest.is_empty() {
                s.read_tls(&mut rest)?;
                s.process_new_packets()?;
            }
            Ok(())
        })?;
        wire.clear();
        self.on_server(|s| {
            while s.wants_write() {
                s.write_tls(&mut wire)?;
            }
            Ok(())
        })?;
        self.on_client(|c| {
            let mut rest = wire.as_slice();
            while !rest.is_empty() {
                c.read_tls(&mut rest)?;
                c.process_new_packets()?;
            }
            Ok(())
        })
    }
}

/// TLS alone, without sockets or a kernel: each agency's handshake and records passed between a
/// client and a server connection in memory, on this thread. Returns the CPU the server's side
/// took and the client's, in seconds.
fn in_memory(agencies: usize, server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> Result<(f64, f64), Error> {
    let (mut server_cpu, mut client_cpu) = (0.0, 0.0);
    for _ in 0..agencies {
        let began = thread_clock();
        let client = ClientConnection::new(Arc::clone(client), ServerName::try_from("localhost")?)?;
        client_cpu += thread_clock() - began;
        let began = thread_clock();
        let server = ServerConnection::new(Arc::clone(server))?;
        let mut pair = Pair { server, client, server_cpu: thread_clock() - began, client_cpu: 0.0 };
        while pair.client.is_handshaking() || pair.server.is_handshaking() {
            pair.round_trip()?;
        }
        let exchanges = [(FIRST_WRITE, FIRST_REPLIES), (SECOND_WRITE, SECOND_REPLIES)];
        for (request, reply) in exchanges {
            pair.on_client(|c| Ok(c.writer().write_all(request)?))?;
            pair.round_trip()?;
            pair.on_server(|s| {
                s.reader().read_exact(&mut vec![0; request.len()])?;
                Ok(s.writer().write_all(reply)?)
            })?;
            pair.round_trip()?;
            pair.on_client(|c| Ok(c.reader().read_exact(&mut vec![0; reply.len()])?))?;
        }
        pair.on_client(|c| {
            c.send_close_notify();
            Ok(())
        })?;
        pair.round_trip()?;
        server_cpu += pair.server_cpu;
        client_cpu += pair.client_cpu;
    }
    Ok((server_cpu, client_cpu))
}

/// Reads lines until `count` have come.
fn read_lines(reader: &mut impl BufRead, count: usize) -> io::Result<()> {
    let mut line = Vec::new();
    for _ in 0..count {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed mid-exchange"));
        }
    }
    Ok(())
}

/// One agency's exchange, from the server's side, on `stream` (a socket or a TLS stream).
fn serve(stream: impl Read + Write) -> io::Result<()> {
    let mut reader = BufReader::new(stream);
    read_lines(&mut reader, FIRST_LINES)?;
    reader.get_mut().write_all(FIRST_REPLIES)?;
    reader.get_mut().flush()?;
    read_lines(&mut reader, SECOND_LINES)?;
    reader.get_mut().write_all(SECOND_REPLIES)?;
    reader.get_mut().flush()?;
    // The agency closes first; the server reads its end (and, over TLS, its close_notify).
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).map(drop)
}

/// One agency's exchange, from its side.
fn converse(stream: impl Read + Write) -> io::Result<()> {
    let mut reader = BufReader::new(stream);
    reader.get_mut().write_all(FIRST_WRITE)?;
    reader.get_mut().flush()?;
    read_lines(&mut reader, 2)?;
    reader.get_mut().write_all(SECOND_WRITE)?;
    reader.get_mut().flush()?;
    read_lines(&mut reader, 3)
}

/// The server's and the agencies' TLS configurations, as `lottery-server` and `lottery-agency`
/// make them, with the agencies offering `p256` first if set.
fn tls_configs(p256: bool) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca = ca_params.self_signed(&ca_key)?;
    let server_key = KeyPair::generate()?;
    let server_cert =
        CertificateParams::new(vec!["localhost".into()])?.signed_by(&server_key, &Issuer::new(ca_params, &ca_key))?;

    let mut provider = default_provider();
    provider.cipher_suites.sort_by_key(|suite| suite.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut server = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![server_cert.der().clone()], PrivateKeyDer::try_from(server_key.serialize_der())?)?;
    server.ignore_client_order = true;
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(NoServerSessionStorage {});

    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der().to_vec()))?;
    let mut provider = default_provider();
    if p256 {
        provider.kx_groups = vec![kx_group::SECP256R1, kx_group::X25519];
    }
    let client = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((Arc::new(server), Arc::new(client)))
}

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let agencies: usize = args.next().map_or(Ok(2000), |n| n.parse())?;
    let mode = args.next().unwrap_or_else(|| "tls".into());
    let tls = match mode.as_str() {
        "tls" | "memory" => true,
        "plain" => false,
        other => return Err(format!("{other:?}: tls, plain or memory").into()),
    };
    let p256 = match args.next().as_deref() {
        None | Some("x25519") => false,
        Some("p256") => true,
        Some(other) => return Err(format!("{other:?}: x25519 or p256").into()),
    };
    let (server_config, client_config) = tls_configs(p256)?;
    let kx = if p256 { "P-256" } else { "X25519" };
    if mode == "memory" {
        let (server_cpu, client_cpu) = in_memory(agencies, &server_config, &client_config)?;
        let per_agency = |seconds: f64| seconds * 1e3 / agencies as f64;
        println!(
            "{agencies} agencies, TLS in memory, {kx} key exchange: server {:.3} ms of CPU per agency, agencies {:.3} ms",
            per_agency(server_cpu),
            per_agency(client_cpu)
        );
        return Ok(());
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;

    let agencies_thread = thread::spawn(move || -> Result<f64, Error> {
        let began = thread_cpu();
        for _ in 0..agencies {
            let stream = TcpStream::connect(address)?;
            stream.set_nodelay(true)?;
            if tls {
                let conn = ClientConnection::new(Arc::clone(&client_config), ServerName::try_from("localhost")?)?;
                let mut tls = StreamOwned::new(conn, stream);
                converse(&mut tls)?;
                tls.conn.send_close_notify();
                tls.flush()?;
            } else {
                converse(&stream)?;
            }
        }
        Ok(thread_cpu() - began)
    });

    let (began, began_cpu) = (Instant::now(), thread_cpu());
    for _ in 0..agencies {
        let (stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        if tls {
            serve(StreamOwned::new(ServerConnection::new(Arc::clone(&server_config))?, stream))?;
        } else {
            serve(stream)?;
        }
    }
    let server_cpu = thread_cpu() - began_cpu;
    let agencies_cpu = agencies_thread.join().map_err(|_| "the agencies' thread panicked")??;
    let per_agency = |seconds: f64| seconds * 1e3 / agencies as f64;
    println!(
        "{agencies} agencies, {}{}: server {:.3} ms of CPU per agency, agencies {:.3} ms, {:.2} s",
        if tls { "TLS, " } else { "plain text" },
        if tls { kx } else { "" },
        per_agency(server_cpu),
        per_agency(agencies_cpu),
        began.elapsed().as_secs_f64()
    );
    Ok(())
}
