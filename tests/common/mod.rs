//! Helpers shared by the black-box tests: the real binaries started as child processes in
//! temporary directories, their log lines read through a channel, and line-oriented clients.
//!
//! Nothing here sleeps to synchronise: readiness is a log line or a connection, every wait has
//! a deadline, every socket has read and write timeouts, and every child is killed and reaped
//! on `Drop`, so a failing test leaves no process behind.

// Each test crate uses a different part of these helpers.
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Longest any single step may take before the test fails instead of hanging.
pub const STEP: Duration = Duration::from_secs(10);

/// The server's binary.
pub const SERVER: &str = env!("CARGO_BIN_EXE_lottery-server");
/// The agency's binary.
pub const AGENCY: &str = env!("CARGO_BIN_EXE_lottery-agency");
/// The whole-round binary.
pub const ROUND: &str = env!("CARGO_BIN_EXE_lottery-round");

/// A `Command` for `binary` that runs in `dir` with only `env` as its configuration: every
/// setting the binaries read is removed from the inherited environment first, so a developer's
/// own `SERVER_PORT` or `LOTTERY_CONFIG` cannot leak in (and `dir` has no `config.ini`).
pub fn command(binary: &str, dir: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(binary);
    cmd.current_dir(dir);
    for (key, _) in lottery::config::KEYS {
        cmd.env_remove(key);
    }
    for key in lottery::config::BET_VARS.iter().chain(&["LOTTERY_CONFIG"]) {
        cmd.env_remove(key);
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// The lines a child writes on stdout (or stderr), read by a thread and handed over through a channel.
pub struct Logs {
    rx: Receiver<String>,
    /// Every line received so far, in order.
    pub seen: Vec<String>,
    eof: bool,
}

impl Logs {
    pub fn capture(stdout: impl Read + Send + 'static) -> Logs {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line).trim_end_matches(['\n', '\r']).to_owned();
                        if tx.send(text).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Logs { rx, seen: Vec::new(), eof: false }
    }

    /// Waits for the next line; `None` at end of output. Panics at the deadline.
    fn next_line(&mut self, deadline: Instant) -> Option<&str> {
        if self.eof {
            return None;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line);
                self.seen.last().map(String::as_str)
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.eof = true;
                None
            }
            Err(RecvTimeoutError::Timeout) => panic!("no log line in time; lines so far:\n{}", self.seen.join("\n")),
        }
    }

    /// Waits for a line containing `needle` (looking at the lines already seen first) and
    /// returns it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + STEP;
        loop {
            match self.next_line(deadline) {
                Some(line) if line.contains(needle) => return line.to_owned(),
                Some(_) => {}
                None => panic!("output ended without {needle:?}; lines:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Like [`Logs::wait_for`], but gives up after `within` (returning `None`) instead of failing.
    pub fn try_wait_for(&mut self, needle: &str, within: Duration) -> Option<String> {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return Some(line.clone());
        }
        let deadline = Instant::now() + within;
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return self.seen.last().cloned();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => self.eof = true,
                Err(RecvTimeoutError::Timeout) => return None,
            }
        }
        None
    }

    /// Waits until `n` lines containing `needle` have been seen in all, and returns the last.
    pub fn wait_count(&mut self, needle: &str, n: usize) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let mut matching = self.seen.iter().filter(|l| l.contains(needle));
            if let Some(line) = matching.nth(n.saturating_sub(1)) {
                return line.clone();
            }
            if self.next_line(deadline).is_none() {
                panic!("output ended before {n} lines with {needle:?}; lines:\n{}", self.seen.join("\n"));
            }
        }
    }

    /// Reads every line up to the end of the output (the child has exited or is exiting).
    pub fn until_eof(&mut self) -> &[String] {
        let deadline = Instant::now() + STEP;
        while self.next_line(deadline).is_some() {}
        &self.seen
    }
}

/// A running child process, killed and reaped on `Drop` if it is still running.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub logs: Logs,
    stderr: Option<JoinHandle<String>>,
}

impl Proc {
    /// Starts `cmd`, capturing stdout (as [`Logs`]) and stderr.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let logs = Logs::capture(child.stdout.take().expect("piped stdout"));
        let mut err = child.stderr.take().expect("piped stderr");
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        });
        Proc { name: name.to_owned(), child, logs, stderr: Some(stderr) }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("a pid fits in i32")
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        let rc = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(rc, 0, "kill({}, SIGTERM) failed", self.pid());
    }

    /// Waits for the process to exit, at most `timeout`; panics if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {timeout:?}; its log:\n{}",
                self.name,
                self.logs.seen.join("\n")
            );
            // Polling the exit status: there is no portable wait-with-timeout on a child.
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the process to exit 0 (at most `timeout`), then reads the rest of its log.
    pub fn wait_success(&mut self, timeout: Duration) {
        let status = self.wait_exit(timeout);
        self.logs.until_eof();
        if !status.success() {
            let stderr = self.stderr();
            panic!("{} exited with {status}; stderr: {stderr}", self.name);
        }
    }

    /// Everything the process wrote on stderr; call once it has exited.
    pub fn stderr(&mut self) -> String {
        self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.logs.seen.join("\n"));
        }
    }
}

/// Runs `cmd` to completion (at most [`STEP`]) and returns its exit status, stdout and stderr.
pub fn run_to_exit(name: &str, cmd: Command) -> (ExitStatus, String, String) {
    let mut proc = Proc::spawn(name, cmd);
    let status = proc.wait_exit(STEP);
    let stdout = proc.logs.until_eof().join("\n");
    (status, stdout, proc.stderr())
}

/// A `lottery-server` on `127.0.0.1`, on a port the system chose, storing into a temporary
/// directory. Killed (SIGKILL) and reaped on `Drop` if still running.
pub struct TestServer {
    // Dropped first: the process goes before its directory.
    pub proc: Proc,
    pub port: u16,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl TestServer {
    /// A server for `agencies` agencies in a fresh temporary directory, with extra settings.
    pub fn start(agencies: u32, env: &[(&str, &str)]) -> TestServer {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let mut server = TestServer::start_in(tmp.path(), agencies, 0, env);
        server._tmp = Some(tmp);
        server
    }

    /// A server storing into `dir/bets.csv` on `port` (0: any), for a restart on the same files.
    pub fn start_in(dir: &Path, agencies: u32, port: u16, env: &[(&str, &str)]) -> TestServer {
        let agencies = agencies.to_string();
        let port_text = port.to_string();
        let storage = dir.join("bets.csv");
        let storage = storage.to_str().expect("UTF-8 temp path");
        // Plain text and protected mode unless the test says otherwise (see `Keys`): most tests
        // speak the protocol by hand from loopback, as the `nc` session of docs/protocol.md does.
        let mut vars = vec![
            ("SERVER_IP", "127.0.0.1"),
            ("SERVER_PORT", port_text.as_str()),
            ("SERVER_AGENCIES", agencies.as_str()),
            ("SERVER_STORAGE_PATH", storage),
            ("SERVER_AGENCY_KEYS", ""),
            ("SERVER_TLS_CERT", ""),
            ("SERVER_TLS_KEY", ""),
            ("SERVER_METRICS_ADDRESS", ""),
        ];
        vars.extend_from_slice(env);
        let mut proc = Proc::spawn("lottery-server", command(SERVER, dir, &vars));
        let listen = proc.logs.wait_for("action: listen | result: success");
        let address = listen
            .split(" | ")
            .find_map(|f| f.strip_prefix("address: "))
            .unwrap_or_else(|| panic!("no address in {listen:?}"));
        let port: u16 = address.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("a port in the listen line");
        TestServer { proc, port, dir: dir.to_owned(), _tmp: None }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn bets_path(&self) -> PathBuf {
        self.dir.join("bets.csv")
    }

    /// A new client connection.
    pub fn client(&self) -> Client {
        Client::connect(self.port)
    }

    /// The server's log lines so far.
    pub fn logs(&mut self) -> &mut Logs {
        &mut self.proc.logs
    }
}

/// A line-oriented client, like `nc`, with read and write timeouts on its socket.
pub struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let stream = TcpStream::connect_timeout(&addr, STEP).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_read_timeout(Some(STEP)).expect("read timeout");
        stream.set_write_timeout(Some(STEP)).expect("write timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone socket"));
        Client { stream, reader }
    }

    /// Writes `bytes` as they are.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends one request line and returns the reply line (without its `\n`).
    pub fn send(&mut self, line: &str) -> String {
        self.write(format!("{line}\n").as_bytes()).unwrap_or_else(|e| panic!("send {line:?}: {e}"));
        self.read_line()
    }

    /// The next reply line; panics on end of stream or timeout.
    pub fn read_line(&mut self) -> String {
        match self.try_read_line() {
            Ok(Some(line)) => line,
            Ok(None) => panic!("the server closed the connection instead of replying"),
            Err(e) => panic!("no reply: {e}"),
        }
    }

    /// The next line, or `None` at end of stream.
    pub fn try_read_line(&mut self) -> io::Result<Option<String>> {
        let mut line = String::new();
        match self.reader.read_line(&mut line)? {
            0 => Ok(None),
            _ => {
                assert!(line.ends_with('\n'), "a reply without its line end: {line:?}");
                Ok(Some(line.trim_end_matches(['\n', '\r']).to_owned()))
            }
        }
    }

    /// Asserts that the server closes the connection next, with nothing more to say.
    pub fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "more after the last reply: {:?}", String::from_utf8_lossy(&rest)),
            // A reset after the server closed is an end too.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected the connection to close: {e}"),
        }
    }

    /// Asserts that nothing arrives (and the connection stays open) for `wait`.
    pub fn expect_silence(&mut self, wait: Duration) {
        self.stream.set_read_timeout(Some(wait)).expect("read timeout");
        let result = self.reader.fill_buf().map(<[u8]>::to_vec);
        self.stream.set_read_timeout(Some(STEP)).expect("read timeout");
        match result {
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("the connection broke while it should wait: {e}"),
            Ok(bytes) if bytes.is_empty() => panic!("the server closed the connection while it should wait"),
            Ok(bytes) => panic!("a reply while it should wait: {:?}", String::from_utf8_lossy(&bytes)),
        }
    }

    /// Another handle on the same socket, for a thread that writes while this one reads.
    pub fn writer(&self) -> TcpStream {
        self.stream.try_clone().expect("clone socket")
    }

    /// Closes the writing half, as `nc` does at the end of its input.
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

/// Reads a CSV file without header into records of strings.
pub fn read_csv(path: &Path) -> Vec<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_path(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    reader
        .records()
        .map(|r| r.unwrap_or_else(|e| panic!("{}: {e}", path.display())).iter().map(str::to_owned).collect())
        .collect()
}

/// The value of field `key` in a log line (`… | key: value | …`).
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let suffix = format!(" {key}");
    line.split(" | ")
        .find_map(|f| f.split_once(": ").filter(|(k, _)| *k == key || k.ends_with(&suffix)).map(|(_, v)| v))
}

/// Asserts that `line` has the spec's shape:
/// `YYYY-MM-DD HH:MM:SS LEVEL    action: <a> | result: <success|fail|in_progress> | <k>: <v> …`.
pub fn assert_log_format(line: &str) {
    let bad = |why: &str| panic!("log line {line:?}: {why}");
    let (stamp, rest) = line.split_at_checked(20).unwrap_or_else(|| bad("too short"));
    let digits_at = |s: &str, i: &[usize]| i.iter().all(|&i| s.as_bytes()[i].is_ascii_digit());
    let stamp_ok = stamp.len() == 20
        && digits_at(stamp, &[0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18])
        && &stamp[4..5] == "-"
        && &stamp[7..8] == "-"
        && &stamp[10..11] == " "
        && &stamp[13..14] == ":"
        && &stamp[16..17] == ":"
        && &stamp[19..20] == " ";
    if !stamp_ok {
        bad("no `YYYY-MM-DD HH:MM:SS ` stamp");
    }
    let (level, fields) = rest.split_at_checked(9).unwrap_or_else(|| bad("no level"));
    if !["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level.trim_end()) {
        bad("no level padded to 8 columns");
    }
    let mut fields = fields.split(" | ");
    let action = fields.next().and_then(|f| f.strip_prefix("action: "));
    if action.is_none_or(str::is_empty) {
        bad("the first field is not `action: …`");
    }
    let result = fields.next().and_then(|f| f.strip_prefix("result: "));
    if result.is_none_or(|r| !["success", "fail", "in_progress"].contains(&r)) {
        bad("the second field is not `result: success|fail|in_progress`");
    }
    for field in fields {
        if field.split_once(": ").is_none_or(|(k, _)| k.is_empty() || k.contains(' ')) {
            bad("a field that is not `key: value`");
        }
    }
}

pub const WINNING_NUMBER: &str = "7574";

/// An agency process for `id`, sending `data` to `address` in batches of at most `batch`.
pub fn agency(dir: &Path, id: u32, address: &str, data: &Path, batch: usize, env: &[(&str, &str)]) -> Proc {
    let (id, batch) = (id.to_string(), batch.to_string());
    let data = data.to_str().expect("UTF-8 temp path");
    // No token and plain text unless the test says otherwise (see `Keys::agency_env`).
    let mut vars = vec![
        ("CLI_ID", id.as_str()),
        ("CLI_SERVER_ADDRESS", address),
        ("CLI_DATA_PATH", data),
        ("CLI_BATCH_MAXAMOUNT", &batch),
        ("CLI_TOKEN_FILE", ""),
        ("CLI_TLS_CA", ""),
    ];
    vars.extend_from_slice(env);
    let cmd: Command = command(AGENCY, dir, &vars);
    Proc::spawn(&format!("lottery-agency {id}"), cmd)
}

/// The documents of the winning rows of an agency file, in file order.
pub fn winners_of(rows: &[Vec<String>]) -> Vec<String> {
    rows.iter().filter(|r| r[4] == WINNING_NUMBER).map(|r| r[2].clone()).collect()
}

/// The reply to `WINNERS` for these documents.
pub fn winners_reply(documents: &[String]) -> String {
    match documents {
        [] => "WINNERS 0".to_owned(),
        docs => format!("WINNERS {} {}", docs.len(), docs.join(",")),
    }
}

/// What `bets.csv` must hold for these agency files (agency `i + 1` for `files[i]`), sorted.
pub fn expected_store(files: &[PathBuf]) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = files
        .iter()
        .enumerate()
        .flat_map(|(i, path)| {
            read_csv(path).into_iter().map(move |row| {
                let mut stored = vec![(i + 1).to_string()];
                stored.extend(row);
                stored
            })
        })
        .collect();
    rows.sort();
    rows
}

/// Asserts that `bets.csv` holds exactly `expected` (sorted), as a multiset.
pub fn assert_store(bets: &Path, expected: &[Vec<String>]) {
    let mut stored = read_csv(bets);
    stored.sort();
    assert_eq!(stored.len(), expected.len(), "rows in bets.csv");
    if let Some(i) = (0..stored.len()).find(|&i| stored[i] != expected[i]) {
        panic!("bets.csv differs from the input: sorted row {i} is {:?}, expected {:?}", stored[i], expected[i]);
    }
}

/// Keys made by the real `lottery-server --make-keys`, and the settings that use them.
pub struct Keys {
    pub dir: PathBuf,
}

impl Keys {
    /// Runs `lottery-server --make-keys DIR` for `agencies` agencies; panics if it fails.
    pub fn make(dir: &Path, agencies: u32) -> Keys {
        let agencies = agencies.to_string();
        let cmd = {
            let mut cmd = command(SERVER, dir, &[("SERVER_AGENCIES", agencies.as_str())]);
            cmd.arg("--make-keys").arg(dir.join("keys"));
            cmd
        };
        let (status, stdout, stderr) = run_to_exit("lottery-server --make-keys", cmd);
        assert!(status.success(), "--make-keys failed: {stderr}");
        assert!(stdout.starts_with("wrote ca.pem"), "{stdout}");
        Keys { dir: dir.join("keys") }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().expect("UTF-8 temp path").to_owned()
    }

    /// The server's settings for TLS and tokens, to pass to [`TestServer::start`].
    pub fn server_env(&self) -> Vec<(String, String)> {
        vec![
            ("SERVER_AGENCY_KEYS".into(), self.path("agencies.keys")),
            ("SERVER_TLS_CERT".into(), self.path("server.pem")),
            ("SERVER_TLS_KEY".into(), self.path("server.key")),
        ]
    }

    /// Agency `id`'s settings for TLS and its token, to pass to [`agency`].
    pub fn agency_env(&self, id: u32) -> Vec<(String, String)> {
        vec![
            ("CLI_TOKEN_FILE".into(), self.path(&format!("agency-{id}.token"))),
            ("CLI_TLS_CA".into(), self.path("ca.pem")),
        ]
    }

    /// Agency `id`'s token (for a test's own TLS client; never printed).
    pub fn token(&self, id: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("agency-{id}.token"))).expect("token file").trim().to_owned()
    }
}

/// `[(String, String)]` as the `[(&str, &str)]` that [`TestServer::start`] and [`agency`] take.
pub fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

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

/// A man in the middle: forwards one connection at a time between a client and `upstream`,
/// keeps every byte it saw, and may flip one byte of what the server sends once the client
/// has sent `flip_after` bytes.
pub struct Relay {
    pub port: u16,
    /// Every byte that crossed, both ways.
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    _accept: JoinHandle<()>,
}

impl Relay {
    pub fn start(upstream: u16, flip_after: Option<usize>) -> Relay {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let captured = Arc::clone(&seen);
        let accept = thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
                let sent_up = Arc::new(AtomicUsize::new(0));
                let flipped = Arc::new(AtomicBool::new(false));
                for (from, to, upward) in [
                    (client.try_clone().expect("clone"), server.try_clone().expect("clone"), true),
                    (server, client, false),
                ] {
                    let (captured, sent_up, flipped) =
                        (Arc::clone(&captured), Arc::clone(&sent_up), Arc::clone(&flipped));
                    thread::spawn(move || pump(from, to, upward, &captured, &sent_up, &flipped, flip_after));
                }
            }
        });
        // The accept thread ends with the test process; the listener dies with it.
        Relay { port, seen, _accept: accept }
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    upward: bool,
    captured: &std::sync::Mutex<Vec<u8>>,
    sent_up: &std::sync::atomic::AtomicUsize,
    flipped: &std::sync::atomic::AtomicBool,
    flip_after: Option<usize>,
) {
    use std::sync::atomic::Ordering;
    let _ = from.set_read_timeout(Some(STEP * 6));
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        captured.lock().expect("capture").extend_from_slice(&buf[..n]);
        if upward {
            sent_up.fetch_add(n, Ordering::SeqCst);
        } else if flip_after.is_some_and(|after| sent_up.load(Ordering::SeqCst) >= after)
            && !flipped.swap(true, Ordering::SeqCst)
        {
            buf[n - 1] ^= 0x01;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
