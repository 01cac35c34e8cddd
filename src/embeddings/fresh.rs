//! Loads into fresh storage (sql/V008): the rows go straight into a new, unattached table of
//! the type's shape with no index, and one short transaction at the end builds the key,
//! carries over the type's other rows (a load) or drops them (a full refresh), and swaps the
//! table in. One connection copies with FREEZE inside that last transaction; several COPY
//! streams, each on its own connection, commit into the table before it (nothing is visible
//! until the swap). A load that fails drops its table at once; one whose process died leaves
//! it to the leftovers sweep ([`LOADS`]), which skips a table whose load id is still locked.

use postgres::Transaction;

use crate::db::commit::{settle, txid};
use crate::db::layout::Layout;
use crate::db::pool::{begin_unbounded, quote_ident, PgConnection, Pool};
use crate::embeddings::copy_rows::{copy_in_streams, copy_in_tx, Source, Target};
use crate::embeddings::encode::Prefix;
use crate::embeddings::sql::COLUMNS;
use crate::embeddings::stamps::{with_stamps, Stamps};
use crate::embeddings::types::Storage;
use crate::error::{RepoError, Result};
use crate::schema::sweep::{owner_lock_key, try_owner_lock, Leftover};

const BEGIN: &str =
    "SELECT load_id, storage, registered, created FROM embedding_load_begin($1, $2)";
const TRUNCATE: &str = "SELECT embedding_load_truncate($1)";
const COMMIT: &str = "SELECT embedding_load_commit($1, $2, $3, $4)";
const ABANDON: &str = "SELECT embedding_load_abandon($1, 0)";
const FORGET_TYPE: &str = "SELECT embedding_type_forget($1)";

/// A live load keeps its id locked (session advisory lock) from its begin to its end, so the
/// sweep never drops its table however long it runs; a dead session's lock is gone with it.
const LOCK_LOAD: &str = concat!(
    "SELECT pg_advisory_lock(",
    owner_lock_key!("fresh_load", "$1"),
    ")"
);
const UNLOCK_LOAD: &str = concat!(
    "SELECT pg_advisory_unlock(",
    owner_lock_key!("fresh_load", "$1"),
    ")"
);

/// Tables of loads whose process died before their commit: old enough, and their load id not
/// locked by a live load.
pub(crate) const LOADS: Leftover = Leftover {
    what: "tables of dead loads into fresh storage",
    candidates: "SELECT load_id FROM embedding_loads \
                 WHERE started_at < now() - $1 * interval '1 second'",
    try_lock: try_owner_lock!("fresh_load", "1886221875"),
    delete: "SELECT 1 WHERE embedding_load_abandon($1, $2)",
};

/// What the load does with the type's rows that are not in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Keep {
    /// Carried over: a load (an upsert of its rows).
    OldRows,
    /// Dropped: a full refresh.
    Nothing,
}

/// What a load into fresh storage writes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan<'a> {
    pub(crate) entity_type: &'a str,
    pub(crate) dimension: usize,
    pub(crate) keep: Keep,
    pub(crate) storage: Storage,
    pub(crate) layout: Layout,
    /// Rows the source holds, when known in advance (a slice): the server's count must match.
    pub(crate) expected: Option<u64>,
    /// The type had rows when the load was planned: a load that keeps them reads their
    /// `created_at` (see `stamps`); a type planned empty has none to keep (a key another
    /// session writes meanwhile takes the load's time, as it would anyway).
    pub(crate) stored: bool,
}

/// A load begun: its table, created and committed, locked by the session that began it.
#[derive(Debug)]
struct Fresh {
    load_id: i64,
    table: String,
    /// The load registered its type: a failed load forgets it again.
    registered_type: bool,
}

/// Loads `source` into fresh storage over `conn` alone, in one transaction that creates its
/// rows frozen (where the layout allows: not through a Citus coordinator) and ends with the
/// swap. Returns the rows loaded (the source's, not those carried over).
pub(crate) fn load_single(
    pool: &Pool,
    conn: &mut PgConnection,
    plan: Plan<'_>,
    source: Source<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    if plan.layout != Layout::Local {
        // A Citus coordinator freezes nothing, and wants its COPY into the distributed
        // table out of the transaction that changes the registry: one stream, as below.
        return load_streams(pool, conn, Vec::new(), plan, source, progress);
    }
    let fresh = begin(conn, &plan)?;
    let loaded = guarded(|| {
        kept_stamps(pool, conn, &plan, |conn, stamps| {
            let mut tx = begin_unbounded(conn)?;
            tx.execute(TRUNCATE, &[&fresh.table])?;
            let target = Target {
                sql: &copy_sql(&fresh.table, true, stamps.is_some()),
                prefix: Prefix::None,
                stamps,
                storage: plan.storage,
            };
            let rows = copy_in_tx(&mut tx, target, source, progress)?;
            check_count(&plan, rows)?;
            let xid = commit(&mut tx, &fresh, &plan)?;
            let committed = tx.commit();
            settle(pool, conn, "load", xid, committed)?;
            Ok(rows)
        })
    });
    finish(pool, conn, &fresh, &plan, loaded)
}

/// Loads `source` into fresh storage over `conn` and the connections in `extra` at once,
/// each COPY stream committing into the load's table; then one transaction on `conn`
/// swaps it in. Returns the rows loaded.
pub(crate) fn load_streams(
    pool: &Pool,
    conn: &mut PgConnection,
    extra: Vec<&mut PgConnection>,
    plan: Plan<'_>,
    source: Source<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    let fresh = begin(conn, &plan)?;
    let loaded = guarded(|| {
        kept_stamps(pool, conn, &plan, |conn, stamps| {
            let target = Target {
                sql: &copy_sql(&fresh.table, false, stamps.is_some()),
                prefix: Prefix::None,
                stamps,
                storage: plan.storage,
            };
            let mut streams: Vec<&mut PgConnection> = vec![&mut *conn];
            streams.extend(extra);
            let rows = copy_in_streams(pool, streams, target, source, progress)?;
            check_count(&plan, rows)?;
            let mut tx = begin_unbounded(conn)?;
            let xid = commit(&mut tx, &fresh, &plan)?;
            let committed = tx.commit();
            settle(pool, conn, "load", xid, committed)?;
            Ok(rows)
        })
    });
    finish(pool, conn, &fresh, &plan, loaded)
}

/// What the load's work ended with: its result, or the panic that ended it (the caller's
/// iterator, its progress callback).
type Ended<T> = std::result::Result<Result<T>, Box<dyn std::any::Any + Send>>;

fn guarded<T>(work: impl FnOnce() -> Result<T>) -> Ended<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
}

/// Cleans up after the load (see [`end`]); a panic resumes once that is done, with the
/// session poisoned (a panic went through it).
fn finish<T>(
    pool: &Pool,
    conn: &mut PgConnection,
    fresh: &Fresh,
    plan: &Plan<'_>,
    ended: Ended<T>,
) -> Result<T> {
    match ended {
        Ok(result) => {
            end(pool, conn, fresh, plan, result.as_ref().map(|_| ()));
            result
        }
        Err(panic) => {
            let cause = RepoError::Io(std::io::Error::other("the load panicked"));
            end(pool, conn, fresh, plan, Err(&cause));
            conn.poison();
            std::panic::resume_unwind(panic)
        }
    }
}

fn copy_sql(table: &str, freeze: bool, stamps: bool) -> String {
    format!(
        "COPY {} ({COLUMNS}{}) FROM STDIN (FORMAT binary{})",
        quote_ident(table),
        if stamps {
            ", created_at, updated_at"
        } else {
            ""
        },
        if freeze { ", FREEZE" } else { "" }
    )
}

/// Runs `work` for a load that keeps the type's rows with their keys' stored `created_at`
/// (see `stamps`), so the rows the load writes again keep theirs (as an upsert does) and
/// every row it writes is updated at the same time; for a refresh, or a type planned with no
/// rows, with none.
fn kept_stamps<T>(
    pool: &Pool,
    conn: &mut PgConnection,
    plan: &Plan<'_>,
    work: impl FnOnce(&mut PgConnection, Option<&Stamps>) -> Result<T>,
) -> Result<T> {
    match plan.keep {
        Keep::OldRows if plan.stored => with_stamps(pool, conn, plan.entity_type, work),
        Keep::OldRows | Keep::Nothing => work(conn, None),
    }
}

/// Registers the type if new and creates the load's table (committed), its id locked by this
/// session. A load (not a refresh) of a type registered with another dimension fails here.
fn begin(conn: &mut PgConnection, plan: &Plan<'_>) -> Result<Fresh> {
    let dimension = i32::try_from(plan.dimension)
        .map_err(|_| RepoError::invalid(format!("dimension {} is too large", plan.dimension)))?;
    let mut tx = begin_unbounded(conn)?;
    let row = tx.query_one(BEGIN, &[&plan.entity_type, &dimension])?;
    let fresh = Fresh {
        load_id: row.try_get(0)?,
        table: row.try_get(1)?,
        registered_type: row.try_get(3)?,
    };
    let registered: i32 = row.try_get(2)?;
    tx.query_one(LOCK_LOAD, &[&fresh.load_id])?;
    if plan.keep == Keep::OldRows && registered != dimension {
        // Rolled back: no table, no registration, and the session lock goes with it.
        tx.query_one(UNLOCK_LOAD, &[&fresh.load_id])?;
        return Err(RepoError::DimensionMismatch {
            entity_type: plan.entity_type.to_owned(),
            expected: registered as usize,
            actual: plan.dimension,
            index: None,
        });
    }
    tx.commit()?;
    log::debug!(
        "pg-model-repo: load {} of {:?} into {}",
        fresh.load_id,
        plan.entity_type,
        fresh.table
    );
    Ok(fresh)
}

/// The server counted every row the source held.
fn check_count(plan: &Plan<'_>, rows: u64) -> Result<()> {
    match plan.expected {
        Some(expected) if expected != rows => Err(RepoError::Io(std::io::Error::other(format!(
            "the server stored {rows} rows of a load of {expected}"
        )))),
        _ => Ok(()),
    }
}

/// The load's last step, in `tx`: key, carry-over, swap. An entity_id twice in the load
/// fails the key's build: `InvalidInput`. Returns the transaction's id, to settle its COMMIT
/// should the reply be lost.
fn commit(tx: &mut Transaction<'_>, fresh: &Fresh, plan: &Plan<'_>) -> Result<i64> {
    let keep = plan.keep == Keep::OldRows;
    let carried: i64 = tx
        .query_one(
            COMMIT,
            &[
                &plan.entity_type,
                &fresh.table,
                &(plan.dimension as i32),
                &keep,
            ],
        )
        .map_err(|e| duplicate_as_invalid(e.into()))?
        .try_get(0)?;
    log::debug!(
        "pg-model-repo: load {} of {:?} swapped in, {carried} rows carried over",
        fresh.load_id,
        plan.entity_type
    );
    txid(tx)
}

/// The key is built after the rows are in: an entity_id twice shows there.
fn duplicate_as_invalid(error: RepoError) -> RepoError {
    match error {
        RepoError::Conflict(m) => {
            RepoError::InvalidInput(m.with_context("duplicate entity_id in one load"))
        }
        other => other,
    }
}

/// After the load, success or not: a failed load's table is dropped at once (on this
/// connection if it still works, else on a fresh one), a type it registered is forgotten
/// (when it still has no rows), and the load id is unlocked.
fn end(
    pool: &Pool,
    conn: &mut PgConnection,
    fresh: &Fresh,
    plan: &Plan<'_>,
    outcome: std::result::Result<(), &RepoError>,
) {
    if let Err(cause) = outcome {
        let abandon = |conn: &mut PgConnection| -> Result<()> {
            conn.client().query_one(ABANDON, &[&fresh.load_id])?;
            if fresh.registered_type {
                conn.client().query_one(FORGET_TYPE, &[&plan.entity_type])?;
            }
            Ok(())
        };
        let own = if conn.is_broken() {
            Err(RepoError::Io(std::io::Error::other("connection lost")))
        } else {
            abandon(conn)
        };
        let dropped = own.or_else(|e| {
            // So that the pool weeds out the idle sessions that died with this one.
            pool.note_failure(conn, &e);
            pool.note_failure(conn, cause);
            pool.get().and_then(|mut other| abandon(&mut other))
        });
        match dropped {
            Ok(()) => log::debug!(
                "pg-model-repo: load {} failed ({cause}); dropped {}",
                fresh.load_id,
                fresh.table
            ),
            Err(e) => log::warn!(
                "pg-model-repo: load {} failed ({cause}) and its table {} could not be dropped \
                 ({e}); the leftovers sweep drops it within the hour",
                fresh.load_id,
                fresh.table
            ),
        }
    }
    if !conn.is_broken() {
        if let Err(e) = conn.client().query_one(UNLOCK_LOAD, &[&fresh.load_id]) {
            log::debug!(
                "pg-model-repo: unlocking load {} failed ({e})",
                fresh.load_id
            );
            conn.poison();
        }
    }
}
