//! Addresses whose guests failed lately: a wrong token, no `HELLO` in time. The door seats those
//! that wait from any other address first, so that strangers who fail over and over (and
//! reconnect at once) cannot stand in an agency's way: an agency's first connection comes from
//! an address with no failure. Nobody is refused for it: a suspect only waits behind the
//! others, and its address is forgiven a minute after its last failure.
//!
//! An IPv6 address counts as its /64, which one client holds whole; what is remembered is
//! bounded, forgetting what is oldest first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a failure is held against its address.
pub const MEMORY: Duration = Duration::from_secs(60);

/// Most addresses remembered: a botnet's worth, a few megabytes at most.
const MOST: usize = 65_536;

#[derive(Default)]
pub struct Suspects {
    failed: Mutex<HashMap<IpAddr, Instant>>,
}

impl Suspects {
    /// A guest from `ip` failed now.
    pub fn failed(&self, ip: IpAddr) {
        self.failed_at(ip, Instant::now());
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) {
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        if failed.len() >= MOST && !failed.contains_key(&key(ip)) {
            failed.retain(|_, at| now.saturating_duration_since(*at) < MEMORY);
            if failed.len() >= MOST {
                // Still full of fresh failures: the oldest go.
                let mut at: Vec<Instant> = failed.values().copied().collect();
                let (_, cut, _) = at.select_nth_unstable(MOST / 2);
                let cut = *cut;
                failed.retain(|_, at| *at > cut);
            }
        }
        failed.insert(key(ip), now);
    }

    /// Whether a guest from `ip` failed within the last [`MEMORY`].
    pub fn is_suspect(&self, ip: IpAddr) -> bool {
        let failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        failed.get(&key(ip)).is_some_and(|at| at.elapsed() < MEMORY)
    }
}

/// The address as remembered: IPv4 as it is (also when mapped into IPv6), IPv6 as its /64.
fn key(ip: IpAddr) -> IpAddr {
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
        let long_ago = Instant::now().checked_sub(MEMORY + Duration::from_secs(1));
        if let Some(long_ago) = long_ago {
            suspects.failed_at(b, long_ago);
            assert!(!suspects.is_suspect(b), "forgiven after MEMORY");
        }
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
        for i in 0..(MOST as u32 + 10) {
            suspects.failed(IpAddr::V4(i.into()));
        }
        let len = suspects.failed.lock().unwrap().len();
        assert!(len <= MOST, "{len}");
        assert!(suspects.is_suspect(IpAddr::V4((MOST as u32 + 9).into())), "the newest is kept");
    }
}
