//! The one retry rule, for both engines: an attempt whose connect failed (nothing was sent) is
//! retried on another endpoint, and so is an idempotent request whose body can be sent again;
//! each retry after a back-off (10 ms, doubling), at most [`MAX_ATTEMPTS`] in all, within the
//! request's deadline, holding again when no endpoint is ready. An endpoint that refused a
//! connection is skipped for [`PASSIVE_EJECTION`]. An engine says how it makes one attempt
//! ([`Attempts`]); [`with_retries`] does the rest.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;

use crate::error::ProxyError;
use crate::gate::{Endpoint, Gate, Permit};
use crate::upstream::SendError;

/// Attempts at most for one request (connect failures, safe retries).
pub(crate) const MAX_ATTEMPTS: u32 = 5;
/// First pause before a retry; doubles each time.
const RETRY_BACKOFF: Duration = Duration::from_millis(10);
/// How long an endpoint that refused a connection is skipped by the balancer.
const PASSIVE_EJECTION: Duration = Duration::from_secs(1);

/// Why an attempt failed.
pub(crate) enum Failed {
    /// Sending to the backend failed.
    Transport(SendError),
    /// The request has its answer already (the client's body broke, say): no retry.
    Answer(ProxyError),
}

/// How an engine makes one attempt at sending its request.
pub(crate) trait Attempts {
    /// A response head from the backend, with what the engine needs to relay the body.
    type Answer;

    /// Sends the request to `endpoint`; `more_allowed` says whether another attempt could
    /// follow this one (so whether to keep what a resend needs).
    fn attempt(
        &mut self,
        endpoint: &Endpoint,
        more_allowed: bool,
    ) -> impl Future<Output = Result<Self::Answer, Failed>> + Send;

    /// After a failed attempt: whether the request can be sent again as it was (idempotent,
    /// its body whole).
    fn resendable(&self) -> bool;
}

/// Sends the request by `attempts` until a backend answers or the retry rule says stop; the
/// answer comes with the permit of the endpoint that gave it. `timeout` is the response
/// timeout an attempt ran out of, for the answer.
pub(crate) async fn with_retries<A: Attempts>(
    gate: &Arc<Gate>,
    mut permit: Permit,
    deadline: Instant,
    timeout: Duration,
    attempts: &mut A,
) -> Result<(A::Answer, Permit), ProxyError> {
    let mut attempt = 1;
    loop {
        let sent = attempts
            .attempt(permit.endpoint(), attempt < MAX_ATTEMPTS)
            .await;
        let err = match sent {
            Ok(answer) => return Ok((answer, permit)),
            Err(Failed::Answer(e)) => return Err(e),
            Err(Failed::Transport(SendError::Timeout)) => {
                return Err(ProxyError::UpstreamTimeout {
                    service: gate.name().clone(),
                    after: timeout,
                })
            }
            Err(Failed::Transport(e)) => e,
        };
        debug!(service = %gate.name(), endpoint = %permit.endpoint().addr, attempt, error = %err, "upstream failed");
        retry_after(
            gate,
            &permit,
            attempt,
            err.is_connect(),
            attempts.resendable(),
            deadline,
        )?;
        drop(permit);
        // Boxed: retries are rare, their futures would grow every request's.
        permit = Box::pin(next_attempt(gate, attempt, deadline)).await?;
        attempt += 1;
    }
}

/// After attempt number `attempt` on `permit`'s endpoint failed: `Ok` when another attempt may
/// follow — the connect failed (nothing was sent), or the request is `resendable` — with
/// attempts and time left; a refused endpoint is then skipped for [`PASSIVE_EJECTION`].
/// `Err`: the request's answer.
fn retry_after(
    gate: &Gate,
    permit: &Permit,
    attempt: u32,
    connect: bool,
    resendable: bool,
    deadline: Instant,
) -> Result<(), ProxyError> {
    if !(connect || resendable) || attempt >= MAX_ATTEMPTS || Instant::now() >= deadline {
        let service = gate.name().clone();
        return Err(if connect {
            ProxyError::UpstreamConnect { service }
        } else {
            ProxyError::Upstream { service }
        });
    }
    if connect {
        gate.eject(permit.endpoint(), PASSIVE_EJECTION);
    }
    Ok(())
}

/// The endpoint slot for the attempt after `attempt`: after the back-off (10 ms, doubling),
/// holding again if no endpoint is ready, within the request's deadline.
async fn next_attempt(
    gate: &Arc<Gate>,
    attempt: u32,
    deadline: Instant,
) -> Result<Permit, ProxyError> {
    // Not past the request's deadline: the wait for an endpoint then answers at once.
    let backoff = Instant::now() + RETRY_BACKOFF * 2u32.pow(attempt - 1);
    tokio::time::sleep_until(backoff.min(deadline)).await;
    Ok(gate.acquire_again(deadline).await?.permit)
}

/// Whether a method may be sent twice without changing the outcome (RFC 9110 §9.2.2); for
/// both request paths.
pub(crate) fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
    )
}
