//! Pauses for the loops that retry until shutdown rather than until a
//! deadline: the consumer's and the relay's reconnects, and a command
//! waiting until its outcome can be recorded. backon's exponential backoff
//! is the delay source (its retry combinator fits calls with a deadline:
//! the lifecycle's store and Docker calls, retried for `RTM_RETRY_FOR`, and
//! `serve`'s start-up connects), so each loop still selects on shutdown and
//! starts over from the shortest pause once it is through. The jitter
//! keeps workers cut off together from coming back in step.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};

#[derive(Debug)]
pub struct Pauses {
    builder: ExponentialBuilder,
    next: ExponentialBackoff,
    max: Duration,
}

impl Pauses {
    /// From `min`, doubling up to `max` (each plus up to as much again in
    /// jitter), for as long as the loop runs.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Self {
            builder,
            next: builder.build(),
            max,
        }
    }

    /// The pause before the next attempt.
    pub fn next_pause(&mut self) -> Duration {
        // `without_max_times` never runs out; `max` only satisfies the type.
        self.next.next().unwrap_or(self.max)
    }

    /// After a success: the next failure waits the shortest pause again.
    pub fn reset(&mut self) {
        self.next = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_cap_and_start_over_after_a_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut pauses = Pauses::new(min, max);
        let first = pauses.next_pause();
        assert!(first >= min && first < min * 2, "{first:?}");
        let later: Vec<Duration> = (0..20).map(|_| pauses.next_pause()).collect();
        assert!(later.iter().all(|p| *p <= max * 2), "{later:?}");
        assert!(later.last().is_some_and(|p| *p >= max), "{later:?}");
        pauses.reset();
        let again = pauses.next_pause();
        assert!(again >= min && again < min * 2, "{again:?}");
    }
}
