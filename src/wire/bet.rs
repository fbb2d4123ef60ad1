//! A bet: its fields, its validation, and its CSV rows.
//!
//! The same five fields travel in three places: an agency's data file, the wire (`BET` and the
//! rows of a `BATCH`) and `bets.csv`, where the agency number comes first. All three are CSV with
//! minimal quoting, so one parser ([`RowParser`]) and one writer ([`RowWriter`]) serve them all.

use std::fmt;

use time::{Date, Month};

/// The number that wins the draw.
pub(crate) const WINNING_NUMBER: u16 = 7574;

/// Longest name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 100;

/// One bet, validated: every value of this type passed [`Bet::from_fields`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bet {
    pub first_name: String,
    pub last_name: String,
    /// The document (DNI) exactly as written: leading zeros are kept.
    pub document: String,
    /// `YYYY-MM-DD`, a real calendar date.
    pub birthdate: String,
    pub number: u16,
}

/// Why a row is not a valid bet. The `Display` text is what an agency sees after `row <i>: `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BetError {
    /// The row is not well-formed CSV (a quote that never closes, bytes that are not UTF-8).
    Csv(&'static str),
    /// A bet has five fields (six in `bets.csv`).
    FieldCount {
        expected: usize,
        found: usize,
    },
    Name {
        field: &'static str,
        why: &'static str,
    },
    /// A character no name holds (see [`is_name_char`]).
    NameChar {
        field: &'static str,
        found: char,
    },
    Document(String),
    Birthdate {
        value: String,
        why: &'static str,
    },
    Number(String),
}

impl fmt::Display for BetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BetError::Csv(why) => write!(f, "not a CSV row: {why}"),
            BetError::FieldCount { expected, found } => {
                write!(f, "expected {expected} fields, found {found}")
            }
            BetError::Name { field, why } => write!(f, "{field} {why}"),
            // `{:?}` escapes what cannot be shown (a line separator, a format character).
            BetError::NameChar { field, found } => {
                write!(f, "{field} has {found:?}, which is not a letter, mark, space, apostrophe, hyphen or dot")
            }
            BetError::Document(v) => write!(f, "document {v:?} is not 1 to 10 digits"),
            BetError::Birthdate { value, why } => write!(f, "birthdate {value:?} {why}"),
            BetError::Number(v) => write!(f, "number {v:?} is not an integer in 0..=9999"),
        }
    }
}

impl std::error::Error for BetError {}

impl Bet {
    /// Validates the five fields `first_name, last_name, document, birthdate, number`.
    /// `today` bounds the birthdate; callers pass it in so that validation is pure.
    ///
    /// # Errors
    /// The first field that is not valid, as a [`BetError`].
    pub fn from_fields(fields: &[&str], today: Date) -> Result<Bet, BetError> {
        let [first, last, document, birthdate, number] = fields else {
            return Err(BetError::FieldCount { expected: 5, found: fields.len() });
        };
        check_name("first_name", first)?;
        check_name("last_name", last)?;
        check_document(document)?;
        check_birthdate(birthdate, today)?;
        Ok(Bet {
            first_name: (*first).to_owned(),
            last_name: (*last).to_owned(),
            document: (*document).to_owned(),
            birthdate: (*birthdate).to_owned(),
            number: parse_number(number)?,
        })
    }

    /// Whether this bet wins the draw (the course's `has_won`).
    pub(crate) fn has_won(&self) -> bool {
        self.number == WINNING_NUMBER
    }
}

/// What a name may not start with: a spreadsheet would read the name as a formula.
pub const FORMULA_STARTS: [char; 4] = ['=', '+', '-', '@'];

/// Whether a name may hold `c`: a letter or a mark, a space, an apostrophe, a hyphen or a dot.
/// Nothing else: no digit, comma, quote or symbol, and so no control, separator (but the ASCII
/// space) or format character, none of which a spreadsheet or a line-based tool takes as text.
///
/// Letters are Unicode's Alphabetic property (letters, and the marks that are part of a
/// script's letters); marks are also the combining diacritics that decomposed text (`e` +
/// U+0301) puts after a letter.
pub fn is_name_char(c: char) -> bool {
    // Latin letters first, as most names hold (all of U+00C0..=U+024F but × and ÷ are
    // letters): Unicode's tables cost more.
    matches!(c, '\u{c0}'..='\u{24f}') && c != '×' && c != '÷'
        || c.is_alphabetic()
        || matches!(c, ' ' | '\'' | '\u{2019}' | '-' | '\u{2010}' | '.')
        || matches!(c, '\u{300}'..='\u{36f}' | '\u{1ab0}'..='\u{1aff}' | '\u{1dc0}'..='\u{1dff}' | '\u{20d0}'..='\u{20f0}' | '\u{fe20}'..='\u{fe2f}')
}

fn check_name(field: &'static str, value: &str) -> Result<(), BetError> {
    let why = if value.is_empty() {
        "is empty"
    } else if value.len() > MAX_NAME_BYTES {
        "is longer than 100 bytes"
    } else if value.starts_with(FORMULA_STARTS) {
        "starts with one of = + - @ (a spreadsheet formula)"
    } else if value.chars().any(char::is_control) {
        "has a control character"
    } else if let Some(found) = value.chars().find(|&c| !is_name_char(c)) {
        return Err(BetError::NameChar { field, found });
    } else {
        return Ok(());
    };
    Err(BetError::Name { field, why })
}

fn check_document(value: &str) -> Result<(), BetError> {
    if (1..=10).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(BetError::Document(value.to_owned()))
    }
}

fn check_birthdate(value: &str, today: Date) -> Result<(), BetError> {
    let bad = |why| BetError::Birthdate { value: value.to_owned(), why };
    let date = parse_date(value).ok_or_else(|| bad("is not a calendar date YYYY-MM-DD"))?;
    if date.year() < 1900 {
        Err(bad("is before 1900"))
    } else if date > today {
        Err(bad("is in the future"))
    } else {
        Ok(())
    }
}

/// Parses `YYYY-MM-DD` (exactly that shape) into a real calendar date.
fn parse_date(value: &str) -> Option<Date> {
    let b = value.as_bytes();
    let shape_ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter().enumerate().all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape_ok {
        return None;
    }
    let year: i32 = value[0..4].parse().ok()?;
    let month: u8 = value[5..7].parse().ok()?;
    let day: u8 = value[8..10].parse().ok()?;
    Date::from_calendar_date(year, Month::try_from(month).ok()?, day).ok()
}

fn parse_number(value: &str) -> Result<u16, BetError> {
    let digits_only = !value.is_empty() && value.len() <= 4 && value.bytes().all(|b| b.is_ascii_digit());
    match value.parse::<u16>() {
        Ok(n) if digits_only => Ok(n),
        _ => Err(BetError::Number(value.to_owned())),
    }
}

/// Today's date (UTC), the upper bound of a birthdate.
pub fn today() -> Date {
    time::OffsetDateTime::now_utc().date()
}

/// Most fields a row may have before we stop counting them.
const MAX_FIELDS: usize = 16;

/// Splits one CSV line (no line end) into fields, reusing its buffers from row to row.
///
/// It holds a `csv_core` reader rather than a `csv::Reader` because the server parses one line at
/// a time, millions of times, and `csv_core` needs no allocation per line.
pub struct RowParser {
    /// Made on first use: building its state machine costs more than a thousand rows' checks
    /// on the fast path, and most connections never need it.
    reader: Option<csv_core::Reader>,
    out: Vec<u8>,
    ends: [usize; MAX_FIELDS],
}

impl Default for RowParser {
    fn default() -> Self {
        RowParser { reader: None, out: Vec::new(), ends: [0; MAX_FIELDS] }
    }
}

/// Refuses what `csv_core` would take too kindly: a quote that never closes, a line break.
fn check_shape(line: &[u8]) -> Result<(), BetError> {
    // csv_core is lenient about a quote that never closes; a well-formed row always has an
    // even number of quote characters, so an odd count is exactly that mistake.
    if line.iter().filter(|&&b| b == b'"').count() % 2 == 1 {
        return Err(BetError::Csv("a quote never closes"));
    }
    if line.iter().any(|&b| b == b'\n' || b == b'\r') {
        return Err(BetError::Csv("a line break inside the row"));
    }
    Ok(())
}

impl RowParser {
    /// The fields of `line`, borrowed from this parser until the next call.
    ///
    /// # Errors
    /// [`BetError::Csv`] for a quote that never closes, bytes that are not UTF-8, or a line
    /// break inside the row; [`BetError::FieldCount`] for more than 16 fields.
    pub fn fields(&mut self, line: &[u8]) -> Result<Vec<&str>, BetError> {
        check_shape(line)?;
        let nends = self.read_record(line)?;
        // Each field must be UTF-8 on its own: a comma can split the bytes of one character
        // into two fields that are valid only when joined.
        let mut start = 0;
        self.ends[..nends]
            .iter()
            .map(|&end| {
                let field = std::str::from_utf8(&self.out[start..end]).map_err(|_| BetError::Csv("not UTF-8"));
                start = end;
                field
            })
            .collect()
    }

    /// Reads `line` as one CSV record into `out` and `ends`, and returns how many fields it has.
    fn read_record(&mut self, line: &[u8]) -> Result<usize, BetError> {
        let reader = self.reader.get_or_insert_with(csv_core::Reader::new);
        reader.reset();
        if self.out.len() < line.len() {
            self.out.resize(line.len(), 0);
        }
        // csv_core drops a UTF-8 BOM that starts its input, as a file's would: right for a file,
        // wrong for a row whose first name begins with U+FEFF. It only does so when its first
        // input holds all three bytes, so the first call is given one byte.
        let (mut rest, mut nout, mut nends, mut at_end, mut first) = (line, 0, 0, false, true);
        loop {
            let input = if first { &rest[..rest.len().min(1)] } else { rest };
            first = false;
            let (result, nin, o, e) = reader.read_record(input, &mut self.out[nout..], &mut self.ends[nends..]);
            rest = &rest[nin..];
            nout += o;
            nends += e;
            match result {
                // csv_core stops early only when `out` is full. Once the row is read, an empty
                // input tells it the row has ended, and the next call yields the record.
                csv_core::ReadRecordResult::InputEmpty if at_end => break,
                csv_core::ReadRecordResult::InputEmpty => at_end = rest.is_empty(),
                csv_core::ReadRecordResult::Record | csv_core::ReadRecordResult::End => break,
                csv_core::ReadRecordResult::OutputEndsFull => {
                    return Err(BetError::FieldCount { expected: 5, found: MAX_FIELDS + 1 });
                }
                // `out` is at least as long as the line, and fields are never longer than it.
                csv_core::ReadRecordResult::OutputFull => {
                    return Err(BetError::Csv("a field longer than its row"));
                }
            }
        }
        Ok(nends)
    }

    /// Parses and validates a wire or data-file row.
    ///
    /// # Errors
    /// As [`RowParser::fields`] and [`Bet::from_fields`].
    pub fn bet(&mut self, line: &[u8], today: Date) -> Result<Bet, BetError> {
        Bet::from_fields(&self.fields(line)?, today)
    }
}

/// Encodes rows as CSV with minimal quoting and `\n` line ends, into memory.
pub struct RowWriter {
    inner: csv::Writer<Vec<u8>>,
}

impl Default for RowWriter {
    fn default() -> Self {
        RowWriter { inner: Self::writer() }
    }
}

impl RowWriter {
    fn writer() -> csv::Writer<Vec<u8>> {
        csv::WriterBuilder::new()
            .terminator(csv::Terminator::Any(b'\n'))
            .quote_style(csv::QuoteStyle::Necessary)
            .buffer_capacity(1024)
            .from_writer(Vec::new())
    }

    /// Appends a wire/data-file row: the bet's five fields.
    pub fn push_bet(&mut self, bet: &Bet) {
        self.push(None, bet);
    }

    /// Appends a `bets.csv` row: the agency, then the bet's five fields.
    pub fn push_stored(&mut self, agency: u32, bet: &Bet) {
        self.push(Some(agency), bet);
    }

    fn push(&mut self, agency: Option<u32>, bet: &Bet) {
        let agency = agency.map(|a| a.to_string());
        let number = bet.number.to_string();
        let fields = agency.iter().map(String::as_str).chain([
            bet.first_name.as_str(),
            bet.last_name.as_str(),
            &bet.document,
            &bet.birthdate,
            &number,
        ]);
        // Writing into a Vec cannot fail, and the writer's own buffer is flushed in `take`.
        let _ = self.inner.write_record(fields);
    }

    /// The bytes written since the last `take`, leaving the writer empty and reusable.
    pub fn take(&mut self) -> Vec<u8> {
        // `csv::Writer` lends no `&mut` to its sink: swap in a fresh writer to take the bytes.
        std::mem::replace(&mut self.inner, Self::writer()).into_inner().unwrap_or_default()
    }

    /// How many bytes are written so far (flushes the writer's buffer into memory).
    pub(crate) fn len(&mut self) -> usize {
        let _ = self.inner.flush();
        self.inner.get_ref().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    const TODAY: Date = date!(2026 - 11 - 26);

    fn parse(line: &str) -> Result<Bet, BetError> {
        RowParser::default().bet(line.as_bytes(), TODAY)
    }

    #[test]
    fn parses_the_course_example() {
        let bet = parse("Santiago Lionel,Lorca,30904465,1999-03-17,2201").unwrap();
        assert_eq!(bet.first_name, "Santiago Lionel");
        assert_eq!(bet.number, 2201);
        assert!(!bet.has_won());
    }

    #[test]
    fn keeps_leading_zeros_and_accents() {
        let bet = parse("Tiago Nicolás,Peña,00000042,1940-02-29,7574").unwrap();
        assert_eq!(bet.document, "00000042");
        assert_eq!(bet.last_name, "Peña");
        assert!(bet.has_won());
    }

    #[test]
    fn quoted_fields_are_read_and_written_back_as_needed() {
        let bet = parse(r#""Ana María","O'Brien",1,2000-01-01,0"#).unwrap();
        assert_eq!(bet.first_name, "Ana María");
        assert_eq!(bet.last_name, "O'Brien");
        let mut w = RowWriter::default();
        w.push_bet(&bet);
        let line = w.take();
        assert_eq!(line, "Ana María,O'Brien,1,2000-01-01,0\n".as_bytes());
        assert_eq!(parse(std::str::from_utf8(&line[..line.len() - 1]).unwrap()), Ok(bet));
    }

    #[test]
    fn the_latin_shortcut_is_unicodes_answer() {
        for c in '\u{c0}'..='\u{24f}' {
            assert_eq!(is_name_char(c), c.is_alphabetic(), "{c:?}");
        }
    }

    #[test]
    fn a_name_is_letters_marks_spaces_apostrophes_hyphens_and_dots() {
        for name in ["Ñandú", "O'Brien", "D\u{2019}Amico", "Jean-Luc", "Ma. José", "Jose\u{301}", "Zoë", "李", "Ærø"]
        {
            assert!(parse(&format!("{name},Paz,1,2000-01-01,1")).is_ok(), "{name}");
        }
        let refused = [
            ("=cmd|' /C calc'!A0", "first_name starts with one of = + - @"),
            ("+1", "first_name starts with one of"),
            ("-Ana", "first_name starts with one of"),
            ("@SUM", "first_name starts with one of"),
            ("\"Ana, María\"", "first_name has ','"),
            ("\"O\"\"Brien\"", "first_name has '\"'"),
            ("Ana2", "first_name has '2'"),
            ("Ana\u{2028}Paz", "first_name has '\\u{2028}'"),
            ("Ana\u{2029}", "first_name has '\\u{2029}'"),
            ("Ana\u{a0}Paz", "first_name has '\\u{a0}'"),
            ("\u{feff}Ana", "first_name has '\\u{feff}'"),
            ("Ana\u{200b}", "first_name has '\\u{200b}'"),
            ("Ana\u{85}", "first_name has a control character"),
        ];
        for (name, want) in refused {
            let err = parse(&format!("{name},Paz,1,2000-01-01,1")).unwrap_err().to_string();
            assert!(err.starts_with(want), "{name:?}: {err:?} lacks {want:?}");
        }
        assert!(parse("Ana,-Paz,1,2000-01-01,1").unwrap_err().to_string().starts_with("last_name starts with"));
    }

    #[test]
    fn rejects_each_bad_field_with_a_reason() {
        let cases = [
            ("a,b,1,2000-01-01", "expected 5 fields, found 4"),
            ("a,b,1,2000-01-01,1,2", "expected 5 fields, found 6"),
            (",b,1,2000-01-01,1", "first_name is empty"),
            ("a,b\tc,1,2000-01-01,1", "last_name has a control character"),
            ("a,b,12345678901,2000-01-01,1", "is not 1 to 10 digits"),
            ("a,b,-1,2000-01-01,1", "is not 1 to 10 digits"),
            ("a,b,1,2001-02-29,1", "is not a calendar date"),
            ("a,b,1,2000-1-01,1", "is not a calendar date"),
            ("a,b,1,1899-12-31,1", "is before 1900"),
            ("a,b,1,2026-11-27,1", "is in the future"),
            ("a,b,1,2000-01-01,10000", "not an integer in 0..=9999"),
            ("a,b,1,2000-01-01,-5", "not an integer in 0..=9999"),
            ("a,b,1,2000-01-01,+5", "not an integer in 0..=9999"),
            ("\"a,b,1,2000-01-01,1", "a quote never closes"),
        ];
        for (line, want) in cases {
            let err = parse(line).unwrap_err().to_string();
            assert!(err.contains(want), "{line:?}: {err:?} lacks {want:?}");
        }
        let long = format!("{},b,1,2000-01-01,1", "x".repeat(101));
        assert!(parse(&long).unwrap_err().to_string().contains("longer than 100"));
        assert!(matches!(RowParser::default().bet(b"a\xff,b,1,2000-01-01,1", TODAY), Err(BetError::Csv(_))));
    }

    #[test]
    fn stored_rows_put_the_agency_first() {
        let bet = parse("Ana,Paz,7,1990-05-05,7574").unwrap();
        let mut w = RowWriter::default();
        w.push_stored(3, &bet);
        assert_eq!(w.take(), b"3,Ana,Paz,7,1990-05-05,7574\n");
        assert_eq!(w.len(), 0);
    }
}
