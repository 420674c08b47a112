//! Reveille: an HTTP activator. It holds requests for services scaled to zero in bounded
//! per-service queues, wakes the service, and forwards the held requests once it is ready.
//!
//! The modules are layers; each uses only the ones listed after it (docs/architecture.md):
//! [`app`] starts, reloads and stops everything; [`admin`] is the admin listener; [`keda`]
//! answers KEDA; [`listen`] accepts and serves client connections (plain, TLS, HTTP/1.1 fast
//! path, hyper's HTTP/1 and HTTP/2); [`forward`] takes a request through [`route`] and [`gate`]
//! to [`upstream`], retrying by one rule and answering every error one way; [`prewarm`] wakes
//! services ahead of demand; [`activate`] wakes a service and reports its endpoints (process,
//! fixed, Kubernetes, rollouts); [`gate`] holds requests and grants endpoint slots; [`cluster`]
//! is what replicas share; [`upstream`] pools connections to backends; [`telemetry`] counts and
//! times; [`config`], [`error`] and [`shutdown`] are at the bottom. [`demo`] is a small backend
//! for trying it out.

pub mod activate;
pub mod admin;
pub mod app;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod error;
pub(crate) mod fields;
pub mod forward;
pub mod gate;
pub mod keda;
pub mod listen;
pub mod prewarm;
pub mod route;
pub mod shutdown;
pub mod telemetry;
pub mod upstream;

pub use app::{start, Running};
pub use config::Config;
