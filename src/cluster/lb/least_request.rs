use std::sync::Arc;

use super::{LbContext, LoadBalancer};
use crate::cluster::host::Host;

/// LEAST_REQUEST: "power of `choice_count` choices" — sample hosts at random and take the
/// one with the fewest active requests. With unequal weights, samples are drawn in
/// proportion to weight and compared by active requests per unit of weight.
#[derive(Debug)]
pub struct LeastRequest {
    choice_count: u32,
    /// Running sums of weights when weights differ; empty when all are equal.
    cumulative: Vec<u64>,
}

impl LeastRequest {
    pub fn new(hosts: &[Arc<Host>], choice_count: u32) -> Self {
        let equal = hosts.windows(2).all(|w| w[0].weight == w[1].weight);
        let cumulative = if equal {
            Vec::new()
        } else {
            hosts
                .iter()
                .scan(0u64, |acc, h| {
                    *acc += u64::from(h.weight);
                    Some(*acc)
                })
                .collect()
        };
        LeastRequest {
            choice_count: choice_count.max(1),
            cumulative,
        }
    }

    fn sample(&self, n: usize, r: u64) -> usize {
        match self.cumulative.last() {
            None => (r % n as u64) as usize,
            Some(total) => {
                let point = r % total;
                self.cumulative.partition_point(|c| *c <= point)
            }
        }
    }
}

impl LoadBalancer for LeastRequest {
    fn pick(&self, hosts: &[Arc<Host>], ctx: &LbContext) -> Option<usize> {
        if hosts.is_empty() {
            return None;
        }
        let mut r = ctx.random;
        let mut best: Option<(usize, f64)> = None;
        for _ in 0..self.choice_count {
            let i = self.sample(hosts.len(), r);
            // A cheap, well-mixed next value for the following sample.
            r = r
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407)
                ^ (r >> 29);
            let h = &hosts[i];
            let load = (h.active_requests() as f64 + 1.0) / f64::from(h.weight);
            if best.is_none_or(|(_, b)| load < b) {
                best = Some((i, load));
            }
        }
        best.map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(weights: &[u32]) -> Vec<Arc<Host>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Arc::new(Host::new(
                    format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                    String::new(),
                    *w,
                    0,
                ))
            })
            .collect()
    }

    #[test]
    fn prefers_the_idle_host() {
        let hs = hosts(&[1, 1]);
        let _busy: Vec<_> = (0..5).map(|_| hs[0].start_request()).collect();
        let lb = LeastRequest::new(&hs, 2);
        let mut picked_idle = 0;
        for i in 0..1000u64 {
            let ctx = LbContext {
                hash: None,
                random: rand::random::<u64>() ^ i,
            };
            if lb.pick(&hs, &ctx) == Some(1) {
                picked_idle += 1;
            }
        }
        // The busy host wins only when both samples land on it (about 1 in 4).
        assert!(picked_idle > 650, "{picked_idle}");
    }

    #[test]
    fn idle_hosts_share_by_weight() {
        let hs = hosts(&[1, 3]);
        let lb = LeastRequest::new(&hs, 1);
        let mut counts = [0u32; 2];
        for _ in 0..8000 {
            let ctx = LbContext {
                hash: None,
                random: rand::random(),
            };
            counts[lb.pick(&hs, &ctx).unwrap()] += 1;
        }
        let ratio = f64::from(counts[1]) / f64::from(counts[0]);
        assert!((2.5..3.5).contains(&ratio), "{counts:?}");
    }
}
