//! One public operation in progress: its name (for retries' logs and timings), the pool it runs
//! on and where the schema's tables are. The handle makes one per call; features run their
//! statements through it.

use crate::db::commit;
use crate::db::layout::Layout;
use crate::db::pool::{PgConnection, Pool};
use crate::db::retry::{self, Policy, Retry};
use crate::error::{RepoError, Result};

/// One public operation in progress.
#[derive(Debug)]
pub(crate) struct Call<'a> {
    op: &'static str,
    pool: &'a Pool,
    layout: Layout,
}

impl<'a> Call<'a> {
    /// The operation `op` on `pool`.
    pub(crate) fn new(op: &'static str, pool: &'a Pool, layout: Layout) -> Self {
        Call { op, pool, layout }
    }

    /// Where the schema's tables are (plain, or distributed by Citus).
    pub(crate) fn layout(&self) -> Layout {
        self.layout
    }

    /// Runs `f` on a pooled connection under this operation's name, retried per `retry`.
    pub(crate) fn with_conn<T>(
        &self,
        retry: Retry,
        f: impl FnMut(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        self.pool.with_conn(self.op, retry, f)
    }

    /// Runs `f` once, on a connection just seen alive: for work that consumes what cannot be
    /// replayed (the caller's iterator or reader). The checkout and a round trip to the
    /// server are retried as every call's are (after a server restart, or every idle
    /// backend killed, the pool hands out dead sessions until it finds them out): `f` starts
    /// only on a live one, so it never fails at once for a session that died before it.
    pub(crate) fn with_live_conn<T>(
        &self,
        f: impl FnOnce(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        let mut conn = retry::with_retries(self.op, Retry::Idempotent, Policy::default(), || {
            let mut conn = self.pool.get()?;
            match conn.client().batch_execute("") {
                Ok(()) => Ok(conn),
                Err(e) => {
                    let e = RepoError::from(e);
                    self.pool.note_failure(&mut conn, &e);
                    Err(e)
                }
            }
        })?;
        let result = f(&mut conn);
        if let Err(e) = &result {
            self.pool.note_failure(&mut conn, e);
        }
        result
    }

    /// Runs `f` in one transaction whose commit survives a lost reply: after one, the server
    /// says whether it committed (then `f`'s answer stands) or not (then it is retried);
    /// when it cannot say, the call fails with `RepoError::OutcomeUnknown`. For writes whose
    /// answer (a count, a bool) or effect would be wrong if repeated blindly.
    pub(crate) fn run_once<T>(
        &self,
        f: impl FnMut(&mut postgres::Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        commit::run_once(self.pool, self.op, Retry::Idempotent, f)
    }

    /// [`run_once`](Self::run_once) for bulk work (removing a big model's chunks): no
    /// statement_timeout, and the watchdog waits stream_idle_timeout instead of the
    /// statement bound.
    pub(crate) fn run_once_bulk<T>(
        &self,
        f: impl FnMut(&mut postgres::Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        commit::run_once_as(self.pool, self.op, Retry::Idempotent, commit::Work::Bulk, f)
    }

    /// The pool, for work that spans several connections.
    pub(crate) fn pool(&self) -> &'a Pool {
        self.pool
    }
}
