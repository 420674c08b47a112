//! What Reveille replicas share: the Lease that picks one holder, and the peers whose counts
//! are summed in (KEDA totals, scale-down agreement, learned history).

pub mod lease;
pub mod peers;
