//! `lottery-server --export-bets` from the database: the round in the `bets.csv` format.

use std::io::{self, Write};

use super::error::detail;
use super::{connect, parse_url, place};

/// Writes every bet of the round at `url` to `out` in the `bets.csv` format, in file order per
/// agency; returns how many.
///
/// # Errors
/// The database cannot be reached or read, or `out` cannot be written.
pub(crate) fn export(url: &str, out: &mut dyn Write) -> Result<u64, String> {
    let config = parse_url(url)?;
    let place = place(&config);
    let mut client = connect(&config, &place)?;
    let fail = |e: &dyn std::fmt::Display| format!("database {place}: {e}");
    let mut reader = client
        .copy_out(
            "COPY (SELECT agency, first_name, last_name, document, to_char(birthdate, 'YYYY-MM-DD'), number \
                   FROM lottery_bet ORDER BY agency, seq) TO STDOUT (FORMAT csv)",
        )
        .map_err(|e| fail(&detail(&e)))?;
    let mut counted = CountLines { out, lines: 0 };
    io::copy(&mut reader, &mut counted).map_err(|e| fail(&e))?;
    Ok(counted.lines)
}

/// A writer that counts the lines it passes on.
struct CountLines<'a> {
    out: &'a mut dyn Write,
    lines: u64,
}

impl Write for CountLines<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
