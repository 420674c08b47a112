//! Which service a request is for: the router (hosts, path prefixes, opt-in Knative names),
//! the checks a request passes before it is routed, and the live table of services.

pub mod checks;
pub mod router;
pub mod services;
