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
