//! Bounded exponential backoff with jitter, for operations that are safe to repeat.
//!
//! What is retried: database errors that say the connection is gone or the server wants us
//! back later (a closed socket or I/O failure, SQLSTATE class 08, 57P01-57P03 admin
//! shutdown/crash/cannot-connect-now, 53300 too many connections, 40001 serialization failure,
//! 40P01 deadlock). What is not: timeouts of every kind (pool checkout, statement_timeout,
//! lock_timeout: they are the caller's budget), bad input, conflicts, anything else.
//! Every write this crate retries is an upsert or keyed on natural keys, so running it twice
//! stores the same thing once; writes that are not (alias rollback) run with [`Retry::Never`]
//! once their commit was sent.

use std::time::{Duration, Instant};

use crate::db::deadline::call_deadline;
use crate::error::{RepoError, Result};

/// How a call may be repeated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Repeating the whole call stores or returns the same thing.
    Idempotent,
    /// Never repeated inside the library.
    Never,
}

/// The retry budget.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles each time.
    pub base_delay: Duration,
    /// The longest single delay.
    pub max_delay: Duration,
    /// No new attempt starts after this much time since the first.
    pub max_elapsed: Duration,
}

impl Default for Policy {
    /// 8 attempts, 20 ms doubling to at most 2 s, within 15 s in all: enough to outlast a pool
    /// whose every idle connection died at once (each failure weeds the stale ones out) and a
    /// fast server restart, short enough that a caller is not kept waiting on a dead server.
    fn default() -> Self {
        Policy {
            max_attempts: 8,
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_secs(2),
            max_elapsed: Duration::from_secs(15),
        }
    }
}

/// True for errors a repeat may cure (see the module docs).
pub(crate) fn is_retryable(error: &RepoError) -> bool {
    matches!(error, RepoError::Database(_)) && error.is_transient()
}

/// Runs `attempt` until it succeeds, fails for good, or the budget is spent.
pub(crate) fn with_retries<T>(
    operation: &str,
    retry: Retry,
    policy: Policy,
    mut attempt: impl FnMut() -> Result<T>,
) -> Result<T> {
    let started = Instant::now();
    let mut tries = 0;
    loop {
        tries += 1;
        let error = match attempt() {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        let delay = backoff(policy, tries);
        let past_deadline = call_deadline().is_some_and(|d| Instant::now() + delay >= d);
        let out_of_budget = tries >= policy.max_attempts
            || started.elapsed() + delay > policy.max_elapsed
            || past_deadline;
        if retry == Retry::Never || !is_retryable(&error) || out_of_budget {
            return Err(error);
        }
        log::warn!(
            "pg-model-repo: {operation} failed on attempt {tries} ({error}); retrying in {delay:?}"
        );
        std::thread::sleep(delay);
    }
}

/// Full jitter between half and all of the exponential delay.
fn backoff(policy: Policy, tries: u32) -> Duration {
    let exp = policy
        .base_delay
        .saturating_mul(1u32 << tries.saturating_sub(1).min(16));
    let capped = exp.min(policy.max_delay);
    capped.mul_f64(0.5 + fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> Policy {
        Policy {
            max_attempts: 4,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
            max_elapsed: Duration::from_secs(5),
        }
    }

    #[test]
    fn non_transient_errors_are_not_retried() {
        let mut calls = 0;
        let r: Result<()> = with_retries("t", Retry::Idempotent, quick(), || {
            calls += 1;
            Err(RepoError::invalid("bad"))
        });
        assert!(r.is_err());
        assert_eq!(calls, 1);
    }

    #[test]
    fn timeouts_are_not_retried_even_when_transient() {
        let mut calls = 0;
        let _ = with_retries::<()>("t", Retry::Idempotent, quick(), || {
            calls += 1;
            Err(RepoError::pool_timeout("busy"))
        });
        assert_eq!(calls, 1);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = quick();
        for tries in 1..10 {
            let d = backoff(p, tries);
            assert!(d <= p.max_delay, "{d:?}");
            assert!(d >= p.base_delay / 2, "{d:?}");
        }
    }
}
