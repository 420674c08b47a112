//! The one place an error becomes an answer, for both engines: the status, Reveille's fields
//! (`x-reveille-error`, `Retry-After`, ...), the one-line body, and whether the connection
//! closes come from the [`ProxyError`]; hyper's path gets them as a `Response`
//! ([`error_response`]), the fast path as head bytes ([`error_head`]). Each refusal is counted
//! and logged here too ([`rejected`]).

use http::header::{self, HeaderValue};
use http::Response;
use tokio::time::Instant;
use tracing::debug;

use super::ProxyBody;
use crate::error::ProxyError;
use crate::gate::Gate;

/// Reveille's answer as a `Response` (hyper's path): the connection closes where
/// [`ProxyError::closes_connection`] says.
pub fn error_response(e: &ProxyError) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::local(e.body()));
    *resp.status_mut() = e.status();
    let h = resp.headers_mut();
    for (name, value) in e.answer_fields() {
        let value = HeaderValue::from_str(&value).expect("Reveille's own fields are plain ASCII");
        h.insert(name, value);
    }
    if e.closes_connection() {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Reveille's answer as HTTP/1.1 head and body bytes in `out` (the fast path), from the same
/// fields as [`error_response`]; `close` is the fast path's decision (it includes
/// [`ProxyError::closes_connection`]).
pub(crate) fn error_head(out: &mut Vec<u8>, e: &ProxyError, close: bool) {
    let status = e.status();
    let body = e.body();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in e.answer_fields() {
        put_field(out, name.as_bytes(), value.as_bytes());
    }
    put_field(out, b"content-length", body.len().to_string().as_bytes());
    put_date(out);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
}

/// Counts and logs a request of `gate`'s that gets Reveille's answer for `e`.
pub(crate) fn rejected(gate: &Gate, e: &ProxyError, arrived: Instant) {
    gate.metrics().rejected(e.kind());
    debug!(service = %gate.name(), kind = e.kind(), "rejected: {e}");
    gate.metrics()
        .request(e.status().as_u16(), arrived.elapsed().as_secs_f64());
}

/// Appends one `name: value` line.
pub(crate) fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends a `date` field for now; the date is formatted once a second per thread (as hyper's
/// server caches it), not per response.
pub(crate) fn put_date(out: &mut Vec<u8>) {
    use std::cell::Cell;
    use std::io::Write;
    use std::time::{SystemTime, UNIX_EPOCH};
    /// An IMF-fixdate is 29 bytes.
    type Date = [u8; 29];
    thread_local! {
        static DATE: Cell<(u64, Date)> = const { Cell::new((u64::MAX, [b' '; 29])) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let date = DATE.with(|cached| {
        let (at, mut date) = cached.get();
        if at != secs {
            let _ = write!(&mut date[..], "{}", httpdate::HttpDate::from(now));
            cached.set((secs, date));
        }
        date
    });
    put_field(out, b"date", &date);
}
