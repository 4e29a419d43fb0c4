//! `initial_fetch_timeout` for route configurations: a listener waiting for its RDS routes
//! starts with an empty table (every request 404) once the timeout passes, as in Envoy.

use std::collections::HashMap;

use tokio::time::Instant;

use super::client::Needs;
use super::Dynamic;

#[derive(Debug, Default)]
pub struct FetchTimeouts {
    deadlines: HashMap<String, Instant>,
}

impl FetchTimeouts {
    /// Starts the clock for route configurations wanted and not yet received.
    pub fn arm(&mut self, needs: &Needs, dynamic: &Dynamic) {
        let now = Instant::now();
        self.deadlines.retain(|name, _| needs.rds.contains(name));
        for name in &needs.rds {
            let known = dynamic.routes.contains_key(name) || dynamic.rds_timed_out.contains(name);
            if known || self.deadlines.contains_key(name) {
                continue;
            }
            if let Some(Some(t)) = needs.rds_timeouts.get(name) {
                self.deadlines.insert(name.clone(), now + *t);
            }
        }
    }

    /// The next deadline, if any.
    pub fn next(&self) -> Option<Instant> {
        self.deadlines.values().min().copied()
    }

    /// Waits until the next deadline (forever when there is none).
    pub async fn wait(next: Option<Instant>) {
        match next {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending::<()>().await,
        }
    }

    /// The candidate to apply when some route configurations timed out, else None.
    pub fn expire(&mut self, dynamic: &Dynamic) -> Option<Dynamic> {
        let now = Instant::now();
        let expired: Vec<String> = self
            .deadlines
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(n, _)| n.clone())
            .collect();
        let mut candidate = dynamic.clone();
        for name in &expired {
            self.deadlines.remove(name);
            if !candidate.routes.contains_key(name) {
                log::warn!(
                    "xDS: route configuration '{name}' did not arrive in time; serving without it"
                );
                candidate.rds_timed_out.insert(name.clone());
            }
        }
        (candidate.rds_timed_out != dynamic.rds_timed_out).then_some(candidate)
    }
}
