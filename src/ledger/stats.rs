//! What the file ledger counts for the operator (`GET /metrics`): bets and bytes appended,
//! each `fdatasync` and how long it took, how many bets one sync made durable (group commit),
//! the draw. Atomics only: the ledger's threads add with no lock, and a scrape reads them
//! without ever waiting for the ledger's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A histogram of fixed buckets, each an atomic: observing is a few atomic adds.
#[derive(Debug)]
pub(crate) struct Histogram {
    /// Upper bounds, ascending; one more bucket counts what is past the last.
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    /// The sum of every value observed, in millionths.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub(crate) fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, value: f64) {
        let i = self.bounds.iter().position(|&b| value <= b).unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((value * 1e6) as u64, Ordering::Relaxed);
    }

    /// `(sum, count, [(upper bound, count in that bucket alone)])`, the last bound infinite.
    pub(crate) fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let bounds = self.bounds.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds.zip(counts.iter().copied()).collect();
        (self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6, counts.iter().sum(), buckets)
    }
}

/// How long an `fdatasync` takes, in seconds: a disk's cache answers in microseconds, a
/// spinning disk in milliseconds, a struggling one in seconds.
pub(crate) const SYNC_SECONDS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

/// How many bets one sync makes durable: one batch is up to a few hundred.
pub(crate) const GROUP_BETS: &[f64] = &[1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0];

/// The file ledger's counters.
#[derive(Debug)]
pub(crate) struct LedgerStats {
    pub bets_appended: AtomicU64,
    pub bytes_appended: AtomicU64,
    /// Bets appended since the last sync began: what the next one makes durable.
    pending_bets: AtomicU64,
    pub sync_seconds: Histogram,
    pub group_bets: Histogram,
    /// When the draw was made (Unix time, milliseconds; 0: not by this server) and how long it took (µs).
    pub drawn_at_ms: AtomicU64,
    pub draw_micros: AtomicU64,
}

impl Default for LedgerStats {
    fn default() -> Self {
        LedgerStats {
            bets_appended: AtomicU64::new(0),
            bytes_appended: AtomicU64::new(0),
            pending_bets: AtomicU64::new(0),
            sync_seconds: Histogram::new(SYNC_SECONDS),
            group_bets: Histogram::new(GROUP_BETS),
            drawn_at_ms: AtomicU64::new(0),
            draw_micros: AtomicU64::new(0),
        }
    }
}

/// A sync under way: when it began, and how many bets it makes durable.
#[derive(Debug)]
pub(crate) struct Syncing {
    began: Instant,
    bets: u64,
}

impl LedgerStats {
    pub(crate) fn appended(&self, bets: u64, bytes: u64) {
        self.bets_appended.fetch_add(bets, Ordering::Relaxed);
        self.bytes_appended.fetch_add(bytes, Ordering::Relaxed);
        self.pending_bets.fetch_add(bets, Ordering::Relaxed);
    }

    /// Called as a sync begins, with the ledger's lock held (so that the bets it covers are exactly
    /// those appended so far).
    pub(crate) fn sync_begins(&self) -> Syncing {
        Syncing { began: Instant::now(), bets: self.pending_bets.swap(0, Ordering::Relaxed) }
    }

    pub(crate) fn sync_ended(&self, syncing: &Syncing) {
        self.sync_seconds.observe(syncing.began.elapsed().as_secs_f64());
        self.group_bets.observe(syncing.bets as f64);
    }

    /// The draw, begun at `began`, is made.
    pub(crate) fn drawn(&self, began: Instant) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        self.drawn_at_ms.store(now.as_millis() as u64, Ordering::Relaxed);
        self.draw_micros.store(began.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_value_in_its_bucket() {
        let h = Histogram::new(&[1.0, 10.0]);
        for v in [0.5, 1.0, 3.0, 11.0, 100.0] {
            h.observe(v);
        }
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 5);
        assert!((sum - 115.5).abs() < 1e-6, "{sum}");
        assert_eq!(buckets, vec![(1.0, 2), (10.0, 1), (f64::INFINITY, 2)]);
    }

    #[test]
    fn a_sync_covers_the_bets_appended_before_it_began() {
        let stats = LedgerStats::default();
        stats.appended(3, 30);
        stats.appended(2, 20);
        let syncing = stats.sync_begins();
        stats.appended(7, 70);
        stats.sync_ended(&syncing);
        let (_, count, buckets) = stats.group_bets.snapshot();
        assert_eq!((count, buckets[1]), (1, (10.0, 1)));
        assert_eq!(stats.sync_begins().bets, 7);
        assert_eq!(stats.bytes_appended.load(Ordering::Relaxed), 120);
    }
}
