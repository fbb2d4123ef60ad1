//! The exclusive lock a server holds on its storage while it runs, so that a second server
//! started on the same `bets.csv` (a typo in a port, a second compose project on the same
//! volume) stops before it reads, "recovers" or truncates a byte of the live file.
//!
//! The lock is an advisory `flock` on `<bets.csv>.lock`, which also holds the holder's process
//! id for the error message. The kernel drops the lock when the holder dies, however it dies,
//! so a crashed server never leaves a stale lock behind; the file itself may stay.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Held for as long as the server runs; dropping it releases the lock.
#[derive(Debug)]
pub struct StorageLock {
    _file: File,
    pub path: PathBuf,
}

/// The lock file of the storage at `storage`.
pub fn path_for(storage: &Path) -> PathBuf {
    let mut name = storage.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".lock");
    storage.with_file_name(name)
}

impl StorageLock {
    /// Takes the lock of the storage at `storage`, without waiting.
    ///
    /// # Errors
    /// Another process holds it (named by its pid when known), or the lock file cannot be
    /// opened; said in one line with the path.
    pub fn acquire(storage: &Path) -> Result<StorageLock, String> {
        let path = path_for(storage);
        // Neither `truncate` nor `append`: a refused server must not change a byte.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("cannot open the lock file {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    pid if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) => format!(" (pid {pid})"),
                    _ => String::new(),
                };
                return Err(format!(
                    "{} is in use by another lottery-server{holder}: it holds {}",
                    storage.display(),
                    path.display()
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(format!("cannot lock {}: {e}", path.display())),
        }
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(pid.as_bytes()))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(StorageLock { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("bets.csv");
        let first = StorageLock::acquire(&storage).unwrap();
        let err = StorageLock::acquire(&storage).unwrap_err();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        assert!(err.contains("in use by another lottery-server"), "{err}");
        drop(first);
        StorageLock::acquire(&storage).unwrap();
    }
}
