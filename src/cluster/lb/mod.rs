//! Load-balancing algorithms behind one trait. Each is built once per host set (when the
//! config or the endpoints change) and then picks lock-free on the request path.

mod least_request;
mod maglev;
mod random;
mod ring_hash;
mod round_robin;
pub mod schedule;

use std::fmt::Debug;
use std::sync::Arc;

pub use least_request::LeastRequest;
pub use maglev::Maglev;
pub use random::RandomLb;
pub use ring_hash::RingHash;
pub use round_robin::RoundRobin;

use super::host::Host;

/// What a pick may depend on besides the hosts.
#[derive(Debug, Clone, Copy)]
pub struct LbContext {
    /// The route's hash policy result (consistent-hashing policies).
    pub hash: Option<u64>,
    /// A fresh random value for this pick.
    pub random: u64,
}

/// A load balancer over one list of hosts; returns an index into that list.
pub trait LoadBalancer: Send + Sync + Debug {
    fn pick(&self, hosts: &[Arc<Host>], ctx: &LbContext) -> Option<usize>;
}

/// A cluster's `lb_policy` with its settings.
#[derive(Debug, Clone)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest {
        choice_count: u32,
    },
    Random,
    RingHash {
        min_ring_size: u64,
        max_ring_size: u64,
    },
    Maglev {
        table_size: u64,
    },
}

impl LbPolicy {
    /// Ring hash and Maglev place hosts by normalised weight over all localities at once.
    pub fn is_consistent_hash(&self) -> bool {
        matches!(self, LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. })
    }

    /// Builds the balancer for hosts with the given normalised weights (summing to 1).
    pub fn build(&self, hosts: &[Arc<Host>], normalized: &[f64]) -> Box<dyn LoadBalancer> {
        match self {
            LbPolicy::RoundRobin => Box::new(RoundRobin::new(hosts)),
            LbPolicy::LeastRequest { choice_count } => {
                Box::new(LeastRequest::new(hosts, *choice_count))
            }
            LbPolicy::Random => Box::new(RandomLb),
            LbPolicy::RingHash {
                min_ring_size,
                max_ring_size,
            } => Box::new(RingHash::new(
                hosts,
                normalized,
                *min_ring_size,
                *max_ring_size,
            )),
            LbPolicy::Maglev { table_size } => {
                Box::new(Maglev::new(hosts, normalized, *table_size))
            }
        }
    }
}

pub fn maglev_default_table_size() -> u64 {
    maglev::DEFAULT_TABLE_SIZE
}

/// Host weights normalised to sum to 1, as Envoy feeds its hashing balancers.
pub fn normalized_weights(hosts: &[Arc<Host>]) -> Vec<f64> {
    let sum: f64 = hosts.iter().map(|h| f64::from(h.weight)).sum();
    hosts.iter().map(|h| f64::from(h.weight) / sum).collect()
}
