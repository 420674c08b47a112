//! The client's connection: accept loops (plain and TLS), protocol detection, hyper's HTTP/1
//! and HTTP/2 connections, the HTTP/1.1 fast path, and what bounds a connection's life
//! (idle, stalled writes, the connection limit).

pub(crate) mod accept;
pub(crate) mod activity;
pub(crate) mod fast;
pub(crate) mod inbound;
pub mod tls;

use std::sync::Arc;

use tokio::net::TcpListener;

pub(crate) use accept::{bind_listener, ConnectionGuard, Connections};

use crate::forward::{Proxy, Shared};
use inbound::Inbound;

/// Serves the cleartext listener until `close` turns true: each connection is sniffed and
/// served by the fast path (HTTP/1.1) or hyper (HTTP/2, and what the fast path hands over).
pub(crate) async fn serve_plain(
    listener: TcpListener,
    shared: Arc<Shared>,
    inbound: Arc<Inbound>,
    close: crate::shutdown::Signal,
    conns: Arc<Connections>,
) {
    let metrics = shared.metrics.clone();
    let conn_close = close.clone();
    accept::accept_loop(
        listener,
        "proxy",
        metrics,
        conns,
        close,
        |stream, remote, guard| {
            let svc = Proxy::new(shared.clone(), remote, "http");
            tokio::spawn(
                inbound
                    .clone()
                    .serve_tcp(stream, svc, conn_close.clone(), guard),
            );
        },
    )
    .await;
}
