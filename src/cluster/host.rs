//! Upstream hosts and their grouping by priority and locality.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Health flags, as Envoy keeps them per host. A host with any flag set is unhealthy.
pub mod flags {
    /// Failed active health checking (or has not passed its first check yet).
    pub const FAILED_ACTIVE_HC: u32 = 1;
    /// Ejected by outlier detection.
    pub const FAILED_OUTLIER: u32 = 1 << 1;
}

/// One upstream endpoint.
#[derive(Debug)]
pub struct Host {
    pub address: SocketAddr,
    /// The endpoint's hostname (DNS name, or `Endpoint.hostname`), used by `auto_host_rewrite`.
    pub hostname: String,
    pub weight: u32,
    pub locality: usize,
    pub priority: u32,
    pub locality_weight: u32,
    active_requests: AtomicU64,
    total_requests: AtomicU64,
    health: AtomicU32,
    /// Active health checking: consecutive results and whether a check has completed.
    pub hc_successes: AtomicU32,
    pub hc_failures: AtomicU32,
    pub hc_checked: std::sync::atomic::AtomicBool,
    /// Outlier detection counters.
    pub outlier: super::outlier::HostOutlier,
}

impl Host {
    pub fn new(address: SocketAddr, hostname: String, weight: u32, locality: usize) -> Self {
        Host {
            address,
            hostname,
            weight: weight.max(1),
            locality,
            priority: 0,
            locality_weight: 1,
            active_requests: AtomicU64::new(0),
            total_requests: AtomicU64::new(0),
            health: AtomicU32::new(0),
            hc_successes: AtomicU32::new(0),
            hc_failures: AtomicU32::new(0),
            hc_checked: std::sync::atomic::AtomicBool::new(false),
            outlier: Default::default(),
        }
    }

    pub fn health_flags(&self) -> u32 {
        self.health.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.health_flags() == 0
    }

    /// Sets or clears a flag; true when the flag changed.
    pub fn set_flag(&self, flag: u32, on: bool) -> bool {
        let old = if on {
            self.health.fetch_or(flag, Ordering::Relaxed)
        } else {
            self.health.fetch_and(!flag, Ordering::Relaxed)
        };
        (old & flag != 0) != on
    }

    /// Copies health and detection state from the same endpoint in a previous config, so a
    /// reload does not reset it.
    pub fn adopt_state(&self, old: &Host) {
        self.health.store(old.health_flags(), Ordering::Relaxed);
        self.hc_successes
            .store(old.hc_successes.load(Ordering::Relaxed), Ordering::Relaxed);
        self.hc_failures
            .store(old.hc_failures.load(Ordering::Relaxed), Ordering::Relaxed);
        self.hc_checked
            .store(old.hc_checked.load(Ordering::Relaxed), Ordering::Relaxed);
        self.outlier.adopt(&old.outlier);
    }

    pub fn active_requests(&self) -> u64 {
        self.active_requests.load(Ordering::Relaxed)
    }

    /// Requests sent to this host since it joined (tries, including retries).
    pub fn total_requests(&self) -> u64 {
        self.total_requests.load(Ordering::Relaxed)
    }

    /// Counts a request against the host until the guard drops (least-request LB input).
    pub fn start_request(self: &std::sync::Arc<Self>) -> ActiveRequest {
        self.active_requests.fetch_add(1, Ordering::Relaxed);
        self.total_requests.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(self.clone())
    }

    /// Envoy's hash key for consistent hashing: the address as `ip:port`.
    pub fn hash_key(&self) -> String {
        self.address.to_string()
    }
}

/// Held while a request is in flight to a host.
#[derive(Debug)]
pub struct ActiveRequest(std::sync::Arc<Host>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active_requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Envoy's default overprovisioning factor (1.4, expressed in percent).
pub const DEFAULT_OVERPROVISIONING_FACTOR: u32 = 140;

/// Splits 100% of traffic over priorities by their healthy share, as Envoy does: each
/// priority takes `min(100, healthy% × overprovisioning)` of what is left.
pub fn priority_load(healthy: &[(usize, usize)], overprovisioning_factor: u32) -> Vec<u32> {
    let mut load = vec![0u32; healthy.len()];
    let mut remaining = 100u32;
    let health: Vec<u32> = healthy
        .iter()
        .map(|&(h, total)| {
            if total == 0 {
                0
            } else {
                let pct = (h as u64 * overprovisioning_factor as u64 / total as u64).min(100);
                pct as u32
            }
        })
        .collect();
    let total_health: u32 = health.iter().sum::<u32>().min(100);
    if total_health == 0 {
        // Nothing healthy anywhere: Envoy sends everything to the first priority.
        if let Some(first) = load.first_mut() {
            *first = 100;
        }
        return load;
    }
    for (i, h) in health.iter().enumerate() {
        // Normalise so the loads add up to 100 even when the total health is below 100.
        let share = (h * 100 / total_health).min(remaining);
        load[i] = share;
        remaining -= share;
    }
    if remaining > 0 {
        if let Some(i) = health.iter().position(|h| *h > 0) {
            load[i] += remaining;
        }
    }
    load
}

/// Picks a priority for a value in [0, 100).
pub fn choose_priority(load: &[u32], value: u64) -> usize {
    let mut point = (value % 100) as u32;
    for (i, l) in load.iter().enumerate() {
        if point < *l {
            return i;
        }
        point -= l;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_first_priority_takes_everything() {
        assert_eq!(priority_load(&[(3, 3), (2, 2)], 140), [100, 0]);
    }

    #[test]
    fn empty_priority_spills_to_next() {
        assert_eq!(priority_load(&[(0, 0), (2, 2)], 140), [0, 100]);
    }

    #[test]
    fn partial_health_spills_by_overprovisioning() {
        // 50% healthy × 1.4 = 70% stays in P0, 30% goes to P1.
        assert_eq!(priority_load(&[(1, 2), (2, 2)], 140), [70, 30]);
    }

    #[test]
    fn choose_priority_walks_the_load() {
        assert_eq!(choose_priority(&[70, 30], 69), 0);
        assert_eq!(choose_priority(&[70, 30], 70), 1);
    }
}
