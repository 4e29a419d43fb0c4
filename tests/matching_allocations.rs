//! Route matching allocates nothing per request (issue 6: "no allocation per request in
//! matching"). A counting allocator sees every allocation this thread makes while a warmed
//! table answers lookups of every kind: indexed prefixes and exact paths, regex, header and
//! query matchers, case-insensitive routes, exact and wildcard domains.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use legate::config::error::Errors;
use legate::route::{RequestView, RouteTable};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator; only counts on the thread that asked to.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note() {
    // try_with: the thread-locals may be gone while a thread shuts down.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> usize {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|on| on.set(true));
    f();
    COUNTING.with(|on| on.set(false));
    ALLOCATIONS.with(|n| n.get())
}

fn table(yaml: &str) -> RouteTable {
    let proto: RouteConfiguration =
        legate::config::load::parse_message(yaml, "envoy.config.route.v3.RouteConfiguration")
            .expect("route config parses");
    let mut errs = Errors::default();
    let t = RouteTable::convert(&proto, "route_config", &mut errs).expect("table");
    errs.into_result(t).expect("table is valid")
}

#[test]
fn route_matching_allocates_nothing() {
    let mut y = String::from("virtual_hosts:\n");
    for i in 0..200 {
        y.push_str(&format!(
            "- {{name: vh{i}, domains: [\"svc{i}.example.com\", \"*.svc{i}.example.com\", \"svc{i}.*\"], routes: [{{match: {{prefix: \"/\"}}, direct_response: {{status: 200}}}}]}}\n"
        ));
    }
    y.push_str("- name: main\n  domains: [\"*\"]\n  routes:\n");
    for i in 0..300 {
        y.push_str(&format!(
            "  - {{match: {{prefix: \"/p{i}/\"}}, direct_response: {{status: 200}}}}\n  - {{match: {{path: \"/e{i}\"}}, direct_response: {{status: 201}}}}\n"
        ));
    }
    y.push_str(concat!(
        "  - {match: {safe_regex: {regex: \"/r/[0-9]+\"}}, direct_response: {status: 202}}\n",
        "  - {match: {prefix: \"/CaSe/\", case_sensitive: false}, direct_response: {status: 203}}\n",
        "  - match:\n",
        "      prefix: /h/\n",
        "      headers: [{name: x-user, string_match: {exact: alice}}, {name: x-tier, present_match: true}]\n",
        "      query_parameters: [{name: debug, string_match: {exact: \"1\"}}]\n",
        "    direct_response: {status: 204}\n",
        "  - {match: {prefix: \"/\"}, direct_response: {status: 404}}\n",
    ));
    let t = table(&y);

    let mut headers = http::HeaderMap::new();
    headers.insert("x-user", http::HeaderValue::from_static("alice"));
    headers.insert("x-tier", http::HeaderValue::from_static("gold"));
    // (virtual host, route): the domain-only hosts come first, then `main` (200).
    let cases: &[(&str, &str, (usize, usize))] = &[
        ("gateway.local", "/p299/items?page=2", (200, 598)),
        ("gateway.local", "/e150", (200, 301)),
        ("gateway.local", "/r/42", (200, 600)),
        ("gateway.local", "/case/x", (200, 601)),
        ("gateway.local", "/h/x?debug=1&y=2", (200, 602)),
        ("gateway.local", "/h/x?debug=0", (200, 603)),
        ("gateway.local", "/nothing", (200, 603)),
        ("svc199.example.com", "/", (199, 0)),
        ("api.svc7.example.com", "/", (7, 0)),
        ("svc3.internal", "/", (3, 0)),
        // A port is part of the host for matching, as in Envoy by default.
        ("api.svc7.example.com:8080", "/", (200, 603)),
    ];
    let views: Vec<RequestView<'_>> = cases
        .iter()
        .map(|(host, path, _)| RequestView::new("GET", path, host, "http", &headers))
        .collect();
    // Check what each case matches, which also warms lazily built state (the regex
    // engine's per-thread cache) outside the count.
    for ((host, path, want), view) in cases.iter().zip(&views) {
        assert_eq!(t.route_index(view), Some(*want), "{host}{path}");
    }
    let n = allocations_during(|| {
        for _ in 0..1_000 {
            for view in &views {
                std::hint::black_box(t.route_index(std::hint::black_box(view)));
            }
        }
    });
    let lookups = 1_000 * views.len();
    assert_eq!(
        n, 0,
        "route matching allocated {n} times in {lookups} lookups"
    );
}
