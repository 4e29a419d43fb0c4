//! Circuit breakers (cluster `circuit_breakers.thresholds`): lock-free counters checked on
//! the request path, with Envoy's defaults.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{circuit_breakers::Thresholds, CircuitBreakers};
use envoy_types::pb::envoy::config::core::v3::RoutingPriority;

use crate::config::error::{index, join, Errors};
use crate::reject_set;

/// Limits for one routing priority (legate routes everything at DEFAULT priority).
#[derive(Debug)]
pub struct CircuitBreaker {
    max_requests: u64,
    max_retries: u64,
    max_connections: u64,
    /// `retry_budget`: (percent of active requests, minimum concurrency); replaces
    /// `max_retries` when set.
    retry_budget: Option<(f64, u64)>,
    active_requests: AtomicU64,
    active_retries: AtomicU64,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker::new(1024, 3, 1024)
    }
}

/// Held while a request (or a retry) counts against a limit.
#[derive(Debug)]
pub struct Slot {
    breaker: Arc<CircuitBreaker>,
    retry: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let c = if self.retry {
            &self.breaker.active_retries
        } else {
            &self.breaker.active_requests
        };
        c.fetch_sub(1, Ordering::Relaxed);
    }
}

impl CircuitBreaker {
    fn new(max_requests: u64, max_retries: u64, max_connections: u64) -> Self {
        CircuitBreaker {
            max_requests,
            max_retries,
            max_connections,
            retry_budget: None,
            active_requests: AtomicU64::new(0),
            active_retries: AtomicU64::new(0),
        }
    }

    pub fn convert(c: &Option<CircuitBreakers>, at: &str, errs: &mut Errors) -> Self {
        let Some(CircuitBreakers {
            thresholds,
            per_host_thresholds,
        }) = c
        else {
            return CircuitBreaker::default();
        };
        reject_set!(errs, at, per_host_thresholds);
        let mut out = CircuitBreaker::default();
        for (i, t) in thresholds.iter().enumerate() {
            let tat = index(&join(at, "thresholds"), i);
            let Thresholds {
                priority,
                max_connections,
                max_pending_requests,
                max_requests,
                max_retries,
                retry_budget,
                track_remaining,
                max_connection_pools,
            } = t;
            // max_pending_requests: legate never queues a request for a connection (each
            // waiting request opens one), so nothing is ever pending; the limit is kept valid.
            let _ = max_pending_requests;
            reject_set!(errs, &tat, track_remaining, max_connection_pools);
            if *priority != RoutingPriority::Default as i32 {
                // Routes always use DEFAULT priority (route `priority` is rejected), so
                // HIGH thresholds could never apply.
                continue;
            }
            let v = |x: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u64| {
                x.map_or(d, |v| u64::from(v.value))
            };
            out = CircuitBreaker::new(
                v(max_requests, 1024),
                v(max_retries, 3),
                v(max_connections, 1024),
            );
            if let Some(b) = retry_budget {
                // budget_interval is not used by Envoy's retry budget either.
                let percent = b.budget_percent.as_ref().map_or(20.0, |p| p.value);
                if !(0.0..=100.0).contains(&percent) {
                    errs.add(
                        join(&tat, "retry_budget.budget_percent"),
                        "must be in [0, 100]",
                    );
                }
                out.retry_budget = Some((percent, v(&b.min_retry_concurrency, 3)));
            }
        }
        out
    }

    /// A slot for a new request, or None when `max_requests` (or, since each HTTP/1.1
    /// request in flight holds one upstream connection, `max_connections`) is reached.
    pub fn try_request(self: &Arc<Self>) -> Option<Slot> {
        let limit = self.max_requests.min(self.max_connections);
        self.try_take(&self.active_requests, limit, false)
    }

    /// A slot for a retry, or None when `max_retries` retries are already under way.
    pub fn try_retry(self: &Arc<Self>) -> Option<Slot> {
        let limit = match self.retry_budget {
            Some((percent, min)) => {
                let active = self.active_requests.load(Ordering::Relaxed) as f64;
                ((active * percent / 100.0) as u64).max(min)
            }
            None => self.max_retries,
        };
        self.try_take(&self.active_retries, limit, true)
    }

    fn try_take(self: &Arc<Self>, counter: &AtomicU64, limit: u64, retry: bool) -> Option<Slot> {
        let mut cur = counter.load(Ordering::Relaxed);
        loop {
            if cur >= limit {
                return None;
            }
            match counter.compare_exchange_weak(cur, cur + 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(Slot {
                        breaker: self.clone(),
                        retry,
                    })
                }
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_budget_scales_with_active_requests() {
        let mut cb = CircuitBreaker::new(1024, 3, 1024);
        cb.retry_budget = Some((50.0, 1));
        let cb = Arc::new(cb);
        let _reqs: Vec<_> = (0..6).map(|_| cb.try_request().unwrap()).collect();
        let retries: Vec<_> = (0..3).map(|_| cb.try_retry().unwrap()).collect();
        assert!(cb.try_retry().is_none(), "50% of 6 active requests");
        drop(retries);
    }

    #[test]
    fn requests_over_the_limit_are_refused_until_a_slot_frees() {
        let cb = Arc::new(CircuitBreaker::new(2, 1, 1024));
        let a = cb.try_request().unwrap();
        let _b = cb.try_request().unwrap();
        assert!(cb.try_request().is_none());
        drop(a);
        assert!(cb.try_request().is_some());
        let r = cb.try_retry().unwrap();
        assert!(cb.try_retry().is_none());
        drop(r);
        assert!(cb.try_retry().is_some());
    }
}
