//! Stdout and stderr that a closed pipe cannot crash. `println!` panics when the reader has
//! gone (`lottery-round | head -2`); every line the binaries print or log goes through here
//! instead. A write that finds the reader gone (`BrokenPipe`) marks stdout closed and runs the
//! hook the binary registered (stop the round, shut the server down), so a closed pipe ends a
//! binary as quietly as it ends `cat`; later writes are dropped. Any other failure (a full disk
//! under a redirected log) loses that line only: no binary stops for a log it cannot write.

use crate::sync::lock_unpoisoned;
use std::fmt;
use std::io::{self, Write};
use std::sync::{Mutex, OnceLock};

/// Why stdout stopped taking lines, once it has.
static CLOSED: OnceLock<io::ErrorKind> = OnceLock::new();

type Hook = Box<dyn Fn() + Send>;

/// What to do when stdout closes: registered by the binary once it can stop itself.
static ON_CLOSE: Mutex<Option<Hook>> = Mutex::new(None);

/// Runs `hook` when stdout closes, or now if it already has (a log line of start-up may have
/// found it closed before the binary could stop itself).
pub(crate) fn on_close(hook: impl Fn() + Send + 'static) {
    let mut slot = lock_unpoisoned(&ON_CLOSE);
    if CLOSED.get().is_some() {
        hook();
    }
    *slot = Some(Box::new(hook));
}

/// `None` while stdout takes lines; else the kind of error that closed it (`BrokenPipe`: the
/// reader went away, which is no error of ours).
pub(crate) fn closed() -> Option<io::ErrorKind> {
    CLOSED.get().copied()
}

/// Writes `bytes` to stdout, unless it has closed; a failure closes it and runs the hook.
pub(crate) fn write(bytes: &[u8]) {
    if CLOSED.get().is_some() {
        return;
    }
    let mut out = io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => {}
        // The reader went away: nobody will read another line.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            drop(out);
            if CLOSED.set(e.kind()).is_ok() {
                let hook = lock_unpoisoned(&ON_CLOSE);
                hook.iter().for_each(|hook| hook());
            }
        }
        // A full disk under a redirected log, an I/O error: this line is lost, but the server
        // goes on serving (its bets may well be on another disk), and the next line may pass.
        Err(_) => {}
    }
}

/// Prints one line on stdout (see [`write()`]).
pub(crate) fn line(args: fmt::Arguments<'_>) {
    write(format!("{args}\n").as_bytes());
}

/// Prints one line on stderr; a closed stderr drops it (there is nowhere left to say so).
pub(crate) fn err_line(args: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{args}");
}

/// The logger's target: stdout through [`write()`], never an error to the logger.
pub(crate) struct LogTarget;

impl Write for LogTarget {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
