use std::sync::Arc;

use xxhash_rust::xxh64::xxh64;

use super::{LbContext, LoadBalancer};
use crate::cluster::host::Host;

/// RING_HASH (ketama), built as Envoy builds it: each host gets `scale × weight` points
/// hashed from `"<ip:port>_<i>"` with xxHash64, so the same request hash lands on the same
/// host as it would in Envoy.
#[derive(Debug)]
pub struct RingHash {
    ring: Vec<(u64, u32)>,
}

impl RingHash {
    pub fn new(
        hosts: &[Arc<Host>],
        normalized: &[f64],
        min_ring_size: u64,
        max_ring_size: u64,
    ) -> Self {
        let mut ring = Vec::new();
        if hosts.is_empty() {
            return RingHash { ring };
        }
        let min_weight = normalized.iter().copied().fold(f64::INFINITY, f64::min);
        let scale =
            ((min_weight * min_ring_size as f64).ceil() / min_weight).min(max_ring_size as f64);
        ring.reserve(scale.ceil() as usize);
        let mut current = 0.0f64;
        let mut target = 0.0f64;
        for (idx, (host, w)) in hosts.iter().zip(normalized).enumerate() {
            let key = host.hash_key();
            target += scale * w;
            let mut i = 0u64;
            while current < target {
                let hash = xxh64(format!("{key}_{i}").as_bytes(), 0);
                ring.push((hash, idx as u32));
                i += 1;
                current += 1.0;
            }
        }
        ring.sort_by_key(|e| e.0);
        RingHash { ring }
    }

    /// Envoy's ketama lookup: the first point at or after `h`, wrapping to the start.
    fn lookup(&self, h: u64) -> Option<usize> {
        if self.ring.is_empty() {
            return None;
        }
        let i = self.ring.partition_point(|(p, _)| *p < h);
        let i = if i == self.ring.len() { 0 } else { i };
        Some(self.ring[i].1 as usize)
    }
}

impl LoadBalancer for RingHash {
    fn pick(&self, _hosts: &[Arc<Host>], ctx: &LbContext) -> Option<usize> {
        self.lookup(ctx.hash.unwrap_or(ctx.random))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::lb::normalized_weights;

    fn hosts(n: usize) -> Vec<Arc<Host>> {
        (0..n)
            .map(|i| {
                Arc::new(Host::new(
                    format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                    String::new(),
                    1,
                    0,
                ))
            })
            .collect()
    }

    #[test]
    fn same_hash_same_host_and_spread() {
        let hs = hosts(4);
        let rh = RingHash::new(&hs, &normalized_weights(&hs), 1024, 8 << 20);
        assert_eq!(rh.ring.len(), 1024);
        let mut counts = [0u32; 4];
        for k in 0..4000u64 {
            let h = xxh64(&k.to_le_bytes(), 0);
            let a = rh.lookup(h).unwrap();
            assert_eq!(rh.lookup(h), Some(a));
            counts[a] += 1;
        }
        assert!(counts.iter().all(|c| *c > 600), "{counts:?}");
    }

    #[test]
    fn removing_a_host_moves_few_other_keys() {
        let hs = hosts(4);
        let before = RingHash::new(&hs, &normalized_weights(&hs), 1024, 8 << 20);
        let fewer: Vec<_> = hs[..3].to_vec();
        let after = RingHash::new(&fewer, &normalized_weights(&fewer), 1024, 8 << 20);
        // Survivors get a few more points each (the ring is rescaled), so a small share of
        // their keys may move; the removed host's keys must all move.
        let mut moved = 0;
        for k in 0..2000u64 {
            let h = xxh64(&k.to_le_bytes(), 0);
            let a = before.lookup(h).unwrap();
            let b = after.lookup(h).unwrap();
            if a != 3 && a != b {
                moved += 1;
            }
            assert_ne!(b, 3);
        }
        assert!(
            moved < 400,
            "{moved} of 2000 keys moved between surviving hosts"
        );
    }
}
