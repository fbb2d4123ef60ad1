//! The agency's bets file, read one row at a time and cut into batches.
//!
//! Rows are read as lines and checked in place ([`RowEncoder::push_plain_wire`]): a plain row
//! is sent exactly as written. From the first line that is anything else (quotes, which may
//! hold a line break; an empty line; a BOM at the start; an invalid row), the csv crate reads
//! the rest of the file (skipping the rows already read), so what is accepted, how it is re-encoded and every error (with its
//! line) are as they always were.

use std::fs::File;
use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::agency::AgencyError;
use crate::config::AgencySettings;
use crate::wire::bet;
use crate::wire::protocol::MAX_LINE;
use crate::wire::row::RowEncoder;

/// A file this small is read whole when opened and closed at once: ten thousand agencies of a
/// `lottery-round` then hold no descriptor for their data while they wait on the server.
const READ_WHOLE: u64 = 1 << 20;

/// Makes a reader over bets made in memory, from their start, as often as asked.
pub(crate) type MakeRows = Arc<dyn Fn() -> Box<dyn Read + Send> + Send + Sync>;

/// Where an agency's bets come from.
#[derive(Clone)]
pub(crate) enum BetData {
    /// Its file (`CLI_DATA_PATH`).
    File(PathBuf),
    /// Rows made in memory (`lottery-round`'s generated data set), named for messages.
    Made { name: PathBuf, rows: MakeRows },
}

impl BetData {
    /// The name errors give it.
    pub(crate) fn name(&self) -> &Path {
        match self {
            BetData::File(path) => path,
            BetData::Made { name, .. } => name,
        }
    }

    /// A reader from the first row; a small file is read whole and closed.
    fn open(&self) -> io::Result<Box<dyn Read + Send>> {
        match self {
            BetData::Made { rows, .. } => Ok(rows()),
            BetData::File(path) => {
                let mut file = File::open(path)?;
                if file.metadata()?.len() > READ_WHOLE {
                    return Ok(Box::new(file));
                }
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes)?;
                Ok(Box::new(Cursor::new(bytes)))
            }
        }
    }
}

/// The data file cut into batches of at most `CLI_BATCH_MAXAMOUNT` bets and 8 KiB.
pub(crate) struct Batches {
    source: BetSource,
    /// A row read but not yet sent (it did not fit in the previous batch), `\n` included.
    next_row: Vec<u8>,
    has_next: bool,
    batch_max: usize,
    /// Room for the longest header, so that every batch fits whatever its offset.
    header_room: usize,
    rows: Vec<u8>,
    /// The last batch made, header and rows.
    pub(crate) bytes: Vec<u8>,
}

impl Batches {
    /// The batches of the data file from row `skip` on.
    ///
    /// # Errors
    /// The file cannot be opened or read, or a row before `skip` or the first after it is not
    /// a bet.
    pub(crate) fn open(settings: &AgencySettings, data: &BetData, skip: u64) -> Result<Batches, AgencyError> {
        let mut source = BetSource::open(data)?;
        let mut next_row = Vec::new();
        for _ in 0..skip {
            next_row.clear();
            source.next(&mut next_row)?;
        }
        next_row.clear();
        Ok(Batches {
            has_next: source.next(&mut next_row)?,
            next_row,
            source,
            batch_max: settings.batch_max,
            header_room: format!("BATCH {} {}\n", u64::MAX, settings.batch_max).len(),
            rows: Vec::with_capacity(MAX_LINE),
            bytes: Vec::with_capacity(MAX_LINE + 64),
        })
    }

    /// Makes the next batch, starting at `offset`, into `self.bytes`; its row count, or
    /// `None` at the end of the file.
    ///
    /// # Errors
    /// A row is not a bet, or does not fit in a batch of 8 KiB.
    pub(crate) fn next(&mut self, offset: u64) -> Result<Option<u32>, AgencyError> {
        if !self.has_next {
            return Ok(None);
        }
        self.rows.clear();
        let mut count = 0;
        while self.has_next && count < self.batch_max {
            if self.header_room + self.rows.len() + self.next_row.len() > MAX_LINE {
                break;
            }
            self.rows.extend_from_slice(&self.next_row);
            count += 1;
            self.next_row.clear();
            self.has_next = self.source.next(&mut self.next_row)?;
        }
        if count == 0 {
            let why = "a row does not fit in a batch of 8 KiB".to_owned();
            return Err(AgencyError::Data { path: self.source.path.clone(), line: Some(self.source.line), why });
        }
        self.bytes.clear();
        self.bytes.extend_from_slice(format!("BATCH {offset} {count}\n").as_bytes());
        self.bytes.extend_from_slice(&self.rows);
        Ok(Some(count as u32))
    }
}

/// The agency's bets file, read one row at a time.
pub(crate) struct BetSource {
    data: BetData,
    path: PathBuf,
    /// The row last read, counting from 1 (rows, not lines, once the csv crate reads).
    line: u64,
    encoder: RowEncoder,
    /// Read by lines while this is `Some`; `buf[start..end]` is read and not yet used.
    file: Option<Box<dyn Read + Send>>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    /// Read by the csv crate once `file` is `None`.
    csv: Option<(csv::Reader<Box<dyn Read + Send>>, csv::StringRecord)>,
}

impl BetSource {
    /// Opens `data`.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub(crate) fn open(data: &BetData) -> Result<BetSource, AgencyError> {
        let path = data.name().to_owned();
        let file = data.open().map_err(|e| AgencyError::Data { path: path.clone(), line: None, why: e.to_string() })?;
        Ok(BetSource {
            data: data.clone(),
            path,
            line: 0,
            encoder: RowEncoder::new(bet::today()),
            file: Some(file),
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
            eof: false,
            csv: None,
        })
    }

    /// Appends the next row to `out` as a wire row; false at the end of the file.
    ///
    /// # Errors
    /// The file cannot be read, or the row is not a bet.
    pub(crate) fn next(&mut self, out: &mut Vec<u8>) -> Result<bool, AgencyError> {
        self.line += 1;
        loop {
            if self.file.is_none() {
                return self.next_csv(out);
            }
            let pending = &self.buf[self.start..self.end];
            let len = match memchr::memchr(b'\n', pending) {
                Some(len) => len,
                None if self.eof && pending.is_empty() => return Ok(false),
                None if self.eof => pending.len(),
                None => {
                    self.fill()?;
                    continue;
                }
            };
            let line = &pending[..len];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            // The csv crate drops a BOM that starts the file.
            let bom = self.line == 1 && line.starts_with(b"\xef\xbb\xbf");
            if bom || !self.encoder.push_plain_wire(line, out) {
                self.switch_to_csv()?;
                continue;
            }
            self.start = (self.start + len + 1).min(self.end);
            return Ok(true);
        }
    }

    /// Reads more of the file; a line longer than the whole buffer goes to the csv crate.
    fn fill(&mut self) -> Result<(), AgencyError> {
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        if self.start == 0 && self.end == self.buf.len() {
            return self.switch_to_csv();
        }
        self.buf.copy_within(self.start..self.end, 0);
        (self.start, self.end) = (0, self.end - self.start);
        loop {
            match file.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(AgencyError::Data {
                        path: self.path.clone(),
                        line: Some(self.line),
                        why: e.to_string(),
                    });
                }
            }
            return Ok(());
        }
    }

    /// Hands the file to the csv crate, from the current row on. It reads from the start (the
    /// data opened again) and skips the rows already read: a csv reader started mid-file would
    /// take a BOM there for the file's.
    fn switch_to_csv(&mut self) -> Result<(), AgencyError> {
        if self.file.take().is_none() {
            return Ok(());
        }
        let bad = |e: &dyn std::fmt::Display| AgencyError::Data {
            path: self.path.clone(),
            line: Some(self.line),
            why: e.to_string(),
        };
        let file = self.data.open().map_err(|e| bad(&e))?;
        let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(file);
        let mut record = csv::ByteRecord::new();
        for _ in 1..self.line {
            reader.read_byte_record(&mut record).map_err(|e| bad(&e))?;
        }
        self.csv = Some((reader, csv::StringRecord::new()));
        Ok(())
    }

    fn next_csv(&mut self, out: &mut Vec<u8>) -> Result<bool, AgencyError> {
        let Some((reader, record)) = self.csv.as_mut() else { return Ok(false) };
        let bad = |why: String| AgencyError::Data { path: self.path.clone(), line: Some(self.line), why };
        match reader.read_record(record) {
            Ok(false) => Ok(false),
            Ok(true) => {
                let fields: Vec<&str> = record.iter().collect();
                self.encoder.push_wire_fields(&fields, out).map(|()| true).map_err(|e| bad(e.to_string()))
            }
            Err(e) => Err(bad(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::bet::{Bet, RowWriter};

    /// The rows as the csv crate alone read them before: re-encoded rows, then the first error.
    fn reference(path: &Path) -> (Vec<u8>, Option<String>) {
        let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_path(path).unwrap();
        let (mut out, mut writer, mut line) = (Vec::new(), RowWriter::default(), 0);
        for record in reader.records() {
            line += 1;
            let error =
                |why: String| Some(AgencyError::Data { path: path.to_owned(), line: Some(line), why }.to_string());
            let fields: Vec<String> = match record {
                Ok(record) => record.iter().map(str::to_owned).collect(),
                Err(e) => return (out, error(e.to_string())),
            };
            let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
            match Bet::from_fields(&fields, bet::today()) {
                Ok(bet) => {
                    writer.push_bet(&bet);
                    out.extend_from_slice(&writer.take());
                }
                Err(e) => return (out, error(e.to_string())),
            }
        }
        (out, None)
    }

    fn fast(path: &Path) -> (Vec<u8>, Option<String>) {
        let mut source = BetSource::open(&BetData::File(path.to_owned())).unwrap();
        let mut out = Vec::new();
        loop {
            match source.next(&mut out) {
                Ok(true) => {}
                Ok(false) => return (out, None),
                Err(e) => return (out, Some(e.to_string())),
            }
        }
    }

    proptest::proptest! {
        /// The agency reads, sends and refuses what it did with the csv crate alone.
        #[test]
        fn the_fast_source_reads_what_the_csv_crate_read(lines in proptest::collection::vec(proptest::sample::select(vec![
            &b"Ana,Paz,11,1990-01-01,7574\n"[..], b"Lu\xc3\xads,G,0022,1980-02-02,1\n", b"\"A, B\",C,33,1970-03-03,0042\n",
            b"\"A\nB\",C,44,1970-03-03,7574\n", b"\n", b"\r\n", b"Ana,Paz,55,1990-01-01,7574\r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf,B,1,2000-01-01,1\n",
            b"A\xff,B,1,2000-01-01,1\n", b"A,B,1,2000-01-01\n", b"A,B,1,2000-02-30,1\n", b"A,B,1,2000-01-01,1\r", b"A\"B,C,77,2000-01-01,7574\n",
            b"A,B,88,2000-01-01,7574",
        ]), 0..12)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("agency-1.csv");
            std::fs::write(&path, lines.concat()).unwrap();
            proptest::prop_assert_eq!(fast(&path), reference(&path));
        }
    }
}
