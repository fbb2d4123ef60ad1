//! What the operator's listener serves: the Prometheus exposition (`/metrics`) and the round now
//! (`/round.json`), both read from atomics (the server's [`Metrics`], the ledger's
//! [`LedgerStats`](crate::ledger::stats::LedgerStats), its `STATUS` figures) without a lock the
//! connections need. The last minute (bets per second, refusals) comes from samples this side
//! takes once a second.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::ledger::Ledger;
use crate::ledger::stats::Histogram;
use crate::server::metrics::{AgencyState, Metrics, ranges};
use crate::sync::lock_unpoisoned;
use crate::wire::protocol::Status;

/// How far back the page looks.
const MINUTE: Duration = Duration::from_secs(60);

/// The figures at one moment.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    bets: u64,
    refusals: u64,
}

/// The round as the operator sees it.
pub(crate) struct RoundView {
    pub metrics: Arc<Metrics>,
    ledger: Arc<dyn Ledger>,
    /// One sample a second, the last minute's and one more.
    samples: Mutex<VecDeque<Sample>>,
    /// When this side first saw the draw made (Unix ms), for a ledger that does not say when.
    seen_drawn_ms: Mutex<Option<u64>>,
}

impl std::fmt::Debug for RoundView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundView").field("ledger", &self.ledger.describe()).finish_non_exhaustive()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl RoundView {
    pub(crate) fn new(metrics: Arc<Metrics>, ledger: Arc<dyn Ledger>) -> RoundView {
        RoundView { metrics, ledger, samples: Mutex::default(), seen_drawn_ms: Mutex::default() }
    }

    fn status(&self) -> Status {
        let agencies = self.metrics.agencies();
        self.ledger.status().unwrap_or(Status { agencies_done: 0, agencies, bets: 0, drawn: false })
    }

    /// Takes a sample if the last is a second old: called by the listener as it waits.
    pub(crate) fn sample(&self) {
        let now = Instant::now();
        let mut samples = lock_unpoisoned(&self.samples);
        if samples.back().is_some_and(|s| now.duration_since(s.at) < Duration::from_secs(1)) {
            return;
        }
        let status = self.status();
        samples.push_back(Sample { at: now, bets: status.bets, refusals: self.metrics.refusals_total() });
        while samples.len() > 2 && samples.get(1).is_some_and(|s| now.duration_since(s.at) >= MINUTE) {
            samples.pop_front();
        }
        drop(samples);
        if status.drawn {
            lock_unpoisoned(&self.seen_drawn_ms).get_or_insert_with(unix_ms);
        }
    }

    /// When the draw was made (Unix ms), and how long it took (seconds) if the ledger says.
    fn draw(&self) -> Option<(u64, Option<f64>)> {
        let stats = self.ledger.stats();
        let at = stats.map_or(0, |s| s.drawn_at_ms.load(Ordering::Relaxed));
        if at > 0 {
            let took = stats.map(|s| s.draw_micros.load(Ordering::Relaxed) as f64 / 1e6);
            return Some((at, took));
        }
        let seen = *lock_unpoisoned(&self.seen_drawn_ms);
        seen.map(|at| (at, None))
    }

    fn phase(&self, status: &Status) -> &'static str {
        if self.ledger.is_shutting_down() {
            "stopping"
        } else if status.drawn {
            "drawn"
        } else {
            "open"
        }
    }

    fn ledger(&self) -> &'static str {
        if self.ledger.stats().is_some() { "file" } else { "postgresql" }
    }

    /// Bets a second over the last minute, second by second (oldest first), and the refusals in it.
    fn last_minute(&self) -> (Vec<f64>, u64) {
        let samples = lock_unpoisoned(&self.samples);
        let rates = samples
            .iter()
            .zip(samples.iter().skip(1))
            .map(|(a, b)| b.bets.saturating_sub(a.bets) as f64 / b.at.duration_since(a.at).as_secs_f64().max(0.001))
            .collect();
        let refusals = match (samples.front(), samples.back()) {
            (Some(a), Some(b)) => b.refusals.saturating_sub(a.refusals),
            _ => 0,
        };
        (rates, refusals)
    }

    /// `/round.json`: the round now. Agency numbers and counts only: nothing names a bettor.
    pub(crate) fn json(&self) -> String {
        let status = self.status();
        let states = self.metrics.states(status.drawn);
        let mut json = String::with_capacity(states.len() + 512);
        let digits: String = states.iter().map(|&s| char::from(b'0' + s as u8)).collect();
        let missing = ranges((1..).zip(&states).filter(|(_, s)| **s < AgencyState::Done).map(|(a, _)| a));
        let count = |state| states.iter().filter(|&&s| s == state).count();
        let (rates, refusals) = self.last_minute();
        // A fold from +0.0, not `sum`, whose empty sum is -0.0 (printed "-0.0").
        let per_second = rates.iter().fold(0.0, |total, r| total + r) / rates.len().max(1) as f64;
        let _ = write!(
            json,
            "{{\"agencies\":{},\"states\":\"{digits}\",\"counts\":{{\"not_connected\":{},\"connected\":{},\"done\":{},\"told\":{}}},\
             \"missing\":\"{missing}\",\"bets\":{},\"bets_per_second\":{per_second:.1},\"bets_per_second_series\":[{}],\
             \"refusals_last_minute\":{refusals},\"phase\":\"{}\",\"drawn\":{},\"ledger\":\"{}\",",
            states.len(),
            count(AgencyState::NotConnected),
            count(AgencyState::Connected),
            count(AgencyState::Done),
            count(AgencyState::Told),
            status.bets,
            rates.iter().map(|r| format!("{r:.1}")).collect::<Vec<_>>().join(","),
            self.phase(&status),
            status.drawn,
            self.ledger(),
        );
        let (at, took) = match self.draw() {
            Some((at, took)) => (at.to_string(), took.map_or("null".into(), |t| format!("{t:.3}"))),
            None => ("null".into(), "null".into()),
        };
        let _ = write!(json, "\"draw_unix_ms\":{at},\"draw_seconds\":{took}}}");
        json
    }

    /// `/metrics`: the Prometheus text format.
    pub(crate) fn exposition(self: &Arc<Self>) -> String {
        let mut registry = Registry::with_prefix("lottery");
        registry.register_collector(Box::new(Arc::clone(self)));
        let mut out = String::new();
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// Writes one metric without labels.
fn single(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    m: &impl EncodeMetric,
) -> std::fmt::Result {
    m.encode(e.encode_descriptor(name, help, unit, m.metric_type())?)
}

/// Writes one metric family, one value per label.
fn family<M: EncodeMetric>(
    e: &mut DescriptorEncoder,
    (name, help, label): (&str, &str, &str),
    values: impl IntoIterator<Item = (&'static str, M)>,
    kind: MetricType,
) -> std::fmt::Result {
    let mut metric = e.encode_descriptor(name, help, None, kind)?;
    for (value, m) in values {
        m.encode(metric.encode_family(&[(label, value)])?)?;
    }
    Ok(())
}

fn histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    h: &Histogram,
) -> std::fmt::Result {
    let (sum, count, buckets) = h.snapshot();
    let mut metric = e.encode_descriptor(name, help, unit, MetricType::Histogram)?;
    metric.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

fn load(a: &std::sync::atomic::AtomicU64) -> ConstCounter<u64> {
    ConstCounter::new(a.load(Ordering::Relaxed))
}

impl Collector for RoundView {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let m = &self.metrics;
        let status = self.status();
        let build = [("version", env!("CARGO_PKG_VERSION")), ("ledger", self.ledger())];
        let mut info =
            e.encode_descriptor("build", "The server's version and where its round lives.", None, MetricType::Info)?;
        info.encode_info(&build)?;
        single(&mut e, "round_agencies", "Agencies in the round.", None, &ConstGauge::new(i64::from(m.agencies())))?;
        let phase = self.phase(&status);
        let phases = ["open", "drawn", "stopping"].map(|p| (p, ConstGauge::new(i64::from(p == phase))));
        family(
            &mut e,
            ("round_phase", "The round's phase: 1 for the current one.", "phase"),
            phases,
            MetricType::Gauge,
        )?;
        self.encode_agencies(&mut e, status.drawn)?;
        self.encode_bets(&mut e, &status)?;
        self.encode_traffic(&mut e)?;
        self.encode_draw(&mut e)?;
        self.encode_ledger(&mut e)
    }
}

impl RoundView {
    /// The agencies by state.
    fn encode_agencies(&self, e: &mut DescriptorEncoder, drawn: bool) -> std::fmt::Result {
        let states = self.metrics.states(drawn);
        let by_state =
            AgencyState::ALL.map(|s| (s.as_str(), ConstGauge::new(states.iter().filter(|&&x| x == s).count() as i64)));
        family(
            e,
            (
                "agencies",
                "Agencies by state: not_connected, connected, done (said DONE), told (sent their winners).",
                "state",
            ),
            by_state,
            MetricType::Gauge,
        )
    }

    /// The bets the round holds, and those this server acknowledged.
    fn encode_bets(&self, e: &mut DescriptorEncoder, status: &Status) -> std::fmt::Result {
        let m = &self.metrics;
        single(
            e,
            "bets",
            "Bets the round holds (every replica's, on PostgreSQL).",
            None,
            &ConstGauge::new(status.bets as i64),
        )?;
        single(
            e,
            "bets_stored",
            "Bets acknowledged OK by this server (a retried batch counts again).",
            None,
            &load(&m.bets),
        )?;
        single(
            e,
            "batches_stored",
            "Batches (and single BETs) acknowledged OK by this server.",
            None,
            &load(&m.batches),
        )
    }

    /// Connections, probes, refusals and TLS handshakes.
    fn encode_traffic(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let m = &self.metrics;
        let kinds = [("guest", load(&m.guests)), ("agency", load(&m.agency_sessions))];
        family(
            e,
            (
                "connections",
                "Connections: guest = admitted by the door (every one starts as a guest), agency = authenticated by HELLO.",
                "kind",
            ),
            kinds,
            MetricType::Counter,
        )?;
        single(e, "probes", "PING, STATUS and QUIT answered to guests by the door.", None, &load(&m.probes))?;
        let refusals = m.refusals().map(|(code, n)| (code.as_str(), ConstCounter::new(n)));
        family(
            e,
            ("refusals", "ERR replies sent (or connections closed with one), by code.", "reason"),
            refusals,
            MetricType::Counter,
        )?;
        let tls = [("success", load(&m.tls_ok)), ("fail", load(&m.tls_failed))];
        family(e, ("tls_handshakes", "TLS handshakes, by result.", "result"), tls, MetricType::Counter)?;
        Ok(())
    }

    fn encode_draw(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let (at, took) = self.draw().map_or((0.0, 0.0), |(at, took)| (at as f64 / 1e3, took.unwrap_or(0.0)));
        single(
            e,
            "draw_timestamp",
            "When the draw was made (Unix time); 0 until it is.",
            Some(&Unit::Seconds),
            &ConstGauge::new(at),
        )?;
        single(
            e,
            "draw_duration",
            "How long reading bets.csv back for the draw took; 0 until made, or unknown (PostgreSQL).",
            Some(&Unit::Seconds),
            &ConstGauge::new(took),
        )
    }

    /// The file ledger's own figures; a PostgreSQL ledger has none of these.
    fn encode_ledger(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let Some(stats) = self.ledger.stats() else { return Ok(()) };
        single(e, "appended", "Bytes appended to bets.csv.", Some(&Unit::Bytes), &load(&stats.bytes_appended))?;
        histogram(
            e,
            "fdatasync_duration",
            "fdatasync calls on bets.csv and how long each took (count = syncs).",
            Some(&Unit::Seconds),
            &stats.sync_seconds,
        )?;
        histogram(e, "group_commit_bets", "Bets made durable by one fdatasync (group commit).", None, &stats.group_bets)
    }
}
