//! The response body passed on to the client as the backend sends it: each write bounded by
//! `timeouts.client_write`, the backend's slot and connection freed at its last byte.

use super::*;

/// Writes to a client, each wait for the socket to take more bounded by
/// `timeouts.client_write`: a client that stops reading is closed (and counted) instead of
/// keeping its endpoint slot and backend connection. A write the socket takes at once costs no
/// timer.
#[derive(Clone, Copy)]
pub(super) struct Writer<'a> {
    pub(super) limit: std::time::Duration,
    pub(super) metrics: &'a crate::telemetry::metrics::Metrics,
}

impl<'a> Writer<'a> {
    pub(super) fn of(shared: &'a crate::forward::Shared) -> Self {
        Writer {
            limit: shared.timeouts.client_write,
            metrics: &shared.metrics,
        }
    }

    /// Writes all of `buf`, then flushes a stream that buffers ([`ClientIo::BUFFERED`]: a TLS
    /// stream may keep records it could not write yet). A write the socket takes at once
    /// costs no timer.
    pub(super) async fn put<S: ClientIo>(
        self,
        client: &mut S,
        mut buf: &[u8],
    ) -> Result<(), RelayError> {
        while !buf.is_empty() {
            let n = match client.try_write_now(buf) {
                Some(Ok(n)) => n,
                Some(Err(e)) if e.kind() != ErrorKind::WouldBlock => {
                    return Err(RelayError::client(e))
                }
                // The socket cannot take it now (or the stream has no such write): poll,
                // bounded.
                _ => {
                    self.bounded(client, |c, cx| Pin::new(c).poll_write(cx, buf))
                        .await?
                }
            };
            if n == 0 {
                return Err(RelayError::ClientGone);
            }
            buf = &buf[n..];
        }
        if !S::BUFFERED {
            return Ok(());
        }
        self.bounded(client, |c, cx| Pin::new(c).poll_flush(cx))
            .await
    }

    /// One write step: tried at once, and only when the socket cannot take it, waited for
    /// within `timeouts.client_write`.
    pub(super) async fn bounded<S: ClientIo, T>(
        self,
        client: &mut S,
        mut step: impl FnMut(&mut S, &mut Context<'_>) -> Poll<std::io::Result<T>>,
    ) -> Result<T, RelayError> {
        let first = std::future::poll_fn(|cx| Poll::Ready(step(client, cx))).await;
        let done = match first {
            Poll::Ready(r) => r,
            Poll::Pending => {
                let wait = std::future::poll_fn(|cx| step(client, cx));
                match tokio::time::timeout(self.limit, wait).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.metrics.reject_connection("client_write_timeout");
                        return Err(RelayError::ClientFailed(ErrorKind::TimedOut));
                    }
                }
            }
        };
        done.map_err(RelayError::client)
    }
}

/// Why relaying a response body broke off midway (the client's connection is then closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RelayError {
    /// The client closed its connection.
    ClientGone,
    /// Writing to the client failed, or stalled past `timeouts.client_write`.
    ClientFailed(ErrorKind),
    /// The backend closed before the body ended.
    BackendGone,
    /// Reading from the backend failed.
    BackendFailed(ErrorKind),
    /// The backend's chunked framing is broken.
    BadChunked,
}

impl RelayError {
    pub(super) fn client(e: std::io::Error) -> Self {
        match e.kind() {
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => RelayError::ClientGone,
            k => RelayError::ClientFailed(k),
        }
    }

    /// The metric label.
    pub(super) fn kind(self) -> &'static str {
        match self {
            RelayError::ClientGone => "client_gone",
            RelayError::ClientFailed(_) => "client_failed",
            RelayError::BackendGone => "backend_gone",
            RelayError::BackendFailed(_) => "backend_failed",
            RelayError::BadChunked => "bad_chunked",
        }
    }
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayError::ClientFailed(k) => write!(f, "writing to the client: {k}"),
            RelayError::BackendFailed(k) => write!(f, "reading from the backend: {k}"),
            e => f.write_str(e.kind()),
        }
    }
}

/// The backend side of a response being relayed: freed as soon as its last byte is read —
/// the endpoint slot, and the connection back to the pool when the body ended exactly —
/// before the last bytes go to the client, so the client's next request (perhaps on another
/// connection, on another worker) finds both free.
pub(super) struct Release<'a> {
    pub(super) up: Option<TcpStream>,
    /// The pool to return the connection to (`None`: it cannot take another request).
    pub(super) host: Option<&'a crate::upstream::raw::Host>,
    pub(super) permit: Option<crate::gate::Permit>,
}

impl Release<'_> {
    pub(super) fn up(&mut self) -> &mut TcpStream {
        self.up.as_mut().expect("present until done")
    }

    /// The body has been read; `clean`: it ended exactly where its framing said.
    pub(super) fn done(&mut self, clean: bool) {
        self.permit.take();
        if let (Some(up), Some(host), true) = (self.up.take(), self.host, clean) {
            host.put(up);
        }
    }
}

/// Writes the client's response head (in `out`) and passes the body on. `Ok(true)` when the
/// body ended exactly where its framing says (the backend connection may be reused);
/// `Err` when either side failed midway. While it waits for the backend, a client that leaves
/// ends it (the endpoint slot and the backend connection are freed then, not when the
/// backend next sends); bytes the client pipelines meanwhile go to `pending`.
#[allow(clippy::too_many_arguments)] // the connection's buffers, each borrowed apart
pub(super) async fn relay_body<S: ClientIo>(
    client: &mut S,
    pending: &mut Vec<u8>,
    w: Writer<'_>,
    mut backend: Release<'_>,
    resp: &mut Vec<u8>,
    out: &mut Vec<u8>,
    start: usize,
    framing: Framing,
) -> Result<(), RelayError> {
    let first = &resp[start..];
    match framing {
        Framing::Empty => {
            backend.done(first.is_empty());
            w.put(client, out).await
        }
        Framing::Length(n) => {
            let take = first.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            let mut clean = first.len() == take;
            out.extend_from_slice(&first[..take]);
            let mut left = n - take as u64;
            if left == 0 {
                backend.done(clean);
            }
            w.put(client, out).await?;
            while left > 0 {
                let got = read_some(backend.up(), resp, client, pending, false).await?;
                let take = got.min(usize::try_from(left).unwrap_or(usize::MAX));
                clean &= got == take;
                left -= take as u64;
                if left == 0 {
                    backend.done(clean);
                }
                w.put(client, &resp[..take]).await?;
            }
            Ok(())
        }
        Framing::Chunked => {
            // Passed on as framed, but for trailer fields (see `chunked::Scanner::passed`).
            let mut scanner = chunked::Scanner::default();
            let end = scanner.feed(first).map_err(|_| RelayError::BadChunked)?;
            let upto = end.unwrap_or(first.len());
            out.extend_from_slice(&first[..scanner.passed(upto)]);
            if let Some(end) = end {
                backend.done(end == first.len());
                if scanner.trailing() {
                    out.extend_from_slice(b"\r\n");
                }
                return w.put(client, out).await;
            }
            w.put(client, out).await?;
            loop {
                let got = read_some(backend.up(), resp, client, pending, false).await?;
                match scanner
                    .feed(&resp[..got])
                    .map_err(|_| RelayError::BadChunked)?
                {
                    Some(end) => {
                        backend.done(end == got);
                        let n = scanner.passed(end);
                        if scanner.trailing() {
                            resp.truncate(n);
                            resp.extend_from_slice(b"\r\n");
                            return w.put(client, resp).await;
                        }
                        return w.put(client, &resp[..n]).await;
                    }
                    None => {
                        let n = scanner.passed(got);
                        w.put(client, &resp[..n]).await?;
                    }
                }
            }
        }
        Framing::UntilClose => {
            put_chunk(out, first);
            w.put(client, out).await?;
            loop {
                let got = read_some(backend.up(), resp, client, pending, true).await?;
                out.clear();
                if got == 0 {
                    backend.done(false);
                    return w.put(client, b"0\r\n\r\n").await;
                }
                put_chunk(out, &resp[..got]);
                w.put(client, out).await?;
            }
        }
    }
}

/// Appends `data` as one chunk (nothing for no data: an empty chunk would end the body).
pub(super) fn put_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    use std::io::Write as _;
    let _ = write!(out, "{:x}\r\n", data.len()); // into a Vec: cannot fail, allocates nothing
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Reads the next piece of a body into `resp` (replacing what was there); the buffer grows
/// while reads fill it, up to [`MAX_BODY_READ`]. The end of the backend's stream is `Ok(0)`
/// when `end_ok` (a body delimited by the close), else an error. A client that leaves while
/// this waits ends it with [`RelayError::ClientGone`].
pub(super) async fn read_some<S: ClientIo>(
    up: &mut TcpStream,
    resp: &mut Vec<u8>,
    client: &mut S,
    pending: &mut Vec<u8>,
    end_ok: bool,
) -> Result<usize, RelayError> {
    let full = resp.len() == resp.capacity();
    resp.clear();
    if full && resp.capacity() < MAX_BODY_READ {
        resp.reserve(resp.capacity() * 2);
    } else if resp.capacity() < RESPONSE_BUF {
        resp.reserve(RESPONSE_BUF);
    }
    let read = tokio::select! {
        biased;
        r = up.read_buf(resp) => r,
        () = client_gone(client, pending) => return Err(RelayError::ClientGone),
    };
    match read {
        Ok(0) if end_ok => Ok(0),
        Ok(0) => Err(RelayError::BackendGone),
        Err(e) => Err(RelayError::BackendFailed(e.kind())),
        Ok(n) => Ok(n),
    }
}
