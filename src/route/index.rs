//! Candidate indexes so that matching does not test every route or domain.
//!
//! Envoy's semantics are "first route in config order that matches", so the index never
//! decides a match itself: it only narrows which routes are tested, and returns the lowest
//! index among those whose full matcher (headers, query, case) accepts the request.

use std::collections::HashMap;

/// What the index needs to know about one route's path matcher.
pub enum PathKey<'a> {
    /// Matches paths starting with this (prefix and path_separated_prefix).
    Prefix(&'a str),
    /// Matches this path, query excluded.
    Exact(&'a str),
    /// Regex and anything else: always tested.
    Other,
}

/// A byte trie of route prefixes and exact paths, keyed case-insensitively so that one walk
/// finds candidates for case-sensitive and case-insensitive routes alike.
#[derive(Debug)]
pub struct RouteIndex {
    nodes: Vec<Node>,
    /// Routes the trie cannot place (regex), in config order.
    scan: Vec<u32>,
}

#[derive(Debug, Default)]
struct Node {
    /// Sorted by byte, for binary search.
    children: Vec<(u8, u32)>,
    /// Prefix routes whose prefix ends at this node, in config order.
    prefix: Vec<u32>,
    /// Exact-path routes whose path ends at this node, in config order.
    exact: Vec<u32>,
}

impl RouteIndex {
    pub fn build<'a>(keys: impl IntoIterator<Item = PathKey<'a>>) -> Self {
        let mut index = RouteIndex {
            nodes: vec![Node::default()],
            scan: Vec::new(),
        };
        for (i, key) in keys.into_iter().enumerate() {
            let i = i as u32;
            match key {
                PathKey::Prefix(p) => {
                    let n = index.node_for(p);
                    index.nodes[n].prefix.push(i);
                }
                PathKey::Exact(p) => {
                    let n = index.node_for(p);
                    index.nodes[n].exact.push(i);
                }
                PathKey::Other => index.scan.push(i),
            }
        }
        index
    }

    fn node_for(&mut self, key: &str) -> usize {
        let mut node = 0;
        for b in key.bytes().map(|b| b.to_ascii_lowercase()) {
            node = match self.nodes[node].children.binary_search_by_key(&b, |c| c.0) {
                Ok(k) => self.nodes[node].children[k].1 as usize,
                Err(k) => {
                    let child = self.nodes.len();
                    self.nodes.push(Node::default());
                    self.nodes[node].children.insert(k, (b, child as u32));
                    child
                }
            };
        }
        node
    }

    /// The lowest route index accepted by `is_match` among the routes that could match
    /// `path` (full `:path`, query included) whose query-less part is `path_only_len` long.
    pub fn first_match(
        &self,
        path: &str,
        path_only_len: usize,
        mut is_match: impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        let mut best = usize::MAX;
        let bytes = path.as_bytes();
        let mut node = &self.nodes[0];
        let mut depth = 0;
        loop {
            first_in(&node.prefix, &mut best, &mut is_match);
            if depth == path_only_len {
                first_in(&node.exact, &mut best, &mut is_match);
            }
            let Some(b) = bytes.get(depth) else { break };
            let b = b.to_ascii_lowercase();
            match node.children.binary_search_by_key(&b, |c| c.0) {
                Ok(k) => node = &self.nodes[node.children[k].1 as usize],
                Err(_) => break,
            }
            depth += 1;
        }
        // Last: these are the expensive ones, and only those before `best` still matter.
        first_in(&self.scan, &mut best, &mut is_match);
        (best != usize::MAX).then_some(best)
    }
}

/// Lowers `best` to the first index in `list` (ascending) that matches, testing only
/// indices below the current best.
fn first_in(list: &[u32], best: &mut usize, is_match: &mut impl FnMut(usize) -> bool) {
    for &i in list {
        let i = i as usize;
        if i >= *best {
            return;
        }
        if is_match(i) {
            *best = i;
            return;
        }
    }
}

/// Wildcard domains (`*.example.com`, `example.*`) looked up by the lengths that occur, so
/// the cost follows the number of distinct wildcard lengths, not the number of domains.
#[derive(Debug, Default)]
pub struct WildcardDomains {
    /// Pattern without the `*` → virtual host index.
    by_pattern: HashMap<String, usize>,
    /// Distinct pattern lengths, longest first (Envoy prefers the longest wildcard).
    lengths: Vec<usize>,
}

impl WildcardDomains {
    /// Adds a pattern; false if it was already present.
    pub fn insert(&mut self, pattern: &str, vhost: usize) -> bool {
        if self.by_pattern.contains_key(pattern) {
            return false;
        }
        self.by_pattern.insert(pattern.to_string(), vhost);
        if let Err(k) = self.lengths.binary_search_by(|l| pattern.len().cmp(l)) {
            self.lengths.insert(k, pattern.len());
        }
        true
    }

    /// The longest suffix pattern that `host` ends with, the wildcard taking at least one
    /// character.
    pub fn longest_suffix(&self, host: &str) -> Option<usize> {
        self.lengths
            .iter()
            .filter(|&&l| l < host.len())
            .find_map(|&l| {
                host.get(host.len() - l..)
                    .and_then(|s| self.by_pattern.get(s))
            })
            .copied()
    }

    /// The longest prefix pattern that `host` starts with, the wildcard taking at least one
    /// character.
    pub fn longest_prefix(&self, host: &str) -> Option<usize> {
        self.lengths
            .iter()
            .filter(|&&l| l < host.len())
            .find_map(|&l| host.get(..l).and_then(|s| self.by_pattern.get(s)))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_match_is_lowest_config_index() {
        let keys = [
            PathKey::Prefix("/api/v2"),
            PathKey::Other,
            PathKey::Exact("/api"),
            PathKey::Prefix("/api"),
            PathKey::Prefix("/"),
            PathKey::Prefix(""),
        ];
        let index = RouteIndex::build(keys);
        // The accepting closure plays the full matcher: everything the index offers matches.
        let all = |p: &str| index.first_match(p, p.find('?').unwrap_or(p.len()), |_| true);
        assert_eq!(all("/api/v2/x"), Some(0));
        // The regex route (1) comes before the /api routes and is tested.
        assert_eq!(all("/api"), Some(1));
        let no_regex = |p: &str| index.first_match(p, p.find('?').unwrap_or(p.len()), |i| i != 1);
        assert_eq!(no_regex("/api?x=1"), Some(2));
        assert_eq!(no_regex("/apix"), Some(3));
        assert_eq!(no_regex("/other"), Some(4));
        assert_eq!(no_regex("x"), Some(5));
        // Keys are case-folded; the full matcher decides case sensitivity.
        assert_eq!(no_regex("/API/V2"), Some(0));
    }

    #[test]
    fn wildcard_domains_prefer_the_longest() {
        let mut w = WildcardDomains::default();
        assert!(w.insert(".example.com", 0));
        assert!(w.insert(".b.example.com", 1));
        assert!(!w.insert(".example.com", 2));
        assert_eq!(w.longest_suffix("a.b.example.com"), Some(1));
        assert_eq!(w.longest_suffix("x.example.com"), Some(0));
        // The wildcard must take at least one character.
        assert_eq!(w.longest_suffix(".example.com"), None);
        let mut p = WildcardDomains::default();
        p.insert("api.", 0);
        assert_eq!(p.longest_prefix("api.internal"), Some(0));
        assert_eq!(p.longest_prefix("api."), None);
    }
}
