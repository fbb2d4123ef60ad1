//! The round file beside `bets.csv` (`bets.csv.round`): which agencies said `DONE` and whether
//! the draw happened, so that a restarted server goes on with the same round.
//!
//! It is a journal. It is created once per round, atomically (a temporary file, synced, renamed
//! over, the directory synced), holding only `agencies = N`; from then on it only grows, one
//! line per event: `done = K` when agency K says `DONE`, `drawn = true` at the draw. An append
//! costs what a batch costs: it is made durable by the round's group commit, sharing one sync
//! with whatever else was appended meanwhile, and nothing is created or renamed for it.
//!
//! Only whole lines count: a last line without its `\n` was torn by a crash before it was
//! synced, so the `DONE` it recorded was never acknowledged (the agency sends it again); it is
//! cut away at start. The format of earlier versions (the file rewritten whole, with one
//! `done = a,b,c` line) is the same grammar: `done` lines add up, so it loads as it is and
//! takes appends from then on.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::ledger::store::{self, Store, StoreError};

/// The durable part of a round's progress besides the bets themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RoundFile {
    pub agencies: u32,
    /// Agencies that said `DONE`, ascending.
    pub done: Vec<u32>,
    pub drawn: bool,
}

/// Where the round file of `storage` lives: the same path with `.round` appended.
pub(crate) fn path_for(storage: &Path) -> PathBuf {
    let mut name = storage.as_os_str().to_owned();
    name.push(".round");
    PathBuf::from(name)
}

/// The journal line that records agency `agency`'s `DONE`.
pub(crate) fn done_line(agency: u32) -> String {
    format!("done = {agency}\n")
}

/// The journal line that records the draw.
pub(crate) const DRAWN_LINE: &[u8] = b"drawn = true\n";

impl RoundFile {
    pub(crate) fn new(agencies: u32) -> Self {
        RoundFile { agencies, done: Vec::new(), drawn: false }
    }

    /// Reads the round file at `path`: what it says and the length of its whole lines, or
    /// `None` if there is none. It changes nothing (see [`RoundFile::append_end`]).
    ///
    /// # Errors
    /// It cannot be read, is a symbolic link, or is not a round file.
    pub(crate) fn read(path: &Path) -> Result<Option<(RoundFile, u64)>, StoreError> {
        let opened = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path);
        let mut file = match opened {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(StoreError::bad(path, None, store::LINK_REFUSED));
            }
            Err(e) => return Err(StoreError::io(path, e)),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| StoreError::io(path, e))?;
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let text =
            std::str::from_utf8(&bytes[..whole]).map_err(|_| StoreError::bad(path, None, "is not UTF-8 text"))?;
        Ok(Some((Self::parse(path, text)?, whole as u64)))
    }

    /// Which agencies said `DONE`, as flags (index 0 is agency 1).
    pub(crate) fn done_flags(&self) -> Vec<bool> {
        let mut flags = vec![false; self.agencies as usize];
        for &a in &self.done {
            flags[a as usize - 1] = true;
        }
        flags
    }

    fn parse(path: &Path, text: &str) -> Result<RoundFile, StoreError> {
        let mut agencies = None;
        let (mut done, mut drawn) = (Vec::new(), false);
        for (i, line) in text.lines().enumerate() {
            let bad = |why: String| StoreError::bad(path, Some(i as u64 + 1), why);
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once('=').ok_or_else(|| bad("expected key = value".into()))?;
            let value = value.trim();
            match key.trim() {
                "agencies" if agencies.is_none() => {
                    agencies = Some(value.parse::<u32>().map_err(|_| bad("agencies is not a number".into()))?);
                }
                "agencies" => return Err(bad("agencies is said twice".into())),
                "done" => {
                    let n = agencies.ok_or_else(|| bad("done before agencies".into()))?;
                    done.extend(parse_done(value, n).map_err(bad)?);
                }
                "drawn" => drawn |= value.parse::<bool>().map_err(|_| bad("drawn is not true or false".into()))?,
                _ => return Err(bad("unknown key".into())),
            }
        }
        let agencies = agencies.ok_or_else(|| StoreError::bad(path, None, "expected the key agencies"))?;
        // A DONE recorded twice (never written so, but harmless) counts once.
        done.sort_unstable();
        done.dedup();
        Ok(RoundFile { agencies, done, drawn })
    }

    /// Makes the round file at `path` a new round's, atomically and durably (once per round),
    /// and returns its append end.
    ///
    /// # Errors
    /// Any step of write, sync, rename or directory sync failed; the old file is then intact.
    pub(crate) fn create(path: &Path, agencies: u32) -> Result<Store, StoreError> {
        let tmp = {
            let mut name = path.as_os_str().to_owned();
            name.push(".tmp");
            PathBuf::from(name)
        };
        let text = format!(
            "# lottery round journal, written by lottery-server: agencies, then one line per DONE and one at the draw;\n\
             # delete it with bets.csv to start a new round\n\
             agencies = {agencies}\n"
        );
        // A temporary file a crash left behind is ours to replace; a link there is refused.
        match fs::symlink_metadata(&tmp) {
            Ok(meta) if meta.file_type().is_symlink() => return Err(StoreError::bad(&tmp, None, store::LINK_REFUSED)),
            Ok(_) => fs::remove_file(&tmp).map_err(|e| StoreError::io(&tmp, e))?,
            Err(_) => {}
        }
        let mut file = store::open_private(&tmp, OpenOptions::new().write(true).create_new(true))?;
        let mut write = || -> io::Result<()> {
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, path)?;
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            File::open(dir)?.sync_all()
        };
        write().map_err(|e| StoreError::io(path, e))?;
        Self::append_end(path, text.len() as u64)
    }

    /// Opens the round file at `path` to append to it, cutting away what follows its first
    /// `whole` bytes (a line torn by a crash, as [`RoundFile::read`] found).
    ///
    /// # Errors
    /// It cannot be opened or cut.
    pub(crate) fn append_end(path: &Path, whole: u64) -> Result<Store, StoreError> {
        let file = store::open_private(path, OpenOptions::new().append(true))?;
        let len = file.metadata().map_err(|e| StoreError::io(path, e))?.len();
        if len > whole {
            file.set_len(whole).and_then(|()| file.sync_data()).map_err(|e| StoreError::io(path, e))?;
        }
        Ok(Store::with_file(Arc::new(file), whole))
    }
}

/// The agencies of one `done` line: a comma-separated list (one number in this version's
/// lines), ascending, distinct, each of the round's.
fn parse_done(value: &str, agencies: u32) -> Result<Vec<u32>, String> {
    let done: Vec<u32> = value
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| "done is not a list of agency numbers".to_owned())?;
    let ascending = done.windows(2).all(|w| w[0] < w[1]);
    if !ascending || done.iter().any(|a| !(1..=agencies).contains(a)) {
        return Err(format!("done is not a list of distinct agencies 1..={agencies}, ascending"));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_is_created_appended_to_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("bets.csv"));
        assert!(path.ends_with("bets.csv.round"));
        assert_eq!(RoundFile::read(&path).unwrap(), None);
        let mut journal = RoundFile::create(&path, 5).unwrap();
        journal.append(done_line(4).as_bytes()).unwrap();
        journal.append(done_line(1).as_bytes()).unwrap();
        let (round, whole) = RoundFile::read(&path).unwrap().unwrap();
        assert_eq!(round, RoundFile { agencies: 5, done: vec![1, 4], drawn: false });
        assert_eq!(whole, journal.len());
        assert_eq!(round.done_flags(), [true, false, false, true, false]);
        journal.append(DRAWN_LINE).unwrap();
        assert!(RoundFile::read(&path).unwrap().unwrap().0.drawn);
        // A new round replaces it whole.
        RoundFile::create(&path, 3).unwrap();
        assert_eq!(RoundFile::read(&path).unwrap().unwrap().0, RoundFile::new(3));
    }

    #[test]
    fn a_torn_last_line_is_ignored_then_cut_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("bets.csv"));
        let journal = RoundFile::create(&path, 20).unwrap();
        let whole = journal.len();
        let mut torn = fs::read(&path).unwrap();
        // "done = 12" torn after its "1": agency 1 must not count as done.
        torn.extend_from_slice(b"done = 3\ndone = 1");
        fs::write(&path, &torn).unwrap();
        let (round, len) = RoundFile::read(&path).unwrap().unwrap();
        assert_eq!((round.done, len), (vec![3], whole + 9));
        let mut journal = RoundFile::append_end(&path, len).unwrap();
        journal.append(done_line(12).as_bytes()).unwrap();
        assert_eq!(RoundFile::read(&path).unwrap().unwrap().0.done, [3, 12]);
    }

    #[test]
    fn the_format_of_earlier_versions_loads_and_takes_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv.round");
        let old = "# lottery round state, written by lottery-server; delete it with bets.csv to start a new round\n\
                   agencies = 5\ndone = 1,4\ndrawn = false\n";
        fs::write(&path, old).unwrap();
        let (round, whole) = RoundFile::read(&path).unwrap().unwrap();
        assert_eq!(round, RoundFile { agencies: 5, done: vec![1, 4], drawn: false });
        let mut journal = RoundFile::append_end(&path, whole).unwrap();
        journal.append(done_line(2).as_bytes()).unwrap();
        journal.append(DRAWN_LINE).unwrap();
        assert_eq!(
            RoundFile::read(&path).unwrap().unwrap().0,
            RoundFile { agencies: 5, done: vec![1, 2, 4], drawn: true }
        );
        fs::write(&path, "agencies = 5\ndone = 1,2,3,4,5\ndrawn = true\n").unwrap();
        assert!(RoundFile::read(&path).unwrap().unwrap().0.drawn);
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.round");
        fs::write(&path, "agencies = 5\ndone = 1,x\ndrawn = false\n").unwrap();
        let err = RoundFile::read(&path).unwrap_err().to_string();
        assert!(err.ends_with("x.round line 2: done is not a list of agency numbers"), "{err}");
        fs::write(&path, "agencies = 5\ndone = 3,3\ndrawn = false\n").unwrap();
        let err = RoundFile::read(&path).unwrap_err().to_string();
        assert!(err.contains("distinct agencies"), "{err}");
        fs::write(&path, "agencies = 5\ndone = 6\n").unwrap();
        assert!(RoundFile::read(&path).unwrap_err().to_string().contains("1..=5"));
        fs::write(&path, "done = 1\n").unwrap();
        assert!(RoundFile::read(&path).unwrap_err().to_string().contains("done before agencies"));
    }

    #[test]
    fn a_link_in_place_of_the_round_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, "precious").unwrap();
        let path = dir.path().join("bets.csv.round");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(RoundFile::read(&path).unwrap_err().to_string().contains("symbolic link"));
        std::os::unix::fs::symlink(&target, dir.path().join("bets.csv.round.tmp")).unwrap();
        fs::remove_file(&path).unwrap();
        assert!(RoundFile::create(&path, 2).err().unwrap().to_string().contains("symbolic link"));
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious");
    }
}
