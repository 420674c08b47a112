//! The static scaler: fixed upstream addresses, always ready. Plain proxying, and the warm path
//! in benchmarks.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::gate::{Gate, State};

/// Publishes the addresses as ready and keeps them until shutdown.
pub async fn run(gate: Arc<Gate>, addresses: &[SocketAddr], mut stop: crate::shutdown::Signal) {
    gate.set_endpoints(addresses);
    gate.set_state(State::Ready);
    stop.fired().await;
}
