//! Limits and bad input: the bounds on what a client may send, and the checks a request passes
//! before it is routed. The listeners ([`crate::server`], [`crate::tls`]) give hyper the size
//! limits below; hyper answers a head that breaks them itself (`431`, `400`). What hyper lets
//! through but a proxy must not forward is caught here by [`check_request`], first thing in
//! the proxy, so nothing of such a request reaches a backend.

use http::header::{self, HeaderValue};
use http::Request;

use crate::error::ProxyError;

/// Largest request head (request line and headers) read from a client, in bytes; larger gets
/// `431`. Bounds HTTP/1's read buffer and HTTP/2's header list.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header fields in one HTTP/1 request; more gets `431`.
pub const MAX_HEADERS: usize = 100;
/// Longest request target (path and query) forwarded, in bytes; longer gets `414`.
pub const MAX_URI_BYTES: usize = 16 * 1024;

/// Rejects what must not be forwarded: an over-long target, a Host that is not one visible-ASCII
/// value, and a transfer coding other than a single `chunked` (the only one Reveille decodes; a
/// body in any other coding would reach the backend without its framing).
pub fn check_request<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return Err(ProxyError::UriTooLong { len: target });
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
