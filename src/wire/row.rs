//! The fast path for bet rows: a row is checked in place and copied as it is.
//!
//! Nearly every row an agency sends has no quotes, and a number without leading zeros. For
//! such a row the reference path ([`RowParser`], [`Bet::from_fields`], then [`RowWriter`]'s
//! minimal quoting) splits it at its commas, validates the five fields, and writes the very
//! same bytes back. `is_plain_bet` decides that in one pass over the bytes, without
//! allocating, so the row can be copied instead. Any other row (quotes, an invalid field, a
//! number like `0042`, which is written back as `42`) takes the reference path, which gives the
//! same error or the same re-encoded row as before: the fast path only ever says "yes, as is".
//! `tests/properties.rs` compares the two on arbitrary input.
//!

use time::Date;

use crate::wire::bet::{Bet, BetError, MAX_NAME_BYTES, RowParser, RowWriter, is_name_char};
use crate::wire::plain::plain_commas;

/// Turns wire or data-file rows into the bytes to send or store, reusing its buffers.
pub struct RowEncoder {
    parser: RowParser,
    writer: RowWriter,
    today: Date,
    /// `today` as `YYYY-MM-DD`: for such text, byte order is date order.
    today_text: [u8; 10],
    /// `<agency>,`, the prefix of a `bets.csv` row, for the agency it was last made for.
    prefix: Vec<u8>,
    prefix_agency: Option<u32>,
}

impl RowEncoder {
    /// An encoder that accepts birthdates up to `today`.
    pub fn new(today: Date) -> Self {
        RowEncoder {
            parser: RowParser::default(),
            writer: RowWriter::default(),
            today,
            today_text: date_text(today),
            prefix: Vec::new(),
            prefix_agency: None,
        }
    }

    /// Moves the upper bound of a birthdate (a long-lived connection crosses midnight).
    pub(crate) fn set_today(&mut self, today: Date) {
        if today != self.today {
            self.today = today;
            self.today_text = date_text(today);
        }
    }

    /// Appends `line`, a wire row, to `out` as `agency`'s `bets.csv` row, `\n` included.
    ///
    /// # Errors
    /// As [`RowParser::bet`]; nothing is appended then.
    pub fn push_stored(&mut self, agency: u32, line: &[u8], out: &mut Vec<u8>) -> Result<(), BetError> {
        if self.prefix_agency != Some(agency) {
            self.prefix = format!("{agency},").into_bytes();
            self.prefix_agency = Some(agency);
        }
        if is_plain_bet(line, &self.today_text) {
            out.reserve(self.prefix.len() + line.len() + 1);
            out.extend_from_slice(&self.prefix);
            out.extend_from_slice(line);
            out.push(b'\n');
            return Ok(());
        }
        let bet = self.parser.bet(line, self.today)?;
        self.writer.push_stored(agency, &bet);
        out.extend_from_slice(&self.writer.take());
        Ok(())
    }

    /// Appends `line`, a data-file row, to `out` as a wire row, `\n` included.
    ///
    /// # Errors
    /// As [`RowParser::bet`]; nothing is appended then.
    pub fn push_wire(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<(), BetError> {
        if self.push_plain_wire(line, out) {
            return Ok(());
        }
        let bet = self.parser.bet(line, self.today)?;
        self.writer.push_bet(&bet);
        out.extend_from_slice(&self.writer.take());
        Ok(())
    }

    /// Appends `line` and `\n` to `out` if it is a plain bet ([`is_plain_bet`]); false, and
    /// nothing appended, otherwise.
    pub(crate) fn push_plain_wire(&mut self, line: &[u8], out: &mut Vec<u8>) -> bool {
        let plain = is_plain_bet(line, &self.today_text);
        if plain {
            out.reserve(line.len() + 1);
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        plain
    }

    /// Validates the five fields of a row already split (by the csv crate) and appends them to
    /// `out` as a wire row.
    ///
    /// # Errors
    /// As [`Bet::from_fields`]; nothing is appended then.
    pub(crate) fn push_wire_fields(&mut self, fields: &[&str], out: &mut Vec<u8>) -> Result<(), BetError> {
        let bet = Bet::from_fields(fields, self.today)?;
        self.writer.push_bet(&bet);
        out.extend_from_slice(&self.writer.take());
        Ok(())
    }
}

/// `date` as `YYYY-MM-DD`.
fn date_text(date: Date) -> [u8; 10] {
    let text = format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day());
    text.as_bytes().try_into().unwrap_or(*b"0000-00-00")
}

/// Whether `line` is a valid bet (birthdates up to `today`, `YYYY-MM-DD`) that the reference
/// path would write back byte for byte: five fields, no quote anywhere, names of name
/// characters not starting with a hyphen, a number without leading zeros. `false` says nothing
/// more: the reference path decides.
pub(crate) fn is_plain_bet(line: &[u8], today: &[u8; 10]) -> bool {
    let Some(([c1, c2, c3, c4], high)) = plain_commas(line) else { return false };
    let (document, birthdate, number) = (&line[c2 + 1..c3], &line[c3 + 1..c4], &line[c4 + 1..]);
    (1..=MAX_NAME_BYTES).contains(&c1)
        && (1..=MAX_NAME_BYTES).contains(&(c2 - c1 - 1))
        && plain_names(&line[..c2])
        && line[0] != b'-'
        && line[c1 + 1] != b'-'
        && (1..=10).contains(&document.len())
        && digits(document)
        && plain_date(birthdate, today)
        && (1..=4).contains(&number.len())
        && digits(number)
        && (number.len() == 1 || number[0] != b'0')
        // Only the names can hold what is not ASCII: the other fields are digits and dashes.
        && high.is_none_or(|high| name_utf8(&line[high]))
}

/// Which bytes the names may hold, as far as ASCII goes: letters, space, apostrophe, hyphen,
/// dot; also the comma between the two names, and every byte from 0x80 up, which
/// [`name_utf8`] looks at as characters.
static NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphabetic() || matches!(c, b' ' | b'\'' | b'-' | b'.' | b',') || c >= 0x80;
        b += 1;
    }
    table
};

/// Whether the two names and the comma between them (a line already known to be plain) hold
/// only [`NAME_BYTES`]; without stopping early, which costs more than it saves on a name.
fn plain_names(names: &[u8]) -> bool {
    names.iter().fold(true, |all, &b| all & NAME_BYTES[usize::from(b)])
}

/// Whether every byte is an ASCII digit; without stopping early, which costs more than it
/// saves on a dozen bytes.
fn digits(field: &[u8]) -> bool {
    field.iter().fold(true, |all, &b| all & (b.wrapping_sub(b'0') <= 9))
}

/// UTF-8 whose characters beyond ASCII are all name characters ([`is_name_char`]: no C1
/// control, separator or format character among them). Given the bytes from the first to the
/// last that is not ASCII, it answers for the whole line: ASCII around them neither ends nor
/// begins a character, and is checked by [`plain_names`].
fn name_utf8(text: &[u8]) -> bool {
    std::str::from_utf8(text).is_ok_and(|text| text.chars().all(|c| c.is_ascii() || is_name_char(c)))
}

/// `YYYY-MM-DD`, a real calendar date from 1900-01-01 to `today`, without a calendar library:
/// byte order of such text is date order, so the bounds are byte comparisons.
fn plain_date(date: &[u8], today: &[u8; 10]) -> bool {
    let Ok(date) = <&[u8; 10]>::try_from(date) else { return false };
    let digit = |i: usize| date[i].wrapping_sub(b'0');
    let shape = date[4] == b'-' && date[7] == b'-' && [0, 1, 2, 3, 5, 6, 8, 9].iter().all(|&i| digit(i) <= 9);
    if !shape || date < b"1900-01-01" || date > today {
        return false;
    }
    let year = u32::from(digit(0)) * 1000 + u32::from(digit(1)) * 100 + u32::from(digit(2)) * 10 + u32::from(digit(3));
    let (month, day) = (digit(5) * 10 + digit(6), digit(8) * 10 + digit(9));
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    const TODAY: &[u8; 10] = b"2026-11-26";

    #[test]
    fn plain_rows_are_recognised() {
        for line in [
            "Santiago Lionel,Lorca,30904465,1999-03-17,2201",
            "Tiago Nicolás,Peña,00000042,2000-02-29,0",
            "Ñandú,O'Brien-Paz,1,2000-01-01,1",
            "Ma. José,D\u{2019}Amico,1,2000-01-01,1",
        ] {
            assert!(is_plain_bet(line.as_bytes(), TODAY), "{line}");
        }
    }

    #[test]
    fn anything_else_goes_to_the_reference_path() {
        let lines = [
            "\"Ana, María\",Paz,1,2000-01-01,1",
            "Ana,O\"Brien,1,2000-01-01,1",
            "Ana,Paz,1,2000-01-01,0042",
            "Ana,Paz,1,2000-01-01",
            "Ana,Paz,1,2000-01-01,1,2",
            "Ana,Paz,1,1900-02-29,1",
            "Ana,Paz,1,1899-12-31,1",
            "Ana,Paz,1,2026-11-27,1",
            "Ana,Paz,1,2000-13-01,1",
            "Ana,Paz,1,2000-04-31,1",
            "Ana,Paz,1,2000-01-00,1",
            "Ana,Paz,+1,2000-01-01,1",
            "Ana,P\u{85}z,1,2000-01-01,1",
            "Ana,Paz\t,1,2000-01-01,1",
            ",Paz,1,2000-01-01,1",
            "Ana2,Paz,1,2000-01-01,1",
            "-Ana,Paz,1,2000-01-01,1",
            "Ana,-Paz,1,2000-01-01,1",
            "=Ana,Paz,1,2000-01-01,1",
            "Ana,Paz+,1,2000-01-01,1",
            "@Ana,Paz,1,2000-01-01,1",
            "Ana,P\u{2028}z,1,2000-01-01,1",
            "Ana,P\u{feff}z,1,2000-01-01,1",
            "Ana\u{a0},Paz,1,2000-01-01,1",
        ];
        for line in lines {
            assert!(!is_plain_bet(line.as_bytes(), TODAY), "{line}");
        }
        assert!(!is_plain_bet(b"An\xc3,\xa1,1,2000-01-01,1", TODAY));
    }

    #[test]
    fn both_paths_write_the_same_rows() {
        let mut encoder = RowEncoder::new(date!(2026 - 11 - 26));
        let mut out = Vec::new();
        encoder.push_stored(3, b"Ana,Paz,7,1990-05-05,7574", &mut out).unwrap();
        encoder.push_stored(3, b"\"Ana\",Paz,7,1990-05-05,0042", &mut out).unwrap();
        encoder.push_wire(b"\"Ana Mar\xc3\xada\",Paz,7,1990-05-05,1", &mut out).unwrap();
        assert_eq!(
            out,
            b"3,Ana,Paz,7,1990-05-05,7574\n3,Ana,Paz,7,1990-05-05,42\nAna Mar\xc3\xada,Paz,7,1990-05-05,1\n"
        );
        let err = encoder.push_stored(3, b"Ana,Paz,7,1990-05-05,x", &mut out).unwrap_err();
        assert_eq!(err.to_string(), "number \"x\" is not an integer in 0..=9999");
    }
}
