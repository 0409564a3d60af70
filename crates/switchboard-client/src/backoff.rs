use std::time::Duration;

use rand::Rng;
use switchboard_protocol::close;

/// When and how often the client reconnects after its connection drops.
///
/// The delay before attempt `n` (counting from 0) is drawn uniformly from
/// `[0, min(max_delay, initial_delay * multiplier^n)]` ("full jitter"), so that thousands of
/// clients dropped by the same node restart do not reconnect in lockstep.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconnectPolicy {
    /// Cap of the first delay (default 100 ms).
    pub initial_delay: Duration,
    /// Largest delay ever waited (default 10 s).
    pub max_delay: Duration,
    /// Growth of the cap per failed attempt (default 2.0; values below 1, and NaN, count as 1).
    pub multiplier: f64,
    /// Full jitter when true (default); when false the delay is the cap itself.
    pub jitter: bool,
    /// Reconnect attempts in a row before giving up and emitting `Closed` (default `None`:
    /// forever). `Some(0)` disables reconnecting.
    pub max_attempts: Option<u32>,
    /// Least delay after the server closed with 1013 "try again later" (default 1 s, bounded by
    /// `max_delay`), so an overloaded node is not hit again at once.
    pub try_again_later_delay: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: true,
            max_attempts: None,
            try_again_later_delay: Duration::from_secs(1),
        }
    }
}

impl ReconnectPolicy {
    /// The largest delay before attempt `attempt` (counting from 0):
    /// `min(max_delay, initial_delay * multiplier^attempt)`.
    pub fn cap(&self, attempt: u32) -> Duration {
        let multiplier = if self.multiplier >= 1.0 {
            self.multiplier
        } else {
            1.0
        };
        let exponent = i32::try_from(attempt).unwrap_or(i32::MAX);
        let seconds = self.initial_delay.as_secs_f64() * multiplier.powi(exponent);
        // Overflow (or an infinite multiplier) saturates at the maximum.
        Duration::try_from_secs_f64(seconds).map_or(self.max_delay, |cap| cap.min(self.max_delay))
    }

    /// The delay before attempt `attempt`, never below `floor`.
    pub(crate) fn delay<R: Rng + ?Sized>(
        &self,
        attempt: u32,
        floor: Duration,
        rng: &mut R,
    ) -> Duration {
        let cap = self.cap(attempt).max(floor);
        if !self.jitter {
            return cap;
        }
        let span = u64::try_from((cap - floor).as_nanos()).unwrap_or(u64::MAX);
        floor + Duration::from_nanos(rng.random_range(0..=span))
    }
}

/// The back-off state of one outage: counts attempts since the connection dropped.
#[derive(Debug)]
pub(crate) struct Backoff {
    policy: ReconnectPolicy,
    attempt: u32,
    floor: Duration,
}

impl Backoff {
    /// A fresh schedule after a connection closed with `close_code`.
    pub(crate) fn new(policy: ReconnectPolicy, close_code: Option<u16>) -> Self {
        let mut backoff = Backoff {
            policy,
            attempt: 0,
            floor: Duration::ZERO,
        };
        backoff.observe(close_code);
        backoff
    }

    /// Takes a close code into account: 1013 raises the least delay for the rest of the outage.
    pub(crate) fn observe(&mut self, close_code: Option<u16>) {
        if close_code == Some(close::TRY_AGAIN_LATER) {
            self.floor = self.policy.try_again_later_delay.min(self.policy.max_delay);
        }
    }

    /// The next attempt's number (from 1) and the delay to wait before it, or `None` once
    /// `max_attempts` attempts were made.
    pub(crate) fn next_delay(&mut self) -> Option<(u32, Duration)> {
        self.next_delay_with(&mut rand::rng())
    }

    fn next_delay_with<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Option<(u32, Duration)> {
        if self
            .policy
            .max_attempts
            .is_some_and(|max| self.attempt >= max)
        {
            return None;
        }
        let delay = self.policy.delay(self.attempt, self.floor, rng);
        self.attempt += 1;
        Some((self.attempt, delay))
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn policy() -> ReconnectPolicy {
        ReconnectPolicy::default()
    }

    #[test]
    fn cap_grows_geometrically_up_to_the_maximum() {
        let policy = policy();
        let caps: Vec<u64> = (0..9)
            .map(|attempt| policy.cap(attempt).as_millis() as u64)
            .collect();
        assert_eq!(caps, [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
        assert_eq!(policy.cap(u32::MAX), policy.max_delay);
    }

    #[test]
    fn odd_multipliers_never_panic_or_shrink() {
        for multiplier in [0.0, 0.5, -3.0, f64::NAN, f64::INFINITY, 1e300] {
            let policy = ReconnectPolicy {
                multiplier,
                ..policy()
            };
            for attempt in [0, 1, 10, 5000, u32::MAX] {
                let cap = policy.cap(attempt);
                assert!(
                    cap >= policy.initial_delay.min(policy.max_delay),
                    "{multiplier}"
                );
                assert!(cap <= policy.max_delay, "{multiplier}");
            }
        }
    }

    #[test]
    fn full_jitter_stays_within_zero_and_the_cap_and_spreads() {
        let policy = policy();
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..12 {
            let cap = policy.cap(attempt);
            let samples: Vec<Duration> = (0..500)
                .map(|_| policy.delay(attempt, Duration::ZERO, &mut rng))
                .collect();
            assert!(
                samples.iter().all(|delay| *delay <= cap),
                "attempt {attempt}"
            );
            let (low, high) = (cap / 4, cap * 3 / 4);
            assert!(
                samples.iter().any(|delay| *delay < low),
                "attempt {attempt}"
            );
            assert!(
                samples.iter().any(|delay| *delay > high),
                "attempt {attempt}"
            );
        }
    }

    #[test]
    fn without_jitter_the_delay_is_the_cap() {
        let policy = ReconnectPolicy {
            jitter: false,
            ..policy()
        };
        let mut rng = StdRng::seed_from_u64(1);
        for attempt in 0..10 {
            assert_eq!(
                policy.delay(attempt, Duration::ZERO, &mut rng),
                policy.cap(attempt)
            );
        }
    }

    #[test]
    fn schedule_counts_attempts_and_stops_at_the_maximum() {
        let policy = ReconnectPolicy {
            max_attempts: Some(3),
            ..policy()
        };
        let mut rng = StdRng::seed_from_u64(3);
        let mut backoff = Backoff::new(policy.clone(), Some(close::GOING_AWAY));
        for expected in 1..=3 {
            let (attempt, delay) = backoff.next_delay_with(&mut rng).expect("attempt allowed");
            assert_eq!(attempt, expected);
            assert!(delay <= policy.cap(expected - 1));
        }
        assert_eq!(backoff.next_delay_with(&mut rng), None);

        let mut never = Backoff::new(
            ReconnectPolicy {
                max_attempts: Some(0),
                ..policy
            },
            None,
        );
        assert_eq!(never.next_delay(), None);
    }

    #[test]
    fn try_again_later_raises_the_least_delay() {
        let policy = policy();
        let mut rng = StdRng::seed_from_u64(5);
        let mut backoff = Backoff::new(policy.clone(), Some(close::TRY_AGAIN_LATER));
        for _ in 0..20 {
            let (attempt, delay) = backoff.next_delay_with(&mut rng).expect("unbounded");
            assert!(delay >= policy.try_again_later_delay, "{delay:?}");
            assert!(delay <= policy.cap(attempt - 1).max(policy.try_again_later_delay));
        }

        let mut later = Backoff::new(policy.clone(), None);
        later.observe(Some(close::TRY_AGAIN_LATER));
        let (_, delay) = later.next_delay_with(&mut rng).expect("unbounded");
        assert!(delay >= policy.try_again_later_delay);

        let small_max = ReconnectPolicy {
            max_delay: Duration::from_millis(300),
            ..policy
        };
        let mut bounded = Backoff::new(small_max, Some(close::TRY_AGAIN_LATER));
        for _ in 0..20 {
            let (_, delay) = bounded.next_delay_with(&mut rng).expect("unbounded");
            assert_eq!(delay, Duration::from_millis(300));
        }
    }
}
