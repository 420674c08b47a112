//! The client's connection: accept loops (plain and TLS), protocol detection, hyper's HTTP/1
//! and HTTP/2 connections, the HTTP/1.1 fast path, and what bounds a connection's life
//! (idle, stalled writes, the connection limit).

pub(crate) mod accept;
pub(crate) mod activity;
pub(crate) mod fast;
pub(crate) mod inbound;
pub mod tls;
