//! The connections' threads, kept for the next connection once theirs has ended. Each connection
//! still has a thread of its own for as long as it lasts; what is saved is the thread's start and
//! end (a stack's `mmap`, `clone`, and at the end an `munmap` whose TLB shootdown interrupts every
//! core running the server). Strangers that speak and are closed thousands of times a second
//! (probes, evicted guests) otherwise spent a fifth of the server's CPU there.
//!
//! A thread that has had no connection for [`IDLE_FOR`] ends: once an attack stops, the server
//! is back to its few threads within a second or two.

use crate::sync::lock_unpoisoned;
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How long a thread waits for its next connection before it ends.
pub(crate) const IDLE_FOR: Duration = Duration::from_secs(1);

type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct Pool {
    shared: Arc<JobQueue>,
    threads: Vec<JoinHandle<()>>,
    /// How many handles there were after finished threads were last forgotten: they are
    /// forgotten again once there are twice as many, so that each start costs O(1) however
    /// many threads run (ten thousand agencies waiting for the draw).
    reaped: usize,
    stack_size: usize,
}

#[derive(Default)]
struct JobQueue {
    state: Mutex<Queued>,
    work: Condvar,
}

#[derive(Default)]
struct Queued {
    jobs: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    closed: bool,
}

impl Pool {
    /// A pool whose threads have stacks of `stack_size` bytes.
    pub(crate) fn new(stack_size: usize) -> Pool {
        Pool { shared: Arc::default(), threads: Vec::new(), reaped: 0, stack_size }
    }

    /// Runs `job` on a thread that waits for one, or on a new thread.
    ///
    /// # Errors
    /// No thread was waiting and none could be started.
    pub(crate) fn run(&mut self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let job: Job = Box::new(job);
        {
            let mut st = lock_unpoisoned(&self.shared.state);
            if st.idle > st.jobs.len() {
                st.jobs.push_back(job);
                self.shared.work.notify_one();
                return Ok(());
            }
        }
        if self.threads.len() >= 2 * self.reaped.max(32) {
            self.threads.retain(|t| !t.is_finished());
            self.reaped = self.threads.len();
        }
        let shared = Arc::clone(&self.shared);
        let thread = thread::Builder::new().name("conn".into()).stack_size(self.stack_size).spawn(move || {
            job();
            while let Some(job) = next_job(&shared) {
                job();
            }
        })?;
        self.threads.push(thread);
        Ok(())
    }

    /// Lets every thread end once its connection has, and waits for them; returns how many there
    /// were.
    pub(crate) fn join(self) -> usize {
        lock_unpoisoned(&self.shared.state).closed = true;
        self.shared.work.notify_all();
        let count = self.threads.len();
        for thread in self.threads {
            // A thread that panicked has already logged it; its connection is gone either way.
            let _ = thread.join();
        }
        count
    }
}

/// The next job for a thread that has finished one; `None` once it has waited [`IDLE_FOR`] for
/// nothing, or the pool is closed.
fn next_job(shared: &JobQueue) -> Option<Job> {
    let mut st = lock_unpoisoned(&shared.state);
    st.idle += 1;
    let job = loop {
        if let Some(job) = st.jobs.pop_front() {
            break Some(job);
        }
        if st.closed {
            break None;
        }
        let (guard, waited) = shared.work.wait_timeout(st, IDLE_FOR).unwrap_or_else(PoisonError::into_inner);
        st = guard;
        if waited.timed_out() && st.jobs.is_empty() {
            break None;
        }
    };
    st.idle -= 1;
    job
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::{Barrier, mpsc};
    use std::time::Instant;

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        // Generous: load only slows these conditions down.
        let deadline = Instant::now() + IDLE_FOR + Duration::from_secs(60);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn one_job_after_another_runs_on_one_thread() {
        let mut pool = Pool::new(64 * 1024);
        let (done, finished) = mpsc::channel();
        let mut ids = HashSet::new();
        for _ in 0..20 {
            let done = done.clone();
            pool.run(move || done.send(thread::current().id()).unwrap()).unwrap();
            ids.insert(finished.recv_timeout(Duration::from_secs(60)).unwrap());
            let shared = Arc::clone(&pool.shared);
            wait_until("the thread waits for the next job", || lock_unpoisoned(&shared.state).idle == 1);
        }
        assert_eq!(ids.len(), 1, "twenty jobs one after another ran on {} threads", ids.len());
        assert_eq!(pool.join(), 1);
    }

    #[test]
    fn jobs_at_once_get_threads_of_their_own_which_end_when_idle() {
        let mut pool = Pool::new(64 * 1024);
        let barrier = Arc::new(Barrier::new(4));
        for _ in 0..4 {
            let barrier = Arc::clone(&barrier);
            // Each waits for the others: they can only finish on four threads.
            pool.run(move || {
                barrier.wait();
            })
            .unwrap();
        }
        assert_eq!(pool.threads.len(), 4);
        wait_until("idle threads end", || pool.threads.iter().all(JoinHandle::is_finished));
        assert_eq!(pool.join(), 4);
    }
}
