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
