//! The exclusive lock a server holds on its storage while it runs, so that a second server
//! started on the same `bets.csv` (a typo in a port, a second compose project on the same
//! volume) stops before it reads, "recovers" or truncates a byte of the live file; and the check
//! of the storage's directory that comes before it.
//!
//! The lock is an advisory `flock` on `<bets.csv>.lock`, which also holds the holder's process
//! id for an operator to read. The kernel drops the lock when the holder dies, however it dies,
//! so a crashed server never leaves a stale lock behind; the file itself may stay. Who holds a
//! lock that is taken is asked of the kernel (`/proc/locks`), never guessed from the file: a
//! stale pid there, or another program holding the file, must not be blamed on a server.
//!
//! The directory rule, as OpenSSH's for its keys: the directory holding `SERVER_STORAGE_PATH`
//! must belong to the server's user or to root, and must not be writable by group or others
//! unless it has the sticky bit (as `/tmp`), where others cannot rename or remove our files.
//! Every file is opened without following a link and must belong to the server's user
//! ([`crate::ledger::store::open_private`]), so what another user plants there is refused too.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::ledger::store;

/// Held for as long as the server runs; dropping it releases the lock.
#[derive(Debug)]
pub(crate) struct StorageLock {
    _file: File,
}

/// The lock file of the storage at `storage`.
pub(crate) fn path_for(storage: &Path) -> PathBuf {
    let mut name = storage.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".lock");
    storage.with_file_name(name)
}

impl StorageLock {
    /// Checks the storage's directory, then takes the lock of the storage at `storage`, without
    /// waiting.
    ///
    /// # Errors
    /// The directory is open to other users, another process holds the lock (named when the
    /// kernel says which), or the lock file cannot be opened; said in one line with the path.
    pub(crate) fn acquire(storage: &Path) -> Result<StorageLock, String> {
        check_directory(storage)?;
        let path = path_for(storage);
        // Neither `truncate` nor `append`: a refused server must not change a byte.
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        let mut file = store::open_private(&path, &mut options).map_err(|e| format!("cannot use the lock file {e}"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(held_by(storage, &path, &file)),
            Err(std::fs::TryLockError::Error(e)) => return Err(format!("cannot lock {}: {e}", path.display())),
        }
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(pid.as_bytes()))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(StorageLock { _file: file })
    }
}

/// The directory of `storage`, refused if other users may write to it (see the module).
///
/// # Errors
/// Why, in one line naming the directory and what to do.
pub(crate) fn check_directory(storage: &Path) -> Result<(), String> {
    let dir = match storage.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let meta = fs::metadata(dir)
        .map_err(|e| format!("cannot use the directory {} of SERVER_STORAGE_PATH: {e}", dir.display()))?;
    let me = rustix::process::geteuid().as_raw();
    let (owner, mode) = (meta.uid(), meta.mode() & 0o7777);
    if owner != me && owner != 0 {
        return Err(format!(
            "the directory {} of SERVER_STORAGE_PATH belongs to uid {owner}, neither the server's user (uid {me}) nor root, who could swap bets.csv for a link: use a directory of the server's user",
            dir.display()
        ));
    }
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky {
        let who = if mode & 0o002 != 0 { "every user" } else { "its group" };
        return Err(format!(
            "the directory {} of SERVER_STORAGE_PATH is writable by {who} (mode {mode:04o}), who could plant links or files for the server to write to: run `chmod go-w {}`, or use a directory only the server's user can write",
            dir.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// Why the lock at `path` could not be taken: who holds it, if the kernel says.
fn held_by(storage: &Path, path: &Path, file: &File) -> String {
    let holder = file.metadata().ok().and_then(|m| lock_holder(m.dev(), m.ino()));
    match holder {
        Some(Holder { pid, command, .. }) if command == "lottery-server" => format!(
            "{} is in use by another lottery-server (pid {pid}): it holds {}",
            storage.display(),
            path.display()
        ),
        Some(Holder { pid, command, uid }) => format!(
            "{} is locked by pid {pid} ({command}, uid {uid}), not a lottery-server; the server will not touch {} while it is: stop that process",
            path.display(),
            storage.display()
        ),
        None => format!(
            "{} is locked by another process, which this server cannot see (another lottery-server, or any program holding the file); the server will not touch {} while it is",
            path.display(),
            storage.display()
        ),
    }
}

/// A process that holds a `flock`, as `/proc` tells it.
#[derive(Debug, PartialEq, Eq)]
struct Holder {
    pid: u32,
    command: String,
    uid: u32,
}

/// Who holds a `flock` on the file `dev`:`ino`, if `/proc/locks` names a process this one can
/// see (another pid namespace shows none).
fn lock_holder(dev: u64, ino: u64) -> Option<Holder> {
    let locks = fs::read_to_string("/proc/locks").ok()?;
    let pid = flock_holders(&locks, dev, ino).into_iter().find(|&pid| pid > 0)?;
    let command = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?.trim().to_owned();
    let uid = fs::metadata(format!("/proc/{pid}")).ok()?.uid();
    Some(Holder { pid, command, uid })
}

/// The pids of `/proc/locks` (as `text`) that hold a `FLOCK` on the file `dev`:`ino`. A line:
/// `1: FLOCK  ADVISORY  WRITE 1234 fe:00:1941505 0 EOF`, the device as hexadecimal major and
/// minor; a waiter's line has `->` after its number and holds nothing.
fn flock_holders(text: &str, dev: u64, ino: u64) -> Vec<u32> {
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [_, "FLOCK", _, _, pid, file, ..] if *file == want => pid.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("bets.csv");
        let first = StorageLock::acquire(&storage).unwrap();
        let err = StorageLock::acquire(&storage).unwrap_err();
        // The holder is this test, not a lottery-server: it is named as what it is.
        assert!(err.contains(&format!("locked by pid {}", std::process::id())), "{err}");
        assert!(err.contains("not a lottery-server"), "{err}");
        drop(first);
        StorageLock::acquire(&storage).unwrap();
        let mode = fs::metadata(path_for(&storage)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn reads_the_holders_of_proc_locks() {
        let text = "1: POSIX  ADVISORY  WRITE 12453 fe:00:379054 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 18444 fe:00:1941505 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 18445 fe:00:1941505 0 EOF\n\
                    3: FLOCK  ADVISORY  READ 0 103:02:77 0 EOF\n";
        assert_eq!(flock_holders(text, libc::makedev(0xfe, 0), 1941505), [18444]);
        assert_eq!(flock_holders(text, libc::makedev(0x103, 2), 77), [0]);
        assert!(flock_holders(text, libc::makedev(0xfe, 0), 379054).is_empty());
    }

    #[test]
    fn a_directory_others_may_write_is_refused_unless_sticky() {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("bets.csv");
        check_directory(&storage).unwrap();
        for (mode, who) in [(0o777, "every user"), (0o770, "its group")] {
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
            let err = check_directory(&storage).unwrap_err();
            assert!(err.contains(who) && err.contains("chmod go-w"), "{err}");
            assert!(StorageLock::acquire(&storage).is_err());
        }
        assert!(!path_for(&storage).exists(), "it created the lock file in a loose directory");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        check_directory(&storage).unwrap();
    }
}
