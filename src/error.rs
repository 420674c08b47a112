//! Errors of the request path, and the one place that turns them into responses.
//!
//! Every part of the proxy returns a [`ProxyError`]; [`ProxyError::status`],
//! [`ProxyError::kind`] and [`ProxyError::retry_after`] decide what the client sees and which
//! metric label counts it. Nothing else writes error responses.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

/// Why Reveille answered a request itself instead of the backend.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// The request carried no Host header or authority.
    #[error("request has no Host header")]
    MissingHost,
    /// The Host header is not one visible-ASCII value (several Host headers, or bytes ≥ 0x80).
    #[error("request has an invalid Host header")]
    InvalidHost,
    /// The request target is longer than [`crate::config::MAX_URI_BYTES`].
    #[error(
        "request target of {len} bytes is too long (limit {})",
        crate::config::MAX_URI_BYTES
    )]
    UriTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// `Transfer-Encoding` is not a single `chunked`, so the body's framing cannot be kept.
    #[error("unsupported Transfer-Encoding (only a single \"chunked\" is accepted)")]
    BadTransferEncoding,
    /// An absolute-form target (HTTP/1.1) or `:authority` (HTTP/2) names another host than the
    /// `Host` field: which one routes would be a guess, so neither does (RFC 9112 §3.2.2).
    #[error("request target and Host name different hosts")]
    AmbiguousHost,
    /// The path has a `.` or `..` segment (also percent-encoded, or between `\` or `%2F`): a
    /// backend that resolves it would escape the path prefix the request was routed by.
    #[error("request path has dot segments")]
    DotSegments,
    /// `CONNECT` is not proxied: Reveille forwards requests to services, it is not a tunnel.
    #[error("CONNECT is not allowed")]
    ConnectNotAllowed,
    /// The request body's chunked framing is malformed.
    #[error("malformed request body (chunked framing)")]
    BadBody,
    /// The request body sent no bytes within `timeouts.client_body`.
    #[error("request body stalled for {}", humantime::format_duration(*.after))]
    BodyTimeout {
        /// The timeout.
        after: Duration,
    },
    /// No service is configured for the request's host and path.
    #[error("no service for host {host:?}")]
    NoRoute {
        /// The host as sent (truncated).
        host: Box<str>,
    },
    /// The service's hold queue is at capacity.
    #[error("service {service:?}: hold queue is full ({capacity} requests held); retry later")]
    QueueFull {
        /// Service name.
        service: Arc<str>,
        /// The queue's capacity.
        capacity: usize,
    },
    /// Reveille holds as many requests as `limits.max_held` allows, all services together.
    #[error("service {service:?}: Reveille holds its limit of {limit} requests; retry later")]
    HeldLimit {
        /// Service name.
        service: Arc<str>,
        /// The global limit.
        limit: usize,
    },
    /// The request was held until its deadline without a ready backend.
    #[error("service {service:?}: no ready backend within the hold timeout of {}", humantime::format_duration(*.waited))]
    HoldTimeout {
        /// Service name.
        service: Arc<str>,
        /// How long it was held.
        waited: Duration,
    },
    /// The backend could not be started.
    #[error("service {service:?}: backend failed to start: {reason}")]
    ActivationFailed {
        /// Service name.
        service: Arc<str>,
        /// What went wrong (exit status, spawn error).
        reason: Arc<str>,
    },
    /// The backend was started but did not become ready in time.
    #[error("service {service:?}: backend did not become ready: {reason}")]
    ActivationTimeout {
        /// Service name.
        service: Arc<str>,
        /// What was waited for.
        reason: Arc<str>,
    },
    /// Reveille is shutting down and the service's backend is being stopped.
    #[error("service {service:?}: Reveille is shutting down")]
    ShuttingDown {
        /// Service name.
        service: Arc<str>,
    },
    /// The service was removed from the configuration while the request was held.
    #[error("service {service:?} was removed")]
    ServiceRemoved {
        /// Service name.
        service: Arc<str>,
    },
    /// Connecting to the backend failed.
    #[error("service {service:?}: backend unreachable")]
    UpstreamConnect {
        /// Service name.
        service: Arc<str>,
    },
    /// The backend did not send response headers within `timeouts.upstream_response`.
    #[error("service {service:?}: backend did not answer within {}", humantime::format_duration(*.after))]
    UpstreamTimeout {
        /// Service name.
        service: Arc<str>,
        /// The timeout.
        after: Duration,
    },
    /// The backend failed while the request was sent or the response read.
    #[error("service {service:?}: backend failed to answer")]
    Upstream {
        /// Service name.
        service: Arc<str>,
    },
}

impl ProxyError {
    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingHost
            | ProxyError::InvalidHost
            | ProxyError::BadTransferEncoding
            | ProxyError::AmbiguousHost
            | ProxyError::DotSegments
            | ProxyError::BadBody => StatusCode::BAD_REQUEST,
            ProxyError::ConnectNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::QueueFull { .. }
            | ProxyError::HeldLimit { .. }
            | ProxyError::ShuttingDown { .. }
            | ProxyError::ServiceRemoved { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::HoldTimeout { .. }
            | ProxyError::ActivationTimeout { .. }
            | ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ActivationFailed { .. }
            | ProxyError::UpstreamConnect { .. }
            | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// A stable, bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::MissingHost => "missing_host",
            ProxyError::InvalidHost => "invalid_host",
            ProxyError::UriTooLong { .. } => "uri_too_long",
            ProxyError::BadTransferEncoding => "bad_transfer_encoding",
            ProxyError::AmbiguousHost => "ambiguous_host",
            ProxyError::DotSegments => "dot_segments",
            ProxyError::ConnectNotAllowed => "connect_not_allowed",
            ProxyError::BadBody => "bad_body",
            ProxyError::BodyTimeout { .. } => "body_timeout",
            ProxyError::NoRoute { .. } => "no_route",
            ProxyError::QueueFull { .. } => "queue_full",
            ProxyError::HeldLimit { .. } => "held_limit",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::HoldTimeout { .. } => "hold_timeout",
            ProxyError::ActivationFailed { .. } => "activation_failed",
            ProxyError::ActivationTimeout { .. } => "activation_timeout",
            ProxyError::ShuttingDown { .. } => "shutting_down",
            ProxyError::ServiceRemoved { .. } => "service_removed",
            ProxyError::UpstreamConnect { .. } => "upstream_connect",
            ProxyError::Upstream { .. } => "upstream_error",
        }
    }

    /// `Retry-After` seconds, for errors a client should retry.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            ProxyError::QueueFull { .. }
            | ProxyError::HeldLimit { .. }
            | ProxyError::ShuttingDown { .. }
            | ProxyError::ServiceRemoved { .. } => Some(1),
            _ => None,
        }
    }

    /// The fields of Reveille's own answer besides its framing and `Date`, one list for both
    /// request paths: the body's type, the kind, and `Retry-After` where a retry makes sense.
    pub fn answer_fields(
        &self,
    ) -> impl Iterator<Item = (&'static str, std::borrow::Cow<'static, str>)> {
        use std::borrow::Cow;
        [
            Some(("content-type", Cow::Borrowed("text/plain; charset=utf-8"))),
            Some(("x-reveille-error", Cow::Borrowed(self.kind()))),
            self.retry_after()
                .map(|secs| ("retry-after", Cow::Owned(secs.to_string()))),
            matches!(self, ProxyError::ConnectNotAllowed).then_some((
                "allow",
                Cow::Borrowed("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),
            )),
        ]
        .into_iter()
        .flatten()
    }

    /// Whether the answer closes the connection: a request that was not understood leaves
    /// nothing after it on the connection to trust.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self.status(),
            StatusCode::BAD_REQUEST | StatusCode::REQUEST_TIMEOUT | StatusCode::METHOD_NOT_ALLOWED
        )
    }

    /// The response body: one line naming the service and the reason.
    pub fn body(&self) -> String {
        format!("reveille: {self}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> Arc<str> {
        Arc::from("hello")
    }

    #[test]
    fn each_error_maps_to_its_status_kind_and_retry_after() {
        let cases: Vec<(ProxyError, u16, &str, Option<u32>)> = vec![
            (ProxyError::MissingHost, 400, "missing_host", None),
            (ProxyError::InvalidHost, 400, "invalid_host", None),
            (
                ProxyError::UriTooLong { len: 20_000 },
                414,
                "uri_too_long",
                None,
            ),
            (
                ProxyError::BadTransferEncoding,
                400,
                "bad_transfer_encoding",
                None,
            ),
            (
                ProxyError::NoRoute { host: "x".into() },
                404,
                "no_route",
                None,
            ),
            (
                ProxyError::QueueFull {
                    service: svc(),
                    capacity: 3,
                },
                503,
                "queue_full",
                Some(1),
            ),
            (
                ProxyError::HoldTimeout {
                    service: svc(),
                    waited: Duration::from_secs(30),
                },
                504,
                "hold_timeout",
                None,
            ),
            (
                ProxyError::ActivationFailed {
                    service: svc(),
                    reason: "exit 1".into(),
                },
                502,
                "activation_failed",
                None,
            ),
            (
                ProxyError::ActivationTimeout {
                    service: svc(),
                    reason: "60s".into(),
                },
                504,
                "activation_timeout",
                None,
            ),
            (
                ProxyError::ShuttingDown { service: svc() },
                503,
                "shutting_down",
                Some(1),
            ),
            (
                ProxyError::ServiceRemoved { service: svc() },
                503,
                "service_removed",
                Some(1),
            ),
            (
                ProxyError::UpstreamConnect { service: svc() },
                502,
                "upstream_connect",
                None,
            ),
            (
                ProxyError::Upstream { service: svc() },
                502,
                "upstream_error",
                None,
            ),
            (
                ProxyError::HeldLimit {
                    service: svc(),
                    limit: 9,
                },
                503,
                "held_limit",
                Some(1),
            ),
            (
                ProxyError::UpstreamTimeout {
                    service: svc(),
                    after: Duration::from_secs(1),
                },
                504,
                "upstream_timeout",
                None,
            ),
            (ProxyError::AmbiguousHost, 400, "ambiguous_host", None),
            (ProxyError::DotSegments, 400, "dot_segments", None),
            (
                ProxyError::ConnectNotAllowed,
                405,
                "connect_not_allowed",
                None,
            ),
            (ProxyError::BadBody, 400, "bad_body", None),
            (
                ProxyError::BodyTimeout {
                    after: Duration::from_secs(1),
                },
                408,
                "body_timeout",
                None,
            ),
        ];
        for (e, status, kind, retry) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
            assert_eq!(e.kind(), kind, "{e}");
            assert_eq!(e.retry_after(), retry, "{e}");
        }
    }

    #[test]
    fn bodies_name_the_service_and_reason() {
        let e = ProxyError::QueueFull {
            service: svc(),
            capacity: 7,
        };
        assert_eq!(
            e.body(),
            "reveille: service \"hello\": hold queue is full (7 requests held); retry later\n"
        );
        let e = ProxyError::HoldTimeout {
            service: svc(),
            waited: Duration::from_millis(1500),
        };
        assert_eq!(
            e.body(),
            "reveille: service \"hello\": no ready backend within the hold timeout of 1s 500ms\n"
        );
    }
}
