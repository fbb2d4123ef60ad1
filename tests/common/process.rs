//! Child processes for the black-box tests: a `Command` with a clean environment, the child's
//! log lines read through a channel, and a child killed and reaped on `Drop`, so a failing test
//! leaves no process behind.
//!
//! Nothing here sleeps to synchronise: readiness is a log line, and every wait has a deadline.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Longest any single step may take before the test fails instead of hanging. Generous: it
/// bounds conditions that load can only slow. Beside a busy loop on each core, at a load
/// average of 900, a child's last log lines took more than 10 s to reach the test after it
/// had exited.
pub const STEP: Duration = Duration::from_secs(30);

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

    /// Takes every line received but not yet looked at into `seen`, without waiting: a failing
    /// test then shows all the child said, not only what the test had waited for.
    pub fn take_pending(&mut self) {
        while let Ok(line) = self.rx.try_recv() {
            self.seen.push(line);
        }
    }

    /// The next line: `Ok(None)` at the end of the output, `Err` at the deadline.
    fn next_line(&mut self, deadline: Instant) -> Result<Option<&str>, RecvTimeoutError> {
        if self.eof {
            return Ok(None);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line);
                Ok(self.seen.last().map(String::as_str))
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.eof = true;
                Ok(None)
            }
            Err(RecvTimeoutError::Timeout) => Err(RecvTimeoutError::Timeout),
        }
    }

    /// Waits for a line containing `needle` (looking at the lines already seen first) and
    /// returns it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        self.wait_count(needle, 1)
    }

    /// Waits until `n` lines containing `needle` have been seen in all, and returns the last.
    pub fn wait_count(&mut self, needle: &str, n: usize) -> String {
        self.try_wait_count(needle, n, STEP).unwrap_or_else(|| {
            panic!(
                "no {n} lines with {needle:?} within {STEP:?} (or before the output ended); lines:\n{}",
                self.seen.join("\n")
            )
        })
    }

    /// Like [`Logs::wait_count`], but gives up after `within` or at the end of the output,
    /// returning `None`, instead of failing.
    pub fn try_wait_count(&mut self, needle: &str, n: usize, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            let mut matching = self.seen.iter().filter(|l| l.contains(needle));
            if let Some(line) = matching.nth(n.saturating_sub(1)) {
                return Some(line.clone());
            }
            if !matches!(self.next_line(deadline), Ok(Some(_))) {
                return None;
            }
        }
    }

    /// Reads every line up to the end of the output (the child has exited or is exiting).
    pub fn until_eof(&mut self) -> &[String] {
        let deadline = Instant::now() + STEP;
        while self.next_line(deadline).unwrap_or_else(|_| panic!("no log line in time")).is_some() {}
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

    /// Sends `signal` (`libc::SIGTERM`, `libc::SIGINT`, …).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.pid());
    }

    /// Waits for the process to exit, at most `timeout`; panics if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                self.logs.take_pending();
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
            self.logs.take_pending();
            eprintln!("--- {} log ---\n{}", self.name, self.logs.seen.join("\n"));
            // Only if it is all there: a grandchild may still hold the pipe open.
            if self.stderr.as_ref().is_some_and(JoinHandle::is_finished) {
                let stderr = self.stderr();
                eprintln!("--- {} stderr ---\n{stderr}", self.name);
            }
        }
    }
}
