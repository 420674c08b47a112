//! What Reveille reports about itself: the Prometheus metrics and the cold-start timing.

pub mod metrics;
pub mod wake;
