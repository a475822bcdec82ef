//! Restart delays: exponential growth from an initial delay, capped, with jitter that
//! only shortens a delay (so the cap always holds), and a reset once a component has
//! been stable long enough.

use std::time::Duration;

/// Why a backoff could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackoffError {
    /// The cap is below the initial delay.
    #[error("max_backoff ({max:?}) is below initial_backoff ({initial:?})")]
    MaxBelowInitial { initial: Duration, max: Duration },
    /// The multiplier is below 1 or not a finite number.
    #[error("multiplier must be a finite number >= 1, got {0}")]
    Multiplier(f64),
    /// Jitter must be a fraction between 0 and 1.
    #[error("jitter must be between 0 and 1, got {0}")]
    Jitter(f64),
}

/// A validated exponential backoff.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExponentialBackoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
    reset_after: Duration,
}

impl ExponentialBackoff {
    /// `initial` may be zero (restart at once, e.g. for benchmarks); `max >= initial`;
    /// `multiplier >= 1`; `jitter` in `[0, 1]` is the largest fraction a delay is shortened by.
    pub fn try_new(
        initial: Duration,
        max: Duration,
        multiplier: f64,
        jitter: f64,
        reset_after: Duration,
    ) -> Result<Self, BackoffError> {
        if max < initial {
            return Err(BackoffError::MaxBelowInitial { initial, max });
        }
        if !multiplier.is_finite() || multiplier < 1.0 {
            return Err(BackoffError::Multiplier(multiplier));
        }
        if !jitter.is_finite() || !(0.0..=1.0).contains(&jitter) {
            return Err(BackoffError::Jitter(jitter));
        }
        Ok(ExponentialBackoff {
            initial,
            max,
            multiplier,
            jitter,
            reset_after,
        })
    }

    pub fn initial(&self) -> Duration {
        self.initial
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    /// How long a component must stay ready before its restart count starts over.
    pub fn reset_after(&self) -> Duration {
        self.reset_after
    }

    /// The delay before restart number `attempt` (0-based) without jitter:
    /// `min(initial * multiplier^attempt, max)`.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exponent = i32::try_from(attempt).unwrap_or(i32::MAX);
        let seconds = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        if !seconds.is_finite() || seconds >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(seconds.max(0.0))
        }
    }

    /// The delay before restart number `attempt`, shortened by up to `jitter` of itself;
    /// `unit_random` is a uniform draw from `[0, 1)` supplied by the caller.
    pub fn delay(&self, attempt: u32, unit_random: f64) -> Duration {
        let base = self.base_delay(attempt);
        let r = if unit_random.is_finite() {
            unit_random.clamp(0.0, 1.0)
        } else {
            0.0
        };
        base.mul_f64(1.0 - self.jitter * r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn refuses_bad_values() {
        assert!(ExponentialBackoff::try_new(ms(10), ms(5), 2.0, 0.1, ms(0)).is_err());
        assert!(ExponentialBackoff::try_new(ms(10), ms(50), 0.5, 0.1, ms(0)).is_err());
        assert!(ExponentialBackoff::try_new(ms(10), ms(50), f64::NAN, 0.1, ms(0)).is_err());
        assert!(ExponentialBackoff::try_new(ms(10), ms(50), 2.0, 1.5, ms(0)).is_err());
        assert!(ExponentialBackoff::try_new(ms(0), ms(0), 1.0, 0.0, ms(0)).is_ok());
    }

    #[test]
    fn doubles_then_caps() {
        let b = ExponentialBackoff::try_new(ms(100), ms(1000), 2.0, 0.0, ms(0)).unwrap();
        let delays: Vec<_> = (0..6).map(|a| b.delay(a, 0.5)).collect();
        assert_eq!(
            delays,
            vec![ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
    }

    proptest! {
        #[test]
        fn grows_is_capped_and_jitter_only_shortens(
            initial in 0u64..10_000,
            extra in 0u64..100_000,
            multiplier in 1.0f64..10.0,
            jitter in 0.0f64..=1.0,
            attempt in 0u32..10_000,
            r in 0.0f64..1.0,
        ) {
            let b = ExponentialBackoff::try_new(ms(initial), ms(initial + extra), multiplier, jitter, ms(0)).unwrap();
            let base = b.base_delay(attempt);
            prop_assert!(base <= b.max());
            prop_assert!(base >= b.initial());
            prop_assert!(b.base_delay(attempt.saturating_add(1)) >= base);
            let d = b.delay(attempt, r);
            prop_assert!(d <= base);
            prop_assert!(d.as_secs_f64() >= base.as_secs_f64() * (1.0 - jitter) - 1e-9);
        }
    }
}
