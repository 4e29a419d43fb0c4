use std::sync::Arc;

use xxhash_rust::xxh64::xxh64;

use super::{LbContext, LoadBalancer};
use crate::cluster::host::Host;

/// Envoy's default Maglev table size (a prime).
pub const DEFAULT_TABLE_SIZE: u64 = 65537;

/// MAGLEV, built as Envoy builds it (hosts sorted by `ip:port`, offset and skip from
/// xxHash64 with seeds 0 and 1, weighted fill), so a hash maps to the host Envoy picks.
#[derive(Debug)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    pub fn new(hosts: &[Arc<Host>], normalized: &[f64], table_size: u64) -> Self {
        if hosts.is_empty() || table_size < 2 {
            return Maglev { table: Vec::new() };
        }
        struct Entry {
            host: u32,
            offset: u64,
            skip: u64,
            weight: f64,
            target: f64,
            next: u64,
        }
        let mut sorted: Vec<(String, u32, f64)> = hosts
            .iter()
            .zip(normalized)
            .enumerate()
            .map(|(i, (h, w))| (h.hash_key(), i as u32, *w))
            .collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        let max_weight = normalized.iter().copied().fold(0.0, f64::max);
        let mut entries: Vec<Entry> = sorted
            .iter()
            .map(|(key, host, weight)| Entry {
                host: *host,
                offset: xxh64(key.as_bytes(), 0) % table_size,
                skip: xxh64(key.as_bytes(), 1) % (table_size - 1) + 1,
                weight: *weight,
                target: 0.0,
                next: 0,
            })
            .collect();
        let mut table = vec![u32::MAX; table_size as usize];
        let mut filled = 0u64;
        let mut iteration: u32 = 1;
        while filled < table_size {
            for e in entries.iter_mut() {
                if filled >= table_size {
                    break;
                }
                if f64::from(iteration) * e.weight < e.target {
                    continue;
                }
                e.target += max_weight;
                let mut c = (e.offset + e.skip * e.next) % table_size;
                while table[c as usize] != u32::MAX {
                    e.next += 1;
                    c = (e.offset + e.skip * e.next) % table_size;
                }
                table[c as usize] = e.host;
                e.next += 1;
                filled += 1;
            }
            iteration += 1;
        }
        Maglev { table }
    }
}

impl LoadBalancer for Maglev {
    fn pick(&self, _hosts: &[Arc<Host>], ctx: &LbContext) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let h = ctx.hash.unwrap_or(ctx.random);
        Some(self.table[(h % self.table.len() as u64) as usize] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::lb::normalized_weights;

    fn hosts(weights: &[u32]) -> Vec<Arc<Host>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Arc::new(Host::new(
                    format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                    String::new(),
                    *w,
                    0,
                ))
            })
            .collect()
    }

    #[test]
    fn table_shares_follow_weights() {
        let hs = hosts(&[1, 1, 2]);
        let m = Maglev::new(&hs, &normalized_weights(&hs), DEFAULT_TABLE_SIZE);
        let mut counts = [0u64; 3];
        for h in &m.table {
            counts[*h as usize] += 1;
        }
        let total = DEFAULT_TABLE_SIZE as f64;
        assert!((counts[2] as f64 / total - 0.5).abs() < 0.01, "{counts:?}");
        assert!((counts[0] as f64 / total - 0.25).abs() < 0.01, "{counts:?}");
    }

    #[test]
    fn same_hash_same_host() {
        let hs = hosts(&[1, 1, 1]);
        let m = Maglev::new(&hs, &normalized_weights(&hs), 251);
        let ctx = LbContext {
            hash: Some(12345),
            random: 0,
        };
        let first = m.pick(&hs, &ctx);
        let m2 = Maglev::new(&hs, &normalized_weights(&hs), 251);
        assert_eq!(m2.pick(&hs, &ctx), first);
    }
}
