//! The one stop signal: Reveille's shutdown and its stages (listeners close, backends stop,
//! the admin side ends), a service's driver being stopped, the shutdown grace running out.
//! A [`Trigger`] fires once; any number of [`Signal`]s wait for it (and a dropped trigger
//! counts as fired, so no task can wait forever on a signal nobody will fire).

use tokio::sync::watch;

/// Fires the signal.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Waits for the signal; cheap to clone.
#[derive(Debug, Clone)]
pub struct Signal {
    rx: watch::Receiver<bool>,
    /// The value this handle last saw.
    seen: bool,
}

/// A new, unfired signal.
pub fn channel() -> (Trigger, Signal) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Signal { rx, seen: false })
}

impl Trigger {
    /// Fires (again is a no-op).
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once this trigger has fired: for one wait (a request's), without the handle
    /// [`Trigger::signal`] makes.
    pub async fn fired(&self) {
        let _ = self.0.subscribe().wait_for(|s| *s).await;
    }

    /// A handle that waits for this trigger.
    pub fn signal(&self) -> Signal {
        let rx = self.0.subscribe();
        let seen = *rx.borrow();
        Signal { rx, seen }
    }
}

impl Signal {
    /// Resolves once the signal has fired (at once if it had).
    pub async fn fired(&mut self) {
        let _ = self.rx.wait_for(|s| *s).await;
        self.seen = true;
    }

    /// Whether the signal has fired: one atomic load while nothing changed since this handle
    /// last looked (it is asked once per request on the fast path).
    pub fn is_fired(&mut self) -> bool {
        match self.rx.has_changed() {
            Err(_) => true,
            Ok(false) => self.seen,
            Ok(true) => {
                self.seen = *self.rx.borrow_and_update();
                self.seen
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_signal_sees_the_one_firing_even_one_made_after_it() {
        let (trigger, mut before) = channel();
        let mut copy = before.clone();
        assert!(!before.is_fired());
        trigger.fire();
        let mut after = trigger.signal();
        assert!(before.is_fired() && copy.is_fired() && after.is_fired());
        before.fired().await;
        after.fired().await;
    }

    #[tokio::test]
    async fn a_dropped_trigger_counts_as_fired() {
        let (trigger, mut s) = channel();
        drop(trigger);
        assert!(s.is_fired());
        s.fired().await;
    }
}
