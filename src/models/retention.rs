//! Retention: which versions of a model stay (the newest active ones, the ones an alias
//! serves, the recent ones) and which go, decided by one rule that the dry run and the real
//! run share, and applied in one transaction per model, chunks and events included.

use std::time::{Duration, SystemTime};

use postgres::Transaction;

use crate::db::call::Call;
use crate::db::retry::Retry;
use crate::error::Result;
use crate::models::aliases::{drop_aliases_to, dropped_alias_notices};
use crate::models::chunked::delete_sets;
use crate::models::events::{notify, ModelEventKind, Notice};
use crate::repository::ModelRepository;
use crate::validate;

/// Which versions [`apply_retention`](ModelRepository::apply_retention) keeps.
///
/// ```no_run
/// # fn main() -> pg_model_repo::Result<()> {
/// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
/// use pg_model_repo::RetentionPolicy;
/// use std::time::Duration;
/// let policy = RetentionPolicy {
///     keep_newest: 3,
///     keep_younger_than: Some(Duration::from_secs(7 * 24 * 3600)),
///     ..RetentionPolicy::default()
/// };
/// let report = repo.apply_retention("ranker", &policy)?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RetentionPolicy {
    /// How many of the newest active versions (by save order) stay. Defaults to 5.
    pub keep_newest: usize,
    /// Whether every version an alias points to stays. Defaults to true.
    pub keep_aliased: bool,
    /// Versions saved less than this long ago stay (by the database clock). Defaults to
    /// `None`: age keeps nothing.
    pub keep_younger_than: Option<Duration>,
    /// Report what would go, change nothing. Defaults to false.
    pub dry_run: bool,
}

impl Default for RetentionPolicy {
    /// Keep the newest 5 and every aliased version; no age rule; not a dry run.
    fn default() -> Self {
        RetentionPolicy {
            keep_newest: 5,
            keep_aliased: true,
            keep_younger_than: None,
            dry_run: false,
        }
    }
}

/// What a retention run did to one model (or, for a dry run, would do).
///
/// ```no_run
/// # fn main() -> pg_model_repo::Result<()> {
/// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
/// let report = repo.apply_retention("ranker", &Default::default())?;
/// for v in &report.versions {
///     println!("{} ({} bytes): {:?}", v.version, v.size_bytes, v.reason);
/// }
/// println!("{} bytes freed", report.bytes_freed);
/// # Ok(()) }
/// ```
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RetentionReport {
    /// The model.
    pub model_name: String,
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// Versions removed (or that the dry run would remove), newest first.
    pub removed: Vec<String>,
    /// Versions kept, newest first.
    pub kept: Vec<String>,
    /// The sum of the removed versions' sizes.
    pub bytes_freed: u64,
    /// Every version of the model, newest first, with why it stays or goes.
    pub versions: Vec<RetentionDecision>,
    /// Aliases removed with the versions they pointed to (possible only without
    /// `keep_aliased`), by name.
    pub aliases_removed: Vec<String>,
}

/// One version in a [`RetentionReport`]: its facts and the rule that decided its fate.
///
/// ```no_run
/// # fn main() -> pg_model_repo::Result<()> {
/// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
/// let report = repo.apply_retention("ranker", &Default::default())?;
/// let biggest_kept = report.versions.iter().filter(|v| !v.removed).max_by_key(|v| v.size_bytes);
/// # Ok(()) }
/// ```
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RetentionDecision {
    /// The version.
    pub version: String,
    /// Its size.
    pub size_bytes: u64,
    /// False for a soft-deleted version.
    pub is_active: bool,
    /// Its save sequence (the order "newest" follows).
    pub save_seq: i64,
    /// When it was saved.
    pub created_at: SystemTime,
    /// Whether it is removed (or would be).
    pub removed: bool,
    /// Why it stays or goes.
    pub reason: RetentionReason,
}

/// Why a version stays or goes, the first rule that applies in this order.
///
/// ```no_run
/// # fn main() -> pg_model_repo::Result<()> {
/// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
/// use pg_model_repo::RetentionReason;
/// let report = repo.apply_retention("ranker", &Default::default())?;
/// let served: Vec<&str> = report
///     .versions
///     .iter()
///     .filter(|v| v.reason == RetentionReason::Aliased)
///     .map(|v| v.version.as_str())
///     .collect();
/// # Ok(()) }
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum RetentionReason {
    /// Stays: among the `keep_newest` newest active versions.
    Newest,
    /// Stays: an alias points to it (`keep_aliased`).
    Aliased,
    /// Stays: saved less than `keep_younger_than` ago.
    Recent,
    /// Goes: an active version older than the newest `keep_newest`, not aliased (or aliased
    /// without `keep_aliased`) and not recent.
    Superseded,
    /// Goes: soft-deleted, and not recent.
    SoftDeleted,
}

impl RetentionReason {
    /// Whether a version with this reason is removed.
    ///
    /// ```no_run
    /// assert!(pg_model_repo::RetentionReason::Superseded.removes());
    /// assert!(!pg_model_repo::RetentionReason::Aliased.removes());
    /// ```
    pub fn removes(self) -> bool {
        matches!(
            self,
            RetentionReason::Superseded | RetentionReason::SoftDeleted
        )
    }
}

/// The longest `keep_younger_than` sent to the database, in microseconds: 10,000 years, more
/// than separates any two timestamps PostgreSQL stores from now (it starts at 4713 BC), and
/// little enough that an interval holds it. A longer one means the same: everything is recent.
const MAX_AGE_US: i64 = 10_000 * 36_525 * 864_000_000;

/// A model's versions, newest first, with what retention needs; `$2` is keep_younger_than in
/// microseconds (NULL: no age rule), compared with the database clock.
const SELECT_VERSIONS: &str = "SELECT version, is_active, save_seq, size_bytes, created_at, \
        chunk_set, (now() - created_at) < $2::int8 * interval '1 microsecond' AS recent \
     FROM ml_models WHERE model_name = $1 ORDER BY save_seq DESC";

/// The same rows, locked against concurrent deletes, alias moves onto them, and re-saves.
const SELECT_VERSIONS_FOR_UPDATE: &str = "SELECT version, is_active, save_seq, size_bytes, \
        created_at, chunk_set, (now() - created_at) < $2::int8 * interval '1 microsecond' AS recent \
     FROM ml_models WHERE model_name = $1 ORDER BY save_seq DESC FOR UPDATE";

const SELECT_ALIASES: &str =
    "SELECT alias, version FROM model_aliases WHERE model_name = $1 ORDER BY alias";

const DELETE_VERSIONS: &str = "DELETE FROM ml_models WHERE model_name = $1 AND version = ANY($2)";

const SELECT_MODELS: &str = "SELECT DISTINCT model_name FROM ml_models ORDER BY model_name";

/// One row of [`SELECT_VERSIONS`].
struct Stored {
    version: String,
    is_active: bool,
    save_seq: i64,
    size_bytes: u64,
    created_at: SystemTime,
    chunk_set: Option<i64>,
    recent: bool,
}

impl ModelRepository {
    /// Removes the versions of `model_name` that `policy` does not keep, in one transaction:
    /// a version stays if it is among the `keep_newest` newest active versions, or an alias
    /// points to it (with `keep_aliased`), or it was saved less than `keep_younger_than` ago
    /// (by the database clock); every other version, soft-deleted ones included, is removed
    /// physically, with its chunks, in the same transaction. Aliases that pointed to removed
    /// versions go (only possible without `keep_aliased`); their history and the training
    /// metrics stay. Each removal sends a `CleanedUp` event (and each alias removed an
    /// `AliasDeleted`) when the transaction commits.
    ///
    /// A dry run reads the same rows, applies the same rule and returns the same report
    /// (with `dry_run: true`), changing nothing. An unknown model: a report with nothing in
    /// it. [`cleanup_old_models`](Self::cleanup_old_models) keeps its own, simpler rule.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::RetentionPolicy;
    /// let policy = RetentionPolicy { keep_newest: 3, dry_run: true, ..Default::default() };
    /// let would = repo.apply_retention("ranker", &policy)?;
    /// println!("would remove {:?}, freeing {} bytes", would.removed, would.bytes_freed);
    /// let done = repo.apply_retention("ranker", &RetentionPolicy { dry_run: false, ..policy })?;
    /// # Ok(()) }
    /// ```
    pub fn apply_retention(
        &self,
        model_name: &str,
        policy: &RetentionPolicy,
    ) -> Result<RetentionReport> {
        self.timed("apply_retention", |call| {
            validate::model_name(model_name)?;
            self.retain(call, model_name, policy)
        })
    }

    /// [`apply_retention`](Self::apply_retention) for every model in the schema, each in its
    /// own transaction, in model name order: one report per model, also for a model where
    /// nothing goes. On an error, the models before it keep what was done to them.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let reports = repo.apply_retention_all(&Default::default())?;
    /// let freed: u64 = reports.iter().map(|r| r.bytes_freed).sum();
    /// # Ok(()) }
    /// ```
    pub fn apply_retention_all(&self, policy: &RetentionPolicy) -> Result<Vec<RetentionReport>> {
        self.timed("apply_retention_all", |call| {
            let models: Vec<String> = call.with_conn(Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(SELECT_MODELS)?;
                conn.client()
                    .query(&statement, &[])?
                    .iter()
                    .map(|row| Ok(row.try_get(0)?))
                    .collect()
            })?;
            models
                .iter()
                .map(|model| self.retain(call, model, policy))
                .collect()
        })
    }

    fn retain(
        &self,
        call: &Call<'_>,
        model_name: &str,
        policy: &RetentionPolicy,
    ) -> Result<RetentionReport> {
        let younger_than = policy
            .keep_younger_than
            .map(|d| i64::try_from(d.as_micros()).map_or(MAX_AGE_US, |us| us.min(MAX_AGE_US)));
        if policy.dry_run {
            return call.with_conn(Retry::Idempotent, |conn| {
                let mut tx = conn.client().transaction()?;
                let report = plan(&mut tx, model_name, policy, younger_than, false)?.0;
                tx.rollback()?;
                Ok(report)
            });
        }
        let channel = self.events_channel();
        // A tracked write: after a lost commit reply the report stays right. Removing a big
        // model's chunks is bulk work.
        call.run_once_bulk(|tx| {
            let (report, chunk_sets) = plan(tx, model_name, policy, younger_than, true)?;
            if report.removed.is_empty() {
                return Ok(report);
            }
            tx.execute(DELETE_VERSIONS, &[&model_name, &report.removed])?;
            let dropped = drop_aliases_to(tx, model_name, &report.removed)?;
            delete_sets(tx, model_name, &chunk_sets)?;
            let mut notices: Vec<Notice<'_>> = report
                .versions
                .iter()
                .filter(|v| v.removed)
                .map(|v| {
                    Notice::version(
                        ModelEventKind::CleanedUp,
                        model_name,
                        &v.version,
                        Some(v.save_seq),
                    )
                })
                .collect();
            notices.extend(dropped_alias_notices(model_name, &dropped));
            notify(tx, channel, &notices)?;
            Ok(report)
        })
    }
}

/// Reads a model's versions and aliases (locking the versions when `lock`), and decides.
/// Returns the report and the chunk sets of the versions that go.
fn plan(
    tx: &mut Transaction<'_>,
    model_name: &str,
    policy: &RetentionPolicy,
    younger_than: Option<i64>,
    lock: bool,
) -> Result<(RetentionReport, Vec<(String, i64)>)> {
    let select = if lock {
        SELECT_VERSIONS_FOR_UPDATE
    } else {
        SELECT_VERSIONS
    };
    let stored: Vec<Stored> = tx
        .query(select, &[&model_name, &younger_than])?
        .iter()
        .map(|row| {
            Ok(Stored {
                version: row.try_get("version")?,
                is_active: row.try_get("is_active")?,
                save_seq: row.try_get("save_seq")?,
                size_bytes: u64::try_from(row.try_get::<_, i64>("size_bytes")?).unwrap_or(0),
                created_at: row.try_get("created_at")?,
                chunk_set: row.try_get("chunk_set")?,
                recent: row.try_get::<_, Option<bool>>("recent")?.unwrap_or(false),
            })
        })
        .collect::<Result<_>>()?;
    let aliases: Vec<(String, String)> = tx
        .query(SELECT_ALIASES, &[&model_name])?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<Result<_>>()?;
    let reasons = decide(&stored, &aliases, policy);
    let mut report = RetentionReport {
        model_name: model_name.to_owned(),
        dry_run: policy.dry_run,
        removed: Vec::new(),
        kept: Vec::new(),
        bytes_freed: 0,
        versions: Vec::with_capacity(stored.len()),
        aliases_removed: Vec::new(),
    };
    let mut chunk_sets = Vec::new();
    for (row, reason) in stored.into_iter().zip(reasons) {
        let removed = reason.removes();
        if removed {
            report.bytes_freed += row.size_bytes;
            report.removed.push(row.version.clone());
            if let Some(set) = row.chunk_set {
                chunk_sets.push((row.version.clone(), set));
            }
        } else {
            report.kept.push(row.version.clone());
        }
        report.versions.push(RetentionDecision {
            version: row.version,
            size_bytes: row.size_bytes,
            is_active: row.is_active,
            save_seq: row.save_seq,
            created_at: row.created_at,
            removed,
            reason,
        });
    }
    report.aliases_removed = aliases
        .into_iter()
        .filter(|(_, version)| report.removed.contains(version))
        .map(|(alias, _)| alias)
        .collect();
    Ok((report, chunk_sets))
}

/// The rule: for each version (newest first), the first reason that applies.
fn decide(
    stored: &[Stored],
    aliases: &[(String, String)],
    policy: &RetentionPolicy,
) -> Vec<RetentionReason> {
    let mut active_seen = 0usize;
    stored
        .iter()
        .map(|v| {
            if v.is_active {
                active_seen += 1;
                if active_seen <= policy.keep_newest {
                    return RetentionReason::Newest;
                }
            }
            if policy.keep_aliased && aliases.iter().any(|(_, target)| *target == v.version) {
                RetentionReason::Aliased
            } else if v.recent {
                RetentionReason::Recent
            } else if v.is_active {
                RetentionReason::Superseded
            } else {
                RetentionReason::SoftDeleted
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(version: &str, is_active: bool, recent: bool) -> Stored {
        Stored {
            version: version.to_owned(),
            is_active,
            save_seq: 0,
            size_bytes: 1,
            created_at: SystemTime::UNIX_EPOCH,
            chunk_set: None,
            recent,
        }
    }

    #[test]
    fn the_first_rule_that_applies_decides() {
        use RetentionReason::*;
        let stored = [
            row("6", true, true),
            row("5", false, false),
            row("4", true, false),
            row("3", true, false),
            row("2", true, true),
            row("1", false, true),
            row("0", false, false),
        ];
        let aliases = [("champion".to_owned(), "3".to_owned())];
        let policy = RetentionPolicy {
            keep_newest: 2,
            ..Default::default()
        };
        assert_eq!(
            decide(&stored, &aliases, &policy),
            [
                Newest,
                SoftDeleted,
                Newest,
                Aliased,
                Recent,
                Recent,
                SoftDeleted
            ]
        );
        let policy = RetentionPolicy {
            keep_newest: 0,
            keep_aliased: false,
            ..Default::default()
        };
        assert_eq!(
            decide(&stored, &aliases, &policy),
            [
                Recent,
                SoftDeleted,
                Superseded,
                Superseded,
                Recent,
                Recent,
                SoftDeleted
            ]
        );
    }
}
