//! The progress of `lottery-round`'s long phases (generating data, sending bets, the draw) on
//! stderr: a live bar on a terminal (`indicatif`), plain lines once a second otherwise (a log
//! file, a test capturing stderr). A phase shorter than a tick shows nothing, and a plain line
//! is never printed twice.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::output;

/// Where a phase is, as seen at one tick.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    /// `generate`, `send`, `draw`.
    pub phase: &'static str,
    /// Bets done so far, out of `total`; no total: a phase that can only say it is running.
    pub done: u64,
    pub total: Option<u64>,
    /// The rest of the line: a rate, the agencies done.
    pub detail: String,
}

/// A thread that samples the work once a tick and shows it, until [`Progress::finish`].
pub(crate) struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Progress {
    /// Shows what `sample` returns (`None`: nothing to show at this tick). `live` asks for a
    /// bar, which is drawn only if stderr is a terminal.
    pub(crate) fn start(live: bool, mut sample: impl FnMut() -> Option<Sample> + Send + 'static) -> Progress {
        let live = live && std::io::stderr().is_terminal();
        let tick = if live { Duration::from_millis(200) } else { Duration::from_secs(1) };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                let mut view = if live { View::bar() } else { View::Lines { last: String::new() } };
                let mut phase = ("", Instant::now());
                loop {
                    thread::park_timeout(tick);
                    if flag.load(Ordering::SeqCst) {
                        return view.clear();
                    }
                    if let Some(s) = sample() {
                        if s.phase != phase.0 {
                            phase = (s.phase, Instant::now());
                        }
                        view.show(&s, phase.1.elapsed());
                    }
                }
            })
            .ok();
        Progress { stop, thread }
    }

    /// Stops showing progress, and clears the bar.
    pub(crate) fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

enum View {
    /// The current phase's bar, and that phase.
    Bar(Option<(ProgressBar, &'static str)>),
    Lines {
        last: String,
    },
}

impl View {
    fn bar() -> View {
        View::Bar(None)
    }

    fn show(&mut self, s: &Sample, elapsed: Duration) {
        match self {
            View::Bar(current) => {
                if current.as_ref().is_none_or(|(_, phase)| *phase != s.phase) {
                    if let Some((old, _)) = current.take() {
                        old.finish_and_clear();
                    }
                    *current = Some((new_bar(s), s.phase));
                }
                if let Some((bar, _)) = current {
                    bar.set_message(s.detail.clone());
                    bar.set_position(s.done);
                }
            }
            View::Lines { last } => {
                let line = line(s, elapsed);
                if line != *last {
                    output::err_line(format_args!("{line}"));
                    *last = line;
                }
            }
        }
    }

    fn clear(self) {
        if let View::Bar(Some((bar, _))) = self {
            bar.finish_and_clear();
        }
    }
}

/// A bar for a phase with a total, a spinner for one without; the message is cut to the
/// terminal's width. It redraws itself (10 times a second), so that an update the draw rate
/// limit skipped still shows.
fn new_bar(s: &Sample) -> ProgressBar {
    let template = match s.total {
        Some(_) => "{prefix:>8} [{bar:25}] {percent:>3}% {pos}/{len} {wide_msg}",
        None => "{prefix:>8} {spinner} {elapsed} {wide_msg}",
    };
    let style = ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::with_draw_target(s.total, ProgressDrawTarget::stderr())
        .with_style(style.progress_chars("=> "))
        .with_prefix(s.phase)
        .with_message(s.detail.clone())
        .with_position(s.done);
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// A plain progress line: `send: 4500000/10000000 bets (45%), 2/5 agencies done, 1100000 bets/s`.
fn line(s: &Sample, elapsed: Duration) -> String {
    let detail = if s.detail.is_empty() { String::new() } else { format!(", {}", s.detail) };
    match s.total {
        Some(total) => {
            let pct = 100.0 * s.done as f64 / total.max(1) as f64;
            format!("{}: {}/{total} bets ({pct:.0}%){detail}", s.phase, s.done)
        }
        None => format!("{}: {:.0} s{detail}", s.phase, elapsed.as_secs_f64()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_say_the_phase_the_count_and_the_share() {
        let send = Sample { phase: "send", done: 450, total: Some(1000), detail: "2/5 agencies done".into() };
        assert_eq!(line(&send, Duration::ZERO), "send: 450/1000 bets (45%), 2/5 agencies done");
        let draw = Sample { phase: "draw", done: 0, total: None, detail: "reading bets.csv back".into() };
        assert_eq!(line(&draw, Duration::from_millis(2100)), "draw: 2 s, reading bets.csv back");
    }
}
