//! Router: the first step of a request's way. It picks the service by Host (exact names first,
//! then the most specific `*.suffix` wildcard), then by the longest matching path prefix.
//!
//! A [`Router`] is immutable; reloads build a new one and swap it in atomically, so a lookup
//! takes no lock and allocates nothing for the common lowercase host.

use std::borrow::Cow;
use std::collections::HashMap;

/// Routes requests to values (a service's gate in the proxy) by host and path prefix.
#[derive(Debug)]
pub struct Router<T> {
    exact: HashMap<Box<str>, Routes<T>>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<Box<str>, Routes<T>>,
    /// Knative revisions, keyed by `namespace/revision`.
    revisions: HashMap<Box<str>, T>,
}

#[derive(Debug)]
struct Routes<T> {
    /// Sorted by prefix length, longest first; the catch-all (empty prefix) last.
    entries: Vec<(Box<str>, T)>,
}

impl<T> Routes<T> {
    fn find(&self, path: &str) -> Option<&T> {
        self.entries
            .iter()
            .find(|(prefix, _)| prefix_matches(prefix, path))
            .map(|(_, v)| v)
    }
}

/// Segment-aware prefix match: `/api` matches `/api`, `/api/x`, `/api?q`, not `/apix`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
        None => false,
    }
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Router {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            revisions: HashMap::new(),
        }
    }
}

impl<T> Router<T> {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route. `host` is a lowercase name or `*.suffix`; `prefix` is a path prefix without
    /// a trailing slash (empty or `None` for all paths). A later duplicate replaces an earlier one.
    pub fn insert(&mut self, host: &str, prefix: Option<&str>, value: T) {
        let prefix: Box<str> = prefix.unwrap_or("").trim_end_matches('/').into();
        let host = host.to_ascii_lowercase();
        let (map, key) = match host.strip_prefix("*.") {
            Some(suffix) => (&mut self.wildcard, suffix.to_string()),
            None => (&mut self.exact, host),
        };
        let routes = map.entry(key.into()).or_insert_with(|| Routes {
            entries: Vec::new(),
        });
        routes.entries.retain(|(p, _)| *p != prefix);
        routes.entries.push((prefix, value));
        routes
            .entries
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    }

    /// Makes a value reachable as a Knative revision: by the `Knative-Serving-Namespace` and
    /// `Knative-Serving-Revision` headers, or a host `<revision>.<namespace>.svc.<domain>`.
    pub fn insert_revision(&mut self, namespace: &str, revision: &str, value: T) {
        self.revisions
            .insert(format!("{namespace}/{revision}").into(), value);
    }

    /// Whether any value is reachable as a Knative revision (Knative routing is opt-in).
    pub fn has_revisions(&self) -> bool {
        !self.revisions.is_empty()
    }

    /// The value for a Knative revision.
    pub fn lookup_revision(&self, namespace: &str, revision: &str) -> Option<&T> {
        if self.revisions.is_empty() {
            return None;
        }
        let mut key = String::with_capacity(namespace.len() + revision.len() + 1);
        key.push_str(namespace);
        key.push('/');
        key.push_str(revision);
        self.revisions.get(key.as_str())
    }

    /// The value for a host of the form `<revision>.<namespace>.svc.<domain>`.
    pub fn lookup_revision_host(&self, host: &str) -> Option<&T> {
        if self.revisions.is_empty() {
            return None;
        }
        let host = normalize_request_host(host)?;
        let mut labels = host.split('.');
        let (rev, ns, svc) = (labels.next()?, labels.next()?, labels.next()?);
        if svc != "svc" {
            return None;
        }
        self.lookup_revision(ns, rev)
    }

    /// Finds the value for a request's host (as sent: port and case are normalised here)
    /// and path.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&T> {
        let host = normalize_request_host(host)?;
        if let Some(v) = self.exact.get(&*host).and_then(|r| r.find(path)) {
            return Some(v);
        }
        if self.wildcard.is_empty() {
            return None;
        }
        // Walk suffixes from the longest: for a.b.example.com try b.example.com, example.com, com.
        let mut rest: &str = &host;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some(v) = self.wildcard.get(rest).and_then(|r| r.find(path)) {
                return Some(v);
            }
        }
        None
    }
}

/// Strips the port and a trailing dot and lowercases; `None` for an empty host.
pub fn normalize_request_host(host: &str) -> Option<Cow<'_, str>> {
    let host = if let Some(v6) = host.strip_prefix('[') {
        // [::1]:8080 → [::1]
        match v6.find(']') {
            Some(end) => &host[..end + 2],
            None => host,
        }
    } else {
        match host.rfind(':') {
            Some(colon) => &host[..colon],
            None => host,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router<&'static str> {
        let mut r = Router::new();
        r.insert("hello.localhost", None, "hello");
        r.insert("hello.localhost", Some("/api/"), "hello-api");
        r.insert("hello.localhost", Some("/api/v2"), "hello-api-v2");
        r.insert("*.example.com", None, "wild");
        r.insert("*.deep.example.com", None, "wild-deep");
        r.insert("only.example.com", Some("/x"), "only-x");
        r
    }

    #[test]
    fn exact_then_longest_prefix() {
        let r = router();
        assert_eq!(r.lookup("hello.localhost", "/"), Some(&"hello"));
        assert_eq!(r.lookup("hello.localhost:8080", "/api"), Some(&"hello-api"));
        assert_eq!(r.lookup("HELLO.localhost", "/api/x"), Some(&"hello-api"));
        assert_eq!(
            r.lookup("hello.localhost", "/api/v2/y"),
            Some(&"hello-api-v2")
        );
        assert_eq!(r.lookup("hello.localhost", "/apix"), Some(&"hello"));
        assert_eq!(r.lookup("hello.localhost", "/api?q=1"), Some(&"hello-api"));
    }

    #[test]
    fn most_specific_wildcard_wins() {
        let r = router();
        assert_eq!(r.lookup("a.example.com", "/"), Some(&"wild"));
        assert_eq!(r.lookup("a.b.example.com", "/"), Some(&"wild"));
        assert_eq!(r.lookup("a.deep.example.com", "/"), Some(&"wild-deep"));
        assert_eq!(r.lookup("example.com", "/"), None);
        assert_eq!(r.lookup("example.com.", "/"), None);
    }

    #[test]
    fn exact_host_without_matching_prefix_falls_back_to_wildcard() {
        let r = router();
        assert_eq!(r.lookup("only.example.com", "/x/1"), Some(&"only-x"));
        assert_eq!(r.lookup("only.example.com", "/y"), Some(&"wild"));
    }

    #[test]
    fn unknown_and_empty_hosts() {
        let r = router();
        assert_eq!(r.lookup("nope.localhost", "/"), None);
        assert_eq!(r.lookup("", "/"), None);
        assert_eq!(r.lookup(":80", "/"), None);
    }

    #[test]
    fn knative_revisions_by_name_and_by_host() {
        let mut r = router();
        r.insert_revision("integrations", "order-sync-00001", "order");
        assert_eq!(
            r.lookup_revision("integrations", "order-sync-00001"),
            Some(&"order")
        );
        assert_eq!(r.lookup_revision("other", "order-sync-00001"), None);
        assert_eq!(
            r.lookup_revision_host("order-sync-00001.integrations.svc.cluster.local:80"),
            Some(&"order")
        );
        assert_eq!(
            r.lookup_revision_host("order-sync-00001.integrations.example.com"),
            None
        );
    }

    #[test]
    fn normalizes_ports_and_ipv6() {
        assert_eq!(normalize_request_host("[::1]:8080").unwrap(), "[::1]");
        assert_eq!(normalize_request_host("A.b:1").unwrap(), "a.b");
        assert_eq!(normalize_request_host("a.b.").unwrap(), "a.b");
    }
}
