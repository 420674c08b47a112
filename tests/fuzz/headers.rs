//! Header handling: no hop-by-hop header survives `strip_hop_by_hop` or the rewrite of an
//! outgoing request, and every other header is left as it was.

use std::net::SocketAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use proptest::sample::select;
use reveille::upstream::{is_protected, strip_hop_by_hop, Outgoing};

use crate::cfg;

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy ones proxies also drop).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

const OTHER_NAMES: &[&str] = &[
    "x-a",
    "x-b",
    "x-c",
    "host",
    "content-type",
    "x-forwarded-for",
    "cookie",
];

/// A token for a `Connection` list: names (any case, padded), junk, and non-UTF-8 bytes.
fn connection_token() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        select([HOP_BY_HOP, OTHER_NAMES].concat()).prop_map(|s| s.as_bytes().to_vec()),
        select(&["X-A", " x-b ", "Close", "keep-alive", "", "  ", "x a", "TE"][..])
            .prop_map(|s| s.as_bytes().to_vec()),
        proptest::collection::vec(any::<u8>(), 0..6),
    ]
}

fn header_value() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        select(
            &[
                "trailers",
                "Trailers",
                "chunked",
                "gzip, trailers",
                "close",
                "websocket",
                ""
            ][..]
        )
        .prop_map(HeaderValue::from_static),
        proptest::collection::vec(any::<u8>(), 0..16)
            .prop_filter_map("valid header value", |b| HeaderValue::from_bytes(&b).ok()),
    ]
}

fn header_map() -> impl Strategy<Value = HeaderMap> {
    let entry = prop_oneof![
        (select([HOP_BY_HOP, OTHER_NAMES].concat()), header_value())
            .prop_map(|(n, v)| (HeaderName::from_static(n), v)),
        proptest::collection::vec(connection_token(), 1..5).prop_filter_map(
            "valid Connection value",
            |tokens| {
                let v = tokens.join(&b","[..]);
                HeaderValue::from_bytes(&v)
                    .ok()
                    .map(|v| (http::header::CONNECTION, v))
            }
        ),
    ];
    proptest::collection::vec(entry, 0..12).prop_map(|entries| {
        let mut h = HeaderMap::new();
        for (n, v) in entries {
            h.append(n, v);
        }
        h
    })
}

/// Names the `Connection` headers of `h` declare hop-by-hop.
fn connection_listed(h: &HeaderMap) -> Vec<HeaderName> {
    h.get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect()
}

/// After stripping: no hop-by-hop header left (`TE: trailers` alone may stay), and every other
/// header untouched.
fn check_stripped(before: &HeaderMap, after: &HeaderMap) -> Result<(), TestCaseError> {
    let listed = connection_listed(before);
    for name in HOP_BY_HOP.iter().filter(|n| **n != "te") {
        prop_assert!(!after.contains_key(*name), "{name} left in {after:?}");
    }
    for v in after.get_all(http::header::TE) {
        prop_assert!(
            v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"trailers"),
            "TE {v:?} left in {after:?}"
        );
    }
    for name in listed.iter().filter(|n| !is_protected(n)) {
        prop_assert!(
            !after.contains_key(name),
            "{name} listed in Connection but left in {after:?}"
        );
    }
    for name in before.keys() {
        if HOP_BY_HOP.contains(&name.as_str()) || (listed.contains(name) && !is_protected(name)) {
            continue;
        }
        let b: Vec<_> = before.get_all(name).iter().collect();
        let a: Vec<_> = after.get_all(name).iter().collect();
        prop_assert_eq!(a, b, "{} changed", name);
    }
    Ok(())
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn strip_hop_by_hop_leaves_none(before in header_map()) {
        let mut after = before.clone();
        strip_hop_by_hop(&mut after);
        check_stripped(&before, &after)?;
    }

    #[test]
    fn outgoing_requests_carry_no_hop_by_hop_headers(
        before in header_map(),
        absolute in any::<bool>(),
        tls in any::<bool>(),
        upgrade in proptest::option::of(select(&["websocket", "h2c", "foo/1"][..])),
        ip in any::<[u8; 4]>(),
    ) {
        let uri = if absolute { "http://Auth.test:81/p?q=1" } else { "/p?q=1" };
        let mut req = http::Request::get(uri).body(()).unwrap();
        *req.headers_mut() = before.clone();
        let (parts, ()) = req.into_parts();
        let client = SocketAddr::from((ip, 4000));
        let proto = if tls { "https" } else { "http" };
        let mut out = Outgoing::new(parts, client, proto, upgrade.map(HeaderValue::from_static));
        let h = out.headers_mut();
        match upgrade {
            Some(u) => {
                prop_assert_eq!(h.get_all(http::header::UPGRADE).iter().collect::<Vec<_>>(), vec![u]);
                prop_assert_eq!(h.get_all(http::header::CONNECTION).iter().collect::<Vec<_>>(), vec!["upgrade"]);
                let mut rest = h.clone();
                rest.remove(http::header::UPGRADE);
                rest.remove(http::header::CONNECTION);
                for name in HOP_BY_HOP.iter().filter(|n| **n != "te") {
                    prop_assert!(!rest.contains_key(*name), "{name} left in {h:?}");
                }
            }
            None => {
                // Stripping itself is checked in full above; here: nothing hop-by-hop survives
                // the whole rewrite, apart from the headers the rewrite sets itself.
                for name in HOP_BY_HOP.iter().filter(|n| **n != "te") {
                    prop_assert!(!h.contains_key(*name), "{name} left in {h:?}");
                }
                for v in h.get_all(http::header::TE) {
                    prop_assert!(v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"trailers"));
                }
                let set_here = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "host"];
                for name in connection_listed(&before) {
                    if !set_here.contains(&name.as_str()) && !is_protected(&name) {
                        prop_assert!(!h.contains_key(&name), "{name} listed in Connection, left in {h:?}");
                    }
                }
            }
        }
        prop_assert_eq!(h.get("x-forwarded-proto").unwrap(), proto);
        let xff = h.get("x-forwarded-for").map(|v| v.as_bytes().to_vec()).unwrap_or_default();
        prop_assert!(
            xff.ends_with(client.ip().to_string().as_bytes()),
            "x-forwarded-for {:?}", String::from_utf8_lossy(&xff)
        );
        if absolute {
            prop_assert!(h.contains_key("host"), "no Host in {h:?}");
        }
    }
}
