//! Limits and bad input: the bounds on what a client may send, and the checks a request passes
//! before it is routed. The listeners ([`crate::app`], [`crate::listen::tls`]) give hyper the size
//! limits below; hyper answers a head that breaks them itself (`431`, `400`). What hyper lets
//! through but a proxy must not forward is caught here by [`check_request`], first thing in
//! the proxy, so nothing of such a request reaches a backend.

use http::header::{self, HeaderValue};
use http::Request;

use crate::error::ProxyError;

pub use crate::config::{MAX_HEADERS, MAX_HEADER_BYTES, MAX_URI_BYTES};

/// Rejects what must not be forwarded: `CONNECT` (Reveille is no tunnel), an over-long target,
/// a path with dot segments ([`has_dot_segments`]), a Host that is not one visible-ASCII value,
/// and a transfer coding other than a single `chunked` (the only one Reveille decodes; a body in
/// any other coding would reach the backend without its framing).
pub fn check_request<B>(req: &Request<B>) -> Result<(), ProxyError> {
    if req.method() == http::Method::CONNECT {
        return Err(ProxyError::ConnectNotAllowed);
    }
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return Err(ProxyError::UriTooLong { len: target });
    }
    if has_dot_segments(req.uri().path().as_bytes()) {
        return Err(ProxyError::DotSegments);
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    if let Some(host) = hosts.next() {
        // RFC 9112 §3.2: more than one Host, or an invalid one, is a 400.
        if hosts.next().is_some() || host.to_str().is_err() {
            return Err(ProxyError::InvalidHost);
        }
    }
    let mut codings = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    if let Some(te) = codings.next() {
        if codings.next().is_some() || !is_plain_chunked(te) {
            return Err(ProxyError::BadTransferEncoding);
        }
    }
    Ok(())
}

/// The host a request is routed by: the target's authority (absolute-form in HTTP/1.1,
/// `:authority` in HTTP/2) or `Host`. When both are present they must name the same host (port
/// and case aside), else the request is ambiguous: RFC 9112 §3.2.2 lets the target win, and a
/// backend that reads `Host` would see another service's name. Such requests get `400`, as
/// HAProxy answers them.
pub fn routing_host<B>(req: &Request<B>) -> Result<&str, ProxyError> {
    let host = req.headers().get(header::HOST).map(|h| h.to_str());
    let authority = req.uri().authority().map(|a| a.as_str());
    match (host, authority) {
        (Some(Err(_)), _) => Err(ProxyError::InvalidHost),
        (Some(Ok(h)), Some(a)) => {
            let same = match (
                crate::route::router::normalize_request_host(h),
                crate::route::router::normalize_request_host(a),
            ) {
                (Some(h), Some(a)) => h == a,
                _ => false,
            };
            if same {
                Ok(a)
            } else {
                Err(ProxyError::AmbiguousHost)
            }
        }
        (Some(Ok(h)), None) => Ok(h),
        (None, Some(a)) => Ok(a),
        (None, None) => Err(ProxyError::MissingHost),
    }
}

/// Whether a request path (the query, if any, is ignored) has a `.` or `..` segment, also
/// percent-encoded (`%2e`) or between encoded or backslash separators (`%2f`, `\\`, `%5c`).
/// Such a path is refused rather than normalised: routing by the normalised path while the
/// backend resolves the raw one differently (or decodes `%2f`) would let `/public/../private`
/// escape the prefix it was routed by. One scan, shared by both request paths.
pub(crate) fn has_dot_segments(path: &[u8]) -> bool {
    // Dots in the current segment so far; `None` once it holds anything else.
    let mut dots: Option<u8> = Some(0);
    let mut i = 0;
    loop {
        let (c, len) = match path.get(i) {
            None | Some(b'?') | Some(b'#') => (b'/', 0),
            Some(b'%') => match path.get(i + 1..i + 3).and_then(hex_pair) {
                Some(b) => (b, 3),
                None => (b'%', 1),
            },
            Some(&b) => (b, 1),
        };
        match c {
            b'/' | b'\\' => {
                if matches!(dots, Some(1 | 2)) {
                    return true;
                }
                if len == 0 {
                    return false;
                }
                dots = Some(0);
            }
            b'.' => dots = dots.map(|d| d.saturating_add(1)),
            _ => dots = None,
        }
        i += len;
    }
}

fn hex_pair(h: &[u8]) -> Option<u8> {
    let digit = |b: u8| (b as char).to_digit(16);
    Some((digit(h[0])? * 16 + digit(h[1])?) as u8)
}

fn is_plain_chunked(v: &HeaderValue) -> bool {
    v.to_str()
        .is_ok_and(|s| s.trim().eq_ignore_ascii_case("chunked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &[u8])]) -> Request<()> {
        let mut b = Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, HeaderValue::from_bytes(v).unwrap());
        }
        b.body(()).unwrap()
    }

    fn kind(r: Result<(), ProxyError>) -> Option<&'static str> {
        r.err().map(|e| e.kind())
    }

    #[test]
    fn long_targets_are_414() {
        let ok = format!("/{}", "a".repeat(MAX_URI_BYTES - 1));
        assert_eq!(kind(check_request(&req(&ok, &[]))), None);
        let long = format!("/{}", "a".repeat(MAX_URI_BYTES));
        let e = check_request(&req(&long, &[])).unwrap_err();
        assert_eq!(e.kind(), "uri_too_long");
        assert_eq!(e.status(), 414);
    }

    #[test]
    fn hosts_must_be_one_ascii_value() {
        assert_eq!(kind(check_request(&req("/", &[("host", b"a.test")]))), None);
        assert_eq!(kind(check_request(&req("/", &[]))), None);
        assert_eq!(
            kind(check_request(&req("/", &[("host", b"caf\xe9.test")]))),
            Some("invalid_host")
        );
        assert_eq!(
            kind(check_request(&req(
                "/",
                &[("host", b"a.test"), ("host", b"b.test")]
            ))),
            Some("invalid_host")
        );
    }

    #[test]
    fn dot_segments_are_found_however_they_are_written() {
        for bad in [
            "/public/../private/x",
            "/public/./x",
            "/..",
            "/a/..",
            "/a/%2e%2e/b",
            "/a/%2E./b",
            "/a/.%2e",
            "/a%2f..%2fb",
            "/a\\..\\b",
            "/a%5c..%5cb",
            "/a/..?q",
            "/a/.#f",
        ] {
            assert!(has_dot_segments(bad.as_bytes()), "{bad}");
        }
        for ok in [
            "/",
            "/a/b",
            "/a/...",
            "/a/.b/..c/b..",
            "/a/%2e%2e%2e",
            "/file.txt",
            "/a?x=/../",
            "/%zz/%2",
            "*",
            "",
        ] {
            assert!(!has_dot_segments(ok.as_bytes()), "{ok}");
        }
    }

    #[test]
    fn connect_and_dot_segments_are_refused() {
        let connect = Request::connect("a.test:443").body(()).unwrap();
        assert_eq!(kind(check_request(&connect)), Some("connect_not_allowed"));
        assert_eq!(
            kind(check_request(&req("/p/%2e%2e/q", &[("host", b"a")]))),
            Some("dot_segments")
        );
    }

    #[test]
    fn the_target_authority_and_host_must_agree() {
        let abs = |host: Option<&str>| {
            let mut b = Request::get("http://a.test:80/x");
            if let Some(h) = host {
                b = b.header("host", h);
            }
            b.body(()).unwrap()
        };
        assert_eq!(routing_host(&abs(Some("A.test"))).unwrap(), "a.test:80");
        assert_eq!(routing_host(&abs(None)).unwrap(), "a.test:80");
        assert_eq!(
            routing_host(&abs(Some("b.test"))).unwrap_err().kind(),
            "ambiguous_host"
        );
        assert_eq!(
            routing_host(&req("/", &[("host", b"b.test")])).unwrap(),
            "b.test"
        );
        assert_eq!(
            routing_host(&req("/", &[])).unwrap_err().kind(),
            "missing_host"
        );
    }

    #[test]
    fn only_a_single_chunked_coding_passes() {
        for ok in [&b"chunked"[..], b"Chunked", b" chunked "] {
            assert_eq!(
                kind(check_request(&req("/", &[("transfer-encoding", ok)]))),
                None
            );
        }
        for bad in [
            &b"gzip, chunked"[..],
            b"chunked, chunked",
            b"identity",
            b"\xff",
        ] {
            assert_eq!(
                kind(check_request(&req("/", &[("transfer-encoding", bad)]))),
                Some("bad_transfer_encoding"),
                "{bad:?}"
            );
        }
        assert_eq!(
            kind(check_request(&req(
                "/",
                &[
                    ("transfer-encoding", b"chunked"),
                    ("transfer-encoding", b"chunked")
                ]
            ))),
            Some("bad_transfer_encoding")
        );
    }
}
