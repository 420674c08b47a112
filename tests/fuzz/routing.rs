//! Routing: the router agrees with a naive reference on random route sets and requests.

use proptest::prelude::*;
use proptest::sample::select;
use reveille::route::router::Router;

use crate::cfg;

/// A route as configured: host (exact or wildcard suffix), optional path prefix.
#[derive(Debug, Clone)]
struct RouteSpec {
    wildcard: bool,
    host: String,
    prefix: Option<String>,
}

impl RouteSpec {
    fn host_pattern(&self) -> String {
        if self.wildcard {
            format!("*.{}", self.host)
        } else {
            self.host.clone()
        }
    }
}

/// A request: host labels, how the host is written, and a path.
#[derive(Debug, Clone)]
struct Req {
    host: String,
    upper: bool,
    port: bool,
    trailing_dot: bool,
    path: String,
}

impl Req {
    fn written_host(&self) -> String {
        let mut h = if self.upper {
            self.host.to_ascii_uppercase()
        } else {
            self.host.clone()
        };
        if self.trailing_dot {
            h.push('.');
        }
        if self.port {
            h.push_str(":8080");
        }
        h
    }
}

/// A few short labels, so generated hosts and paths collide and nest often.
fn small_host() -> impl Strategy<Value = String> {
    proptest::collection::vec(select(&["a", "b", "ab", "c"][..]), 1..4).prop_map(|l| l.join("."))
}

fn small_path() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(select(&["x", "y", "xy", "x-y", "z"][..]), 0..4),
        select(&["", "/", "?q=1", "/?q"][..]),
    )
        .prop_map(|(segs, tail)| {
            let mut p = String::new();
            for s in segs {
                p.push('/');
                p.push_str(s);
            }
            p.push_str(tail);
            if p.is_empty() || p.starts_with('?') {
                p.insert(0, '/');
            }
            p
        })
}

fn route_spec() -> impl Strategy<Value = RouteSpec> {
    (
        any::<bool>(),
        small_host(),
        proptest::option::of((
            proptest::collection::vec(select(&["x", "y", "xy"][..]), 0..3),
            any::<bool>(),
        )),
    )
        .prop_map(|(wildcard, host, prefix)| RouteSpec {
            wildcard,
            host,
            prefix: prefix.map(|(segs, slash)| {
                let mut p: String = segs.iter().map(|s| format!("/{s}")).collect();
                if slash || p.is_empty() {
                    p.push('/');
                }
                p
            }),
        })
}

fn request() -> impl Strategy<Value = Req> {
    (
        small_host(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        small_path(),
    )
        .prop_map(|(host, upper, port, trailing_dot, path)| Req {
            host,
            upper,
            port,
            trailing_dot,
            path,
        })
}

fn segment_match(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
}

/// Exact host first (longest matching prefix), then wildcards from the most specific suffix
/// (longest matching prefix within it). A later route with the same host and prefix replaces an
/// earlier one.
fn reference(routes: &[RouteSpec], req: &Req) -> Option<usize> {
    let mut table: Vec<(bool, String, String, usize)> = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        let prefix = r
            .prefix
            .as_deref()
            .unwrap_or("")
            .trim_end_matches('/')
            .to_string();
        let host = r.host.to_ascii_lowercase();
        match table
            .iter_mut()
            .find(|e| e.0 == r.wildcard && e.1 == host && e.2 == prefix)
        {
            Some(e) => e.3 = i,
            None => table.push((r.wildcard, host, prefix, i)),
        }
    }
    let host = req.host.to_ascii_lowercase();
    let best = |wild: bool, key: &str| {
        table
            .iter()
            .filter(|e| e.0 == wild && e.1 == key && segment_match(&e.2, &req.path))
            .max_by_key(|e| e.2.len())
            .map(|e| e.3)
    };
    if let Some(v) = best(false, &host) {
        return Some(v);
    }
    let labels: Vec<&str> = host.split('.').collect();
    (1..labels.len()).find_map(|i| best(true, &labels[i..].join(".")))
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn routing_agrees_with_the_reference(
        routes in proptest::collection::vec(route_spec(), 0..12),
        reqs in proptest::collection::vec(request(), 1..16),
    ) {
        let mut router = Router::new();
        for (i, r) in routes.iter().enumerate() {
            router.insert(&r.host_pattern(), r.prefix.as_deref(), i);
        }
        for req in &reqs {
            let got = router.lookup(&req.written_host(), &req.path).copied();
            let want = reference(&routes, req);
            prop_assert_eq!(got, want, "request {:?} with routes {:?}", req, routes);
        }
    }
}
