//! A cluster's `load_balancing_policy`: Envoy's typed load-balancing extensions
//! (`envoy.extensions.load_balancing_policies.*`), the form control planes such as Envoy
//! Gateway write, mapped onto the balancers `lb_policy` already selects.

use envoy_types::pb::envoy::config::cluster::v3::{
    load_balancing_policy::Policy, LoadBalancingPolicy,
};
use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use envoy_types::pb::envoy::extensions::load_balancing_policies::{
    common::v3::{locality_lb_config::LocalityConfigSpecifier, LocalityLbConfig},
    least_request::v3::{least_request::SelectionMethod, LeastRequest},
    maglev::v3::Maglev,
    random::v3::Random,
    ring_hash::v3::{ring_hash::HashFunction, RingHash},
    round_robin::v3::RoundRobin,
};

use super::config::{least_request, maglev, ring_hash};
use super::lb::LbPolicy;
use crate::config::error::{index, join, Errors};
use crate::config::load::{type_name, unpack_or_report};
use crate::config::shape::UNKNOWN_TYPE;
use crate::reject_set;

const LEAST_REQUEST: &str =
    "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest";
const ROUND_ROBIN: &str = "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin";
const RANDOM: &str = "envoy.extensions.load_balancing_policies.random.v3.Random";
const RING_HASH: &str = "envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash";
const MAGLEV: &str = "envoy.extensions.load_balancing_policies.maglev.v3.Maglev";

/// The balancer and whether it weighs localities. Envoy takes the first policy of the list
/// that it has; a type outside Envoy's API is skipped as Envoy skips it, but the first one
/// Envoy would use must be one legate implements, or the cluster would balance differently.
pub(super) fn convert(
    p: &LoadBalancingPolicy,
    at: &str,
    errs: &mut Errors,
) -> Option<(LbPolicy, bool)> {
    let LoadBalancingPolicy { policies } = p;
    let list_at = join(at, "policies");
    for (
        i,
        Policy {
            typed_extension_config,
        },
    ) in policies.iter().enumerate()
    {
        let pat = join(&index(&list_at, i), "typed_extension_config");
        let Some(TypedExtensionConfig {
            name: _,
            typed_config: Some(any),
        }) = typed_extension_config
        else {
            errs.add(join(&pat, "typed_config"), "required");
            return None;
        };
        let tat = join(&pat, "typed_config");
        let name = type_name(any);
        // Over xDS an unknown type arrives as bytes under its own URL; from a file it is
        // the parser's placeholder (and the file is refused for it, as Envoy refuses it).
        if any.type_url.ends_with(UNKNOWN_TYPE) || !name.starts_with("envoy.") {
            continue;
        }
        return match &*name {
            LEAST_REQUEST => {
                let c: LeastRequest = unpack_or_report(any, LEAST_REQUEST, &pat, errs)?;
                let LeastRequest {
                    choice_count,
                    active_request_bias,
                    slow_start_config,
                    locality_lb_config,
                    enable_full_scan,
                    selection_method,
                } = &c;
                reject_set!(
                    errs,
                    &tat,
                    active_request_bias,
                    slow_start_config,
                    enable_full_scan
                );
                if *selection_method != SelectionMethod::NChoices as i32 {
                    errs.add(
                        join(&tat, "selection_method"),
                        "only N_CHOICES is supported",
                    );
                }
                let policy = least_request(*choice_count, &tat, errs);
                Some((policy, locality(locality_lb_config, &tat, errs)))
            }
            ROUND_ROBIN => {
                let c: RoundRobin = unpack_or_report(any, ROUND_ROBIN, &pat, errs)?;
                let RoundRobin {
                    slow_start_config,
                    locality_lb_config,
                } = &c;
                reject_set!(errs, &tat, slow_start_config);
                Some((
                    LbPolicy::RoundRobin,
                    locality(locality_lb_config, &tat, errs),
                ))
            }
            RANDOM => {
                let c: Random = unpack_or_report(any, RANDOM, &pat, errs)?;
                let Random { locality_lb_config } = &c;
                Some((LbPolicy::Random, locality(locality_lb_config, &tat, errs)))
            }
            RING_HASH => {
                let c: RingHash = unpack_or_report(any, RING_HASH, &pat, errs)?;
                let RingHash {
                    hash_function,
                    minimum_ring_size,
                    maximum_ring_size,
                    use_hostname_for_hashing,
                    hash_balance_factor,
                    consistent_hashing_lb_config,
                    locality_weighted_lb_config,
                } = &c;
                reject_set!(
                    errs,
                    &tat,
                    use_hostname_for_hashing,
                    hash_balance_factor,
                    consistent_hashing_lb_config
                );
                // DEFAULT_HASH is xxHash, the one legate's ring uses.
                if *hash_function != HashFunction::DefaultHash as i32
                    && *hash_function != HashFunction::XxHash as i32
                {
                    errs.add(join(&tat, "hash_function"), "only XX_HASH is supported");
                }
                let policy = ring_hash(*minimum_ring_size, *maximum_ring_size, &tat, errs);
                Some((policy, locality_weighted_lb_config.is_some()))
            }
            MAGLEV => {
                let c: Maglev = unpack_or_report(any, MAGLEV, &pat, errs)?;
                let Maglev {
                    table_size,
                    consistent_hashing_lb_config,
                    locality_weighted_lb_config,
                } = &c;
                reject_set!(errs, &tat, consistent_hashing_lb_config);
                let policy = maglev(*table_size, &tat, errs);
                Some((policy, locality_weighted_lb_config.is_some()))
            }
            other => {
                errs.unsupported_extension(
                    &tat,
                    other,
                    format!("load-balancing policy {other} is not supported (least_request, round_robin, random, ring_hash or maglev)"),
                );
                None
            }
        };
    }
    errs.add(
        list_at,
        "no policy of a type Envoy knows (Envoy refuses such a cluster too)",
    );
    None
}

/// `locality_lb_config`: locality-weighted balancing, or an error for zone-aware routing
/// (which needs a local cluster legate does not have).
fn locality(c: &Option<LocalityLbConfig>, at: &str, errs: &mut Errors) -> bool {
    match c
        .as_ref()
        .and_then(|c| c.locality_config_specifier.as_ref())
    {
        None => false,
        Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_)) => true,
        Some(LocalityConfigSpecifier::ZoneAwareLbConfig(_)) => {
            errs.add(
                join(at, "locality_lb_config.zone_aware_lb_config"),
                "not supported",
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_lenient;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster as ClusterProto;

    fn policy(yaml: &str) -> (Option<(LbPolicy, bool)>, Vec<String>) {
        let proto: ClusterProto = parse_lenient(
            &format!("name: c\nload_balancing_policy:\n  policies:\n{yaml}"),
            "envoy.config.cluster.v3.Cluster",
        )
        .unwrap()
        .message;
        let mut errs = Errors::default();
        let out = convert(
            proto.load_balancing_policy.as_ref().unwrap(),
            "c.load_balancing_policy",
            &mut errs,
        );
        let errs = errs
            .into_result(())
            .err()
            .map(|e| e.0.iter().map(|e| e.to_string()).collect())
            .unwrap_or_default();
        (out, errs)
    }

    fn entry(type_name: &str, body: &str) -> String {
        format!("  - typed_extension_config:\n      name: x\n      typed_config:\n        '@type': type.googleapis.com/{type_name}\n{body}")
    }

    #[test]
    fn envoy_gateways_least_request_with_locality_weights() {
        let (out, errs) = policy(&entry(
            LEAST_REQUEST,
            "        locality_lb_config: {locality_weighted_lb_config: {}}\n",
        ));
        assert!(errs.is_empty(), "{errs:?}");
        let (p, weighted) = out.unwrap();
        assert!(matches!(p, LbPolicy::LeastRequest { choice_count: 2 }));
        assert!(weighted);
    }

    #[test]
    fn each_policy_maps_with_its_settings() {
        let (out, _) = policy(&entry(LEAST_REQUEST, "        choice_count: 5\n"));
        assert!(matches!(
            out,
            Some((LbPolicy::LeastRequest { choice_count: 5 }, false))
        ));
        let (out, _) = policy(&entry(ROUND_ROBIN, ""));
        assert!(matches!(out, Some((LbPolicy::RoundRobin, false))));
        let (out, _) = policy(&entry(RANDOM, ""));
        assert!(matches!(out, Some((LbPolicy::Random, false))));
        let (out, errs) = policy(&entry(
            RING_HASH,
            "        minimum_ring_size: 64\n        maximum_ring_size: 128\n",
        ));
        assert!(errs.is_empty(), "{errs:?}");
        assert!(matches!(
            out,
            Some((
                LbPolicy::RingHash {
                    min_ring_size: 64,
                    max_ring_size: 128
                },
                false
            ))
        ));
        let (out, _) = policy(&entry(
            MAGLEV,
            "        table_size: 5\n        locality_weighted_lb_config: {}\n",
        ));
        assert!(matches!(
            out,
            Some((LbPolicy::Maglev { table_size: 5 }, true))
        ));
        let (_, errs) = policy(&entry(MAGLEV, "        table_size: 6\n"));
        assert_eq!(
            errs,
            ["c.load_balancing_policy.policies[0].typed_extension_config.typed_config.table_size: must be a prime number no larger than 5000011"]
        );
    }

    #[test]
    fn types_outside_envoy_are_skipped_but_envoy_types_legate_lacks_are_refused() {
        let list = format!("{}{}", entry("acme.Balancer", ""), entry(ROUND_ROBIN, ""));
        let (out, errs) = policy(&list);
        assert!(errs.is_empty(), "{errs:?}");
        assert!(matches!(out, Some((LbPolicy::RoundRobin, false))));
        let wrr = "envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin";
        let (out, errs) = policy(&format!("{}{}", entry(wrr, ""), entry(ROUND_ROBIN, "")));
        assert!(out.is_none());
        assert!(
            errs[0].contains("ClientSideWeightedRoundRobin is not supported"),
            "{errs:?}"
        );
        let (_, errs) = policy(&entry(
            LEAST_REQUEST,
            "        slow_start_config: {slow_start_window: 1s}\n",
        ));
        assert_eq!(
            errs,
            ["c.load_balancing_policy.policies[0].typed_extension_config.typed_config.slow_start_config: not supported"]
        );
    }
}
