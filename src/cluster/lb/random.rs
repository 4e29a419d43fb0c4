use std::sync::Arc;

use super::{LbContext, LoadBalancer};
use crate::cluster::host::Host;

/// RANDOM: a uniformly random host (Envoy's random balancer does not weigh hosts).
#[derive(Debug)]
pub struct RandomLb;

impl LoadBalancer for RandomLb {
    fn pick(&self, hosts: &[Arc<Host>], ctx: &LbContext) -> Option<usize> {
        if hosts.is_empty() {
            return None;
        }
        Some((ctx.random % hosts.len() as u64) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_every_host_about_equally() {
        let hosts: Vec<Arc<Host>> = (0..4)
            .map(|i| {
                Arc::new(Host::new(
                    ([127, 0, 0, 1], 9000 + i).into(),
                    String::new(),
                    1 + u32::from(i) * 10,
                    0,
                ))
            })
            .collect();
        let mut counts = [0u32; 4];
        for _ in 0..8000 {
            let ctx = LbContext {
                hash: None,
                random: rand::random(),
            };
            counts[RandomLb.pick(&hosts, &ctx).unwrap()] += 1;
        }
        // Weights are ignored, as in Envoy's RANDOM: ~2000 each.
        assert!(
            counts.iter().all(|c| (1700..2300).contains(c)),
            "{counts:?}"
        );
    }
}
