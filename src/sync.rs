//! The one way the crate takes a `Mutex`.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, even if a thread panicked while holding it.
///
/// Poisoning is ignored on purpose. Every value the crate keeps behind a `Mutex` is changed by
/// whole assignments, made after the fallible work they depend on, so a panicking thread cannot
/// leave it half-updated; and refusing every other connection (or the whole round) for one
/// thread's bug would be worse than going on.
pub(crate) fn lock_unpoisoned<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

const PR_FUTEX_HASH: libc::c_int = 78;
const PR_FUTEX_HASH_SET_SLOTS: libc::c_ulong = 1;
const PR_FUTEX_HASH_GET_SLOTS: libc::c_ulong = 2;

/// Gives this process a futex hash table of a bucket per thread it may run, up to 65,536,
/// unless it has a larger one. Each program calls it in its first steps, while it has one
/// thread: then it takes microseconds; later, tens of milliseconds (the kernel waits for every
/// thread to leave the old table).
///
/// Since Linux 6.16 a process with threads gets a private futex hash, sized for its CPUs, not
/// for its threads: 16 buckets on a 2-core machine. Every thread blocked on a `Mutex` or a
/// `Condvar` is queued in one of them, and every wake-up walks its bucket's queue. With
/// thousands of connections waiting for the draw, each wake-up of anything else that fell into
/// that bucket walked thousands of entries: the cost of a round grew with the square of its
/// agencies. Where the kernel has no such setting, its global table is in use and nothing
/// changes.
pub(crate) fn size_futex_hash(threads: usize) {
    let slots = threads.clamp(16, 1 << 16).next_power_of_two() as libc::c_ulong;
    let none = 0 as libc::c_ulong;
    // SAFETY: prctl with integer arguments only; it reads and writes no memory of ours.
    let now = unsafe { libc::prctl(PR_FUTEX_HASH, PR_FUTEX_HASH_GET_SLOTS, none, none, none) };
    if libc::c_ulong::try_from(now).is_ok_and(|now| now >= slots) {
        return;
    }
    // SAFETY: as above.
    let set = unsafe { libc::prctl(PR_FUTEX_HASH, PR_FUTEX_HASH_SET_SLOTS, slots, none, none) };
    if set != 0 {
        log::debug!(
            "action: size_futex_hash | result: fail | slots: {slots} | error: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn futex_slots() -> libc::c_int {
        let none = 0 as libc::c_ulong;
        // SAFETY: as in size_futex_hash.
        unsafe { libc::prctl(PR_FUTEX_HASH, PR_FUTEX_HASH_GET_SLOTS, none, none, none) }
    }

    #[test]
    fn the_futex_hash_grows_to_the_threads_and_never_shrinks() {
        size_futex_hash(3000);
        let grown = futex_slots();
        // -1: a kernel without private futex hashes (before 6.16), whose global table serves.
        assert!(grown == -1 || grown >= 4096, "{grown} buckets for 3,000 threads");
        size_futex_hash(20);
        assert!(futex_slots() >= grown);
    }
}
