//! The operator's listener (`SERVER_METRICS_ADDRESS`): `GET /metrics` for Prometheus,
//! `GET /round.json` and `GET /` (a page of the round) for a person. It has threads of its own
//! (one accepting, `WORKERS` answering, a queue of `QUEUE` between) and shares nothing with the
//! agencies' port but atomics: a crowd, a slow client or a huge header here costs these threads a
//! deadline at most, and the round never waits for them.

mod http;
pub(crate) mod view;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{info, warn};
use rustix::event::{PollFd, PollFlags, Timespec, poll};

use crate::config::MetricsAddress;
use crate::ledger::Ledger;
use crate::server::metrics::Metrics;
use crate::sync::lock_unpoisoned;
use http::{Head, Status};
use view::RoundView;

/// Threads answering requests: a scrape or a page refresh takes well under a millisecond.
const WORKERS: usize = 4;
/// Connections accepted and waiting for a worker; past it, `503` at once.
const QUEUE: usize = 64;
/// A request's head must arrive whole within this of its connection's accept (time queued
/// counts), and its answer be taken within it.
const DEADLINE: Duration = Duration::from_secs(2);
/// How often the accepting thread looks up (to sample the round, and to stop).
const TICK: Duration = Duration::from_millis(250);

/// The page, built into the binary.
const PAGE: &str = include_str!("page.html");

/// The operator's view of a server: its counters, and the listener serving them if any.
pub(crate) struct Operator {
    metrics: Arc<Metrics>,
    serving: Option<Serving>,
}

struct Serving {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// The connection each worker is answering, so that a stop need not wait for its deadline.
    answering: Arc<Vec<Mutex<Option<TcpStream>>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Operator {
    /// Counters for `round`, served at `address` if one is set. The default address being
    /// taken (another server on this machine) is a warning and no listener; any other address
    /// that cannot be bound is an error.
    ///
    /// # Errors
    /// A required address cannot be bound, or a thread cannot be started.
    pub(crate) fn start(address: Option<MetricsAddress>, ledger: Arc<dyn Ledger>) -> Result<Operator, String> {
        let metrics = Arc::new(Metrics::new(ledger.agencies()));
        let Some(MetricsAddress { addr, required }) = address else {
            return Ok(Operator { metrics, serving: None });
        };
        let listener = match crate::server::bind(addr, 128) {
            Ok(listener) => listener,
            Err(e) if required => return Err(format!("cannot listen on {addr} (SERVER_METRICS_ADDRESS): {e}")),
            Err(e) => {
                warn!(
                    "action: listen | result: fail | service: metrics | address: {addr} | error: {e}; serving without metrics (set SERVER_METRICS_ADDRESS to another ip:port, or empty)"
                );
                return Ok(Operator { metrics, serving: None });
            }
        };
        let view = Arc::new(RoundView::new(Arc::clone(&metrics), ledger));
        let serving = Serving::start(listener, view).map_err(|e| format!("cannot serve metrics: {e}"))?;
        info!("action: listen | result: success | service: metrics | address: {}", serving.addr);
        Ok(Operator { metrics, serving: Some(serving) })
    }

    pub(crate) fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Where the listener is, if there is one.
    pub(crate) fn address(&self) -> Option<SocketAddr> {
        self.serving.as_ref().map(|s| s.addr)
    }

    /// Stops the listener and joins its threads.
    pub(crate) fn stop(self) {
        let Some(serving) = self.serving else { return };
        serving.stop.store(true, Ordering::SeqCst);
        for slot in serving.answering.iter() {
            if let Some(stream) = lock_unpoisoned(slot).as_ref() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        let count = serving.threads.len();
        for thread in serving.threads {
            let _ = thread.join();
        }
        info!("action: close_metrics | result: success | threads: {count}");
    }
}

impl Serving {
    fn start(listener: TcpListener, view: Arc<RoundView>) -> io::Result<Serving> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let answering: Arc<Vec<_>> = Arc::new((0..WORKERS).map(|_| Mutex::new(None)).collect());
        let (tx, rx) = mpsc::sync_channel::<Accepted>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::with_capacity(WORKERS + 1);
        for i in 0..WORKERS {
            let (rx, view, answering) = (Arc::clone(&rx), Arc::clone(&view), Arc::clone(&answering));
            let worker = thread::Builder::new().name(format!("metrics-{i}")).stack_size(256 * 1024);
            threads.push(worker.spawn(move || answer_each(&rx, &view, &answering[i]))?);
        }
        let accept_stop = Arc::clone(&stop);
        let acceptor = thread::Builder::new().name("metrics".into()).stack_size(256 * 1024);
        threads.push(acceptor.spawn(move || accept_until(&listener, &tx, &view, &accept_stop))?);
        Ok(Serving { addr, stop, answering, threads })
    }
}

/// Accepts connections and queues them for the workers until `stop`, sampling the round as it goes.
fn accept_until(listener: &TcpListener, queue: &SyncSender<Accepted>, view: &RoundView, stop: &AtomicBool) {
    let timeout = Timespec::try_from(TICK).ok();
    while !stop.load(Ordering::SeqCst) {
        view.sample();
        let mut fds = [PollFd::new(listener, PollFlags::IN)];
        if poll(&mut fds, timeout.as_ref()).is_err() {
            thread::sleep(TICK);
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => queue_or_refuse(queue, (stream, Instant::now())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // Out of file descriptors: a pause, not a spin.
                    thread::sleep(TICK);
                    break;
                }
            }
        }
    }
}

/// A connection and when it was accepted.
type Accepted = (TcpStream, Instant);

fn queue_or_refuse(queue: &SyncSender<Accepted>, accepted: Accepted) {
    match queue.try_send(accepted) {
        Ok(()) => {}
        Err(TrySendError::Full((stream, _)) | TrySendError::Disconnected((stream, _))) => {
            // Told at once, without waiting: the socket's buffer takes a short answer whole.
            let _ = stream.set_nonblocking(true);
            let _ = (&stream).write(&http::error(Status::Unavailable));
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// A worker: answers queued connections, one at a time, until the queue is closed.
fn answer_each(queue: &Mutex<Receiver<Accepted>>, view: &Arc<RoundView>, answering: &Mutex<Option<TcpStream>>) {
    loop {
        let next = lock_unpoisoned(queue).recv();
        let Ok((stream, accepted)) = next else { return };
        *lock_unpoisoned(answering) = stream.try_clone().ok();
        answer(&stream, accepted + DEADLINE, view);
        *lock_unpoisoned(answering) = None;
    }
}

/// Reads one request's head by `deadline`, answers it, and closes.
fn answer(mut stream: &TcpStream, deadline: Instant, view: &Arc<RoundView>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(DEADLINE));
    let mut head = [0u8; http::MAX_HEAD];
    let mut len = 0;
    let reply = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break http::error(Status::Timeout);
        }
        match stream.read(&mut head[len..]) {
            Ok(0) => return,
            Ok(n) => len += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                break http::error(Status::Timeout);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        match http::parse(&head[..len]) {
            Head::Partial => {}
            Head::Complete(Ok(request)) => break route(view, request.path, request.head_only),
            Head::Complete(Err(status)) => break http::error(status),
        }
    };
    let _ = stream.write_all(&reply);
    let _ = stream.shutdown(Shutdown::Write);
}

fn route(view: &Arc<RoundView>, path: &str, head_only: bool) -> Vec<u8> {
    match path {
        "/" | "/index.html" => http::response(Status::Ok, "text/html; charset=utf-8", PAGE.as_bytes(), head_only),
        "/round.json" => http::response(Status::Ok, "application/json", view.json().as_bytes(), head_only),
        "/metrics" => {
            let text = view.exposition();
            http::response(
                Status::Ok,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                text.as_bytes(),
                head_only,
            )
        }
        _ => http::error(Status::NotFound),
    }
}
