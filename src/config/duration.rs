//! protobuf `Duration` fields as `std::time::Duration`, with Envoy's conventions.

use std::time::Duration;

use envoy_types::pb::google::protobuf::Duration as ProtoDuration;

use super::error::Errors;

pub fn to_std(d: &ProtoDuration) -> Duration {
    Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

/// A timeout where Envoy reads zero as "disabled" and absence as `default`.
pub fn optional_timeout(d: &Option<ProtoDuration>, default: Option<Duration>) -> Option<Duration> {
    match d {
        None => default,
        Some(d) => Some(to_std(d)).filter(|d| !d.is_zero()),
    }
}

/// Rejects negative durations, which the proto allows and Envoy's validation does not.
pub fn check(d: &Option<ProtoDuration>, at: &str, errs: &mut Errors) {
    if let Some(d) = d {
        if d.seconds < 0 || d.nanos < 0 {
            errs.add(at, "must not be negative");
        }
    }
}
