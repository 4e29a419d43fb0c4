use std::sync::Arc;

use super::schedule::WeightedSchedule;
use super::{LbContext, LoadBalancer};
use crate::cluster::host::Host;

/// ROUND_ROBIN: plain rotation for equal weights, smooth weighted rotation otherwise.
#[derive(Debug)]
pub struct RoundRobin {
    schedule: WeightedSchedule,
}

impl RoundRobin {
    pub fn new(hosts: &[Arc<Host>]) -> Self {
        let weights: Vec<u32> = hosts.iter().map(|h| h.weight).collect();
        // Start at a random offset so that many gateways do not all hit the first host first.
        RoundRobin {
            schedule: WeightedSchedule::new(&weights, rand::random::<u32>() as usize),
        }
    }
}

impl LoadBalancer for RoundRobin {
    fn pick(&self, _hosts: &[Arc<Host>], _ctx: &LbContext) -> Option<usize> {
        self.schedule.pick()
    }
}
