//! Random input for the fast path's parsers (`scripts/fuzz.sh` runs the integration
//! properties; these run with `cargo test`, `PROPTEST_CASES` for more).
use super::*;
use proptest::prelude::*;
use proptest::sample::select;

/// A chunked body from `sizes` (one chunk each, then the last chunk), with extensions and
/// trailers when asked.
fn chunked_body(sizes: &[usize], ext: bool, trailers: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    for (i, n) in sizes.iter().enumerate() {
        b.extend_from_slice(format!("{n:x}").as_bytes());
        if ext {
            b.extend_from_slice(format!(";k{i}=v").as_bytes());
        }
        b.extend_from_slice(b"\r\n");
        b.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, *n));
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"0\r\n");
    for t in trailers {
        b.extend_from_slice(t.as_bytes());
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"\r\n");
    b
}

proptest! {
    /// However a chunked body is cut into reads, its end is found exactly, and bytes after
    /// it are not taken.
    #[test]
    fn the_chunked_end_is_found_at_any_split(
        sizes in proptest::collection::vec(1usize..600, 0..6),
        ext in any::<bool>(),
        trailers in proptest::collection::vec(select(vec!["X-A: 1", "Grpc-Status: 0", "T:"]), 0..3),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..5),
        after in select(vec![&b""[..], b"HTTP/1.1 200 OK\r\n", b"0\r\n\r\n"]),
    ) {
        let body = chunked_body(&sizes, ext, &trailers);
        let mut stream = body.clone();
        stream.extend_from_slice(after);
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();
        let mut scanner = chunked::Scanner::default();
        let mut at = 0;
        let mut end = None;
        for cut in cuts {
            if cut <= at {
                continue;
            }
            if let Some(n) = scanner.feed(&stream[at..cut]).unwrap() {
                end = Some(at + n);
                break;
            }
            at = cut;
        }
        prop_assert_eq!(end, Some(body.len()));
    }

    /// Random bytes never panic the scanner.
    #[test]
    fn random_bytes_never_panic_the_scanner(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = chunked::Scanner::default().feed(&data);
    }
}

const NAMES: &[&str] = &[
    "Host",
    "host",
    "Content-Length",
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "Proxy-Authorization",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "Accept",
    "User-Agent",
    "X-Custom",
    "Cookie",
    "TE",
    "Upgrade",
    "Expect",
    "Transfer-Encoding",
    "Trailer",
];
const VALUES: &[&str] = &[
    "web.test",
    "WEB.test:80",
    "0",
    "5",
    "close",
    "keep-alive",
    "Upgrade",
    "x-custom",
    "10.0.0.1",
    "chunked",
    "*/*",
    "a=b; c=d",
    "",
];

fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "upgrade",
        "trailer",
        "transfer-encoding",
    ]
    .contains(&name.to_ascii_lowercase().as_str())
}

proptest! {
    /// A head the fast path forwards is one HTTP/1.1 head for the backend: it parses, has no
    /// hop-by-hop field, sets each `X-Forwarded-*` once, and keeps every other field of the
    /// client's head in order.
    #[test]
    fn a_forwarded_head_is_well_formed(
        method in select(vec!["GET", "HEAD", "POST", "DELETE", "PATCH"]),
        fields in proptest::collection::vec((select(NAMES.to_vec()), select(VALUES.to_vec())), 0..10),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let p = rt.block_on(proxy());
        let mut head = format!("{method} /p?q=1 HTTP/1.1\r\n");
        for (n, v) in &fields {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = Vec::new();
        let Plan::Forward(f) = plan(head.as_bytes(), &mut out, &p) else {
            return Ok(());
        };
        prop_assert_eq!(f.head_len, head.len());
        let mut parsed = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut parsed);
        prop_assert_eq!(req.parse(&out).unwrap(), httparse::Status::Complete(out.len()));
        prop_assert_eq!(req.method, Some(method));
        prop_assert_eq!(req.path, Some("/p?q=1"));
        let names: Vec<String> = req.headers.iter().map(|h| h.name.to_ascii_lowercase()).collect();
        prop_assert!(!names.iter().any(|n| is_hop_by_hop(n)), "{:?}", names);
        for own in ["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"] {
            prop_assert_eq!(names.iter().filter(|n| *n == own).count(), 1, "{}", own);
        }
        let kept: Vec<String> = fields
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase())
            .filter(|n| !is_hop_by_hop(n) && !n.starts_with("x-forwarded-"))
            .collect();
        let sent: Vec<String> = names
            .iter()
            .filter(|n| !n.starts_with("x-forwarded-"))
            .cloned()
            .collect();
        prop_assert_eq!(sent, kept);
    }

    /// Any backend bytes give a response head that parses, or a refusal; never a panic.
    #[test]
    fn any_backend_head_is_rewritten_or_refused(
        status in select(vec!["200 OK", "204 No Content", "304 Not Modified", "100 Continue", "101 Switching", "404 ", "099 X"]),
        fields in proptest::collection::vec((select(NAMES.to_vec()), select(VALUES.to_vec())), 0..8),
        cold in any::<bool>(),
        head_method in any::<bool>(),
    ) {
        let mut resp = format!("HTTP/1.1 {status}\r\n");
        for (n, v) in &fields {
            resp.push_str(&format!("{n}: {v}\r\n"));
        }
        resp.push_str("\r\n");
        let mut out = Vec::new();
        let ctx = ResponseCtx { cold, close: false, head_method };
        if let Parsed::Complete(h) = response_head(resp.as_bytes(), &mut out, ctx) {
            let mut parsed = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut parsed);
            prop_assert_eq!(r.parse(&out).unwrap(), httparse::Status::Complete(out.len()));
            let names: Vec<String> = r.headers.iter().map(|h| h.name.to_ascii_lowercase()).collect();
            let te = names.iter().filter(|n| *n == "transfer-encoding").count();
            prop_assert!(te <= 1);
            if h.framing == Framing::Chunked {
                prop_assert!(!names.iter().any(|n| n == "content-length"));
            }
            prop_assert_eq!(te == 1, matches!(h.framing, Framing::Chunked | Framing::UntilClose));
        }
    }
}
