//! `lottery-round --attack` runs each round's attackers in a process of their own, as a botnet's
//! are on machines of their own. In the same process as the server and the agencies, 2,000
//! attacker threads in `SCHED_IDLE` shared one memory map with them: an attacker that took the
//! map's lock for a page fault and was then left without CPU (as `SCHED_IDLE` threads are while
//! others run) held up every thread start behind it, the server's door's among them, for up to
//! seconds. That was the harness's doing, not the server's.
//!
//! The parent starts `lottery-round --attack-worker …` (not in `--help`), which runs the
//! attackers until its standard input closes, then prints what they got, one figure a line.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::time::Duration;

use crate::agency::credentials;
use crate::tools::attacks::{self, Attack, Report, Sources, Target};

/// The hidden first argument that makes `lottery-round` a botnet.
pub(crate) const WORKER: &str = "--attack-worker";

/// What the attackers of one round are told.
pub(crate) struct Orders<'a> {
    pub kind: Attack,
    pub count: usize,
    pub addr: SocketAddr,
    /// The CA that the TLS attackers trust (the server's), if it speaks TLS.
    pub ca: Option<&'a Path>,
    pub agencies: u32,
    pub refresh_every: Duration,
    pub sources: Sources,
}

/// Attackers running in a child process.
pub(crate) struct Botnet {
    child: Child,
    orders: Option<ChildStdin>,
}

impl Botnet {
    /// Starts the attackers' process.
    ///
    /// # Errors
    /// This program cannot be found or started again.
    pub(crate) fn launch(orders: &Orders) -> Result<Botnet, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this program to run attackers: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.args([
            WORKER.to_owned(),
            orders.kind.name().to_owned(),
            orders.count.to_string(),
            orders.addr.to_string(),
            orders.agencies.to_string(),
            orders.refresh_every.as_millis().to_string(),
            match orders.sources {
                Sources::Spread => "spread".to_owned(),
                Sources::Same => "same".to_owned(),
            },
        ]);
        if let Some(ca) = orders.ca {
            cmd.arg(ca);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the attackers' process: {e}"))?;
        let orders = child.stdin.take();
        Ok(Botnet { child, orders })
    }

    /// Stops the attackers and sums what they got (nothing, if their process failed).
    pub(crate) fn stop(mut self) -> Report {
        drop(self.orders.take());
        let mut text = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            let _ = out.read_to_string(&mut text);
        }
        let _ = self.child.wait();
        decode(&text)
    }
}

impl Drop for Botnet {
    fn drop(&mut self) {
        if self.orders.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The attackers' process: `lottery-round --attack-worker KIND COUNT ADDR AGENCIES REFRESH_MS
/// spread|same [CA]`. Attacks until its standard input closes, then prints the report.
pub(crate) fn worker(args: &[String]) -> ExitCode {
    match run_worker(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lottery-round {WORKER}: {e}");
            ExitCode::from(2)
        }
    }
}

fn run_worker(args: &[String]) -> Result<(), String> {
    let [kind, count, addr, agencies, refresh_ms, sources, rest @ ..] = args else {
        return Err("usage: KIND COUNT ADDR AGENCIES REFRESH_MS spread|same [CA]".into());
    };
    let kind = Attack::parse_list(kind)?.into_iter().next().ok_or("no attack kind")?;
    let number = |what: &str, text: &str| text.parse::<u64>().map_err(|e| format!("{what} {text:?}: {e}"));
    let count = usize::try_from(number("COUNT", count)?).map_err(|e| e.to_string())?;
    let agencies = u32::try_from(number("AGENCIES", agencies)?).map_err(|e| e.to_string())?;
    let refresh_every = Duration::from_millis(number("REFRESH_MS", refresh_ms)?);
    let addr: SocketAddr = addr.parse().map_err(|e| format!("ADDR {addr:?}: {e}"))?;
    let sources = match sources.as_str() {
        "spread" => Sources::Spread,
        "same" => Sources::Same,
        other => return Err(format!("{other:?} is not spread or same")),
    };
    let tls = match rest.first() {
        Some(ca) => Some(credentials::client_config(&PathBuf::from(ca))?),
        None => None,
    };
    let target = Target { addr, tls, agencies, refresh_every };
    stand_aside();
    let attackers = attacks::launch(kind, count, &target, sources);
    // Until the parent closes our standard input (or goes away).
    let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
    let report = attackers.stop();
    let mut out = io::stdout().lock();
    out.write_all(encode(&report).as_bytes()).and_then(|()| out.flush()).map_err(|e| e.to_string())
}

/// Puts this process in a scheduling group of its own (a session of its own is one, where the
/// kernel groups by session, `sched_autogroup`), weighed as nice 19: the scheduler then shares
/// the CPU between this group and the server's as between two tasks, not between 2,000
/// attackers and a few threads. Even in `SCHED_IDLE` (weight 3 each against 1,024 for a normal
/// thread) 2,000 runnable attackers outweighed the round's threads several times over. Best
/// effort: without autogroups the attackers are only in `SCHED_IDLE`.
fn stand_aside() {
    let _ = rustix::process::setsid();
    let _ = std::fs::write("/proc/self/autogroup", "19");
}

/// A report as lines: `attackers N`, `connections N`, `failed_connects N`, then `reply N TEXT`.
fn encode(report: &Report) -> String {
    let mut text = format!(
        "attackers {}\nconnections {}\nfailed_connects {}\n",
        report.attackers, report.connections, report.failed_connects
    );
    for (reply, n) in &report.replies {
        text.push_str(&format!("reply {n} {reply}\n"));
    }
    text
}

fn decode(text: &str) -> Report {
    let mut report = Report::default();
    for line in BufReader::new(text.as_bytes()).lines().map_while(Result::ok) {
        let mut words = line.splitn(3, ' ');
        let (key, n) = (words.next(), words.next().and_then(|n| n.parse::<u64>().ok()));
        match (key, n, words.next()) {
            (Some("attackers"), Some(n), None) => report.attackers = usize::try_from(n).unwrap_or(usize::MAX),
            (Some("connections"), Some(n), None) => report.connections = n,
            (Some("failed_connects"), Some(n), None) => report.failed_connects = n,
            (Some("reply"), Some(n), Some(reply)) => {
                report.replies.insert(reply.to_owned(), n);
            }
            _ => {}
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_survives_its_way_between_processes() {
        let mut report = Report { attackers: 3, connections: 70, failed_connects: 2, ..Report::default() };
        report.replies.insert("ERR BUSY".into(), 5);
        report.replies.insert("closed".into(), 9);
        let back = decode(&encode(&report));
        assert_eq!((back.attackers, back.connections, back.failed_connects, back.replies), (3, 70, 2, report.replies));
    }
}
