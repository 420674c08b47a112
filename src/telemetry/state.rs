//! The activation state every service is in, as the gate keeps it and the metrics report it:
//! `Idle → Waking → Ready → Stopping → Idle`.

/// A service's activation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// No backend running; the next request wakes it.
    Idle = 0,
    /// The backend is being started; requests are held.
    Waking = 1,
    /// At least one endpoint is ready.
    Ready = 2,
    /// Idle period passed; in-flight requests finish, then the backend stops.
    Stopping = 3,
}

impl State {
    /// Every state, for metrics.
    pub const ALL: [State; 4] = [State::Idle, State::Waking, State::Ready, State::Stopping];

    /// The state's name in metrics and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Waking => "waking",
            State::Ready => "ready",
            State::Stopping => "stopping",
        }
    }

    pub(crate) fn from_u8(v: u8) -> State {
        match v {
            1 => State::Waking,
            2 => State::Ready,
            3 => State::Stopping,
            _ => State::Idle,
        }
    }
}
