//! Reveille: an HTTP activator. It holds requests for services scaled to zero in bounded
//! per-service queues, wakes the service, and forwards the held requests once it is ready.
//!
//! The modules follow a request's way: [`server`] accepts it ([`tls`] for HTTPS), [`inbound`]
//! serves its connection as HTTP/1 or HTTP/2, [`router`] picks the service, [`gate`] grants an
//! endpoint slot at once or holds the request while a [`scaler`] driver wakes the backend,
//! [`upstream`] forwards it, and [`proxy`] ties these together and maps every [`error`] to a
//! response. [`config`] builds the typed settings, [`metrics`] and [`admin`] report on it all,
//! [`keda`] answers KEDA's external scaler calls, [`wake`] times cold starts, [`prewarm`] wakes
//! services ahead of their demand, and [`demo`] is a small backend for trying it out.

pub(crate) mod accept;
pub mod admin;
pub mod config;
pub mod crd;
pub mod demo;
pub mod error;
pub mod gate;
pub mod group;
pub mod h1;
pub mod inbound;
pub mod keda;
pub mod limits;
pub mod metrics;
pub mod prewarm;
pub mod proxy;
pub mod router;
pub mod scaler;
pub mod server;
pub mod services;
pub mod tls;
pub mod upstream;
pub mod wake;

pub use config::Config;
pub use server::{start, Running};
