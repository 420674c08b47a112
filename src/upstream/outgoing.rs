//! A client request rewritten for the backends: hop-by-hop fields removed (the rule in
//! [`crate::fields`]), `Host` kept, `X-Forwarded-*` set.

use super::*;

pub(super) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(super) static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub(super) static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether `name` is hop-by-hop by itself (not by being listed in `Connection`): the rule in
/// [`crate::fields`].
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    crate::fields::of(name).hop_by_hop()
}

/// Fields a `Connection` list cannot remove (the rule in [`crate::fields`]): `Host`, the
/// body's framing, and the fields Reveille sets itself.
pub fn is_protected(name: &HeaderName) -> bool {
    crate::fields::of(name).protected()
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`
/// (except the [`is_protected`] ones).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there is none: one pass over the few names present costs less than a hashed
    // lookup per hop-by-hop name. (Names listed in `Connection` need `Connection` itself.)
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Every `Connection` line counts, and a name counts even beside non-UTF-8 junk.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect();
    for name in listed {
        if !is_protected(&name) {
            headers.remove(name);
        }
    }
    headers.remove(header::CONNECTION);
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    // `TE: trailers` is the one TE value HTTP/2 allows; gRPC needs it end to end.
    if headers
        .get_all(header::TE)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::UPGRADE);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::PROXY_AUTHENTICATE);
}

/// A client request rewritten for the backends: hop-by-hop headers removed (the upgrade pair
/// kept for upgrades), Host kept, `X-Forwarded-*` set. Each attempt builds its request from it.
pub struct Outgoing {
    pub(super) method: http::Method,
    pub(super) path_and_query: http::uri::PathAndQuery,
    pub(super) headers: HeaderMap,
}

impl Outgoing {
    /// Rewrites the head of a client request. `upgrade` is the `Upgrade` value to pass on.
    pub fn new(
        parts: http::request::Parts,
        client: SocketAddr,
        proto: &'static str,
        upgrade: Option<HeaderValue>,
    ) -> Self {
        Self::with_client_ip(parts, &client_ip(client), proto, upgrade)
    }

    /// [`Outgoing::new`] with the client's address already made a header value
    /// ([`client_ip`], once per connection rather than per request).
    pub fn with_client_ip(
        parts: http::request::Parts,
        client_ip: &HeaderValue,
        proto: &'static str,
        upgrade: Option<HeaderValue>,
    ) -> Self {
        let http::request::Parts {
            method,
            uri,
            mut headers,
            ..
        } = parts;
        strip_hop_by_hop(&mut headers);
        if let Some(u) = upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, u);
        }
        let host = match headers.get(header::HOST) {
            Some(host) => Some(host.clone()),
            // HTTP/2 clients send :authority instead of Host.
            None => uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .inspect(|v| {
                    headers.insert(header::HOST, v.clone());
                }),
        };
        if let Some(host) = host {
            headers.insert(&X_FORWARDED_HOST, host);
        }
        // Every earlier hop, however many lines they came on (RFC 9110 §5.3), then the client.
        match headers.entry(&X_FORWARDED_FOR) {
            header::Entry::Vacant(e) => {
                e.insert(client_ip.clone());
            }
            header::Entry::Occupied(mut e) => {
                let mut xff = Vec::new();
                for prev in e.iter() {
                    if prev.to_str().is_ok() {
                        xff.extend_from_slice(prev.as_bytes());
                        xff.extend_from_slice(b", ");
                    }
                }
                xff.extend_from_slice(client_ip.as_bytes());
                if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(xff)) {
                    // Replaces every earlier line.
                    e.insert(v);
                }
            }
        }
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        let path_and_query = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        Outgoing {
            method,
            path_and_query,
            headers,
        }
    }

    /// The method.
    pub fn method(&self) -> &http::Method {
        &self.method
    }

    /// The (rewritten) headers.
    pub fn headers_mut(&mut self) -> &mut HeaderMap {
        &mut self.headers
    }

    /// The request for one attempt at `authority` (through a hyper-util client, which wants an
    /// absolute URI). With `keep_headers` the headers are copied for another attempt, else moved.
    pub fn request(
        &mut self,
        authority: &http::uri::Authority,
        protocol: Protocol,
        body: RequestBody,
        keep_headers: bool,
    ) -> Request<RequestBody> {
        let uri = Uri::builder()
            .scheme(if protocol.is_tls() { "https" } else { "http" })
            .authority(authority.clone())
            .path_and_query(self.path_and_query.clone())
            .build()
            .expect("valid parts make a valid URI");
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = match protocol {
            Protocol::Http1 | Protocol::Https => Version::HTTP_11,
            Protocol::H2c | Protocol::H2 => Version::HTTP_2,
        };
        *req.headers_mut() = self.take_headers(keep_headers);
        req
    }

    /// The HTTP/1.1 request for one attempt on a connection of our own (origin-form target).
    pub(super) fn origin_request(
        &mut self,
        body: RequestBody,
        keep_headers: bool,
    ) -> Request<RequestBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = Uri::from(self.path_and_query.clone());
        *req.headers_mut() = self.take_headers(keep_headers);
        req
    }

    pub(super) fn take_headers(&mut self, keep: bool) -> HeaderMap {
        if keep {
            self.headers.clone()
        } else {
            std::mem::take(&mut self.headers)
        }
    }

    /// Takes the headers back from a request that was never written.
    pub(super) fn restore(&mut self, req: Request<RequestBody>) {
        let (parts, _) = req.into_parts();
        if self.headers.is_empty() {
            self.headers = parts.headers;
        }
    }
}

/// A client's address as the value this hop adds to `X-Forwarded-For`.
pub fn client_ip(client: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&client.ip().to_string()).expect("an IP address is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn every_connection_line_and_every_te_value_counts() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"X-Secret, caf\xe9").unwrap(),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.append(header::TE, HeaderValue::from_static("trailers"));
        h.append(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-keep"]);
    }

    #[test]
    pub(super) fn forwarded_headers_join_earlier_hops_and_take_host_from_the_authority() {
        let mut req = Request::get("http://auth.test:81/p?q=1").body(()).unwrap();
        let h = req.headers_mut();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        );
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        let (parts, ()) = req.into_parts();
        let ip = client_ip(([192, 0, 2, 7], 4000).into());
        let out = Outgoing::with_client_ip(parts, &ip, "https", None);
        let xff: Vec<_> = out.headers.get_all(&X_FORWARDED_FOR).iter().collect();
        assert_eq!(xff, ["10.0.0.1, 10.0.0.2, 192.0.2.7"]);
        assert_eq!(out.headers[header::HOST], "auth.test:81");
        assert_eq!(out.headers[&X_FORWARDED_HOST], "auth.test:81");
        assert_eq!(out.headers[&X_FORWARDED_PROTO], "https");
        assert_eq!(out.path_and_query, "/p?q=1");

        // No earlier hop: the connection's value as it is.
        let (parts, ()) = Request::get("/").body(()).unwrap().into_parts();
        let out = Outgoing::with_client_ip(parts, &ip, "http", None);
        assert_eq!(out.headers[&X_FORWARDED_FOR], "192.0.2.7");
        assert!(!out.headers.contains_key(header::HOST));
    }

    #[test]
    pub(super) fn strips_hop_by_hop_and_connection_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        h.insert(header::HOST, HeaderValue::from_static("a.b"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("x-keep"));
        assert!(h.contains_key(header::HOST));
    }

    #[test]
    pub(super) fn connection_cannot_remove_host_framing_or_our_own_fields() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static(
                "host, content-length, x-forwarded-for, X-Forwarded-Host, k-original-host, x-gone",
            ),
        );
        for name in [
            "host",
            "content-length",
            "x-forwarded-for",
            "x-forwarded-host",
            "k-original-host",
            "x-gone",
        ] {
            h.insert(name, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(
            left,
            [
                "content-length",
                "host",
                "k-original-host",
                "x-forwarded-for",
                "x-forwarded-host"
            ]
        );
    }
}
