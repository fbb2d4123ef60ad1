//! Addresses whose guests fail more than they succeed: a wrong token, a stalled handshake, no
//! `HELLO` in time, an eviction, a turn-away. The door seats those that wait from any other
//! address first, so that strangers who fail over and over (and reconnect at once) cannot stand
//! in an agency's way. Nobody is refused for it: a suspect only waits behind the others.
//!
//! Failures are counted against successes (an agency authenticated) from the same address, so
//! that one wrong `HELLO` from behind the agencies' own NAT does not put the agencies behind
//! every stranger: an address is a suspect while its failures outnumber its successes, and
//! both are forgotten [`FORGIVEN_AFTER`] after its last failure.
//!
//! Every per-address count of the server (these, and the guest places per address) counts an
//! IPv6 address as its /64, which one client holds whole; what is remembered is bounded,
//! forgetting what is oldest first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long an address's record is kept after its last failure or success.
pub const FORGIVEN_AFTER: Duration = Duration::from_secs(60);

/// Most addresses remembered: a botnet's worth, a few megabytes at most.
const MAX_ADDRESSES: usize = 65_536;

/// What an address's guests did lately.
#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    successes: u32,
    /// The last failure or success: both are forgotten [`FORGIVEN_AFTER`] after it.
    last_seen: Instant,
}

#[derive(Default)]
pub struct Suspects {
    records: Mutex<HashMap<IpAddr, Record>>,
}

impl Suspects {
    /// A guest from `ip` failed now.
    pub fn failed(&self, ip: IpAddr) {
        self.count_at(ip, Instant::now(), |r| r.failures = r.failures.saturating_add(1));
    }

    /// An agency authenticated from `ip`: it outweighs one failure of that address.
    pub fn succeeded(&self, ip: IpAddr) {
        self.count_at(ip, Instant::now(), |r| r.successes = r.successes.saturating_add(1));
    }

    fn count_at(&self, ip: IpAddr, now: Instant, count: impl FnOnce(&mut Record)) {
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        if records.len() >= MAX_ADDRESSES && !records.contains_key(&origin(ip)) {
            make_room(&mut records, now);
        }
        let record = records.entry(origin(ip)).or_insert(Record { failures: 0, successes: 0, last_seen: now });
        if now.saturating_duration_since(record.last_seen) >= FORGIVEN_AFTER {
            *record = Record { failures: 0, successes: 0, last_seen: now };
        }
        count(record);
        record.last_seen = now;
    }

    /// Whether guests from `ip` failed more than they succeeded, counting since the address
    /// was last quiet for [`FORGIVEN_AFTER`].
    pub fn is_suspect(&self, ip: IpAddr) -> bool {
        let records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        records.get(&origin(ip)).is_some_and(|r| r.last_seen.elapsed() < FORGIVEN_AFTER && r.failures > r.successes)
    }
}

/// Forgets the records of a full map: those forgiven, then, if it is still full of fresh
/// ones, the older half.
fn make_room(records: &mut HashMap<IpAddr, Record>, now: Instant) {
    records.retain(|_, r| now.saturating_duration_since(r.last_seen) < FORGIVEN_AFTER);
    if records.len() >= MAX_ADDRESSES {
        let mut at: Vec<Instant> = records.values().map(|r| r.last_seen).collect();
        let (_, cut, _) = at.select_nth_unstable(MAX_ADDRESSES / 2);
        let cut = *cut;
        records.retain(|_, r| r.last_seen > cut);
    }
}

/// The address as the server counts it, for the suspects and the guest places alike: IPv4 as
/// it is (also when mapped into IPv6), IPv6 as its /64.
pub fn origin(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_held_against_its_address_for_a_while() {
        let suspects = Suspects::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        suspects.failed(a);
        assert!(suspects.is_suspect(a) && !suspects.is_suspect(b));
        let long_ago = Instant::now().checked_sub(FORGIVEN_AFTER + Duration::from_secs(1));
        if let Some(long_ago) = long_ago {
            suspects.count_at(b, long_ago, |r| r.failures += 1);
            assert!(!suspects.is_suspect(b), "forgiven after FORGIVEN_AFTER");
        }
    }

    #[test]
    fn failures_count_against_successes_of_the_same_address() {
        let suspects = Suspects::default();
        let nat: IpAddr = "10.0.0.7".parse().unwrap();
        suspects.failed(nat);
        assert!(suspects.is_suspect(nat));
        for _ in 0..5 {
            suspects.succeeded(nat);
        }
        // One wrong HELLO among five agencies: no suspect.
        assert!(!suspects.is_suspect(nat));
        for _ in 0..5 {
            suspects.failed(nat);
        }
        assert!(suspects.is_suspect(nat), "six failures outnumber five successes");
        // An agency's address that never failed: its first wrong HELLO makes no suspect.
        let agencies: IpAddr = "10.0.0.8".parse().unwrap();
        suspects.succeeded(agencies);
        suspects.failed(agencies);
        assert!(!suspects.is_suspect(agencies));
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_ipv4_is_the_ipv4() {
        let suspects = Suspects::default();
        suspects.failed("2001:db8:1:2::1".parse().unwrap());
        assert!(suspects.is_suspect("2001:db8:1:2:ffff::9".parse().unwrap()));
        assert!(!suspects.is_suspect("2001:db8:1:3::1".parse().unwrap()));
        suspects.failed("::ffff:10.1.2.3".parse().unwrap());
        assert!(suspects.is_suspect("10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn memory_is_bounded() {
        let suspects = Suspects::default();
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            suspects.failed(IpAddr::V4(i.into()));
        }
        let len = suspects.records.lock().unwrap().len();
        assert!(len <= MAX_ADDRESSES, "{len}");
        assert!(suspects.is_suspect(IpAddr::V4((MAX_ADDRESSES as u32 + 9).into())), "the newest is kept");
    }
}
