//! `envoy.filters.http.header_mutation`: ordered header removals and appends on requests
//! and responses, with per-route mutations.

use envoy_types::pb::envoy::config::common::mutation_rules::v3::{
    header_mutation::Action, HeaderMutation as MutationProto,
};
use envoy_types::pb::envoy::extensions::filters::http::header_mutation::v3::{
    HeaderMutation as Proto, HeaderMutationPerRoute, Mutations as MutationsProto,
};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::config::error::{index, join, Errors};
use crate::filter::{FilterContext, FilterDecision, HttpFilter};
use crate::reject_set;
use crate::route::headers::{FormatContext, HeaderMutations, HeaderTarget};

pub const TYPE: &str = "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation";
pub const PER_ROUTE_TYPE: &str =
    "envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute";

/// Request and response mutations, each applied in config order.
#[derive(Debug, Default)]
pub struct Mutations {
    request: Vec<HeaderMutations>,
    response: Vec<HeaderMutations>,
}

#[derive(Debug)]
pub struct HeaderMutation {
    mutations: Mutations,
}

impl Mutations {
    fn convert(m: &MutationsProto, at: &str, errs: &mut Errors) -> Self {
        let MutationsProto {
            request_mutations,
            query_parameter_mutations,
            response_mutations,
            response_trailers_mutations,
            request_trailers_mutations,
        } = m;
        reject_set!(
            errs,
            at,
            query_parameter_mutations,
            response_trailers_mutations,
            request_trailers_mutations,
        );
        Mutations {
            request: list(request_mutations, &join(at, "request_mutations"), errs),
            response: list(response_mutations, &join(at, "response_mutations"), errs),
        }
    }

    fn request(&self, req: &mut RequestHeader) {
        for m in &self.request {
            m.apply(req as &mut dyn HeaderTarget, &FormatContext::default());
        }
    }

    fn response(&self, resp: &mut ResponseHeader) {
        for m in &self.response {
            m.apply(resp as &mut dyn HeaderTarget, &FormatContext::default());
        }
    }
}

fn list(items: &[MutationProto], at: &str, errs: &mut Errors) -> Vec<HeaderMutations> {
    let mut out = Vec::new();
    for (i, m) in items.iter().enumerate() {
        let iat = index(at, i);
        let one = match &m.action {
            Some(Action::Remove(name)) => HeaderMutations::convert(
                &[],
                std::slice::from_ref(name),
                &iat,
                "append",
                "remove",
                errs,
            ),
            Some(Action::Append(opt)) => HeaderMutations::convert(
                std::slice::from_ref(opt),
                &[],
                &iat,
                "append",
                "remove",
                errs,
            ),
            Some(Action::RemoveOnMatch(_)) => {
                errs.add(join(&iat, "remove_on_match"), "not supported");
                continue;
            }
            None => {
                errs.add(&iat, "an action is required");
                continue;
            }
        };
        if one.uses_format() {
            errs.add(
                join(&iat, "append.header.value"),
                "command operators are not supported in this filter yet",
            );
        }
        out.push(one);
    }
    out
}

impl HeaderMutation {
    pub fn convert(p: &Proto, at: &str, errs: &mut Errors) -> Self {
        // most_specific_header_mutations_wins orders the route, virtual host and route
        // table levels among themselves; legate applies only the most specific level's
        // per-route mutations (docs/configuration.md), where the flag changes nothing.
        let Proto {
            mutations,
            most_specific_header_mutations_wins: _,
        } = p;
        HeaderMutation {
            mutations: mutations
                .as_ref()
                .map(|m| Mutations::convert(m, &join(at, "mutations"), errs))
                .unwrap_or_default(),
        }
    }

    /// The order Envoy 1.40 applies them in (checked against it in tests/header_mutation.rs,
    /// with and without `most_specific_header_mutations_wins`, which only orders per-route
    /// levels among themselves): the filter's own, then the route's.
    fn ordered<'a>(&'a self, cx: &FilterContext<'a>) -> [Option<&'a Mutations>; 2] {
        let route = cx.per_route.and_then(|c| c.downcast_ref::<Mutations>());
        [Some(&self.mutations), route]
    }
}

/// `HeaderMutationPerRoute`.
pub fn per_route(p: &HeaderMutationPerRoute, at: &str, errs: &mut Errors) -> Mutations {
    let HeaderMutationPerRoute { mutations } = p;
    mutations
        .as_ref()
        .map(|m| Mutations::convert(m, &join(at, "mutations"), errs))
        .unwrap_or_default()
}

impl HttpFilter for HeaderMutation {
    fn on_request_headers(
        &self,
        req: &mut RequestHeader,
        cx: &FilterContext<'_>,
    ) -> FilterDecision {
        for m in self.ordered(cx).into_iter().flatten() {
            m.request(req);
        }
        FilterDecision::Continue
    }

    fn on_response_headers(&self, resp: &mut ResponseHeader, cx: &FilterContext<'_>) {
        for m in self.ordered(cx).into_iter().flatten() {
            m.response(resp);
        }
    }
}
