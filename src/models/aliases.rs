//! Model aliases: named, movable pointers to an active version ("champion", "staging"), with a
//! stack of targets that rollback pops and a history of every move.

use std::collections::BTreeMap;
use std::time::SystemTime;

use postgres::Transaction;

use crate::db::retry::Retry;
use crate::error::{RepoError, Result};
use crate::models::events::{notify, ModelEventKind, Notice};
use crate::models::reference::VersionRef;
use crate::repository::ModelRepository;
use crate::validate;

const UPSERT_ALIAS: &str =
    "INSERT INTO model_aliases (model_name, alias, version) VALUES ($1, $2, $3)
     ON CONFLICT (model_name, alias) DO UPDATE SET version = EXCLUDED.version,
         updated_at = EXCLUDED.updated_at";

const PUSH: &str = "INSERT INTO model_alias_stack (model_name, alias, version) VALUES ($1, $2, $3)";

const RECORD: &str = "INSERT INTO model_alias_history (model_name, alias, version, action)
     VALUES ($1, $2, $3, $4) RETURNING event_seq";

const CURRENT_FOR_UPDATE: &str =
    "SELECT version FROM model_aliases WHERE model_name = $1 AND alias = $2 FOR UPDATE";

const STACK_DOWN: &str = "SELECT s.position, s.version, coalesce(m.is_active, false) AS active,
        m.save_seq
     FROM model_alias_stack s
     LEFT JOIN ml_models m ON m.model_name = s.model_name AND m.version = s.version
     WHERE s.model_name = $1 AND s.alias = $2 ORDER BY s.position DESC FOR UPDATE OF s";

const POP_ABOVE: &str =
    "DELETE FROM model_alias_stack WHERE model_name = $1 AND alias = $2 AND position > $3";

const MOVE: &str =
    "UPDATE model_aliases SET version = $3, updated_at = now() WHERE model_name = $1 AND alias = $2";

const DELETE_ALIAS: &str =
    "DELETE FROM model_aliases WHERE model_name = $1 AND alias = $2 RETURNING version";

const DELETE_STACK: &str = "DELETE FROM model_alias_stack WHERE model_name = $1 AND alias = $2";

const EVENT_EXISTS: &str = "SELECT 1 FROM model_alias_history \
     WHERE model_name = $1 AND alias = $2 AND event_seq = $3";

const SELECT_ALIASES: &str =
    "SELECT alias, version FROM model_aliases WHERE model_name = $1 ORDER BY alias";

const SELECT_HISTORY: &str = "SELECT version, set_at FROM model_alias_history
     WHERE model_name = $1 AND alias = $2 ORDER BY event_seq";

impl ModelRepository {
    /// Points `alias` at an active version (`"latest"` and `"@other"` resolve first) and pushes
    /// it on the alias's stack. Aliases are 1..=64 characters of `[A-Za-z0-9_-]`, not
    /// "latest"; an absent or deleted version is `NotFound`. Setting the version the alias
    /// already points to changes nothing.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// repo.set_model_alias("ranker", "champion", "2.0")?;
    /// let champion = repo.load_model("ranker", "@champion")?;
    /// # Ok(()) }
    /// ```
    pub fn set_model_alias(&self, model_name: &str, alias: &str, version: &str) -> Result<()> {
        self.timed("set_model_alias", |call| {
            validate::model_name(model_name)?;
            validate::alias(alias)?;
            let target = VersionRef::parse(version)?;
            let channel = self.events_channel();
            call.with_conn(Retry::Idempotent, |conn| {
                let mut tx = conn.client().transaction()?;
                // FOR SHARE: a concurrent delete of the target waits for us, or we for it.
                let row = target
                    .select(&mut tx, model_name, "m.version, m.save_seq", "FOR SHARE")?
                    .ok_or_else(|| {
                        RepoError::not_found(format!(
                            "no active version {version:?} of model {model_name:?}"
                        ))
                    })?;
                let (literal, save_seq): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
                let current: Option<String> = tx
                    .query_opt(CURRENT_FOR_UPDATE, &[&model_name, &alias])?
                    .map(|row| row.try_get(0))
                    .transpose()?;
                // Also what a retry after a lost commit reply finds: no second event.
                if current.as_deref() == Some(literal.as_str()) {
                    return Ok(());
                }
                tx.execute(UPSERT_ALIAS, &[&model_name, &alias, &literal])?;
                tx.execute(PUSH, &[&model_name, &alias, &literal])?;
                tx.query_one(RECORD, &[&model_name, &alias, &literal, &"set"])?;
                let event = Notice::alias(
                    ModelEventKind::AliasSet,
                    model_name,
                    alias,
                    &literal,
                    Some(save_seq),
                );
                notify(&mut tx, channel, &[event])?;
                tx.commit()?;
                Ok(())
            })
        })
    }

    /// Removes an alias (its history stays). True if it existed.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// repo.delete_model_alias("ranker", "staging")?;
    /// # Ok(()) }
    /// ```
    pub fn delete_model_alias(&self, model_name: &str, alias: &str) -> Result<bool> {
        self.timed("delete_model_alias", |call| {
            validate::model_name(model_name)?;
            validate::alias(alias)?;
            let channel = self.events_channel();
            // A tracked write: after a lost commit reply the answer stays right.
            call.run_once(|tx| {
                let Some(row) = tx.query_opt(DELETE_ALIAS, &[&model_name, &alias])? else {
                    tx.execute(DELETE_STACK, &[&model_name, &alias])?;
                    return Ok(false);
                };
                let version: String = row.try_get(0)?;
                tx.execute(DELETE_STACK, &[&model_name, &alias])?;
                let event = Notice::alias(
                    ModelEventKind::AliasDeleted,
                    model_name,
                    alias,
                    &version,
                    None,
                );
                notify(tx, channel, &[event])?;
                Ok(true)
            })
        })
    }

    /// Every alias of a model and the version it points to.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// for (alias, version) in repo.get_model_aliases("ranker")? {
    ///     println!("@{alias} -> {version}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn get_model_aliases(&self, model_name: &str) -> Result<BTreeMap<String, String>> {
        self.timed("get_model_aliases", |call| {
            validate::model_name(model_name)?;
            call.with_conn(Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(SELECT_ALIASES)?;
                conn.client()
                    .query(&statement, &[&model_name])?
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                    .collect()
            })
        })
    }

    /// Every move of an alias (sets and rollbacks) as `(version, when)`, oldest first; empty
    /// for an alias that never existed.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// for (version, at) in repo.get_alias_history("ranker", "champion")? {
    ///     println!("{version} at {at:?}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn get_alias_history(
        &self,
        model_name: &str,
        alias: &str,
    ) -> Result<Vec<(String, SystemTime)>> {
        self.timed("get_alias_history", |call| {
            validate::model_name(model_name)?;
            validate::alias(alias)?;
            call.with_conn(Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(SELECT_HISTORY)?;
                conn.client()
                    .query(&statement, &[&model_name, &alias])?
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                    .collect()
            })
        })
    }

    /// Moves an alias back to the version it pointed to before its last set, skipping (and
    /// popping) versions no longer active; returns the version it moved to. `NotFound` when
    /// the alias does not exist or nothing active is left below (then nothing changes).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let restored = repo.rollback_model_alias("ranker", "champion")?;
    /// # Ok(()) }
    /// ```
    pub fn rollback_model_alias(&self, model_name: &str, alias: &str) -> Result<String> {
        self.timed("rollback_model_alias", |call| {
            validate::model_name(model_name)?;
            validate::alias(alias)?;
            // A rollback is not idempotent: a commit whose outcome is unknown is checked
            // against the history row it would have written, never blindly repeated.
            let mut pending: Option<(i64, String)> = None;
            let channel = self.events_channel();
            call.with_conn(Retry::Idempotent, |conn| {
                if let Some((event, target)) = &pending {
                    let done = conn
                        .client()
                        .query_opt(EVENT_EXISTS, &[&model_name, &alias, event])?;
                    if done.is_some() {
                        return Ok(target.clone());
                    }
                }
                let mut tx = conn.client().transaction()?;
                let (event, target, save_seq) = pop_to_active(&mut tx, model_name, alias)?;
                let notice = Notice::alias(
                    ModelEventKind::AliasRolledBack,
                    model_name,
                    alias,
                    &target,
                    save_seq,
                );
                notify(&mut tx, channel, &[notice])?;
                pending = Some((event, target.clone()));
                tx.commit()?;
                Ok(target)
            })
        })
    }
}

/// Pops the current target and every inactive one below it; moves the alias to the first
/// active version left and records the move. Returns (history event, new target, its save
/// sequence).
fn pop_to_active(
    tx: &mut Transaction<'_>,
    model_name: &str,
    alias: &str,
) -> Result<(i64, String, Option<i64>)> {
    if tx
        .query_opt(CURRENT_FOR_UPDATE, &[&model_name, &alias])?
        .is_none()
    {
        return Err(RepoError::not_found(format!(
            "model {model_name:?} has no alias {alias:?}"
        )));
    }
    let stack = tx.query(STACK_DOWN, &[&model_name, &alias])?;
    // Skip the top (the current target), then the first active entry below is the new top.
    let mut below = None;
    for row in stack.iter().skip(1) {
        if row.try_get::<_, bool>("active")? {
            below = Some(row);
            break;
        }
    }
    let Some(row) = below else {
        return Err(RepoError::not_found(format!(
            "alias {alias:?} of model {model_name:?} has no earlier active version to roll back to"
        )));
    };
    let position: i64 = row.try_get("position")?;
    let target: String = row.try_get("version")?;
    let save_seq: Option<i64> = row.try_get("save_seq")?;
    tx.execute(POP_ABOVE, &[&model_name, &alias, &position])?;
    tx.execute(MOVE, &[&model_name, &alias, &target])?;
    let event: i64 = tx
        .query_one(RECORD, &[&model_name, &alias, &target, &"rollback"])?
        .try_get(0)?;
    Ok((event, target, save_seq))
}

/// The aliases that point to any of `versions`, removed with their stacks (history stays).
const DROP_ALIASES_TO: &str = "WITH gone AS (
        DELETE FROM model_aliases WHERE model_name = $1 AND version = ANY($2)
        RETURNING alias, version),
     stack AS (
        DELETE FROM model_alias_stack s USING gone
        WHERE s.model_name = $1 AND s.alias = gone.alias)
     SELECT alias, version FROM gone ORDER BY alias";

/// Removes the aliases (and their stacks) that point to any of `versions`; history stays.
/// Returns the removed aliases and the versions they pointed to, by alias.
pub(crate) fn drop_aliases_to(
    tx: &mut Transaction<'_>,
    model_name: &str,
    versions: &[String],
) -> Result<Vec<(String, String)>> {
    if versions.is_empty() {
        return Ok(Vec::new());
    }
    tx.query(DROP_ALIASES_TO, &[&model_name, &versions])?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// The `AliasDeleted` events of the aliases [`drop_aliases_to`] removed.
pub(crate) fn dropped_alias_notices<'a>(
    model_name: &'a str,
    dropped: &'a [(String, String)],
) -> impl Iterator<Item = Notice<'a>> {
    dropped.iter().map(move |(alias, version)| {
        Notice::alias(
            ModelEventKind::AliasDeleted,
            model_name,
            alias,
            version,
            None,
        )
    })
}
