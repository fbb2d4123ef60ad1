//! The sockets of agencies waiting for the draw, watched by one thread. A waiter whose client
//! hangs up, or whose session a newer connection of its agency takes over (the registry shuts
//! its reading half), is woken at once; no waiter has to look up from the round every few
//! hundred milliseconds to find out. With thousands of agencies waiting at the close of a round,
//! that looking up was thousands of wake-ups a second, each taking the round's lock.

use std::collections::HashMap;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::buffer::spare_capacity;
use rustix::event::{Timespec, epoll};

use crate::ledger::Ledger;
use crate::server::ShutdownHandle;
use crate::sync::lock_unpoisoned;

/// How long the watching thread waits at most before it looks at the shutdown flag, should
/// the shutdown's eventfd not wake it.
const STOP_CHECK: Duration = Duration::from_millis(500);

/// Most hang-ups taken from the kernel at once.
const EVENTS: usize = 256;

/// The waiters' sockets, in an epoll set of their own, and each waiter's "hung up" flag.
pub(crate) struct Hangups {
    epoll: OwnedFd,
    flags: Mutex<HashMap<u64, Arc<AtomicBool>>>,
}

/// One waiter's socket, watched until this is dropped.
pub(crate) struct Watched<'a> {
    hangups: &'a Hangups,
    socket: BorrowedFd<'a>,
    id: u64,
    /// Set by the watching thread when the client hangs up or the reading half is shut.
    pub hung_up: Arc<AtomicBool>,
}

impl Hangups {
    /// An empty watch.
    ///
    /// # Errors
    /// The epoll set cannot be made (out of file descriptors).
    pub(crate) fn new() -> io::Result<Hangups> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        Ok(Hangups { epoll, flags: Mutex::new(HashMap::new()) })
    }

    /// Watches `socket`, connection `id`'s, until the returned guard is dropped.
    ///
    /// # Errors
    /// The kernel refuses to add it (out of memory): the caller looks up by itself instead.
    pub(crate) fn watch<'a>(&'a self, id: u64, socket: BorrowedFd<'a>) -> io::Result<Watched<'a>> {
        let hung_up = Arc::new(AtomicBool::new(false));
        lock_unpoisoned(&self.flags).insert(id, Arc::clone(&hung_up));
        if let Err(e) = epoll::add(&self.epoll, socket, epoll::EventData::new_u64(id), interest()) {
            lock_unpoisoned(&self.flags).remove(&id);
            return Err(e.into());
        }
        Ok(Watched { hangups: self, socket, id, hung_up })
    }

    /// Marks the waiters whose clients hang up and wakes the round's waiters so that they look,
    /// until the server shuts down (which wakes every waiter itself).
    pub(crate) fn run(&self, ledger: &dyn Ledger, shutdown: &ShutdownHandle) {
        const WAKE: u64 = u64::MAX;
        // Edge-triggered: the eventfd stays readable once triggered, and the door may not drain it.
        let flags = epoll::EventFlags::IN | epoll::EventFlags::ET;
        if let Err(e) = epoll::add(&self.epoll, shutdown.wake_fd(), epoll::EventData::new_u64(WAKE), flags) {
            log::debug!("action: watch_waiters | result: fail | error: {e}");
        }
        let timeout = Timespec::try_from(STOP_CHECK).ok();
        let mut events = Vec::with_capacity(EVENTS);
        while !shutdown.is_triggered() {
            events.clear();
            if epoll::wait(&self.epoll, spare_capacity(&mut events), timeout.as_ref()).is_err() {
                continue;
            }
            let ids = events.iter().map(|e| e.data.u64()).filter(|&id| id != WAKE);
            let mut marked = false;
            {
                let flags = lock_unpoisoned(&self.flags);
                for flag in ids.filter_map(|id| flags.get(&id)) {
                    flag.store(true, Ordering::SeqCst);
                    marked = true;
                }
            }
            if marked {
                ledger.wake_waiters();
            }
        }
    }
}

impl Watched<'_> {
    /// Watches again after a wake-up that was no hang-up (the kernel said the socket has
    /// something to say, and it is not the end).
    pub(crate) fn rearm(&self) {
        self.hung_up.store(false, Ordering::SeqCst);
        let data = epoll::EventData::new_u64(self.id);
        let _ = epoll::modify(&self.hangups.epoll, self.socket, data, interest());
    }
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        let _ = epoll::delete(&self.hangups.epoll, self.socket);
        lock_unpoisoned(&self.hangups.flags).remove(&self.id);
    }
}

/// A hang-up, a reading half shut, an error; once, until re-armed. Not `IN`: a waiter's
/// client may pipeline a request behind `WINNERS`, which is no reason to wake.
fn interest() -> epoll::EventFlags {
    epoll::EventFlags::RDHUP | epoll::EventFlags::HUP | epoll::EventFlags::ERR | epoll::EventFlags::ONESHOT
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn a_client_that_hangs_up_is_marked() {
        let hangups = Hangups::new().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let watched = hangups.watch(7, server.as_fd()).unwrap();
        drop(client);
        let mut events = Vec::with_capacity(4);
        let timeout = Timespec::try_from(Duration::from_secs(10)).ok();
        epoll::wait(&hangups.epoll, spare_capacity(&mut events), timeout.as_ref()).unwrap();
        assert_eq!(events.first().map(|e| e.data.u64()), Some(7));
        drop(watched);
        assert!(lock_unpoisoned(&hangups.flags).is_empty());
    }
}
