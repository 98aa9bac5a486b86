//! Credit for a windowed stream: the sender takes one credit per chunk and
//! waits when none is left; the receiver's acknowledgements give them back.
//! A reader that stops reading then holds up its own stream only, and the
//! bytes queued for it stay bounded.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How many stdin chunks (each at most 64 KiB) the host may send one exec
/// ahead of the agent's acknowledgements.
pub const STDIN_WINDOW: u32 = 8;

/// The sender's side of a window.
#[derive(Debug)]
pub struct Window {
    size: u32,
    state: Mutex<Credit>,
    changed: Condvar,
}

#[derive(Debug)]
struct Credit {
    available: u32,
    closed: bool,
}

/// What [`Window::take`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// A credit is taken: send one chunk.
    Taken,
    /// The stream ended (its receiver is gone): send nothing more.
    Closed,
    /// No credit came back in time.
    TimedOut,
}

impl Window {
    pub fn new(size: u32) -> Window {
        Window { size, state: Mutex::new(Credit { available: size, closed: false }), changed: Condvar::new() }
    }

    /// Takes one credit, waiting up to `timeout` for one to come back.
    pub fn take(&self, timeout: Duration) -> Take {
        let deadline = Instant::now() + timeout;
        let mut credit = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if credit.closed {
                return Take::Closed;
            }
            if credit.available > 0 {
                credit.available -= 1;
                return Take::Taken;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Take::TimedOut;
            }
            credit = self.changed.wait_timeout(credit, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// One chunk was acknowledged. More acknowledgements than chunks sent
    /// (a confused or hostile receiver) never raise the window past its size.
    pub fn give_back(&self) {
        let mut credit = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        credit.available = (credit.available + 1).min(self.size);
        self.changed.notify_all();
    }

    /// The stream is over: wakes and refuses every sender.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_sender_waits_for_acknowledgements_and_no_more() {
        let window = Window::new(2);
        assert_eq!(window.take(Duration::ZERO), Take::Taken);
        assert_eq!(window.take(Duration::ZERO), Take::Taken);
        assert_eq!(window.take(Duration::from_millis(20)), Take::TimedOut, "the window is full");
        window.give_back();
        assert_eq!(window.take(Duration::ZERO), Take::Taken);
        for _ in 0..10 {
            window.give_back();
        }
        assert_eq!(window.take(Duration::ZERO), Take::Taken);
        assert_eq!(window.take(Duration::ZERO), Take::Taken);
        assert_eq!(window.take(Duration::ZERO), Take::TimedOut, "extra acknowledgements do not widen it");
    }

    #[test]
    fn an_acknowledgement_or_the_end_wakes_a_waiting_sender() {
        let window = Arc::new(Window::new(1));
        assert_eq!(window.take(Duration::ZERO), Take::Taken);
        let waiter = {
            let window = window.clone();
            std::thread::spawn(move || window.take(Duration::from_secs(30)))
        };
        std::thread::sleep(Duration::from_millis(20));
        window.give_back();
        assert_eq!(waiter.join().unwrap(), Take::Taken);
        let waiter = {
            let window = window.clone();
            std::thread::spawn(move || window.take(Duration::from_secs(30)))
        };
        window.close();
        assert_eq!(waiter.join().unwrap(), Take::Closed);
        window.give_back();
        assert_eq!(window.take(Duration::ZERO), Take::Closed, "closed stays closed");
    }
}
