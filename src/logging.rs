//! The log line format of the spec: `YYYY-MM-DD HH:MM:SS LEVEL    action: … | result: …`, on
//! stdout (through [`crate::output`], so that a closed pipe stops a binary instead of crashing
//! it), timestamps in UTC.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use log::LevelFilter;
use time::macros::format_description;

thread_local! {
    /// The last second a line was logged in on this thread, and its text.
    static STAMP: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((i64::MIN, String::new())) };
}

/// Bytes of the lines the server's side (its connections, door and ledger) has logged at
/// `INFO` or above, shown or not: `lottery-round --attack` shows only errors, and reports how
/// much log each attack would have made a server write.
pub static SERVER_LOG_BYTES: AtomicU64 = AtomicU64::new(0);

/// Installs the logger at `level`. Calling it twice (tests, `lottery-round`) keeps the first.
pub(crate) fn init(level: LevelFilter) {
    install(level, level, false);
}

/// Installs the logger at `INFO` but shows only lines at `shown` or above, counting every
/// server line in [`SERVER_LOG_BYTES`].
pub(crate) fn init_counting(shown: LevelFilter) {
    install(LevelFilter::Info.max(shown), shown, true);
}

fn install(level: LevelFilter, shown: LevelFilter, counting: bool) {
    let format = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let _ = env_logger::Builder::new()
        .filter_level(level)
        .target(env_logger::Target::Pipe(Box::new(crate::output::LogTarget)))
        .format(move |buf, record| {
            let now = time::OffsetDateTime::now_utc();
            // A busy server logs many lines a second: format the second once, per thread.
            STAMP.with_borrow_mut(|(second, stamp)| {
                if *second != now.unix_timestamp() {
                    *second = now.unix_timestamp();
                    *stamp = now.format(&format).unwrap_or_default();
                }
                if counting && is_server_side(record.target()) {
                    let line = format!("{stamp} {:<8} {}\n", record.level(), record.args());
                    SERVER_LOG_BYTES.fetch_add(line.len() as u64, Ordering::Relaxed);
                }
                if record.level() <= shown {
                    writeln!(buf, "{stamp} {:<8} {}", record.level(), record.args())
                } else {
                    Ok(())
                }
            })
        })
        .try_init();
}

/// Whether a log line comes from the server's side rather than an agency's or a tool's.
fn is_server_side(target: &str) -> bool {
    target.starts_with("lottery::server") || target.starts_with("lottery::ledger")
}

/// A value for a log field: no `|` (it separates fields) and no line break.
pub(crate) fn field(value: &str) -> String {
    value.replace('|', "/").replace(['\n', '\r'], " ")
}
