//! Commits whose reply may be lost. A write that is not idempotent in its answer (a delete
//! that reports what it removed, a counter that adds) cannot simply be repeated when the
//! connection dies after COMMIT was sent: the first attempt may have committed. So such
//! writes run in a transaction whose id is taken before the commit, and after a lost reply the
//! server's own commit log (`txid_status`) says what happened: committed (the answer computed
//! inside the transaction stands), aborted (it is repeated like any transient failure), or,
//! when the server cannot be asked (it hangs, or it forgot), an error that says the outcome is
//! unknown. Exactly once, with no table of our own.

use std::time::{Duration, Instant};

use postgres::Transaction;

use crate::db::deadline::call_deadline;
use crate::db::pool::{unbounded, Conn, PgConnection, Pool};
use crate::db::retry::{self, Policy, Retry};
use crate::error::{ErrorDetail, RepoError, Result};

/// Assigns the transaction its id (a 64-bit, epoch-extended xid) before anything is written.
const TXID: &str = "SELECT txid_current()";

/// 'committed', 'aborted', 'in progress', or NULL once the server no longer keeps the status.
const TXID_STATUS: &str = "SELECT txid_status($1)";

/// How long a transaction the server still shows "in progress" (its backend is finishing
/// the commit it received, or noticing its client left) is waited for.
const IN_PROGRESS_WAIT: Duration = Duration::from_secs(5);
const IN_PROGRESS_POLL: Duration = Duration::from_millis(20);

/// The server's verdict on a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Committed,
    Aborted,
    InProgress,
    /// Too old: the server no longer keeps its status.
    Forgotten,
}

/// The result of a tracked write.
#[derive(Debug)]
pub(crate) enum Outcome<T> {
    /// It committed (possibly on an attempt whose reply was lost): here is its answer.
    Committed(T),
    /// COMMIT was sent, its reply lost, and the server could not say what happened.
    Unknown {
        /// The transaction's id, for [`status`] later.
        xid: i64,
        /// What broke the reply.
        cause: RepoError,
    },
}

/// How a tracked write gets its connection.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Checkout {
    /// Like every call: within pool_timeout.
    Pool,
    /// Within this long (background work that must not hold up a close).
    Within(Duration),
    /// Before this deadline, and cut by it (work inside a close).
    Until(Instant),
}

/// How an attempt failed.
enum Failed<T> {
    /// Before COMMIT was sent: nothing was written.
    Before(RepoError),
    /// COMMIT was sent and failed: it may or may not have committed.
    AtCommit {
        xid: i64,
        value: T,
        error: RepoError,
        /// The watchdog cut it: the server hangs.
        hung: bool,
    },
}

/// Runs `work` in a tracked transaction on a pooled connection, retried per `retry` when it
/// surely did not commit.
pub(crate) fn run_tracked<T>(
    pool: &Pool,
    op: &str,
    retry: Retry,
    checkout: Checkout,
    work: impl FnMut(&mut Transaction<'_>) -> Result<T>,
) -> Result<Outcome<T>> {
    run_tracked_as(pool, op, retry, checkout, Work::Statements, work)
}

/// What a tracked transaction does, for the bounds it runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Work {
    /// Ordinary statements: statement_timeout, and the watchdog's statement bound.
    Statements,
    /// Bulk work (deleting a big model's chunks): no statement_timeout, and the watchdog
    /// waits stream_idle_timeout (see `PgConnection::unbounded_client`).
    Bulk,
}

fn run_tracked_as<T>(
    pool: &Pool,
    op: &str,
    retry: Retry,
    checkout: Checkout,
    work_kind: Work,
    mut work: impl FnMut(&mut Transaction<'_>) -> Result<T>,
) -> Result<Outcome<T>> {
    retry::with_retries(op, retry, Policy::default(), || {
        let mut conn = check_out(pool, checkout)?;
        match attempt(&mut conn, work_kind, &mut work) {
            Ok(value) => Ok(Outcome::Committed(value)),
            Err(Failed::Before(e)) => {
                pool.note_failure(&mut conn, &e);
                Err(e)
            }
            Err(Failed::AtCommit {
                xid,
                value,
                error,
                hung,
            }) => {
                pool.note_failure(&mut conn, &error);
                conn.poison();
                // Its pool slot is free before the server is asked on another connection.
                drop(conn);
                match verdict(pool, op, xid, error, hung, checkout) {
                    Verdict::Committed => Ok(Outcome::Committed(value)),
                    // Nothing happened: the error and the caller's retry policy decide whether it
                    // is repeated.
                    Verdict::Aborted(error) => Err(error),
                    Verdict::Unknown(cause) => Ok(Outcome::Unknown { xid, cause }),
                }
            }
        }
    })
}

/// [`run_tracked`] for a public call: an unknown outcome is `RepoError::OutcomeUnknown`.
pub(crate) fn run_once<T>(
    pool: &Pool,
    op: &str,
    retry: Retry,
    work: impl FnMut(&mut Transaction<'_>) -> Result<T>,
) -> Result<T> {
    run_once_as(pool, op, retry, Work::Statements, work)
}

/// [`run_once`] for a tracked write of the given kind of work.
pub(crate) fn run_once_as<T>(
    pool: &Pool,
    op: &str,
    retry: Retry,
    work_kind: Work,
    work: impl FnMut(&mut Transaction<'_>) -> Result<T>,
) -> Result<T> {
    match run_tracked_as(pool, op, retry, Checkout::Pool, work_kind, work)? {
        Outcome::Committed(value) => Ok(value),
        Outcome::Unknown { xid, cause } => Err(unknown(op, xid, &cause)),
    }
}

/// The id of the transaction `tx` (assigned now if it had none), so that a COMMIT whose reply
/// is lost can be [`settle`]d.
pub(crate) fn txid(tx: &mut Transaction<'_>) -> Result<i64> {
    Ok(tx.query_one(TXID, &[])?.try_get(0)?)
}

/// Settles the COMMIT of transaction `xid`, sent on `conn`, by its result: when the reply was
/// lost the server says what happened (committed: `Ok`; aborted: the error), and when it
/// cannot (it hangs, it forgot) the error is `OutcomeUnknown`. For writes that are not run
/// by [`run_tracked`] (a bulk load's swap, whose rows cannot be sent again).
pub(crate) fn settle(
    pool: &Pool,
    conn: &mut PgConnection,
    op: &str,
    xid: i64,
    committed: std::result::Result<(), postgres::Error>,
) -> Result<()> {
    let Err(e) = committed else {
        return Ok(());
    };
    let hung = conn.watch().fired();
    let error = RepoError::from(e);
    pool.note_failure(conn, &error);
    conn.poison();
    match verdict(pool, op, xid, error, hung, Checkout::Pool) {
        Verdict::Committed => Ok(()),
        Verdict::Aborted(error) => Err(error),
        Verdict::Unknown(cause) => Err(unknown(op, xid, &cause)),
    }
}

/// What a COMMIT of a transaction that failed came to.
enum Verdict {
    Committed,
    /// It did not commit: here is why the COMMIT failed.
    Aborted(RepoError),
    /// The server could not be asked (it hangs, or it no longer knows): the COMMIT's error.
    Unknown(RepoError),
}

/// Settles a COMMIT of transaction `xid` that failed with `error`: the server's commit log is
/// asked on a pooled connection, unless the watchdog cut the one that sent it (`hung`: asking
/// a hung server would hang the caller again).
fn verdict(
    pool: &Pool,
    op: &str,
    xid: i64,
    error: RepoError,
    hung: bool,
    checkout: Checkout,
) -> Verdict {
    if hung {
        return Verdict::Unknown(error);
    }
    match status(pool, xid, checkout) {
        Ok(Status::Committed) => {
            log::info!(
                "pg-model-repo: {op}: COMMIT failed ({error}); the server says it committed"
            );
            Verdict::Committed
        }
        Ok(Status::Aborted) => Verdict::Aborted(error),
        Ok(Status::InProgress | Status::Forgotten) | Err(_) => Verdict::Unknown(error),
    }
}

/// The error of a write whose outcome cannot be established.
pub(crate) fn unknown(op: &str, xid: i64, cause: &RepoError) -> RepoError {
    RepoError::OutcomeUnknown(ErrorDetail::new(format!(
        "{op}: COMMIT was sent but its reply was lost ({cause}), and the server could not say \
         whether it took effect; `SELECT txid_status({xid})` tells once it answers"
    )))
}

fn check_out(pool: &Pool, checkout: Checkout) -> Result<Conn> {
    match checkout {
        Checkout::Pool => pool.get(),
        Checkout::Within(timeout) => pool.get_within(timeout),
        Checkout::Until(deadline) => pool.get_until(deadline),
    }
}

fn attempt<T>(
    conn: &mut PgConnection,
    work_kind: Work,
    work: &mut impl FnMut(&mut Transaction<'_>) -> Result<T>,
) -> std::result::Result<T, Failed<T>> {
    let txid = conn.prepare_cached(TXID).map_err(Failed::Before)?;
    let (xid, value, committed) = {
        let client = match work_kind {
            Work::Statements => conn.client(),
            Work::Bulk => conn.unbounded_client(),
        };
        let mut tx = client.transaction().map_err(|e| Failed::Before(e.into()))?;
        if work_kind == Work::Bulk {
            unbounded(&mut tx).map_err(Failed::Before)?;
        }
        let xid: i64 = tx
            .query_one(&txid, &[])
            .and_then(|row| row.try_get(0))
            .map_err(|e| Failed::Before(e.into()))?;
        let value = work(&mut tx).map_err(Failed::Before)?;
        (xid, value, tx.commit())
    };
    let Err(e) = committed else {
        return Ok(value);
    };
    // Any failed COMMIT is settled by asking the server, not by reading the error: a backend
    // terminated while it commits answers 57P01 whether or not the commit record was written.
    let hung = conn.watch().fired();
    let error = RepoError::from(e);
    Err(Failed::AtCommit {
        xid,
        value,
        error,
        hung,
    })
}

/// What the server says about transaction `xid`, asked on a pooled connection; a transaction
/// still in progress is waited for a little.
pub(crate) fn status(pool: &Pool, xid: i64, checkout: Checkout) -> Result<Status> {
    let started = Instant::now();
    loop {
        let found =
            retry::with_retries("txid_status", Retry::Idempotent, Policy::default(), || {
                let mut conn = check_out(pool, checkout)?;
                let row = conn.client().query_one(TXID_STATUS, &[&xid]);
                let status: Option<String> = match row.and_then(|r| r.try_get(0)) {
                    Ok(status) => status,
                    Err(e) => {
                        let e = RepoError::from(e);
                        pool.note_failure(&mut conn, &e);
                        return Err(e);
                    }
                };
                Ok(match status.as_deref() {
                    Some("committed") => Status::Committed,
                    Some("aborted") => Status::Aborted,
                    Some("in progress") => Status::InProgress,
                    _ => Status::Forgotten,
                })
            })?;
        let next_poll = Instant::now() + IN_PROGRESS_POLL;
        let out_of_time = started.elapsed() >= IN_PROGRESS_WAIT
            || matches!(checkout, Checkout::Until(d) if next_poll >= d)
            || call_deadline().is_some_and(|d| next_poll >= d);
        if found != Status::InProgress || out_of_time {
            return Ok(found);
        }
        std::thread::sleep(IN_PROGRESS_POLL);
    }
}
