//! The command line of the three binaries: help, bad flags, bad settings, missing files.

mod common {
    pub mod agency_keys;
    pub mod keys;
    pub mod log_line;
    pub mod process;
    pub mod run;
    pub mod server;
    pub mod server_temp;
}

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::process::{STEP, command};
use common::run::run_to_exit;
use common::server::{SERVER, TestServer};

/// The agency's binary.
const AGENCY: &str = env!("CARGO_BIN_EXE_lottery-agency");
/// The whole-round binary.
const ROUND: &str = env!("CARGO_BIN_EXE_lottery-round");

/// A server in plain text and protected mode, as `TestServer` starts it (see `tests/common`).
const PLAIN_SERVER: [(&str, &str); 3] = [("SERVER_AGENCY_KEYS", ""), ("SERVER_TLS_CERT", ""), ("SERVER_TLS_KEY", "")];
/// Agencies with no token and no TLS, for such a server.
const PLAIN_AGENCY: [(&str, &str); 2] = [("CLI_TOKEN_FILE", ""), ("CLI_TLS_CA", "")];

/// A plain-text server on a free loopback port, storing into `storage`.
fn server_env(storage: &str) -> Vec<(&str, &str)> {
    [&[("SERVER_IP", "127.0.0.1"), ("SERVER_PORT", "0"), ("SERVER_STORAGE_PATH", storage)], &PLAIN_SERVER[..]].concat()
}

const BINARIES: [(&str, &str); 3] = [("lottery-server", SERVER), ("lottery-agency", AGENCY), ("lottery-round", ROUND)];

#[test]
fn help_on_all_three_binaries_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    for (name, binary) in BINARIES {
        let mut cmd = command(binary, dir.path(), &[]);
        cmd.arg("--help");
        let (status, stdout, stderr) = run_to_exit(name, cmd);
        assert!(status.success(), "{name} --help: {status}; {stderr}");
        assert!(stdout.contains(name) && stdout.contains("Usage"), "{name} --help printed {stdout:?}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "--help wrote files");
}

#[test]
fn a_bad_flag_exits_non_zero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (name, binary) in BINARIES {
        let mut cmd = command(binary, dir.path(), &[]);
        cmd.arg("--bogus");
        let (status, stdout, stderr) = run_to_exit(name, cmd);
        assert!(!status.success(), "{name} --bogus exited 0");
        assert_eq!(stderr.lines().count(), 1, "{name}: stderr {stderr:?}");
        assert!(stderr.contains("bogus"), "{name}: {stderr:?} does not name the flag");
        assert!(stdout.is_empty(), "{name}: did something before refusing: {stdout:?}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "a refused start wrote files");
}

#[test]
fn a_bad_config_value_exits_non_zero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    // (name, binary, environment, the key the error must name)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 5] = [
        ("lottery-server", SERVER, &[("SERVER_PORT", "abc")], "SERVER_PORT"),
        ("lottery-server", SERVER, &[("SERVER_IDLE_TIMEOUT_MS", "soon")], "SERVER_IDLE_TIMEOUT_MS"),
        ("lottery-server", SERVER, &[("LOTTERY_CONFIG", "no-such.ini")], "LOTTERY_CONFIG"),
        ("lottery-agency", AGENCY, &[("CLI_ID", "1"), ("CLI_BATCH_MAXAMOUNT", "many")], "CLI_BATCH_MAXAMOUNT"),
        ("lottery-agency", AGENCY, &[], "CLI_ID"),
    ];
    for (name, binary, env, key) in cases {
        let (status, stdout, stderr) = run_to_exit(name, command(binary, dir.path(), env));
        assert!(!status.success(), "{name} with {env:?} exited 0");
        assert_eq!(stderr.lines().count(), 1, "{name} with {env:?}: stderr {stderr:?}");
        assert!(stderr.contains(key), "{name} with {env:?}: {stderr:?} does not name {key}");
        assert!(stdout.is_empty(), "{name} with {env:?} logged before refusing: {stdout:?}");
    }
    // Refused before anything else happened: no bets file, no round file.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "a refused start wrote files");
}

#[test]
fn an_agency_with_a_missing_data_file_says_so_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("agency-7.csv");
    // Nothing listens on port 1: the agency must refuse before trying to connect.
    let env = [("CLI_ID", "7"), ("CLI_SERVER_ADDRESS", "127.0.0.1:1"), ("CLI_DATA_PATH", missing.to_str().unwrap())];
    let (status, stdout, stderr) = run_to_exit("lottery-agency", command(AGENCY, dir.path(), &env));
    assert!(!status.success(), "exited 0 without its data file");
    assert_eq!(stderr.lines().count(), 1, "stderr {stderr:?}");
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr:?} does not name the file");
    assert!(!stdout.contains("action: connect"), "it tried to connect first: {stdout}");
}

#[test]
fn agency_ping_is_a_health_check() {
    let server = TestServer::start(1, &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command(AGENCY, dir.path(), &[("CLI_SERVER_ADDRESS", &server.address())]);
    cmd.arg("--ping");
    let (status, stdout, _) = run_to_exit("lottery-agency --ping", cmd);
    assert!(status.success(), "{status}");
    assert_eq!(stdout, format!("PONG from {}", server.address()));
    drop(server);
    // No server there any more: one line on stderr, exit 1.
    let mut cmd = command(AGENCY, dir.path(), &[]);
    cmd.args(["--ping", "127.0.0.1:1"]);
    let (status, _, stderr) = run_to_exit("lottery-agency --ping", cmd);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.starts_with("lottery-agency: cannot reach 127.0.0.1:1") && stderr.lines().count() == 1, "{stderr}");
}

/// A child whose stdout the test may close, killed and reaped on `Drop` if still running.
struct Piped {
    child: Child,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Piped {
    fn spawn(mut cmd: Command) -> Piped {
        cmd.stdout(Stdio::piped());
        Piped::spawn_with_stdout(cmd)
    }

    /// Starts `cmd` with whatever stdout it was given.
    fn spawn_with_stdout(mut cmd: Command) -> Piped {
        cmd.stdin(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start the binary");
        let mut err = child.stderr.take().expect("piped stderr");
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        });
        Piped { child, stderr: Some(stderr) }
    }

    /// Waits (at most [`STEP`]) for the exit; its status and everything it said on stderr.
    fn finish(&mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + STEP;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "still running {STEP:?} after its stdout closed");
            // Polling the exit status: there is no portable wait-with-timeout on a child.
            thread::sleep(Duration::from_millis(5));
        };
        (status, self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default())
    }
}

impl Drop for Piped {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` with its stdout closed before it writes anything (`| head -0`); exit and stderr.
/// The pipe's reading end is closed before the binary starts: closed after the spawn, a binary
/// quick enough could write all its start-up lines into the pipe first and never meet the close.
fn with_stdout_closed(mut cmd: Command) -> (ExitStatus, String) {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    cmd.stdout(writer);
    let mut piped = Piped::spawn_with_stdout(cmd);
    piped.finish()
}

#[test]
fn a_closed_stdout_ends_every_binary_quietly() {
    let dir = tempfile::tempdir().unwrap();
    for (name, binary) in BINARIES {
        let mut cmd = command(binary, dir.path(), &[]);
        cmd.arg("--help");
        let (status, stderr) = with_stdout_closed(cmd);
        assert!(status.success() && stderr.is_empty(), "{name} --help | head -0: {status}, stderr {stderr:?}");
    }
    for verbose in [false, true] {
        let mut cmd = command(ROUND, dir.path(), &[]);
        cmd.args(["--agencies", "2", "--bets-per-agency", "300"]);
        if verbose {
            cmd.arg("--verbose");
        }
        let (status, stderr) = with_stdout_closed(cmd);
        assert!(status.success() && stderr.is_empty(), "lottery-round (verbose {verbose}): {status}, {stderr:?}");
    }
    // A server whose log is gone stops as on SIGTERM: cleanly, exit 0, nothing on stderr.
    let storage = dir.path().join("bets.csv");
    let env = server_env(storage.to_str().unwrap());
    let (status, stderr) = with_stdout_closed(command(SERVER, dir.path(), &env));
    assert!(status.success() && stderr.is_empty(), "lottery-server: {status}, stderr {stderr:?}");
}

#[test]
fn a_server_whose_reader_goes_away_stops_at_its_next_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("bets.csv");
    let env = server_env(storage.to_str().unwrap());
    let mut server = Piped::spawn(command(SERVER, dir.path(), &env));
    let mut log = BufReader::new(server.child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    while !line.contains("action: listen") {
        line.clear();
        assert!(log.read_line(&mut line).unwrap() > 0, "the server ended before listening");
    }
    let address = line.trim_end().rsplit_once("address: ").and_then(|(_, a)| a.split(' ').next()).unwrap().to_owned();
    drop(log); // `| head -2`: the reader has what it wanted
    // A connection makes the server log `accept_connections` into the closed pipe: that line
    // is what stops it.
    let client = TcpStream::connect(&address).unwrap();
    let (status, stderr) = server.finish();
    assert!(status.success() && stderr.is_empty(), "{status}, stderr {stderr:?}");
    drop(client);
}

#[test]
fn an_agency_whose_reader_goes_away_stops_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("agency-1.csv");
    std::fs::write(&data, "Ana,Paz,1,2000-01-01,5\n").unwrap();
    let server = TestServer::start(1, &[]);
    let address = server.address();
    let env = [
        &[("CLI_ID", "1"), ("CLI_SERVER_ADDRESS", &address), ("CLI_DATA_PATH", data.to_str().unwrap())],
        &PLAIN_AGENCY[..],
    ]
    .concat();
    let (status, stderr) = with_stdout_closed(command(AGENCY, dir.path(), &env));
    assert!(status.success() && stderr.is_empty(), "lottery-agency: {status}, stderr {stderr:?}");
}

#[test]
fn the_course_config_ini_is_read_and_config_errors_name_file_line_and_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("bets.csv");
    // The course's file, with a port of 0 and a host name this machine resolves.
    let course = "[DEFAULT]\nSERVER_PORT = 0\nSERVER_IP = localhost\nSERVER_LISTEN_BACKLOG = 5\nLOGGING_LEVEL = INFO\n";
    std::fs::write(dir.path().join("config.ini"), course).unwrap();
    let env = [&[("SERVER_STORAGE_PATH", storage.to_str().unwrap())], &PLAIN_SERVER[..]].concat();
    let mut server = common::process::Proc::spawn("lottery-server", command(SERVER, dir.path(), &env));
    server.logs.wait_for("action: listen | result: success");
    drop(server);
    let cases = [
        ("[DEFAULT]\nSERVER_PORT\n", "config.ini:2: \"SERVER_PORT\" is not a setting: expected KEY = value"),
        ("[server]\nSERVER_PORT = 1\n", "config.ini:1: section [server] is not accepted: expected keys"),
        ("\nSERVER_PORT = 99999\n", "config.ini:2: SERVER_PORT = \"99999\" is not a port 0..=65535"),
    ];
    for (text, expected) in cases {
        std::fs::write(dir.path().join("config.ini"), text).unwrap();
        let (status, stdout, stderr) = run_to_exit("lottery-server", command(SERVER, dir.path(), &env));
        assert!(!status.success() && stdout.is_empty(), "{text:?}: {status}, {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{text:?}: {stderr:?}");
        assert!(stderr.contains(expected), "{text:?}: {stderr:?} lacks {expected:?}");
    }
}

/// `lottery-round` in `dir` with `args`, run to its end.
fn round(dir: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> (ExitStatus, String, String) {
    let mut cmd = command(ROUND, dir, env);
    cmd.args(args);
    run_to_exit("lottery-round", cmd)
}

#[test]
fn a_batch_size_is_checked_the_same_way_as_a_flag_and_as_a_setting() {
    let dir = tempfile::tempdir().unwrap();
    let expected = format!("is not {}", lottery::config::BATCH_MAX_WHAT);
    let runs = [
        round(dir.path(), &[], &["--batch", "0"]),
        round(dir.path(), &[], &["--batch", "1000"]),
        round(dir.path(), &[("CLI_BATCH_MAXAMOUNT", "1000")], &[]),
        round(dir.path(), &[("CLI_BATCH_MAXAMOUNT", "0")], &[]),
    ];
    for (status, stdout, stderr) in runs {
        assert!(!status.success() && stdout.is_empty(), "{status}: {stdout}");
        assert!(stderr.lines().count() == 1 && stderr.contains(&expected), "{stderr:?} lacks {expected:?}");
    }
    let (status, stdout, stderr) =
        round(dir.path(), &[], &["--agencies", "1", "--bets-per-agency", "20", "--batch", "431"]);
    assert!(status.success(), "--batch 431: {status}, {stderr}");
    assert!(stdout.contains("bets/s"), "{stdout}");
}

#[test]
fn a_round_that_cannot_reach_its_server_fails_within_the_retry_timeout_without_a_rate() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1; the default retry window (30 s) would outlast run_to_exit's.
    let args = ["--agencies", "2", "--bets-per-agency", "10", "--server", "127.0.0.1:1"];
    let env = [&[("CLI_RETRY_TIMEOUT_MS", "200")], &PLAIN_AGENCY[..]].concat();
    let (status, stdout, stderr) = round(dir.path(), &env, &args);
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(!stdout.contains("bets/s"), "a rate for a failed round: {stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(stderr.contains("failed for 2 of 2 agencies") && stderr.contains("no server at 127.0.0.1:1"), "{stderr}");
}

#[test]
fn an_explicit_size_or_seed_wins_over_a_complete_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    lottery::tools::dataset::generate(&dir.path().join(".data"), 2, 10, 1).unwrap();
    let (status, stdout, stderr) = round(dir.path(), &[], &["--agencies", "2"]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.starts_with("round: 2 agencies, 20 bets from .data,"), "{stdout}");
    for flag in [["--bets-per-agency", "30"], ["--seed", "9"]] {
        let (status, stdout, stderr) = round(dir.path(), &[], &[&["--agencies", "2"], &flag[..]].concat());
        assert!(status.success(), "{flag:?}: {stderr}");
        let first = stdout.lines().next().unwrap_or_default();
        assert!(first.contains(" bets from ") && !first.contains("from .data,"), "{flag:?}: {first}");
    }
    let (status, _, stderr) = round(dir.path(), &[], &["--agencies", "2", "--bets-per-agency", "30"]);
    assert!(status.success() && stderr.is_empty(), "{stderr}");
    let (status, _, stderr) = round(dir.path(), &[], &["--data", ".data", "--bets-per-agency", "30"]);
    assert!(status.code() == Some(2) && stderr.contains("--data uses DIR's files as they are"), "{stderr}");
}

#[test]
fn an_interrupted_round_shows_progress_once_a_second_and_prints_no_rate() {
    // Three agencies make the draw and the round brings two: it waits, showing its progress.
    let server = TestServer::start(3, &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command(ROUND, dir.path(), &PLAIN_AGENCY);
    cmd.args(["--agencies", "2", "--bets-per-agency", "50", "--server", &server.address()]);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = Piped { child: cmd.spawn().unwrap(), stderr: None };
    let mut stdout = common::process::Logs::capture(child.child.stdout.take().unwrap());
    let mut stderr = common::process::Logs::capture(child.child.stderr.take().unwrap());
    stdout.wait_for("round: 2 agencies, 100 bets");
    stderr.wait_count("send: 100/100 bets (100%), 2/3 agencies done, ", 2);
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(child.child.id() as i32, libc::SIGINT) }, 0);
    let (status, _) = child.finish();
    assert_eq!(status.code(), Some(1));
    let lines = stderr.until_eof().to_vec();
    assert!(lines.last().is_some_and(|l| l.contains("interrupted")), "{lines:?}");
    assert!(lines.windows(2).all(|w| w[0] != w[1]), "a progress line printed twice: {lines:?}");
    assert!(lines.iter().any(|l| l.contains("bets (100%), 2/3 agencies done, ")), "{lines:?}");
    assert!(!stdout.until_eof().iter().any(|l| l.contains("bets/s")), "a rate for an interrupted round");
}

#[test]
fn a_server_whose_log_cannot_be_written_goes_on_serving() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("bets.csv");
    // A free port: the server's `listen` line, which would name one, goes to a full disk.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let mut env = server_env(storage.to_str().unwrap());
    env.retain(|(k, _)| *k != "SERVER_PORT");
    env.push(("SERVER_PORT", &port));
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full (Linux)");
    let mut cmd = command(SERVER, dir.path(), &env);
    cmd.stdin(Stdio::null()).stdout(full).stderr(Stdio::piped());
    let mut server = Reaped(cmd.spawn().unwrap());
    let deadline = Instant::now() + STEP;
    let reply = loop {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())) {
            stream.set_read_timeout(Some(STEP)).unwrap();
            stream.write_all(b"PING\n").unwrap();
            let mut line = String::new();
            let _ = BufReader::new(stream).read_line(&mut line);
            break line;
        }
        assert!(Instant::now() < deadline, "the server never listened");
        // Waiting for the server to listen: its log, which would say so, goes nowhere.
        thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(reply, "PONG\n", "every log line failed (ENOSPC), and the server must still serve");
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(server.0.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not stop on SIGTERM");
        thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success(), "{status}");
}

/// A child killed and reaped on drop, if the test fails before it exits.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn an_agency_that_fails_for_good_stops_the_round_instead_of_leaving_the_others_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join(".data");
    lottery::tools::dataset::generate(&data, 3, 50, 1).unwrap();
    // Agency 2's last row is not a bet: it stops there, and the server can never draw.
    let mut file = fs::OpenOptions::new().append(true).open(data.join("agency-2.csv")).unwrap();
    file.write_all(b"Ana,Perez,notanumber,1990-01-01,1\n").unwrap();
    let (status, stdout, stderr) = round(dir.path(), &[], &["--agencies", "3"]);
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("2 failed: .data/agency-2.csv line 51:"), "{stdout}");
    assert!(stdout.contains("1 failed: stopped, as agency 2 failed"), "{stdout}");
    assert!(stderr.contains("failed for 3 of 3 agencies; agency 2: .data/agency-2.csv line 51"), "{stderr}");
}

/// Process ids of running `lottery-round --attack-worker` processes.
/// Only those working in `cwd`: other rounds on the machine (other tests, other users) have their own.
fn attack_workers(cwd: &std::path::Path) -> Vec<String> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter(|e| {
            let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
            cmdline.split(|&b| b == 0).any(|arg| arg == b"--attack-worker")
                && fs::read_link(e.path().join("cwd")).is_ok_and(|d| d == cwd)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn an_attack_round_runs_its_attackers_in_a_process_that_ends_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--agencies", "2", "--bets-per-agency", "50", "--attack", "park,flood", "--attackers", "20"];
    let (status, stdout, stderr) = round(dir.path(), &[], &args);
    assert!(status.success(), "{stdout}\n{stderr}");
    for kind in ["none", "park", "flood"] {
        let row = stdout.lines().find(|l| l.split_whitespace().next() == Some(kind)).unwrap_or_default();
        assert!(row.contains("exact"), "{kind}: {row:?} in\n{stdout}");
    }
    // flood's attackers were answered: their report crossed from their process.
    assert!(stdout.contains("PONG x") || stdout.contains("STATUS x"), "{stdout}");
    // The report says how much log each kind made the server write.
    assert!(stdout.contains("log KB/s"), "{stdout}");
    let cwd = fs::canonicalize(dir.path()).unwrap();
    assert_eq!(attack_workers(&cwd), Vec::<String>::new(), "attackers' processes left behind");
}

/// `cmd` with its open-files limit, soft and hard, set to `limit`, as `prlimit --nofile` would.
fn with_open_files(mut cmd: Command, limit: u64) -> Command {
    use std::os::unix::process::CommandExt;
    let set = move || {
        let limit = libc::rlimit { rlim_cur: limit as libc::rlim_t, rlim_max: limit as libc::rlim_t };
        // SAFETY: setrlimit is async-signal-safe and only reads `limit`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: the closure calls nothing but setrlimit between fork and exec.
    unsafe { cmd.pre_exec(set) };
    cmd
}

#[test]
fn a_round_larger_than_the_open_files_limit_allows_says_so_in_one_line_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command(ROUND, dir.path(), &[]);
    cmd.args(["--agencies", "400", "--bets-per-agency", "2"]);
    let (status, stdout, stderr) = run_to_exit("lottery-round", with_open_files(cmd, 256));
    assert!(!status.success() && stdout.is_empty(), "{status}: {stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    for part in ["400 agencies need about", "open files", "the hard limit is 256", "ulimit -Hn", "fewer agencies"] {
        assert!(stderr.contains(part), "{stderr:?} lacks {part:?}");
    }
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "a refused round wrote files");
}

#[test]
fn a_round_of_300_agencies_fits_500_open_files_with_its_agencies_in_a_process_of_their_own() {
    // One process would hold 600 sockets (both ends of 300 connections), and before this it
    // also held a data file and a key file per agency.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command(ROUND, dir.path(), &[]);
    cmd.args(["--agencies", "300", "--bets-per-agency", "3"]);
    let mut round = common::process::Proc::spawn("lottery-round", with_open_files(cmd, 500));
    let status = round.wait_exit(Duration::from_secs(120));
    let (stdout, stderr) = (round.logs.until_eof().join("\n"), round.stderr());
    assert!(status.success(), "{status}: {stdout}\n{stderr}");
    assert!(stdout.contains("agencies: in a process of their own"), "{stdout}");
    assert!(stdout.contains("bets/s") && !stdout.contains("MISMATCH") && !stdout.contains("failed"), "{stdout}");
    let total = stdout.lines().find(|l| l.trim_start().starts_with("total")).unwrap_or_default();
    assert_eq!(total.split_whitespace().nth(1), Some("900"), "{total}");
}

/// The settings SPEC.md names for each binary: its `--help` lists every one, with its default.
const SERVER_SETTINGS: [&str; 23] = [
    "SERVER_IP",
    "SERVER_PORT",
    "SERVER_LISTEN_BACKLOG",
    "SERVER_AGENCIES",
    "SERVER_STORAGE_PATH",
    "SERVER_MAX_CONNECTIONS",
    "SERVER_IDLE_TIMEOUT_MS",
    "LOGGING_LEVEL",
    "SERVER_AGENCY_KEYS",
    "SERVER_TLS_CERT",
    "SERVER_TLS_KEY",
    "SERVER_TLS_NAMES",
    "SERVER_MAX_GUESTS",
    "SERVER_MAX_GUESTS_PER_IP",
    "SERVER_HELLO_TIMEOUT_MS",
    "SERVER_MAX_BETS_PER_AGENCY",
    "SERVER_MIN_FREE_BYTES",
    "SERVER_DATABASE_URL",
    "SERVER_METRICS_ADDRESS",
    "SERVER_SYNC",
    "SERVER_GROUP_COMMIT",
    "LOTTERY_CONFIG",
    "127.0.0.1:9745",
];
const AGENCY_SETTINGS: [&str; 15] = [
    "CLI_ID",
    "CLI_SERVER_ADDRESS",
    "CLI_BATCH_MAXAMOUNT",
    "CLI_DATA_PATH",
    "CLI_RETRY_TIMEOUT_MS",
    "CLI_LOG_LEVEL",
    "NOMBRE",
    "APELLIDO",
    "DOCUMENTO",
    "NACIMIENTO",
    "NUMERO",
    "CLI_TOKEN_FILE",
    "CLI_TLS_CA",
    "CLI_TLS_NAME",
    "LOTTERY_CONFIG",
];

#[test]
fn the_help_of_the_server_and_the_agency_lists_every_setting_with_its_default() {
    let dir = tempfile::tempdir().unwrap();
    for (name, binary, settings) in
        [("lottery-server", SERVER, &SERVER_SETTINGS[..]), ("lottery-agency", AGENCY, &AGENCY_SETTINGS[..])]
    {
        let mut cmd = command(binary, dir.path(), &[]);
        cmd.arg("--help");
        let (status, stdout, _) = run_to_exit(name, cmd);
        assert!(status.success(), "{name}: {status}");
        for setting in settings {
            assert!(stdout.contains(setting), "{name} --help lacks {setting}:\n{stdout}");
        }
        // Every entry (a line `  NAME …`, with the lines indented further under it) ends its
        // text with its default in brackets.
        let mut entries: Vec<String> = Vec::new();
        for line in stdout.lines() {
            if line.starts_with("  ") && line[2..].starts_with(|c: char| c.is_ascii_uppercase()) {
                entries.push(line.to_owned());
            } else if line.starts_with("   ") && !entries.is_empty() {
                entries.last_mut().unwrap().push_str(line);
            }
        }
        assert!(entries.len() >= settings.len() - 5, "{name}: {entries:#?}");
        for entry in &entries {
            assert!(entry.contains('[') && entry.trim_end().ends_with(']'), "{name}: no default in {entry:?}");
        }
    }
}

#[test]
fn an_unreachable_server_is_said_once_then_summed_up_and_its_address_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = lottery::tools::dataset::generate(&dir.path().join("data"), 1, 5, 1).unwrap();
    // Nothing listens on port 1: every attempt is refused at once, about four a second.
    let env = [
        ("CLI_ID", "1"),
        ("CLI_SERVER_ADDRESS", "127.0.0.1:1"),
        ("CLI_DATA_PATH", data[0].to_str().unwrap()),
        ("CLI_RETRY_TIMEOUT_MS", "6000"),
        ("CLI_TOKEN_FILE", ""),
        ("CLI_TLS_CA", ""),
    ];
    let (status, stdout, stderr) = run_to_exit("lottery-agency", command(AGENCY, dir.path(), &env));
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    let connects: Vec<&str> = stdout.lines().filter(|l| l.contains("action: connect")).collect();
    // The first failure, then one summary every 5 s: not one line per attempt.
    assert!((1..=3).contains(&connects.len()), "{connects:#?}");
    assert!(connects[0].contains("result: in_progress | address: 127.0.0.1:1 | error: "), "{}", connects[0]);
    if let Some(summary) = connects.get(1) {
        let attempts: u32 =
            common::log_line::log_field(summary, "attempts").and_then(|n| n.parse().ok()).unwrap_or_default();
        assert!(attempts > 1, "{summary}");
    }
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(stderr.starts_with("lottery-agency: no server at 127.0.0.1:1: "), "{stderr}");
    assert_eq!(stderr.matches("127.0.0.1:1").count(), 1, "the address said twice: {stderr}");
}

#[test]
fn the_default_address_that_does_not_resolve_is_said_to_be_the_compose_name() {
    use std::net::ToSocketAddrs;
    if ("server", 12345).to_socket_addrs().is_ok_and(|mut a| a.next().is_some()) {
        return; // Inside compose, `server` resolves: nothing to explain.
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = common::keys::Keys::make(dir.path(), 1);
    let data = lottery::tools::dataset::generate(&dir.path().join("data"), 1, 5, 1).unwrap();
    let mut env: Vec<(String, String)> = keys.agency_env(1);
    env.extend([
        ("CLI_ID".into(), "1".into()),
        ("CLI_DATA_PATH".into(), data[0].to_str().unwrap().into()),
        ("CLI_RETRY_TIMEOUT_MS".into(), "300".into()),
    ]);
    let (status, stdout, stderr) =
        run_to_exit("lottery-agency", command(AGENCY, dir.path(), &common::keys::env_refs(&env)));
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(stderr.contains("no server at server:12345: "), "{stderr}");
    assert!(stderr.contains("docker compose") && stderr.contains("CLI_SERVER_ADDRESS"), "{stderr}");
}

#[test]
fn an_agency_without_a_ca_refuses_a_server_that_is_not_on_this_machine_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let keys = common::keys::Keys::make(dir.path(), 1);
    let data = lottery::tools::dataset::generate(&dir.path().join("data"), 1, 5, 1).unwrap();
    let token = keys.path("agency-1.token");
    // 192.0.2.1 is TEST-NET-1: nothing answers there, and nothing must be sent.
    let env = [
        ("CLI_ID", "1"),
        ("CLI_SERVER_ADDRESS", "192.0.2.1:12345"),
        ("CLI_DATA_PATH", data[0].to_str().unwrap()),
        ("CLI_TOKEN_FILE", token.as_str()),
        ("CLI_TLS_CA", ""),
    ];
    let (status, stdout, stderr) = run_to_exit("lottery-agency", command(AGENCY, dir.path(), &env));
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(stderr.contains("192.0.2.1:12345") && stderr.contains("set CLI_TLS_CA"), "{stderr}");
    assert!(!stdout.contains("action: connect"), "it tried to connect: {stdout}");
    assert!(!stdout.contains(&keys.token(1)) && !stderr.contains(&keys.token(1)), "the token was printed");
}

#[test]
fn lottery_round_watch_serves_the_rounds_page_until_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command(ROUND, dir.path(), &[]);
    cmd.args(["--watch", "--agencies", "3", "--bets-per-agency", "10"]);
    let mut round = common::process::Proc::spawn("lottery-round", cmd);
    let line = round.logs.wait_for("the page stays up at http://");
    let address = line.split("http://").nth(1).and_then(|rest| rest.split('/').next()).unwrap_or_default().to_owned();
    let mut stream = TcpStream::connect(&address).unwrap_or_else(|e| panic!("the page at {address}: {e}"));
    stream.set_read_timeout(Some(STEP)).unwrap();
    stream.write_all(b"GET /round.json HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"drawn\":true") && answer.contains("\"states\":\"333\""), "{answer}");
    round.signal(libc::SIGINT);
    round.wait_success(STEP);
}
