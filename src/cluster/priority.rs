//! The hosts of a cluster grouped by priority (and locality), with a balancer per group.

use std::sync::Arc;

use super::host::{choose_priority, priority_load, Host};
use super::lb::schedule::WeightedSchedule;
use super::lb::{normalized_weights, LbContext, LbPolicy, LoadBalancer};

/// The hosts of one locality inside a priority.
#[derive(Debug)]
pub struct LocalityHosts {
    pub weight: u32,
    pub hosts: Vec<Arc<Host>>,
}

/// One priority level.
#[derive(Debug)]
pub struct HostSet {
    pub hosts: Vec<Arc<Host>>,
    lb: Box<dyn LoadBalancer>,
    /// Set when `locality_weighted_lb_config` is on (and the policy is not a hash).
    localities: Option<LocalityPicker>,
}

/// One locality's hosts and the balancer over them.
type LocalityBalancer = (Vec<Arc<Host>>, Box<dyn LoadBalancer>);

#[derive(Debug)]
struct LocalityPicker {
    schedule: WeightedSchedule,
    localities: Vec<LocalityBalancer>,
}

impl HostSet {
    pub fn new(localities: Vec<LocalityHosts>, policy: &LbPolicy, locality_weighted: bool) -> Self {
        let hosts: Vec<Arc<Host>> = localities
            .iter()
            .flat_map(|l| l.hosts.iter().cloned())
            .collect();
        let weighted: Vec<&LocalityHosts> = localities
            .iter()
            .filter(|l| l.weight > 0 && !l.hosts.is_empty())
            .collect();
        if locality_weighted && policy.is_consistent_hash() {
            // Envoy folds locality weights into each host's normalised weight.
            let total: f64 = weighted.iter().map(|l| f64::from(l.weight)).sum();
            let mut hs = Vec::new();
            let mut norm = Vec::new();
            for l in &weighted {
                let share = f64::from(l.weight) / total;
                let w = normalized_weights(&l.hosts);
                hs.extend(l.hosts.iter().cloned());
                norm.extend(w.into_iter().map(|w| w * share));
            }
            let lb = policy.build(&hs, &norm);
            return HostSet {
                hosts: hs,
                lb,
                localities: None,
            };
        }
        let lb = policy.build(&hosts, &normalized_weights(&hosts));
        let localities = (locality_weighted && !weighted.is_empty()).then(|| {
            let weights: Vec<u32> = weighted.iter().map(|l| l.weight).collect();
            LocalityPicker {
                schedule: WeightedSchedule::new(&weights, rand::random::<u32>() as usize),
                localities: weighted
                    .iter()
                    .map(|l| {
                        (
                            l.hosts.clone(),
                            policy.build(&l.hosts, &normalized_weights(&l.hosts)),
                        )
                    })
                    .collect(),
            }
        });
        HostSet {
            hosts,
            lb,
            localities,
        }
    }

    fn pick(&self, ctx: &LbContext) -> Option<Arc<Host>> {
        if let Some(lp) = &self.localities {
            let (hosts, lb) = &lp.localities[lp.schedule.pick()?];
            return lb.pick(hosts, ctx).and_then(|i| hosts.get(i)).cloned();
        }
        self.lb
            .pick(&self.hosts, ctx)
            .and_then(|i| self.hosts.get(i))
            .cloned()
    }
}

/// All priorities of a cluster, with the traffic share of each.
#[derive(Debug)]
pub struct PrioritySet {
    pub priorities: Vec<HostSet>,
    load: Vec<u32>,
}

impl PrioritySet {
    /// `health` holds each priority's (healthy, total) host counts.
    pub fn new(
        priorities: Vec<HostSet>,
        health: &[(usize, usize)],
        overprovisioning_factor: u32,
    ) -> Self {
        let load = priority_load(health, overprovisioning_factor);
        PrioritySet { priorities, load }
    }

    pub fn empty() -> Self {
        PrioritySet {
            priorities: Vec::new(),
            load: Vec::new(),
        }
    }

    pub fn host_count(&self) -> usize {
        self.priorities.iter().map(|p| p.hosts.len()).sum()
    }

    /// Picks a priority (by hash when there is one, as Envoy does) and a host within it.
    pub fn pick(&self, ctx: &LbContext) -> Option<Arc<Host>> {
        if self.priorities.is_empty() {
            return None;
        }
        let p = choose_priority(&self.load, ctx.hash.unwrap_or(ctx.random));
        self.priorities.get(p)?.pick(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(port: u16, weight: u32, locality: usize) -> Arc<Host> {
        Arc::new(Host::new(
            ([127, 0, 0, 1], port).into(),
            String::new(),
            weight,
            locality,
        ))
    }

    #[test]
    fn locality_weights_split_traffic() {
        let set = HostSet::new(
            vec![
                LocalityHosts {
                    weight: 1,
                    hosts: vec![host(1, 1, 0)],
                },
                LocalityHosts {
                    weight: 3,
                    hosts: vec![host(2, 1, 1), host(3, 1, 1)],
                },
            ],
            &LbPolicy::RoundRobin,
            true,
        );
        let mut counts = [0u32; 4];
        for _ in 0..400 {
            let h = set
                .pick(&LbContext {
                    hash: None,
                    random: rand::random(),
                })
                .unwrap();
            counts[h.address.port() as usize] += 1;
        }
        assert_eq!(counts[1], 100);
        assert_eq!(counts[2] + counts[3], 300);
    }

    #[test]
    fn without_locality_weighting_hosts_share_equally() {
        let set = HostSet::new(
            vec![
                LocalityHosts {
                    weight: 1,
                    hosts: vec![host(1, 1, 0)],
                },
                LocalityHosts {
                    weight: 3,
                    hosts: vec![host(2, 1, 1)],
                },
            ],
            &LbPolicy::RoundRobin,
            false,
        );
        let mut counts = [0u32; 3];
        for _ in 0..100 {
            let h = set
                .pick(&LbContext {
                    hash: None,
                    random: 0,
                })
                .unwrap();
            counts[h.address.port() as usize] += 1;
        }
        assert_eq!(counts[1], 50);
    }

    #[test]
    fn lower_priority_is_used_only_when_higher_is_empty() {
        let p0 = HostSet::new(vec![], &LbPolicy::RoundRobin, false);
        let p1 = HostSet::new(
            vec![LocalityHosts {
                weight: 1,
                hosts: vec![host(7, 1, 0)],
            }],
            &LbPolicy::RoundRobin,
            false,
        );
        let set = PrioritySet::new(vec![p0, p1], &[(0, 0), (1, 1)], 140);
        let h = set
            .pick(&LbContext {
                hash: None,
                random: 5,
            })
            .unwrap();
        assert_eq!(h.address.port(), 7);
    }
}
