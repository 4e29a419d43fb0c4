//! Outlier detection (cluster `outlier_detection`): passive ejection of hosts that fail,
//! with Envoy's defaults — consecutive 5xx, consecutive gateway failures, locally
//! originated failures, success rate and failure percentage, growing ejection times.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::OutlierDetection as OutlierProto;

use crate::config::duration;
use crate::config::error::{join, Errors};
use crate::reject_set;

/// What one request did, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status.
    Status(u16),
    /// Connect failure, reset or timeout: originated locally, not by the upstream's answer.
    LocalFailure,
}

/// Why a host was ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
    SuccessRate,
    FailurePercentage,
}

#[derive(Debug, Clone)]
pub struct OutlierConfig {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub consecutive_local_origin_failure: u32,
    pub enforcing_consecutive_5xx: u32,
    pub enforcing_consecutive_gateway_failure: u32,
    pub enforcing_consecutive_local_origin_failure: u32,
    pub split_local_origin: bool,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub enforcing_success_rate: u32,
    pub success_rate_minimum_hosts: u32,
    pub success_rate_request_volume: u32,
    pub success_rate_stdev_factor: u32,
    pub failure_percentage_threshold: u32,
    pub enforcing_failure_percentage: u32,
    pub failure_percentage_minimum_hosts: u32,
    pub failure_percentage_request_volume: u32,
    /// A passing active health check ends an ejection (Envoy's default).
    pub uneject_on_health_check: bool,
}

impl OutlierConfig {
    pub fn convert(o: &OutlierProto, at: &str, errs: &mut Errors) -> Self {
        let OutlierProto {
            consecutive_5xx,
            interval,
            base_ejection_time,
            max_ejection_percent,
            enforcing_consecutive_5xx,
            enforcing_success_rate,
            success_rate_minimum_hosts,
            success_rate_request_volume,
            success_rate_stdev_factor,
            consecutive_gateway_failure,
            enforcing_consecutive_gateway_failure,
            split_external_local_origin_errors,
            consecutive_local_origin_failure,
            enforcing_consecutive_local_origin_failure,
            enforcing_local_origin_success_rate,
            failure_percentage_threshold,
            enforcing_failure_percentage,
            enforcing_failure_percentage_local_origin,
            failure_percentage_minimum_hosts,
            failure_percentage_request_volume,
            max_ejection_time,
            max_ejection_time_jitter,
            successful_active_health_check_uneject_host,
            monitors,
            always_eject_one_host,
            detect_degraded_hosts,
        } = o;
        reject_set!(
            errs,
            at,
            enforcing_local_origin_success_rate,
            enforcing_failure_percentage_local_origin,
            max_ejection_time_jitter,
            monitors,
            always_eject_one_host,
            detect_degraded_hosts,
        );
        for (d, f) in [
            (interval, "interval"),
            (base_ejection_time, "base_ejection_time"),
            (max_ejection_time, "max_ejection_time"),
        ] {
            duration::check(d, &join(at, f), errs);
        }
        let u = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, default: u32| {
            v.map_or(default, |v| v.value)
        };
        let pct = |v: u32, field: &str, errs: &mut Errors| {
            if v > 100 {
                errs.add(join(at, field), "must be at most 100");
            }
            v.min(100)
        };
        let cfg = OutlierConfig {
            consecutive_5xx: u(consecutive_5xx, 5),
            consecutive_gateway_failure: u(consecutive_gateway_failure, 5),
            consecutive_local_origin_failure: u(consecutive_local_origin_failure, 5),
            enforcing_consecutive_5xx: pct(
                u(enforcing_consecutive_5xx, 100),
                "enforcing_consecutive_5xx",
                errs,
            ),
            enforcing_consecutive_gateway_failure: pct(
                u(enforcing_consecutive_gateway_failure, 0),
                "enforcing_consecutive_gateway_failure",
                errs,
            ),
            enforcing_consecutive_local_origin_failure: pct(
                u(enforcing_consecutive_local_origin_failure, 100),
                "enforcing_consecutive_local_origin_failure",
                errs,
            ),
            split_local_origin: *split_external_local_origin_errors,
            interval: interval
                .as_ref()
                .map_or(Duration::from_secs(10), duration::to_std),
            base_ejection_time: base_ejection_time
                .as_ref()
                .map_or(Duration::from_secs(30), duration::to_std),
            max_ejection_time: max_ejection_time
                .as_ref()
                .map_or(Duration::from_secs(300), duration::to_std),
            max_ejection_percent: pct(u(max_ejection_percent, 10), "max_ejection_percent", errs),
            enforcing_success_rate: pct(
                u(enforcing_success_rate, 100),
                "enforcing_success_rate",
                errs,
            ),
            success_rate_minimum_hosts: u(success_rate_minimum_hosts, 5),
            success_rate_request_volume: u(success_rate_request_volume, 100),
            success_rate_stdev_factor: u(success_rate_stdev_factor, 1900),
            failure_percentage_threshold: pct(
                u(failure_percentage_threshold, 85),
                "failure_percentage_threshold",
                errs,
            ),
            enforcing_failure_percentage: pct(
                u(enforcing_failure_percentage, 0),
                "enforcing_failure_percentage",
                errs,
            ),
            failure_percentage_minimum_hosts: u(failure_percentage_minimum_hosts, 5),
            failure_percentage_request_volume: u(failure_percentage_request_volume, 50),
            uneject_on_health_check: successful_active_health_check_uneject_host
                .is_none_or(|b| b.value),
        };
        if cfg.interval.is_zero() {
            errs.add(join(at, "interval"), "must be greater than 0");
        }
        cfg
    }

    /// How long the `n`th ejection lasts: base × n, capped at max_ejection_time.
    pub fn ejection_time(&self, n: u32) -> Duration {
        (self.base_ejection_time * n.max(1))
            .min(self.max_ejection_time.max(self.base_ejection_time))
    }
}

/// Per-host outlier counters, updated lock-free on the request path.
#[derive(Debug, Default)]
pub struct HostOutlier {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// Ejections so far (the multiplier of the ejection time).
    pub ejections: AtomicU32,
    /// When the current ejection ends, in ms on the process clock; 0 when not ejected.
    pub ejected_until_ms: AtomicU64,
    /// Requests and failures in the current interval (success rate / failure percentage).
    pub interval_requests: AtomicU64,
    pub interval_failures: AtomicU64,
}

impl HostOutlier {
    pub fn adopt(&self, old: &HostOutlier) {
        for (a, b) in [
            (&self.consecutive_5xx, &old.consecutive_5xx),
            (&self.consecutive_gateway, &old.consecutive_gateway),
            (&self.consecutive_local, &old.consecutive_local),
            (&self.ejections, &old.ejections),
        ] {
            a.store(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.ejected_until_ms.store(
            old.ejected_until_ms.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }

    /// Records one request's outcome; returns the reason to eject, if a consecutive
    /// threshold was just reached (enforcement is decided by the caller).
    pub fn record(&self, outcome: Outcome, cfg: &OutlierConfig) -> Option<Reason> {
        self.interval_requests.fetch_add(1, Ordering::Relaxed);
        let (is_5xx, is_gateway, is_local) = match outcome {
            // Without the split, a local failure counts as a 503 from the upstream.
            Outcome::LocalFailure if !cfg.split_local_origin => (true, true, false),
            Outcome::LocalFailure => (false, false, true),
            Outcome::Status(s) => (s >= 500, matches!(s, 502..=504), false),
        };
        if is_5xx || is_local {
            self.interval_failures.fetch_add(1, Ordering::Relaxed);
        }
        let bump = |c: &AtomicU32, hit: bool| -> u32 {
            if hit {
                c.fetch_add(1, Ordering::Relaxed) + 1
            } else {
                c.store(0, Ordering::Relaxed);
                0
            }
        };
        if cfg.split_local_origin {
            match outcome {
                Outcome::LocalFailure => {
                    let n = bump(&self.consecutive_local, true);
                    return (n == cfg.consecutive_local_origin_failure)
                        .then_some(Reason::ConsecutiveLocalOriginFailure);
                }
                // An answer, whatever it is, ends a run of local failures.
                Outcome::Status(_) => {
                    self.consecutive_local.store(0, Ordering::Relaxed);
                }
            }
        }
        let n5 = bump(&self.consecutive_5xx, is_5xx);
        let ng = bump(&self.consecutive_gateway, is_gateway);
        if is_5xx && n5 == cfg.consecutive_5xx {
            return Some(Reason::Consecutive5xx);
        }
        if is_gateway && ng == cfg.consecutive_gateway_failure {
            return Some(Reason::ConsecutiveGatewayFailure);
        }
        None
    }

    pub fn reset_consecutive(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        self.consecutive_local.store(0, Ordering::Relaxed);
    }

    /// Takes this interval's (requests, failures) and starts the next interval.
    pub fn take_interval(&self) -> (u64, u64) {
        (
            self.interval_requests.swap(0, Ordering::Relaxed),
            self.interval_failures.swap(0, Ordering::Relaxed),
        )
    }
}

/// The enforcement percentage for a reason.
pub fn enforcing(cfg: &OutlierConfig, reason: Reason) -> u32 {
    match reason {
        Reason::Consecutive5xx => cfg.enforcing_consecutive_5xx,
        Reason::ConsecutiveGatewayFailure => cfg.enforcing_consecutive_gateway_failure,
        Reason::ConsecutiveLocalOriginFailure => cfg.enforcing_consecutive_local_origin_failure,
        Reason::SuccessRate => cfg.enforcing_success_rate,
        Reason::FailurePercentage => cfg.enforcing_failure_percentage,
    }
}

/// Success-rate and failure-percentage outliers for one interval: `stats` holds each
/// host's (requests, failures); returns indices to eject with their reason.
pub fn interval_outliers(stats: &[(u64, u64)], cfg: &OutlierConfig) -> Vec<(usize, Reason)> {
    let mut out = Vec::new();
    let rate = |(r, f): (u64, u64)| 100.0 * (r - f) as f64 / r as f64;
    // Success rate: hosts below mean - stdev × factor/1000.
    let sr: Vec<(usize, f64)> = stats
        .iter()
        .enumerate()
        .filter(|(_, (r, _))| *r >= u64::from(cfg.success_rate_request_volume) && *r > 0)
        .map(|(i, s)| (i, rate(*s)))
        .collect();
    if sr.len() >= cfg.success_rate_minimum_hosts as usize && !sr.is_empty() {
        let mean = sr.iter().map(|(_, r)| r).sum::<f64>() / sr.len() as f64;
        let var = sr.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / sr.len() as f64;
        let limit = mean - var.sqrt() * f64::from(cfg.success_rate_stdev_factor) / 1000.0;
        for (i, r) in &sr {
            if *r < limit {
                out.push((*i, Reason::SuccessRate));
            }
        }
    }
    // Failure percentage: hosts whose failures reach the threshold.
    let fp: Vec<(usize, f64)> = stats
        .iter()
        .enumerate()
        .filter(|(_, (r, _))| *r >= u64::from(cfg.failure_percentage_request_volume) && *r > 0)
        .map(|(i, (r, f))| (i, 100.0 * *f as f64 / *r as f64))
        .collect();
    if fp.len() >= cfg.failure_percentage_minimum_hosts as usize {
        for (i, p) in fp {
            if p >= f64::from(cfg.failure_percentage_threshold) && !out.iter().any(|(j, _)| *j == i)
            {
                out.push((i, Reason::FailurePercentage));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> OutlierConfig {
        let p: OutlierProto =
            crate::config::load::parse_message(yaml, "envoy.config.cluster.v3.OutlierDetection")
                .unwrap();
        let mut errs = Errors::default();
        let c = OutlierConfig::convert(&p, "o", &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        c
    }

    #[test]
    fn five_consecutive_5xx_eject_and_a_success_resets() {
        let c = cfg("{}");
        let h = HostOutlier::default();
        for _ in 0..4 {
            assert_eq!(h.record(Outcome::Status(500), &c), None);
        }
        assert_eq!(h.record(Outcome::Status(200), &c), None);
        for _ in 0..4 {
            assert_eq!(h.record(Outcome::Status(503), &c), None);
        }
        assert_eq!(
            h.record(Outcome::Status(503), &c),
            Some(Reason::Consecutive5xx)
        );
    }

    #[test]
    fn local_failures_count_as_5xx_unless_split() {
        let c = cfg("consecutive_5xx: 2");
        let h = HostOutlier::default();
        h.record(Outcome::LocalFailure, &c);
        assert_eq!(
            h.record(Outcome::LocalFailure, &c),
            Some(Reason::Consecutive5xx)
        );
        let c = cfg("consecutive_5xx: 2\nsplit_external_local_origin_errors: true\nconsecutive_local_origin_failure: 3");
        let h = HostOutlier::default();
        h.record(Outcome::LocalFailure, &c);
        h.record(Outcome::LocalFailure, &c);
        assert_eq!(
            h.record(Outcome::LocalFailure, &c),
            Some(Reason::ConsecutiveLocalOriginFailure)
        );
    }

    #[test]
    fn gateway_failures_are_not_enforced_by_default() {
        let c = cfg("consecutive_5xx: 100");
        let h = HostOutlier::default();
        let mut reason = None;
        for _ in 0..5 {
            reason = h.record(Outcome::Status(502), &c);
        }
        assert_eq!(reason, Some(Reason::ConsecutiveGatewayFailure));
        assert_eq!(enforcing(&c, Reason::ConsecutiveGatewayFailure), 0);
    }

    #[test]
    fn ejection_time_grows_and_is_capped() {
        let c = cfg("base_ejection_time: 10s\nmax_ejection_time: 25s");
        assert_eq!(c.ejection_time(1), Duration::from_secs(10));
        assert_eq!(c.ejection_time(2), Duration::from_secs(20));
        assert_eq!(c.ejection_time(5), Duration::from_secs(25));
    }

    #[test]
    fn success_rate_needs_enough_hosts_and_volume() {
        let c = cfg("{}");
        let good = (200, 2);
        let bad = (200, 120);
        let five = [good, good, good, good, bad];
        assert_eq!(interval_outliers(&five, &c), vec![(4, Reason::SuccessRate)]);
        assert!(
            interval_outliers(&[good, good, bad], &c).is_empty(),
            "fewer than 5 hosts"
        );
        let low_volume = [(50, 0), (50, 0), (50, 0), (50, 0), (50, 40)];
        assert!(
            interval_outliers(&low_volume, &c).is_empty(),
            "under 100 requests"
        );
    }

    #[test]
    fn failure_percentage_when_enforced() {
        let c = cfg("enforcing_success_rate: 0\nenforcing_failure_percentage: 100\nfailure_percentage_minimum_hosts: 2");
        let out = interval_outliers(&[(100, 90), (100, 1)], &c);
        assert_eq!(out, vec![(0, Reason::FailurePercentage)]);
    }
}
