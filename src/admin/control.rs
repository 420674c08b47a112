//! The admin endpoints that change something: `POST /api/rollouts/{service}/promote` and
//! `/abort` (`promotion: manual`). Closed by default: they need `admin.token_file`, and a
//! request must carry `Authorization: Bearer <token>`, compared in constant time. The file is
//! re-read when its modification time or length changes. No token configured → 403 saying how
//! to enable them; a wrong or missing token → 401. Also the client side, used by
//! `reveille rollout promote|abort`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;

use crate::activate::kubernetes::rollout::board::{Command, CommandError};
use crate::route::services::Services;

/// Longest token accepted from the file or a request, in bytes.
const MAX_TOKEN: usize = 4096;
/// Bound on one command sent by the CLI.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(40);

/// The token last read: the file's modification time and length, and the token.
type Cached = (SystemTime, u64, Arc<[u8]>);

/// The token file and what was last read from it.
pub struct Control {
    file: Option<PathBuf>,
    cached: Mutex<Option<Cached>>,
}

impl Control {
    /// Commands guarded by the token in `file` (`None`: commands are off).
    pub fn new(file: Option<PathBuf>) -> Control {
        Control {
            file,
            cached: Mutex::new(None),
        }
    }

    /// The current token, read again if the file changed.
    async fn token(&self) -> Result<Arc<[u8]>, String> {
        let Some(file) = &self.file else {
            return Err("rollout commands are off: set `admin: { listen: ADDR, token_file: FILE }` in the config to enable them".into());
        };
        let unreadable = |e: std::io::Error| format!("admin.token_file {}: {e}", file.display());
        let meta = tokio::fs::metadata(file).await.map_err(unreadable)?;
        let stamp = (meta.modified().map_err(unreadable)?, meta.len());
        if let Some((m, l, t)) = &*self.cached.lock() {
            if (*m, *l) == stamp {
                return Ok(t.clone());
            }
        }
        if meta.len() > MAX_TOKEN as u64 {
            return Err(format!("admin.token_file {}: too long", file.display()));
        }
        let text = tokio::fs::read_to_string(file).await.map_err(unreadable)?;
        let token = text.trim();
        if token.is_empty() {
            return Err(format!("admin.token_file {} is empty", file.display()));
        }
        let token: Arc<[u8]> = token.as_bytes().into();
        *self.cached.lock() = Some((stamp.0, stamp.1, token.clone()));
        Ok(token)
    }
}

/// Equal without an early exit: the time taken depends on `given`'s length only, never on
/// where it differs from `secret`.
fn constant_time_eq(given: &[u8], secret: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != secret.len());
    for (i, g) in given.iter().enumerate() {
        diff |= g ^ secret.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(diff) == 0
}

/// Answers `POST /api/rollouts/{service}/{promote|abort}`.
pub async fn handle<B>(
    control: &Control,
    services: &Services,
    req: Request<B>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let Some((service, action)) = path
        .strip_prefix("/api/rollouts/")
        .and_then(|r| r.split_once('/'))
    else {
        return text(
            StatusCode::NOT_FOUND,
            "use POST /api/rollouts/{service}/promote or /abort\n",
        );
    };
    let command = match action {
        "promote" => Command::Promote,
        "abort" => Command::Abort,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "use POST /api/rollouts/{service}/promote or /abort\n",
            )
        }
    };
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
    }
    let secret = match control.token().await {
        Ok(t) => t,
        Err(why) => return text(StatusCode::FORBIDDEN, &format!("{why}\n")),
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .filter(|t| t.len() <= MAX_TOKEN);
    if !given.is_some_and(|g| constant_time_eq(g, &secret)) {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required\n",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
        return r;
    }
    let Some(board) = services.rollouts() else {
        return text(
            StatusCode::NOT_FOUND,
            &format!("no service {service:?} with a rollout\n"),
        );
    };
    match board.command(service, command).await {
        Ok(done) => text(StatusCode::OK, &format!("{service}: {done}\n")),
        Err(e @ CommandError::NoRollout(_)) => text(StatusCode::NOT_FOUND, &format!("{e}\n")),
        Err(e @ CommandError::Refused(_)) => {
            text(StatusCode::CONFLICT, &format!("{service}: {e}\n"))
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().expect("static"),
    );
    r
}

/// Sends `action` (`promote` or `abort`) for `service` to the admin listener at `admin` with
/// `token`: the answer's text on success, else the status and text. The CLI's half.
pub async fn send(
    admin: SocketAddr,
    service: &str,
    action: &str,
    token: &str,
) -> Result<String, String> {
    let req = Request::post(format!("http://{admin}/api/rollouts/{service}/{action}"))
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("bad request: {e}"))?;
    exchange(admin, req).await
}

/// `GET path` from the admin listener at `admin` (read-only, no token): the body on success,
/// else the status and text. The CLI's half of `prewarm plan --admin`.
pub async fn fetch(admin: SocketAddr, path: &str) -> Result<String, String> {
    let req = Request::get(format!("http://{admin}{path}"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("bad request: {e}"))?;
    exchange(admin, req).await
}

/// Bound on an answer the CLI reads from an admin listener (a plan of thousands of pre-warmed
/// services fits; an address that streams without end does not hold the CLI).
const MAX_ANSWER: usize = 64 << 20;

/// One request to the admin listener, bounded by [`CLIENT_TIMEOUT`] and [`MAX_ANSWER`].
async fn exchange(admin: SocketAddr, req: Request<Full<Bytes>>) -> Result<String, String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("{admin}: {e}"))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("{admin}: reading the answer: {e}"))?
            .to_bytes();
        let body = String::from_utf8_lossy(&body).trim().to_string();
        if status.is_success() {
            Ok(body)
        } else {
            Err(format!("{status}: {body}"))
        }
    };
    tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("{admin}: no answer within {CLIENT_TIMEOUT:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_compared_whole() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"s3cretX", b"s3cret"));
        assert!(!constant_time_eq(b"S3cret", b"s3cret"));
        assert!(!constant_time_eq(b"", b"s3cret"));
    }
}
