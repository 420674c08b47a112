//! A rollout candidate reachable on purpose (`promotion: manual` with `candidate_header`):
//! while a validated version awaits promotion, a request carrying `<header>: candidate` goes
//! to one of its pods instead of the current version; every other request is untouched. The
//! candidate's pods are not in the gate's endpoints: held requests are never dispatched to
//! them, and a retry of a candidate request goes to the current version like any retry.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};

use super::{Acquired, Endpoint, Gate};

/// The value of the header that asks for the candidate.
pub const CANDIDATE_VALUE: &[u8] = b"candidate";

/// The header that selects the candidate, and the candidate's pods.
pub struct Candidate {
    header: HeaderName,
    endpoints: Vec<Arc<Endpoint>>,
}

impl Gate {
    /// Makes `addrs` reachable with `header: candidate`, or nothing when `addrs` is empty.
    pub fn set_candidate(&self, header: &HeaderName, addrs: &[SocketAddr]) {
        let same = self.switch.candidate.load().as_ref().is_some_and(|c| {
            c.header == header && c.endpoints.iter().map(|e| e.addr).eq(addrs.iter().copied())
        });
        if same {
            return;
        }
        self.switch.candidate.store((!addrs.is_empty()).then(|| {
            Arc::new(Candidate {
                header: header.clone(),
                endpoints: addrs.iter().map(|a| Arc::new(Endpoint::new(*a))).collect(),
            })
        }));
    }

    /// Whether a request whose field names are `names` may ask for the candidate (the
    /// HTTP/1.1 fast path hands such requests to hyper's path, which decides).
    pub fn may_want_candidate<'a>(&self, mut names: impl Iterator<Item = &'a [u8]>) -> bool {
        let c = self.switch.candidate.load();
        let Some(c) = c.as_ref() else { return false };
        let want = c.header.as_str().as_bytes();
        names.any(|n| n.eq_ignore_ascii_case(want))
    }

    /// A slot on the candidate's least busy pod when `headers` ask for it, else `None` (the
    /// request goes through [`Gate::acquire`] as usual).
    pub fn acquire_candidate(self: &Arc<Self>, headers: &HeaderMap) -> Option<Acquired> {
        let c = self.switch.candidate.load();
        let c = c.as_ref()?;
        if headers.get(&c.header)?.as_bytes() != CANDIDATE_VALUE {
            return None;
        }
        let ep = c.endpoints.iter().min_by_key(|e| e.in_flight())?.clone();
        ep.try_take(None);
        Some(Acquired {
            permit: self.permit(ep),
            held_for: None,
            cold: false,
        })
    }
}
