//! The request head: parsed in place, checked, routed, and (for a common request) rewritten
//! for the backend; anything else goes to hyper's path.

use super::*;

/// What to do with the bytes read so far.
pub(super) enum Plan {
    /// The head is not complete yet.
    Partial,
    /// Not for the fast path: hyper serves the connection from here.
    Handoff,
    /// A common request, its backend head written.
    Forward(Forward),
}

pub(super) struct Forward {
    pub(super) gate: Arc<Gate>,
    pub(super) head_len: usize,
    /// Request body bytes (`Content-Length`), after the head.
    pub(super) body: usize,
    /// The client asked to close after this request.
    pub(super) close: bool,
    pub(super) idempotent: bool,
    /// A `HEAD` request: the response has no body.
    pub(super) head: bool,
}

/// Whether a request field leaves the request to hyper's path: framing or protocol meaning
/// (`Transfer-Encoding`, `TE`, `Trailer`, `Upgrade`, `Expect`) or Knative's fields, which hyper's
/// path strips or acts on.
pub(super) fn needs_hyper(f: Field) -> bool {
    matches!(
        f,
        Field::TransferEncoding
            | Field::Te
            | Field::Trailer
            | Field::Upgrade
            | Field::Expect
            | Field::KnativeRoute
            | Field::KnativeSet
            | Field::KnativeProbe
    )
}

/// A header value `HeaderValue::to_str` accepts: visible ASCII, spaces and tabs.
pub(super) fn visible_ascii(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// A byte the fast path passes in a request target: RFC 3986 unreserved, sub-delims, `:`, `@`,
/// `/`, `?`, `%`. Anything else goes to hyper, whose URI parser decides.
pub(super) fn plain_target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// What a request's fields say, when the fast path can take it.
struct Checked<'h> {
    host: Option<&'h [u8]>,
    /// `Connection: close`.
    close: bool,
    body: Option<u64>,
    /// `X-Forwarded-For` came from the client.
    xff: bool,
}

/// Checks a request's fields, noting each one's kind in `kinds`; `None` when the request is
/// for hyper's path.
fn check_fields<'h>(headers: &[httparse::Header<'h>], kinds: &mut [Field]) -> Option<Checked<'h>> {
    let mut c = Checked {
        host: None,
        close: false,
        body: None,
        xff: false,
    };
    for (h, kind) in headers.iter().zip(kinds.iter_mut()) {
        *kind = fields::field(h.name.as_bytes());
        match *kind {
            Field::Host => {
                if c.host.is_some() || !visible_ascii(h.value) {
                    return None;
                }
                c.host = Some(h.value);
            }
            Field::ContentLength => match (c.body, parse_length(h.value)) {
                (None, Some(n)) if n <= MAX_FAST_BODY => c.body = Some(n),
                // Several, invalid or large: hyper's path judges or streams it.
                _ => return None,
            },
            // Lists other fields as hop-by-hop (or asks for an upgrade).
            Field::Connection if !fields::plain_connection(h.value, &mut c.close) => return None,
            Field::XForwardedFor => c.xff = true,
            f if needs_hyper(f) => return None,
            _ => {}
        }
    }
    Some(c)
}

/// Parses the head in `buf` and, for a common request, writes the backend's head into `out`.
pub(super) fn plan(buf: &[u8], out: &mut Vec<u8>, proxy: &Proxy) -> Plan {
    // Uninitialised: httparse writes the fields it finds (initialising the array would cost
    // more than parsing a typical head).
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; FAST_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Plan::Partial,
        Err(_) => return Plan::Handoff,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Plan::Handoff;
    };
    if method == "CONNECT"
        || !target.starts_with('/')
        || target.len() > MAX_URI_BYTES
        || !target.bytes().all(plain_target_byte)
    {
        return Plan::Handoff;
    }
    if head_len > MAX_HEADER_BYTES {
        // hyper answers 431.
        return Plan::Handoff;
    }
    // Each field's kind, found once for the checks and the rewrite.
    let mut kinds = [Field::Other; FAST_HEADERS];
    let Some(Checked {
        host,
        close,
        body,
        xff,
    }) = check_fields(req.headers, &mut kinds)
    else {
        return Plan::Handoff;
    };
    let Some(host) = host.and_then(|h| std::str::from_utf8(h).ok()) else {
        return Plan::Handoff;
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if crate::route::checks::has_dot_segments(path.as_bytes()) {
        // hyper's path answers 400.
        return Plan::Handoff;
    }
    let gate = {
        let snapshot = proxy.shared.services.load();
        match snapshot.router.lookup(host, path) {
            Some(g) => g.clone(),
            None => return Plan::Handoff,
        }
    };
    // A request that may ask for a rollout candidate is decided on hyper's path.
    if !serves(gate.settings())
        || gate.may_want_candidate(req.headers.iter().map(|h| h.name.as_bytes()))
    {
        return Plan::Handoff;
    }
    out.clear();
    out.reserve(head_len + 128);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let underscores = !proxy.shared.drop_underscore_headers;
    for (h, kind) in req.headers.iter().zip(kinds) {
        let name = h.name.as_bytes();
        let keep = match kind {
            Field::Host | Field::ContentLength => true,
            Field::Other => underscores || !fields::underscored(name),
            // Hop-by-hop, or set by this hop below.
            _ => false,
        };
        if keep {
            put_field(out, name, h.value);
        }
    }
    put_field(out, b"x-forwarded-host", host.as_bytes());
    // Every earlier hop, however many lines they came on (RFC 9110 §5.3), then the client.
    out.extend_from_slice(b"x-forwarded-for: ");
    if xff {
        for (h, kind) in req.headers.iter().zip(kinds) {
            if kind == Field::XForwardedFor && visible_ascii(h.value) {
                out.extend_from_slice(h.value);
                out.extend_from_slice(b", ");
            }
        }
    }
    out.extend_from_slice(proxy.client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    put_field(out, b"x-forwarded-proto", proxy.proto.as_bytes());
    out.extend_from_slice(b"\r\n");
    Plan::Forward(Forward {
        gate,
        head_len,
        body: body.unwrap_or(0) as usize,
        close,
        idempotent: crate::forward::idempotent(method),
        head: method == "HEAD",
    })
}

/// Whether the fast path serves a service: cleartext HTTP/1.1 backends only.
pub(super) fn serves(settings: &crate::gate::GateSettings) -> bool {
    settings.protocol == Protocol::Http1 && settings.upstream.is_none()
}
