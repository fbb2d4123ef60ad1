//! The least CPU an agency can cost a server on this machine: a server with no thread per
//! connection, no lock, no disk and no log line, serving one agency after another on one thread.
//! Each agency's exchange is the one `lottery-agency` makes with ten bets: a TLS handshake (the
//! server's choices: AES-128-GCM, no session tickets, an ECDSA P-256 certificate from a CA),
//! `HELLO` and a batch in one write, two replies, `DONE`, `STATUS` and `WINNERS` in one write,
//! three replies, and the close. The agencies run on a second thread, one at a time.
//!
//! Prints the server's CPU (user + system) per agency, and the agencies'.
//! What `lottery-server` spends above this floor is its shape: a thread, the round's lock and
//! its waits, the disk and the log.
//!
//! ```text
//! cargo run --release --example agency_floor [AGENCIES] [MODE]
//! ```
//!
//! MODE is `tls` (the default), `plain` (plain text), `threads` (TLS with a `std::thread` of the
//! server's stack size per connection, as the mission's shape has it: each is joined before the
//! next agency comes, so its stack is reused and it costs less than a crowd's threads do), or
//! `memory` (TLS without sockets: each agency's records passed to the server in memory, the CPU
//! of the server's calls into rustls alone). The configurations
//! and the certificate are the product's own ([`lottery::bench`]).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use lottery::bench::{CONNECTION_STACK_SIZE, process_cpu, thread_cpu, tls_configs};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};

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

/// Runs `f` on `conn`, adding the CPU it took to `cpu`.
fn timed<C, T>(conn: &mut C, cpu: &mut f64, f: impl FnOnce(&mut C) -> Result<T, Error>) -> Result<T, Error> {
    let began = thread_cpu();
    let result = f(conn);
    *cpu += thread_cpu() - began;
    result
}

/// A client and a server connection joined in memory, with the CPU each side has taken.
struct Pair {
    server: ServerConnection,
    client: ClientConnection,
    server_cpu: f64,
    client_cpu: f64,
}

impl Pair {
    /// Carries what the client has to send to the server, and the server's answer back.
    fn round_trip(&mut self) -> Result<(), Error> {
        let mut wire = Vec::new();
        timed(&mut self.client, &mut self.client_cpu, |c| Ok(c.write_all_tls(&mut wire)?))?;
        timed(&mut self.server, &mut self.server_cpu, |s| s.take_tls(&wire))?;
        wire.clear();
        timed(&mut self.server, &mut self.server_cpu, |s| Ok(s.write_all_tls(&mut wire)?))?;
        timed(&mut self.client, &mut self.client_cpu, |c| c.take_tls(&wire))
    }
}

/// What both ends of a TLS connection do with the records between them.
trait Records {
    /// Writes every record waiting to be sent.
    fn write_all_tls(&mut self, wire: &mut Vec<u8>) -> io::Result<()>;
    /// Reads and processes `wire`'s records.
    fn take_tls(&mut self, wire: &[u8]) -> Result<(), Error>;
}

impl<Data> Records for rustls::ConnectionCommon<Data> {
    fn write_all_tls(&mut self, wire: &mut Vec<u8>) -> io::Result<()> {
        while self.wants_write() {
            self.write_tls(wire)?;
        }
        Ok(())
    }

    fn take_tls(&mut self, mut wire: &[u8]) -> Result<(), Error> {
        while !wire.is_empty() {
            self.read_tls(&mut wire)?;
            self.process_new_packets()?;
        }
        Ok(())
    }
}

/// TLS alone, without sockets or a kernel: each agency's handshake and records passed between a
/// client and a server connection in memory, on this thread. Returns the CPU the server's side
/// took and the client's, in seconds.
fn in_memory(agencies: usize, server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> Result<(f64, f64), Error> {
    let (mut server_cpu, mut client_cpu) = (0.0, 0.0);
    for _ in 0..agencies {
        let client = timed(&mut (), &mut client_cpu, |()| {
            Ok(ClientConnection::new(Arc::clone(client), ServerName::try_from("localhost")?)?)
        })?;
        let server = timed(&mut (), &mut server_cpu, |()| Ok(ServerConnection::new(Arc::clone(server))?))?;
        let mut pair = Pair { server, client, server_cpu: 0.0, client_cpu: 0.0 };
        while pair.client.is_handshaking() || pair.server.is_handshaking() {
            pair.round_trip()?;
        }
        let exchanges = [(FIRST_WRITE, FIRST_REPLIES), (SECOND_WRITE, SECOND_REPLIES)];
        for (request, reply) in exchanges {
            timed(&mut pair.client, &mut pair.client_cpu, |c| Ok(c.writer().write_all(request)?))?;
            pair.round_trip()?;
            timed(&mut pair.server, &mut pair.server_cpu, |s| {
                s.reader().read_exact(&mut vec![0; request.len()])?;
                Ok(s.writer().write_all(reply)?)
            })?;
            pair.round_trip()?;
            timed(&mut pair.client, &mut pair.client_cpu, |c| Ok(c.reader().read_exact(&mut vec![0; reply.len()])?))?;
        }
        timed(&mut pair.client, &mut pair.client_cpu, |c| {
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

/// Runs `agencies` one after the other against `address`, over TLS with `tls`. Returns this
/// thread's CPU, in seconds.
fn run_agencies(agencies: usize, address: SocketAddr, tls: Option<&Arc<ClientConfig>>) -> Result<f64, Error> {
    let began = thread_cpu();
    for _ in 0..agencies {
        let stream = TcpStream::connect(address)?;
        stream.set_nodelay(true)?;
        if let Some(config) = tls {
            let conn = ClientConnection::new(Arc::clone(config), ServerName::try_from("localhost")?)?;
            let mut tls = StreamOwned::new(conn, stream);
            converse(&mut tls)?;
            tls.conn.send_close_notify();
            tls.flush()?;
        } else {
            converse(&stream)?;
        }
    }
    Ok(thread_cpu() - began)
}

/// Serves `agencies` over TCP on loopback, one after the other, their side on a thread of its
/// own; over TLS with `tls`'s configurations; each on a thread of its own if `threads` (joined
/// before the next is accepted, so that its stack is reused: less than a crowd's threads cost).
/// Returns the CPU of the server's side and of the agencies', in seconds.
fn over_tcp(
    agencies: usize,
    tls: Option<(Arc<ServerConfig>, Arc<ClientConfig>)>,
    threads: bool,
) -> Result<(f64, f64), Error> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let client_config = tls.as_ref().map(|(_, client)| Arc::clone(client));
    let agencies_thread = thread::spawn(move || run_agencies(agencies, address, client_config.as_ref()));
    let server_config = tls.map(|(server, _)| server);
    let began = process_cpu();
    for _ in 0..agencies {
        let (stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let config = server_config.clone();
        let connection = move || -> Result<(), Error> {
            match config {
                Some(config) => serve(StreamOwned::new(ServerConnection::new(config)?, stream))?,
                None => serve(stream)?,
            }
            Ok(())
        };
        if threads {
            let thread = thread::Builder::new().stack_size(CONNECTION_STACK_SIZE).spawn(connection)?;
            thread.join().map_err(|_| "a connection's thread panicked")??;
        } else {
            connection()?;
        }
    }
    let agencies_cpu = agencies_thread.join().map_err(|_| "the agencies' thread panicked")??;
    // The process's CPU but the agencies' thread: the server's, on this thread and its own.
    let server_cpu = process_cpu() - began - agencies_cpu;
    Ok((server_cpu, agencies_cpu))
}

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let agencies: usize = args.next().map_or(Ok(2000), |n| n.parse())?;
    let mode = args.next().unwrap_or_else(|| "tls".into());
    let keys = tempfile::tempdir()?;
    let configs = tls_configs(&keys.path().join("keys"))?;
    let began = Instant::now();
    let (server_cpu, agencies_cpu) = match mode.as_str() {
        "tls" => over_tcp(agencies, Some(configs), false)?,
        "threads" => over_tcp(agencies, Some(configs), true)?,
        "plain" => over_tcp(agencies, None, false)?,
        "memory" => in_memory(agencies, &configs.0, &configs.1)?,
        other => return Err(format!("{other:?}: tls, threads, plain or memory").into()),
    };
    let label = match mode.as_str() {
        "plain" => "plain text over TCP".to_owned(),
        "memory" => "TLS in memory".to_owned(),
        "threads" => "TLS over TCP, a thread per connection".to_owned(),
        _ => "TLS over TCP".to_owned(),
    };
    let per_agency = |seconds: f64| seconds * 1e3 / agencies as f64;
    println!(
        "{agencies} agencies, {label}: server {:.3} ms of CPU per agency, agencies {:.3} ms, {:.2} s",
        per_agency(server_cpu),
        per_agency(agencies_cpu),
        began.elapsed().as_secs_f64()
    );
    Ok(())
}
