//! The log line format of the spec: `YYYY-MM-DD HH:MM:SS LEVEL    action: … | result: …`, on
//! stdout (through [`crate::output`], so that a closed pipe stops a binary instead of crashing
//! it), timestamps in UTC.

use std::io::Write;

use log::LevelFilter;
use time::macros::format_description;

thread_local! {
    /// The last second a line was logged in on this thread, and its text.
    static STAMP: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((i64::MIN, String::new())) };
}

/// Installs the logger at `level`. Calling it twice (tests, `lottery-round`) keeps the first.
pub(crate) fn init(level: LevelFilter) {
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
                writeln!(buf, "{stamp} {:<8} {}", record.level(), record.args())
            })
        })
        .try_init();
}

/// A value for a log field: no `|` (it separates fields) and no line break.
pub(crate) fn field(value: &str) -> String {
    value.replace('|', "/").replace(['\n', '\r'], " ")
}
