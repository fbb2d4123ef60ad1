//! Reading `bets.csv` back fast, for the draw and for recovery at start-up.
//!
//! Every row the server writes is one line; nearly all have no quotes. Such a line is split at
//! its commas here, in place, without the csv crate's per-record work; the first line that is
//! anything else (quotes, a `\r`, an empty line, a BOM at the start, bytes that are not UTF-8,
//! a row that is not a bet of this round) stops this reader, and [`crate::ledger::store::scan`]
//! hands the rest of the file to the csv crate, which decides as it always did.

use std::fs::File;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::wire::plain::plain_commas;

/// How far the fast reader got.
pub(crate) enum Fast {
    /// It read the whole file (`true`), or gave up because `stop` was set (`false`).
    Finished(bool),
    /// It visited this many rows, then met a line it leaves to the csv crate.
    Unsure { visited: u64 },
}

/// Read size: big enough that a read is rare, small enough to stay in the cache.
const CHUNK: usize = 256 * 1024;

/// Reads `file` from the start and calls `visit(agency, document, number)` for every row, as
/// long as each is a plain line. Checks `stop` every 65,536 rows, as the csv reader does.
///
/// # Errors
/// The file cannot be read.
pub(crate) fn fast_scan(
    mut file: File,
    agencies: u32,
    stop: Option<&AtomicBool>,
    visit: &mut impl FnMut(u32, &[u8], u16),
) -> io::Result<Fast> {
    let mut buf = vec![0u8; CHUNK];
    let (mut start, mut end, mut visited, mut eof) = (0, 0, 0u64, false);
    loop {
        while let Some(len) = next_line(&buf[start..end], eof) {
            if (visited + 1) % 65536 == 0 && stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                return Ok(Fast::Finished(false));
            }
            let line = &buf[start..start + len];
            // The csv crate drops a BOM that starts the file.
            let bom = visited == 0 && line.starts_with(b"\xef\xbb\xbf");
            let Some((agency, document, number)) = plain_row(line, agencies).filter(|_| !bom) else {
                return Ok(Fast::Unsure { visited });
            };
            visit(agency, document, number);
            visited += 1;
            start = (start + len + 1).min(end);
        }
        if eof {
            return Ok(Fast::Finished(true));
        }
        if start == 0 && end == buf.len() {
            // A line longer than the buffer: no row of ours.
            return Ok(Fast::Unsure { visited });
        }
        buf.copy_within(start..end, 0);
        (start, end) = (0, end - start);
        match file.read(&mut buf[end..]) {
            Ok(0) => eof = true,
            Ok(n) => end += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The length of the first line of `bytes` (without its `\n`); at the end of the file, the
/// last bytes even without one.
fn next_line(bytes: &[u8], eof: bool) -> Option<usize> {
    match memchr::memchr(b'\n', bytes) {
        Some(len) => Some(len),
        None if eof && !bytes.is_empty() => Some(bytes.len()),
        None => None,
    }
}

/// The agency, document and number of a line that the csv crate would read as exactly these
/// six comma-separated fields, and that is a row of this round; `None` for anything else.
fn plain_row(line: &[u8], agencies: u32) -> Option<(u32, &[u8], u16)> {
    let ([c1, _, c3, c4, c5], high) = plain_commas(line)?;
    // The rest is ASCII: the line is UTF-8 if this is.
    if let Some(high) = high {
        std::str::from_utf8(&line[high]).ok()?;
    }
    let agency =
        parse_unsigned(&line[..c1]).and_then(|a| u32::try_from(a).ok()).filter(|a| (1..=agencies).contains(a))?;
    let number = parse_unsigned(&line[c5 + 1..]).and_then(|n| u16::try_from(n).ok())?;
    Some((agency, &line[c3 + 1..c4], number))
}

/// What `str::parse` of an unsigned integer accepts (an optional `+`, then digits) and
/// returns, up to `u64`; without the `str`.
fn parse_unsigned(text: &[u8]) -> Option<u64> {
    let digits = text.strip_prefix(b"+").unwrap_or(text);
    if digits.is_empty() {
        return None;
    }
    let digit = |d: u8| Some(u64::from(d.wrapping_sub(b'0'))).filter(|&d| d <= 9);
    if digits.len() <= 19 {
        // Nineteen digits cannot overflow a u64: no checked arithmetic.
        digits.iter().try_fold(0u64, |n, &d| Some(n * 10 + digit(d)?))
    } else {
        digits.iter().try_fold(0u64, |n, &d| n.checked_mul(10)?.checked_add(digit(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unsigned_as_str_parse_does() {
        for text in
            ["0", "7574", "+12", "0042", "", "+", "-1", "1 ", "4294967295", "4294967296", "99999999999999999999"]
        {
            let want = text.parse::<u32>().ok();
            let got = parse_unsigned(text.as_bytes()).and_then(|n| u32::try_from(n).ok());
            assert_eq!(got, want, "{text:?}");
        }
    }

    #[test]
    fn plain_rows_only() {
        assert_eq!(plain_row(b"2,Ana,Paz,0042,2000-01-01,7574", 5), Some((2, &b"0042"[..], 7574)));
        assert_eq!(plain_row("1,Iñaki,Peña,1,2000-01-01,+5".as_bytes(), 5), Some((1, &b"1"[..], 5)));
        for line in [
            &b"6,Ana,Paz,1,2000-01-01,1"[..],
            b"1,\"Ana\",Paz,1,2000-01-01,1",
            b"1,Ana,Paz,1,2000-01-01,1,",
            b"1,A\xff,P,1,2000-01-01,1",
            b"1,Ana,Paz,1,2000-01-01,1\r",
            b"",
        ] {
            assert_eq!(plain_row(line, 5), None, "{line:?}");
        }
    }
}
