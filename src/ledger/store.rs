//! The bets file, `bets.csv`: append whole rows, sync them, read them back, recover after a crash.
//!
//! The file only ever grows by whole lines. An append that fails half-way is cut back to the last
//! good length, and a line torn by a crash (no `\n` at the end of the file) is cut away when the
//! server starts, so every line in the file is a whole, valid row.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::ledger::scan::{Fast, fast_scan};
use crate::wire::bet::WINNING_NUMBER;

/// What the store needs of a file. A trait so that tests can inject write and sync errors.
pub(crate) trait BetFile: Send + Sync {
    /// Appends all of `bytes` at the end of the file (it may write a part before failing).
    fn append(&self, bytes: &[u8]) -> io::Result<()>;
    /// Makes everything appended so far durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    /// Cuts the file back to `len` bytes.
    fn truncate(&self, len: u64) -> io::Result<()>;
}

impl BetFile for File {
    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        // `&File` is `Write`; the file is opened in append mode, so this lands at the end even
        // after a truncate.
        (&*self).write_all(bytes)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
}

/// An error about `bets.csv` or its round file, with the path (and line) it concerns.
#[derive(Debug)]
pub struct StoreError {
    pub path: PathBuf,
    pub line: Option<u64>,
    pub kind: StoreErrorKind,
}

#[derive(Debug)]
pub enum StoreErrorKind {
    Io(io::Error),
    /// A whole line that is not a stored bet: the file was edited, or is not ours.
    BadRow(String),
    /// A row of an agency past this round's: the file is another round's (`text` as written).
    ForeignAgency {
        text: String,
        agencies: u32,
    },
}

impl StoreError {
    pub(crate) fn io(path: &Path, error: io::Error) -> Self {
        StoreError { path: path.to_owned(), line: None, kind: StoreErrorKind::Io(error) }
    }

    pub(crate) fn bad(path: &Path, line: Option<u64>, why: impl Into<String>) -> Self {
        StoreError { path: path.to_owned(), line, kind: StoreErrorKind::BadRow(why.into()) }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        match &self.kind {
            StoreErrorKind::Io(e) => write!(f, ": {e}"),
            StoreErrorKind::BadRow(why) => write!(f, ": {why}"),
            StoreErrorKind::ForeignAgency { text, agencies } => write!(f, ": agency {text:?} is not in 1..={agencies}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            StoreErrorKind::Io(e) => Some(e),
            StoreErrorKind::BadRow(_) | StoreErrorKind::ForeignAgency { .. } => None,
        }
    }
}

/// What opening an existing `bets.csv` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Recovered {
    /// Bets held per agency; index 0 is agency 1.
    pub stored: Vec<u64>,
    /// Bytes of a torn last line that were cut away.
    pub truncated: u64,
    /// Each agency's winners in the file, as [`winners`] reads them: read in the same pass, so
    /// that a server restarted after its draw reads the file once, not twice.
    pub winners: Vec<String>,
}

/// The open bets file: the append end of it. Reading back goes through [`scan`].
pub(crate) struct Store {
    file: Arc<dyn BetFile>,
    /// Length of the file: every byte before it is a whole row.
    len: u64,
}

impl Store {
    /// Opens (or creates) the bets file for `agencies` agencies, cutting away a torn last line
    /// and counting what each agency already has.
    ///
    /// # Errors
    /// The file cannot be opened, read or cut, or holds a line that is not a stored bet.
    pub(crate) fn open(path: &Path, agencies: u32) -> Result<(Store, Recovered), StoreError> {
        let mut file = open_private(path, OpenOptions::new().read(true).append(true).create(true))?;
        let full = file.metadata().map_err(|e| StoreError::io(path, e))?.len();
        let len = whole_lines_len(&mut file, full).map_err(|e| StoreError::io(path, e))?;
        if len < full {
            file.set_len(len).and_then(|()| file.sync_data()).map_err(|e| StoreError::io(path, e))?;
        }
        let (mut stored, mut winners) = (vec![0; agencies as usize], vec![String::new(); agencies as usize]);
        scan(path, agencies, None, |agency, document, number| {
            stored[agency as usize - 1] += 1;
            add_winner(&mut winners, agency, document, number);
        })?;
        let recovered = Recovered { stored, truncated: full - len, winners };
        Ok((Store::with_file(Arc::new(file), len), recovered))
    }

    /// A store over any [`BetFile`] whose first `len` bytes are whole rows.
    pub(crate) fn with_file(file: Arc<dyn BetFile>, len: u64) -> Store {
        Store { file, len }
    }

    /// Length of the file in bytes, all of it whole rows.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Appends whole rows and returns the new length. On failure the file is cut back to its
    /// length before the call, so it never ends in a partial row.
    ///
    /// # Errors
    /// The write error; or, if cutting back failed too, that error (the file may then end in a
    /// partial row, which the next start-up cuts away).
    pub(crate) fn append(&mut self, rows: &[u8]) -> io::Result<u64> {
        if let Err(e) = self.file.append(rows) {
            self.file.truncate(self.len)?;
            return Err(e);
        }
        self.len += rows.len() as u64;
        Ok(self.len)
    }

    /// The file handle, for syncing with the round's lock released.
    pub(crate) fn file(&self) -> Arc<dyn BetFile> {
        Arc::clone(&self.file)
    }
}

/// Why a symbolic link in place of one of the server's files is refused.
pub(crate) const LINK_REFUSED: &str =
    "is a symbolic link, and the server writes only to a file of its own: remove the link";

/// Opens `path` with `options` as a file of the server's own: created mode 0600 whatever the
/// umask (a bettor's name and DNI are for the server's user only), never through a symbolic
/// link (in a directory another user once could write, a link would make the server write
/// wherever it points), and, if it exists, owned by the server's user (not planted by another).
///
/// # Errors
/// The open fails, `path` is a symbolic link, or another user owns the file; said with the path.
pub(crate) fn open_private(path: &Path, options: &mut OpenOptions) -> Result<File, StoreError> {
    // Said plainly first; the flag below closes the race (where the kernel may answer a link
    // planted in a sticky directory with a bare "permission denied").
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(StoreError::bad(path, None, LINK_REFUSED));
    }
    let opened = options.mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path);
    let file = match opened {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(StoreError::bad(path, None, LINK_REFUSED)),
        Err(e) => return Err(StoreError::io(path, e)),
    };
    let owner = file.metadata().map_err(|e| StoreError::io(path, e))?.uid();
    let me = rustix::process::geteuid().as_raw();
    if owner != me {
        let why = format!(
            "belongs to uid {owner}, and the server runs as uid {me}: it writes only to files of its own (run it as that user, or move the file away)"
        );
        return Err(StoreError::bad(path, None, why));
    }
    Ok(file)
}

/// The length of the longest prefix of `file` (of length `len`) that ends in `\n`.
fn whole_lines_len(file: &mut File, len: u64) -> io::Result<u64> {
    let mut end = len;
    let mut chunk = [0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(part)?;
        if let Some(i) = part.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Reads `bets.csv` from the start, streaming, and calls `visit(agency, document, number)` for
/// every row (the document as bytes: UTF-8, but most visitors never look at it). With `stop`, it gives up (returning `Ok(false)`) once `stop` is set.
///
/// Plain lines (all of ours but those with quotes) are read in place by
/// `scan::fast_scan`; from the first other line on, the csv crate reads
/// the file, so what is accepted and every error are as they always were.
///
/// # Errors
/// The file cannot be read, or a line is not a stored bet of one of `agencies` agencies.
pub(crate) fn scan(
    path: &Path,
    agencies: u32,
    stop: Option<&AtomicBool>,
    mut visit: impl FnMut(u32, &[u8], u16),
) -> Result<bool, StoreError> {
    let file = open_read(path)?;
    match fast_scan(file, agencies, stop, &mut visit).map_err(|e| StoreError::io(path, e))? {
        Fast::Finished(finished) => Ok(finished),
        Fast::Unsure { visited } => csv_scan(path, agencies, stop, visited, visit),
    }
}

/// [`scan`] by the csv crate, visiting the rows after the first `skip` (which it still reads:
/// records and lines are told apart only by reading).
fn csv_scan(
    path: &Path,
    agencies: u32,
    stop: Option<&AtomicBool>,
    skip: u64,
    mut visit: impl FnMut(u32, &[u8], u16),
) -> Result<bool, StoreError> {
    let file = open_read(path)?;
    let mut reader =
        csv::ReaderBuilder::new().has_headers(false).flexible(true).buffer_capacity(256 * 1024).from_reader(file);
    let mut record = csv::StringRecord::new();
    let mut line = 0;
    loop {
        line += 1;
        if line % 65536 == 0 && stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Ok(false);
        }
        match reader.read_record(&mut record) {
            Ok(false) => return Ok(true),
            Ok(true) => {}
            Err(e) => return Err(StoreError::bad(path, Some(line), e.to_string())),
        }
        let bad = |why: String| StoreError::bad(path, Some(line), why);
        if record.len() != 6 {
            return Err(bad(format!("expected 6 fields, found {}", record.len())));
        }
        let agency = match record[0].parse::<u32>() {
            Ok(a) if (1..=agencies).contains(&a) => a,
            Ok(a) if a > agencies => {
                let kind = StoreErrorKind::ForeignAgency { text: record[0].to_owned(), agencies };
                return Err(StoreError { path: path.to_owned(), line: Some(line), kind });
            }
            _ => return Err(bad(format!("agency {:?} is not in 1..={agencies}", &record[0]))),
        };
        let number = record[5].parse::<u16>().map_err(|_| bad(format!("number {:?} is not an integer", &record[5])))?;
        if line > skip {
            visit(agency, record[3].as_bytes(), number);
        }
    }
}

/// Opens `path` to read it, never through a symbolic link.
fn open_read(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(|e| StoreError::io(path, e))
}

/// The draw: every agency's winning documents in file order, each agency's joined by commas
/// (one string per agency, not one per winner: the server keeps them for the whole round).
/// `None` if `stop` was set before it finished.
///
/// # Errors
/// As [`scan`].
pub(crate) fn winners(
    path: &Path,
    agencies: u32,
    stop: Option<&AtomicBool>,
) -> Result<Option<Vec<String>>, StoreError> {
    let mut winners = vec![String::new(); agencies as usize];
    let finished = scan(path, agencies, stop, |agency, document, number| {
        add_winner(&mut winners, agency, document, number);
    })?;
    Ok(finished.then_some(winners))
}

/// Adds `document` to its agency's winners if `number` wins.
fn add_winner(winners: &mut [String], agency: u32, document: &[u8], number: u16) {
    if number == WINNING_NUMBER {
        let joined = &mut winners[agency as usize - 1];
        if !joined.is_empty() {
            joined.push(',');
        }
        // A scanned row is UTF-8, so this is the document as written.
        joined.push_str(&String::from_utf8_lossy(document));
    }
}

/// A [`BetFile`] in memory that fails when told to, for the tests of the store and the round.
#[cfg(test)]
pub(crate) mod testing {
    use super::BetFile;
    use std::io;
    use std::sync::Mutex;

    /// Writes half of what it is given on its `fail_append`-th append, then fails; fails its
    /// `fail_sync`-th sync.
    #[derive(Default)]
    pub(crate) struct FailingFile {
        pub(crate) data: Mutex<Vec<u8>>,
        calls: Mutex<(u32, u32)>,
        fail_append: Option<u32>,
        fail_sync: Option<u32>,
    }

    impl FailingFile {
        pub(crate) fn new(fail_append: Option<u32>, fail_sync: Option<u32>) -> Self {
            FailingFile { fail_append, fail_sync, ..FailingFile::default() }
        }
    }

    impl BetFile for FailingFile {
        fn append(&self, bytes: &[u8]) -> io::Result<()> {
            let mut calls = self.calls.lock().unwrap();
            calls.0 += 1;
            let mut data = self.data.lock().unwrap();
            if Some(calls.0) == self.fail_append {
                data.extend_from_slice(&bytes[..bytes.len() / 2]);
                return Err(io::Error::other("injected: no space left on device"));
            }
            data.extend_from_slice(bytes);
            Ok(())
        }

        fn sync(&self) -> io::Result<()> {
            let mut calls = self.calls.lock().unwrap();
            calls.1 += 1;
            if Some(calls.1) == self.fail_sync { Err(io::Error::other("injected: I/O error")) } else { Ok(()) }
        }

        fn truncate(&self, len: u64) -> io::Result<()> {
            self.data.lock().unwrap().truncate(len as usize);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::FailingFile;
    use super::*;

    const ROWS: &str = "1,Ana,Paz,11,1990-01-01,7574\n2,Luis,Gómez,22,1980-02-02,1\n1,Eva,Sol,33,1970-03-03,7574\n";

    #[test]
    fn recovery_cuts_a_torn_last_line_and_counts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        std::fs::write(&path, format!("{ROWS}2,Torn,Li")).unwrap();
        let (store, recovered) = Store::open(&path, 2).unwrap();
        assert_eq!(
            recovered,
            Recovered { stored: vec![2, 1], truncated: 9, winners: vec!["11,33".into(), String::new()] }
        );
        assert_eq!(store.len(), ROWS.len() as u64);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), ROWS);
        let winners = winners(&path, 2, None).unwrap().unwrap();
        assert_eq!(winners, ["11,33", ""]);
    }

    #[test]
    fn recovery_of_a_file_that_is_all_torn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        std::fs::write(&path, "1,Ana,P").unwrap();
        let (store, recovered) = Store::open(&path, 1).unwrap();
        assert_eq!((store.len(), recovered.stored, recovered.truncated), (0, vec![0], 7));
    }

    #[test]
    fn a_foreign_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        std::fs::write(&path, format!("{ROWS}9,X,Y,1,2000-01-01,5\n")).unwrap();
        let err = Store::open(&path, 2).err().unwrap().to_string();
        assert!(err.ends_with("bets.csv line 4: agency \"9\" is not in 1..=2"), "{err}");
    }

    #[test]
    fn a_failed_append_leaves_whole_lines() {
        let file = Arc::new(FailingFile::new(Some(2), None));
        let mut store = Store::with_file(file.clone(), 0);
        let (first, second) = ROWS.split_at(ROWS.find('\n').unwrap() + 1);
        assert_eq!(store.append(first.as_bytes()).unwrap(), first.len() as u64);
        let err = store.append(second.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("no space left"));
        assert_eq!(store.len(), first.len() as u64);
        assert_eq!(*file.data.lock().unwrap(), first.as_bytes());
        assert_eq!(store.append(second.as_bytes()).unwrap(), ROWS.len() as u64);
        assert_eq!(*file.data.lock().unwrap(), ROWS.as_bytes());
    }

    /// Every visit of a scan: agency, document, number.
    type Visits = Vec<(u32, String, u16)>;

    /// What a scan saw: every visit, then how it ended.
    fn seen(path: &Path, csv_only: bool) -> (Visits, Result<bool, String>) {
        let mut visits = Vec::new();
        let visit = |a: u32, d: &[u8], n: u16| visits.push((a, String::from_utf8(d.to_vec()).unwrap(), n));
        let result = if csv_only { csv_scan(path, 3, None, 0, visit) } else { scan(path, 3, None, visit) };
        (visits, result.map_err(|e| e.to_string()))
    }

    proptest::proptest! {
        /// The fast reader and the csv crate see the same rows and the same errors, whatever
        /// the file holds: plain rows, quoted ones (some over two lines), blank lines, `\r\n`,
        /// a BOM, bytes that are not UTF-8, rows of other rounds.
        #[test]
        fn the_fast_scan_sees_what_the_csv_crate_sees(lines in proptest::collection::vec(proptest::sample::select(vec![
            &b"1,Ana,Paz,11,1990-01-01,7574\n"[..], b"2,Lu\xc3\xads,G,0022,1980-02-02,1\n", b"3,\"A, B\",C,33,1970-03-03,+7574\n",
            b"1,\"A\nB\",C,44,1970-03-03,7574\n", b"\n", b"1,Ana,Paz,55,1990-01-01,7574\r\n", b"\xef\xbb\xbf", b"4,A,B,1,2000-01-01,1\n",
            b"1,A\xff,B,1,2000-01-01,1\n", b"1,A,B,1,2000-01-01\n", b"1,A,B,1,2000-01-01,99999\n", b"+2,A,B,66,2000-01-01,7574\n",
            b"1,A\"B,C,77,2000-01-01,7574\n", b"2,A,B,88,2000-01-01,7574",
        ]), 0..12)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("bets.csv");
            std::fs::write(&path, lines.concat()).unwrap();
            proptest::prop_assert_eq!(seen(&path, false), seen(&path, true));
        }
    }
}
