//! The writer's retry delays: doubling from 200 ms up to 3 s, each one jittered (a random point
//! in its upper half), so agents that lost the same database at the same moment do not all retry
//! in the same instant after a failover.

use std::time::Duration;

/// First retry delay; doubled after each failure up to `MAX`.
const MIN: Duration = Duration::from_millis(200);
const MAX: Duration = Duration::from_secs(3);

/// Where the writer is in its run of retries.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { next: MIN }
    }
}

impl Backoff {
    /// The delay before the next retry, with a random jitter.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(random_fraction())
    }

    /// The delay before the next retry for a jitter `fraction` in [0, 1): between half the
    /// current step and the whole of it. Then the step doubles, up to `MAX`.
    pub fn next_with(&mut self, fraction: f64) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(MAX);
        step.mul_f64(0.5 + 0.5 * fraction.clamp(0.0, 1.0))
    }

    /// A write landed: the next failure starts again from the first step.
    pub fn reset(&mut self) {
        self.next = MIN;
    }
}

/// A number in [0, 1) from the operating system's generator; 0.5 if it cannot answer (the delay
/// is then the middle of its range, which is still correct, only not spread).
fn random_fraction() -> f64 {
    let mut bytes = [0u8; 4];
    match getrandom::fill(&mut bytes) {
        Ok(()) => f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_within_its_jitter() {
        let mut b = Backoff::default();
        let lows: Vec<u128> = (0..7).map(|_| b.next_with(0.0).as_millis()).collect();
        assert_eq!(lows, vec![100, 200, 400, 800, 1500, 1500, 1500]);
        b.reset();
        let highs: Vec<u128> = (0..6).map(|_| b.next_with(0.999_999).as_millis()).collect();
        assert_eq!(highs, vec![199, 399, 799, 1599, 2999, 2999]);
    }

    #[test]
    fn random_delays_are_spread() {
        let delays: std::collections::BTreeSet<Duration> =
            (0..20).map(|_| Backoff::default().next_delay()).collect();
        assert!(delays.len() > 10, "{delays:?}");
        assert!(delays.iter().all(|d| *d >= MIN / 2 && *d < MIN));
    }
}
