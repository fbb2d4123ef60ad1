//! The round file beside `bets.csv` (`bets.csv.round`): which agencies said `DONE` and whether
//! the draw happened, so that a restarted server goes on with the same round.
//!
//! It is rewritten whole and atomically (write a temporary file, sync it, rename it over the old
//! one, sync the directory), so a crash leaves either the old contents or the new, never a mix.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::ledger::store::StoreError;

/// The durable part of a round's progress besides the bets themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundFile {
    pub agencies: u32,
    /// Agencies that said `DONE`, ascending.
    pub done: Vec<u32>,
    pub drawn: bool,
}

/// Where the round file of `storage` lives: the same path with `.round` appended.
pub fn path_for(storage: &Path) -> PathBuf {
    let mut name = storage.as_os_str().to_owned();
    name.push(".round");
    PathBuf::from(name)
}

impl RoundFile {
    pub fn new(agencies: u32) -> Self {
        RoundFile { agencies, done: Vec::new(), drawn: false }
    }

    /// Reads the round file at `path` for a round of `agencies`, or `None` if there is none.
    ///
    /// # Errors
    /// It cannot be read, is not a round file, or is the file of a round of another size.
    pub fn load(path: &Path, agencies: u32) -> Result<Option<RoundFile>, StoreError> {
        let Some(round) = Self::parse(path)? else { return Ok(None) };
        if round.agencies != agencies {
            let why = format!("this round has {} agencies, SERVER_AGENCIES is {agencies}", round.agencies);
            return Err(StoreError::bad(path, None, why));
        }
        let ascending = round.done.windows(2).all(|w| w[0] < w[1]);
        if !ascending || round.done.iter().any(|a| !(1..=agencies).contains(a)) {
            let why = format!("done is not a list of distinct agencies 1..={agencies}, ascending");
            return Err(StoreError::bad(path, None, why));
        }
        Ok(Some(round))
    }

    /// Which agencies said `DONE`, as flags (index 0 is agency 1).
    pub fn done_flags(&self) -> Vec<bool> {
        (1..=self.agencies).map(|a| self.done.contains(&a)).collect()
    }

    fn parse(path: &Path) -> Result<Option<RoundFile>, StoreError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(path, e)),
        };
        let mut round = RoundFile::new(0);
        let mut seen = 0;
        for (i, line) in text.lines().enumerate() {
            let bad = |why: &str| StoreError::bad(path, Some(i as u64 + 1), why);
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once('=').ok_or_else(|| bad("expected key = value"))?;
            let value = value.trim();
            match key.trim() {
                "agencies" => round.agencies = value.parse().map_err(|_| bad("agencies is not a number"))?,
                "done" => {
                    round.done = value
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .map_err(|_| bad("done is not a list of agency numbers"))?;
                }
                "drawn" => round.drawn = value.parse().map_err(|_| bad("drawn is not true or false"))?,
                _ => return Err(bad("unknown key")),
            }
            seen += 1;
        }
        if seen != 3 {
            return Err(StoreError::bad(path, None, "expected the keys agencies, done and drawn"));
        }
        Ok(Some(round))
    }

    /// Replaces the round file at `path` with this one, atomically and durably.
    ///
    /// # Errors
    /// Any step of write, sync, rename or directory sync failed; the old file is then intact.
    pub fn save(&self, path: &Path) -> Result<(), StoreError> {
        let tmp = {
            let mut name = path.as_os_str().to_owned();
            name.push(".tmp");
            PathBuf::from(name)
        };
        let done: Vec<String> = self.done.iter().map(u32::to_string).collect();
        let text = format!(
            "# lottery round state, written by lottery-server; delete it with bets.csv to start a new round\n\
             agencies = {}\ndone = {}\ndrawn = {}\n",
            self.agencies,
            done.join(","),
            self.drawn
        );
        let write = || -> io::Result<()> {
            let mut file = File::create(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, path)?;
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            File::open(dir)?.sync_all()
        };
        write().map_err(|e| StoreError::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("bets.csv"));
        assert!(path.ends_with("bets.csv.round"));
        assert_eq!(RoundFile::load(&path, 5).unwrap(), None);
        let round = RoundFile { agencies: 5, done: vec![1, 4], drawn: false };
        round.save(&path).unwrap();
        assert_eq!(RoundFile::load(&path, 5).unwrap(), Some(round.clone()));
        assert_eq!(round.done_flags(), [true, false, false, true, false]);
        let drawn = RoundFile { drawn: true, done: vec![1, 2, 3, 4, 5], ..round };
        drawn.save(&path).unwrap();
        assert_eq!(RoundFile::load(&path, 5).unwrap(), Some(drawn));
        let err = RoundFile::load(&path, 3).unwrap_err().to_string();
        assert!(err.ends_with("this round has 5 agencies, SERVER_AGENCIES is 3"), "{err}");
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.round");
        fs::write(&path, "agencies = 5\ndone = 1,x\ndrawn = false\n").unwrap();
        let err = RoundFile::load(&path, 5).unwrap_err().to_string();
        assert!(err.ends_with("x.round line 2: done is not a list of agency numbers"), "{err}");
        fs::write(&path, "agencies = 5\ndone = 3,3\ndrawn = false\n").unwrap();
        let err = RoundFile::load(&path, 5).unwrap_err().to_string();
        assert!(err.contains("distinct agencies"), "{err}");
    }
}
