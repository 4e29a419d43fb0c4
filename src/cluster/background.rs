//! A cluster's background work on the control runtime: one health-check loop per host,
//! the outlier-detection interval, and DNS re-resolution. Every task holds only weak
//! references and ends when its cluster (or host) is gone.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::health::{self, Transition};
use super::host::{flags, Host};
use super::outlier::{self, OutlierConfig, Reason};
use super::Cluster;

/// Milliseconds on a process-wide monotonic clock (for ejection deadlines in atomics).
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

pub fn spawn_health_checks(cluster: &Cluster, rt: &tokio::runtime::Handle, hosts: &[Arc<Host>]) {
    let Some(cfg) = cluster.health_check.clone() else {
        return;
    };
    // The loop needs the cluster by Arc; members find it again through this weak self.
    let Some(me) = cluster_weak(cluster) else {
        return;
    };
    for h in hosts {
        let (cluster, host, cfg) = (me.clone(), Arc::downgrade(h), cfg.clone());
        rt.spawn(async move {
            let initial = cfg.initial_jitter.as_millis() as u64;
            if initial > 0 {
                tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % initial)).await;
            }
            loop {
                let (Some(c), Some(h)) = (cluster.upgrade(), host.upgrade()) else {
                    return;
                };
                if !c.members().iter().any(|m| Arc::ptr_eq(m, &h)) {
                    return;
                }
                let result = health::check(h.address, &cfg, &c.name).await;
                let mut changed = health::apply_result(&h, result, &cfg);
                if result == health::CheckResult::Healthy
                    && h.set_flag(flags::FAILED_OUTLIER, false)
                {
                    // A passing active check ends an outlier ejection, as in Envoy.
                    h.outlier.ejected_until_ms.store(0, Ordering::Relaxed);
                    h.outlier.reset_consecutive();
                    changed = Transition::BecameHealthy;
                }
                if changed != Transition::Unchanged {
                    log::info!(
                        "cluster {}: host {} is now {}",
                        c.name,
                        h.address,
                        if h.is_healthy() {
                            "healthy"
                        } else {
                            "unhealthy"
                        }
                    );
                    c.rebuild();
                }
                let wait =
                    cfg.next_interval(h.is_healthy(), changed, c.has_traffic(), rand::random());
                drop((c, h));
                tokio::time::sleep(wait).await;
            }
        });
    }
}

pub fn spawn_outlier_detection(cluster: &Arc<Cluster>, rt: &tokio::runtime::Handle) {
    let Some(cfg) = cluster.outlier.clone() else {
        return;
    };
    let weak = Arc::downgrade(cluster);
    rt.spawn(async move {
        loop {
            tokio::time::sleep(cfg.interval).await;
            let Some(c) = weak.upgrade() else { return };
            if outlier_interval(&c, &cfg) {
                c.rebuild();
            }
        }
    });
}

pub fn spawn_dns_refresh(cluster: &Arc<Cluster>, rt: &tokio::runtime::Handle, period: Duration) {
    if !cluster.uses_dns() {
        return;
    }
    let weak = Arc::downgrade(cluster);
    rt.spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let Some(c) = weak.upgrade() else { return };
            // Resolution blocks; keep it off the runtime's workers.
            let _ = tokio::task::spawn_blocking(move || c.refresh_hosts()).await;
        }
    });
}

/// One outlier-detection interval: end expired ejections, decay ejection counts, and
/// apply success-rate and failure-percentage detection. True when health changed.
fn outlier_interval(c: &Cluster, cfg: &OutlierConfig) -> bool {
    let now = now_ms();
    let members = c.members();
    let mut changed = false;
    for h in members.iter() {
        let until = h.outlier.ejected_until_ms.load(Ordering::Relaxed);
        if until != 0 && now >= until {
            h.outlier.ejected_until_ms.store(0, Ordering::Relaxed);
            h.outlier.reset_consecutive();
            changed |= h.set_flag(flags::FAILED_OUTLIER, false);
        } else if until == 0 {
            let n = h.outlier.ejections.load(Ordering::Relaxed);
            if n > 0 {
                h.outlier.ejections.store(n - 1, Ordering::Relaxed);
            }
        }
    }
    let stats: Vec<(u64, u64)> = members.iter().map(|h| h.outlier.take_interval()).collect();
    for (i, reason) in outlier::interval_outliers(&stats, cfg) {
        if let Some(h) = members.get(i) {
            changed |= eject(c, h, reason, cfg);
        }
    }
    changed
}

/// Ejects a host if enforcement and `max_ejection_percent` allow; true when it was.
pub fn eject(c: &Cluster, h: &Arc<Host>, reason: Reason, cfg: &OutlierConfig) -> bool {
    if h.health_flags() & flags::FAILED_OUTLIER != 0 {
        return false;
    }
    let members = c.members();
    let ejected = members
        .iter()
        .filter(|m| m.health_flags() & flags::FAILED_OUTLIER != 0)
        .count();
    if members.is_empty() || ejected * 100 / members.len() >= cfg.max_ejection_percent as usize {
        return false;
    }
    if rand::random::<u32>() % 100 >= outlier::enforcing(cfg, reason) {
        return false;
    }
    let n = h.outlier.ejections.fetch_add(1, Ordering::Relaxed) + 1;
    let until = now_ms() + cfg.ejection_time(n).as_millis() as u64;
    h.outlier.ejected_until_ms.store(until, Ordering::Relaxed);
    log::info!(
        "cluster {}: host {} ejected ({reason:?}) for {:?}",
        c.name,
        h.address,
        cfg.ejection_time(n)
    );
    h.set_flag(flags::FAILED_OUTLIER, true)
}

/// The cluster's own weak reference, from the registry of running clusters.
fn cluster_weak(cluster: &Cluster) -> Option<Weak<Cluster>> {
    cluster.self_ref.get().cloned()
}
