//! What Reveille reports about itself: the Prometheus metrics and the cold-start timing.

pub mod metrics;
mod state;
pub mod wake;

pub use state::State;
