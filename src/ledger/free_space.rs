//! The free space left on the storage's filesystem, so that a batch is refused before a byte of
//! it is written once less than `SERVER_MIN_FREE_BYTES` would remain: one agency streaming valid
//! bets must not be able to fill the disk that the round (and the machine) needs.
//!
//! `statvfs` is asked again once a second or once a MiB has been written since, whichever comes
//! first; in between, what was written since is subtracted from its last answer.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const RECHECK_AFTER: Duration = Duration::from_secs(1);
const RECHECK_BYTES: u64 = 1 << 20;

/// The free-space guard of one bets file.
#[derive(Debug)]
pub(crate) struct FreeSpace {
    dir: PathBuf,
    min_free: u64,
    /// The last answer: when, the file's length then, and the bytes free then.
    last: Option<(Instant, u64, u64)>,
}

impl FreeSpace {
    /// A guard for the filesystem holding `storage`; `min_free` 0 turns it off.
    pub(crate) fn new(storage: &Path, min_free: u64) -> FreeSpace {
        let dir = match storage.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        FreeSpace { dir, min_free, last: None }
    }

    /// Whether `adding` more bytes, on a file now `len` long, leave at least the minimum free.
    ///
    /// # Errors
    /// Why not, for the `ERR STORAGE` reply. A filesystem that cannot be asked is let be: the
    /// write itself then says whether there was room.
    pub(crate) fn check(&mut self, len: u64, adding: u64) -> Result<(), String> {
        if self.min_free == 0 {
            return Ok(());
        }
        let stale = self
            .last
            .is_none_or(|(at, at_len, _)| at.elapsed() >= RECHECK_AFTER || len.saturating_sub(at_len) >= RECHECK_BYTES);
        if stale {
            self.last = rustix::fs::statvfs(&self.dir)
                .ok()
                .map(|st| (Instant::now(), len, st.f_bavail.saturating_mul(st.f_frsize)));
        }
        let Some((_, at_len, free)) = self.last else { return Ok(()) };
        let left = free.saturating_sub(len.saturating_sub(at_len)).saturating_sub(adding);
        if left >= self.min_free {
            Ok(())
        } else {
            Err(format!(
                "{} would have {left} bytes free, below SERVER_MIN_FREE_BYTES = {}; nothing of this batch was stored",
                self.dir.display(),
                self.min_free
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_below_the_minimum_and_is_off_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let bets = dir.path().join("bets.csv");
        assert_eq!(FreeSpace::new(&bets, 0).check(0, u64::MAX), Ok(()));
        assert_eq!(FreeSpace::new(&bets, 1).check(0, 100), Ok(()));
        let err = FreeSpace::new(&bets, u64::MAX).check(0, 100).unwrap_err();
        assert!(err.contains("below SERVER_MIN_FREE_BYTES"), "{err}");
    }
}
