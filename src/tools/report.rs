//! What `lottery-round` prints once a round has ended: each agency's bets and winners against
//! what its file holds, the throughput of a round that completed, and what hostile clients got;
//! and the counts, taken from the agency files, that it checks the server's answers against.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::path::Path;
use std::time::Duration;

use crate::agency::Outcome;
use crate::output;
use crate::tools::hostile;

/// How an agency stopped because another failed begins its report.
pub(crate) const STOPPED_BY: &str = "stopped, as agency";

/// Prints the table, and the throughput if the round completed with exactly the expected
/// winners.
///
/// # Errors
/// What went wrong: the agencies that failed, or got other winners than their files hold.
pub(crate) fn report(
    outcomes: &[Result<Outcome, String>],
    expected: &[u64],
    total: u64,
    elapsed: Duration,
) -> Result<(), String> {
    output::line(format_args!("{:>7} {:>10} {:>8} {:>9}", "agency", "bets", "winners", "expected"));
    let mut wrong = Vec::new();
    for (id, (outcome, want)) in (1..).zip(outcomes.iter().zip(expected)) {
        match outcome {
            Ok(o) if o.winners.len() as u64 == *want => {
                output::line(format_args!("{id:>7} {:>10} {:>8} {want:>9}", o.stored, o.winners.len()));
            }
            Ok(o) => {
                output::line(format_args!("{id:>7} {:>10} {:>8} {want:>9}  MISMATCH", o.stored, o.winners.len()));
                wrong.push(format!("agency {id} was told {} winners, its file holds {want}", o.winners.len()));
            }
            Err(e) => {
                output::line(format_args!("{id:>7} failed: {e}"));
                wrong.push(format!("agency {id}: {e}"));
            }
        }
    }
    let winners: usize = outcomes.iter().flatten().map(|o| o.winners.len()).sum();
    output::line(format_args!("{:>7} {total:>10} {winners:>8} {:>9}", "total", expected.iter().sum::<u64>()));
    // The agency whose failure stopped the others says why the round failed.
    if let Some(first) = wrong.iter().find(|w| !w.contains(STOPPED_BY)).or(wrong.first()) {
        return Err(format!("the round failed for {} of {} agencies; {first}", wrong.len(), outcomes.len()));
    }
    let secs = elapsed.as_secs_f64();
    output::line(format_args!("wall time {secs:.3} s, {:.0} bets/s", total as f64 / secs.max(1e-9)));
    Ok(())
}

/// Prints, per kind of hostile client, what the server answered them.
pub(crate) fn report_hostile(reports: &[hostile::Report]) {
    if reports.is_empty() {
        return;
    }
    let mut by_kind: BTreeMap<hostile::Kind, (usize, usize, BTreeMap<String, usize>)> = BTreeMap::new();
    for r in reports {
        let entry = by_kind.entry(r.kind).or_default();
        entry.0 += 1;
        entry.1 += usize::from(r.closed_by_server);
        for reply in &r.replies {
            *entry.2.entry(reply.clone()).or_default() += 1;
        }
    }
    output::line(format_args!("{:>11} {:>7} {:>7}  replies", "hostile", "clients", "closed"));
    for (kind, (clients, closed, replies)) in by_kind {
        let replies: Vec<String> = replies.iter().map(|(r, n)| format!("{r} x{n}")).collect();
        output::line(format_args!("{:>11} {clients:>7} {closed:>7}  {}", kind.to_string(), replies.join(", ")));
    }
}

/// Lines in a file: the bets an agency will send.
pub(crate) fn count_lines(path: &Path) -> io::Result<u64> {
    let mut reader = BufReader::with_capacity(1 << 20, fs::File::open(path)?);
    let mut lines = 0;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(lines);
        }
        lines += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        let n = buf.len();
        reader.consume(n);
    }
}

/// Winning bets in an agency file: rows whose number is 7574.
pub(crate) fn count_winners(path: &Path) -> io::Result<u64> {
    let reader = BufReader::with_capacity(1 << 20, fs::File::open(path)?);
    let mut winners = 0;
    for line in reader.split(b'\n') {
        let line = line?;
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        winners += u64::from(line.ends_with(b",7574"));
    }
    Ok(winners)
}
