//! The live connections: their sockets, so that shutdown can unblock their threads, and which
//! connection speaks for each agency, so that a newer session of an agency ends the older one.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use log::info;

/// One live connection, as others may need to reach it.
pub struct Peer {
    pub stream: Arc<TcpStream>,
    /// A newer connection of the same agency took over: this one says `ERR REPLACED` and ends.
    replaced: AtomicBool,
}

impl Peer {
    pub fn is_replaced(&self) -> bool {
        self.replaced.load(Ordering::SeqCst)
    }
}

#[derive(Default)]
struct Live {
    peers: HashMap<u64, Arc<Peer>>,
    /// The connection that speaks for each agency.
    agencies: HashMap<u32, u64>,
}

/// Every live connection, and a `Condvar` signalled whenever one ends.
#[derive(Default)]
pub struct Registry {
    live: Mutex<Live>,
    ended: Condvar,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Live> {
        // The maps stay consistent whatever a panicking thread did: inserts and removes are whole.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn len(&self) -> usize {
        self.lock().peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn insert(&self, id: u64, stream: Arc<TcpStream>) -> Arc<Peer> {
        let peer = Arc::new(Peer { stream, replaced: AtomicBool::new(false) });
        self.lock().peers.insert(id, Arc::clone(&peer));
        peer
    }

    /// Forgets connection `id` and any agency it spoke for.
    pub fn remove(&self, id: u64) {
        let mut live = self.lock();
        live.peers.remove(&id);
        live.agencies.retain(|_, holder| *holder != id);
        drop(live);
        self.ended.notify_all();
    }

    /// Makes connection `id` the one that speaks for `agency`. The connection that spoke for it
    /// before, if any, is marked replaced and its reading half shut, so that its thread wakes
    /// from any read and ends with `ERR REPLACED`; true if there was one.
    pub fn claim(&self, agency: u32, id: u64) -> bool {
        let mut live = self.lock();
        let previous = live.agencies.insert(agency, id).filter(|&old| old != id);
        let Some(old) = previous.and_then(|old| live.peers.get(&old)) else { return false };
        old.replaced.store(true, Ordering::SeqCst);
        let _ = old.stream.shutdown(Shutdown::Read);
        true
    }

    /// Shuts down every live socket: its reading half, then, after `grace`, both.
    pub fn close_all(&self, grace: Duration) {
        let live = self.lock();
        let count = live.peers.len();
        for peer in live.peers.values() {
            let _ = peer.stream.shutdown(Shutdown::Read);
        }
        let (live, _) = self
            .ended
            .wait_timeout_while(live, grace, |live| !live.peers.is_empty())
            .unwrap_or_else(PoisonError::into_inner);
        for peer in live.peers.values() {
            let _ = peer.stream.shutdown(Shutdown::Both);
        }
        info!("action: close_connections | result: success | connections: {count}");
    }
}
