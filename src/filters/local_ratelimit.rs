//! `envoy.filters.http.local_ratelimit`: a token bucket per filter (and per route that
//! overrides it), shared by every worker and connection, answering 429 when empty.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit as Proto;
use envoy_types::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, TokenBucket};
use pingora::http::RequestHeader;

use crate::config::duration;
use crate::config::error::{join, Errors};
use crate::filter::{FilterContext, FilterDecision, HttpFilter};
use crate::reject_set;

pub const TYPE: &str = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

/// Envoy's body for a rate-limited request.
const BODY: &str = "local_rate_limited";

#[derive(Debug)]
pub struct LocalRateLimit {
    status: u16,
    bucket: Option<Bucket>,
    /// Fractions of requests the filter looks at, and of those it enforces on.
    enabled: Fraction,
    enforced: Fraction,
}

#[derive(Debug, Clone, Copy)]
struct Fraction(u64, u64);

impl Fraction {
    fn hit(self) -> bool {
        self.0 >= self.1 || (self.0 > 0 && rand::random::<u64>() % self.1 < self.0)
    }
}

/// Envoy's token bucket: starts full, `tokens_per_fill` added every `fill_interval` up to
/// `max_tokens`. Lock-free: fills are claimed by advancing the fill count with a CAS.
#[derive(Debug)]
struct Bucket {
    max: u64,
    per_fill: u64,
    interval: Duration,
    start: Instant,
    fills: AtomicU64,
    tokens: AtomicU64,
}

impl Bucket {
    fn take(&self) -> bool {
        let due = (self.start.elapsed().as_nanos() / self.interval.as_nanos().max(1)) as u64;
        let done = self.fills.load(Ordering::Acquire);
        if due > done
            && self
                .fills
                .compare_exchange(done, due, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let add = (due - done).saturating_mul(self.per_fill);
            let _ = self
                .tokens
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                    Some(t.saturating_add(add).min(self.max))
                });
        }
        self.tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(1))
            .is_ok()
    }
}

impl LocalRateLimit {
    pub fn convert(p: &Proto, at: &str, errs: &mut Errors) -> Option<Self> {
        let Proto {
            stat_prefix,
            status,
            token_bucket,
            filter_enabled,
            filter_enforced,
            request_headers_to_add_when_not_enforced,
            response_headers_to_add,
            descriptors,
            stage,
            local_rate_limit_per_downstream_connection,
            local_cluster_rate_limit,
            enable_x_ratelimit_headers,
            vh_rate_limits,
            always_consume_default_token_bucket,
            rate_limited_as_resource_exhausted,
            rate_limits,
            max_dynamic_descriptors,
            enable_retry_after_header,
        } = p;
        reject_set!(
            errs,
            at,
            request_headers_to_add_when_not_enforced,
            response_headers_to_add,
            descriptors,
            stage,
            local_rate_limit_per_downstream_connection,
            local_cluster_rate_limit,
            enable_x_ratelimit_headers,
            vh_rate_limits,
            always_consume_default_token_bucket,
            rate_limited_as_resource_exhausted,
            rate_limits,
            max_dynamic_descriptors,
            enable_retry_after_header,
        );
        if stat_prefix.is_empty() {
            errs.add(join(at, "stat_prefix"), "must not be empty");
        }
        let status = match status {
            None => 429,
            Some(s) if (400..600).contains(&s.code) => s.code as u16,
            Some(_) => {
                errs.add(join(at, "status.code"), "must be in [400, 600)");
                429
            }
        };
        let bucket = token_bucket
            .as_ref()
            .and_then(|b| bucket(b, &join(at, "token_bucket"), errs));
        Some(LocalRateLimit {
            status,
            bucket,
            enabled: fraction(filter_enabled, &join(at, "filter_enabled"), errs),
            enforced: fraction(filter_enforced, &join(at, "filter_enforced"), errs),
        })
    }
}

fn bucket(b: &TokenBucket, at: &str, errs: &mut Errors) -> Option<Bucket> {
    let TokenBucket {
        max_tokens,
        tokens_per_fill,
        fill_interval,
    } = b;
    if *max_tokens == 0 {
        errs.add(join(at, "max_tokens"), "must be at least 1");
    }
    let Some(interval) = fill_interval.as_ref().map(duration::to_std) else {
        errs.add(join(at, "fill_interval"), "required");
        return None;
    };
    if interval < Duration::from_millis(50) {
        // Envoy's lower bound.
        errs.add(join(at, "fill_interval"), "must be at least 50ms");
    }
    Some(Bucket {
        max: u64::from(*max_tokens),
        per_fill: tokens_per_fill.map_or(1, |t| u64::from(t.value)),
        interval,
        start: Instant::now(),
        fills: AtomicU64::new(0),
        tokens: AtomicU64::new(u64::from(*max_tokens)),
    })
}

/// A `RuntimeFractionalPercent`; legate has no runtime, so its default applies (as in Envoy
/// when the runtime key is unset). Unset means 0%: the filter does nothing, as in Envoy.
fn fraction(f: &Option<RuntimeFractionalPercent>, at: &str, errs: &mut Errors) -> Fraction {
    let Some(f) = f else { return Fraction(0, 100) };
    let Some(d) = &f.default_value else {
        errs.add(join(at, "default_value"), "required");
        return Fraction(0, 100);
    };
    let denominator = match DenominatorType::try_from(d.denominator) {
        Ok(DenominatorType::Hundred) => 100,
        Ok(DenominatorType::TenThousand) => 10_000,
        Ok(DenominatorType::Million) => 1_000_000,
        Err(_) => {
            errs.add(join(at, "default_value.denominator"), "unknown value");
            100
        }
    };
    Fraction(u64::from(d.numerator), denominator)
}

impl HttpFilter for LocalRateLimit {
    fn on_request_headers(
        &self,
        _req: &mut RequestHeader,
        cx: &FilterContext<'_>,
    ) -> FilterDecision {
        // A route's own settings replace the filter's (Envoy's per-route override).
        let this = cx
            .per_route
            .and_then(|c| c.downcast_ref::<LocalRateLimit>())
            .unwrap_or(self);
        let Some(bucket) = &this.bucket else {
            return FilterDecision::Continue;
        };
        if !this.enabled.hit() || bucket.take() || !this.enforced.hit() {
            return FilterDecision::Continue;
        }
        FilterDecision::Respond {
            status: this.status,
            body: BODY.to_string(),
        }
    }
}
