//! The HTTP field rules, written once: which request and response fields are hop-by-hop, which
//! a `Connection` list may not remove, which Reveille sets itself, which belong to Knative.
//! Both engines look fields up here: the HTTP/1.1 fast path on the bytes of a parsed head
//! ([`field`]), hyper's path on `HeaderMap` names ([`of`]); so a rule changed here changes
//! for both, and the differential test (tests/engines.rs) keeps what each sends equal.

use http::HeaderName;

/// `Knative-Serving-Revision`: the revision a Knative ingress routes to.
pub const KNATIVE_REVISION: &str = "knative-serving-revision";
/// `Knative-Serving-Namespace`: its namespace.
pub const KNATIVE_NAMESPACE: &str = "knative-serving-namespace";
/// `K-Original-Host`: the host the client asked for, set by Reveille on Knative requests.
pub const K_ORIGINAL_HOST: &str = "k-original-host";
/// `K-Proxy-Request`: set to `activator` by Reveille on Knative requests.
pub const K_PROXY_REQUEST: &str = "k-proxy-request";
/// `K-Network-Probe`: Knative's network probe.
pub const K_NETWORK_PROBE: &str = "k-network-probe";
/// `K-Network-Hash`: echoed on a Knative probe.
pub const K_NETWORK_HASH: &str = "k-network-hash";

/// What the rules say about a field, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    /// `Host`: routes the request; kept.
    Host,
    /// `Content-Length`: the body's framing.
    ContentLength,
    /// `Transfer-Encoding`: the body's framing; hop-by-hop.
    TransferEncoding,
    /// `Connection`: hop-by-hop, and lists more hop-by-hop fields.
    Connection,
    /// `Upgrade`: hop-by-hop; passed on only for an allowed upgrade.
    Upgrade,
    /// `TE`: hop-by-hop (`trailers` is kept for gRPC over HTTP/2).
    Te,
    /// `Trailer`: hop-by-hop.
    Trailer,
    /// `Keep-Alive`, `Proxy-Connection`, `Proxy-Authenticate`, `Proxy-Authorization`.
    HopByHop,
    /// `Expect`: `100-continue` is answered by hyper's server.
    Expect,
    /// `X-Forwarded-For`: earlier hops, to which this hop appends the client.
    XForwardedFor,
    /// `X-Forwarded-Host` and `X-Forwarded-Proto`: replaced by this hop.
    XForwardedOwn,
    /// `Knative-Serving-Revision` and `-Namespace`: route a Knative request (when opted in).
    KnativeRoute,
    /// `K-Original-Host` and `K-Proxy-Request`: set by Reveille on Knative requests only.
    KnativeSet,
    /// `K-Network-Probe`: answered by Reveille when Knative routing is on.
    KnativeProbe,
    /// Any other field.
    Other,
}

impl Field {
    /// Hop-by-hop by itself (RFC 9110 §7.6.1), not by being listed in `Connection`: never
    /// forwarded as it came.
    pub(crate) fn hop_by_hop(self) -> bool {
        matches!(
            self,
            Field::Connection
                | Field::TransferEncoding
                | Field::Upgrade
                | Field::Te
                | Field::Trailer
                | Field::HopByHop
        )
    }

    /// A field a `Connection` list cannot remove: `Host` (routing and the backend's virtual
    /// hosts depend on it; nginx and HAProxy keep it too), the body's framing, and the fields
    /// Reveille sets itself. Removing them is no client's choice.
    pub(crate) fn protected(self) -> bool {
        matches!(
            self,
            Field::Host
                | Field::ContentLength
                | Field::XForwardedFor
                | Field::XForwardedOwn
                | Field::KnativeSet
        )
    }

    /// A Knative field a client's request loses unless it was routed as a Knative one.
    pub(crate) fn knative(self) -> bool {
        matches!(self, Field::KnativeRoute | Field::KnativeSet)
    }
}

/// The rule for a field name, any case.
#[inline]
pub(crate) fn field(name: &[u8]) -> Field {
    let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
    match name.len() {
        2 if is("te") => Field::Te,
        4 if is("host") => Field::Host,
        6 if is("expect") => Field::Expect,
        7 if is("upgrade") => Field::Upgrade,
        7 if is("trailer") => Field::Trailer,
        10 if is("connection") => Field::Connection,
        10 if is("keep-alive") => Field::HopByHop,
        14 if is("content-length") => Field::ContentLength,
        15 if is("x-forwarded-for") => Field::XForwardedFor,
        15 if is(K_NETWORK_PROBE) => Field::KnativeProbe,
        15 if is(K_ORIGINAL_HOST) || is(K_PROXY_REQUEST) => Field::KnativeSet,
        16 if is("x-forwarded-host") => Field::XForwardedOwn,
        16 if is("proxy-connection") => Field::HopByHop,
        17 if is("x-forwarded-proto") => Field::XForwardedOwn,
        17 if is("transfer-encoding") => Field::TransferEncoding,
        18 if is("proxy-authenticate") => Field::HopByHop,
        19 if is("proxy-authorization") => Field::HopByHop,
        24 if is(KNATIVE_REVISION) => Field::KnativeRoute,
        25 if is(KNATIVE_NAMESPACE) => Field::KnativeRoute,
        _ => Field::Other,
    }
}

/// The rule for a `HeaderMap` name (lowercase already).
pub(crate) fn of(name: &HeaderName) -> Field {
    field(name.as_str().as_bytes())
}

/// A name with `_`: dropped under `drop_underscore_headers` (a backend may read it as the same
/// field as its `-` spelling, which a client could use to smuggle a value past checks).
#[inline]
pub(crate) fn underscored(name: &[u8]) -> bool {
    name.contains(&b'_')
}

/// Whether a `Connection` value asks for nothing but `close` or `keep-alive`; `close` is
/// reported through `close`. Any other token lists a hop-by-hop field (or asks for an upgrade).
pub(crate) fn plain_connection(value: &[u8], close: &mut bool) -> bool {
    let mut plain = true;
    for token in value.split(|b| *b == b',') {
        let token = token.trim_ascii();
        if token.eq_ignore_ascii_case(b"close") {
            *close = true;
        } else if !(token.is_empty() || token.eq_ignore_ascii_case(b"keep-alive")) {
            plain = false;
        }
    }
    plain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_finds_its_rule_in_any_case() {
        let cases = [
            ("te", Field::Te),
            ("Host", Field::Host),
            ("EXPECT", Field::Expect),
            ("upgrade", Field::Upgrade),
            ("Trailer", Field::Trailer),
            ("connection", Field::Connection),
            ("Keep-Alive", Field::HopByHop),
            ("content-length", Field::ContentLength),
            ("X-Forwarded-For", Field::XForwardedFor),
            ("k-network-probe", Field::KnativeProbe),
            ("K-Original-Host", Field::KnativeSet),
            ("k-proxy-request", Field::KnativeSet),
            ("x-forwarded-host", Field::XForwardedOwn),
            ("Proxy-Connection", Field::HopByHop),
            ("x-forwarded-proto", Field::XForwardedOwn),
            ("transfer-encoding", Field::TransferEncoding),
            ("proxy-authenticate", Field::HopByHop),
            ("proxy-authorization", Field::HopByHop),
            ("Knative-Serving-Revision", Field::KnativeRoute),
            ("knative-serving-namespace", Field::KnativeRoute),
            ("x-request-id", Field::Other),
            ("k-network-hash", Field::Other),
        ];
        for (name, rule) in cases {
            assert_eq!(field(name.as_bytes()), rule, "{name}");
            let lower = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert_eq!(of(&lower), rule, "{name}");
        }
    }

    #[test]
    fn hop_by_hop_and_protected_never_overlap() {
        for f in [
            Field::Host,
            Field::ContentLength,
            Field::TransferEncoding,
            Field::Connection,
            Field::Upgrade,
            Field::Te,
            Field::Trailer,
            Field::HopByHop,
            Field::Expect,
            Field::XForwardedFor,
            Field::XForwardedOwn,
            Field::KnativeRoute,
            Field::KnativeSet,
            Field::KnativeProbe,
            Field::Other,
        ] {
            assert!(!(f.hop_by_hop() && f.protected()), "{f:?}");
        }
    }

    #[test]
    fn connection_values_other_than_close_and_keep_alive_are_not_plain() {
        let mut close = false;
        assert!(plain_connection(b"keep-alive", &mut close) && !close);
        assert!(plain_connection(b" Close , keep-alive", &mut close) && close);
        let mut close = false;
        assert!(!plain_connection(b"close, x-secret", &mut close));
        assert!(!plain_connection(b"upgrade", &mut close));
    }
}
