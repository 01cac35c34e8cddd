//! Waiting for an alias to move: read it, and if it has not moved, listen for its events (and
//! re-read now and then, for moves other clients make with SQL, which send none).

use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;

use crate::db::retry::Retry;
use crate::error::{RepoError, Result};
use crate::models::events::{ModelEvent, ModelEventKind};
use crate::repository::ModelRepository;
use crate::validate;

/// How often a wait reads the alias again even without an event: the bound on how late it
/// sees a move made by another client's SQL.
pub(crate) const ALIAS_RECHECK: Duration = Duration::from_secs(2);

const SELECT_TARGET: &str =
    "SELECT version FROM model_aliases WHERE model_name = $1 AND alias = $2";

impl ModelRepository {
    /// Waits until `alias` of `model_name` points to a version other than `current_version`
    /// (`None`: the alias does not exist yet) and returns that version, or `Ok(None)` when
    /// `timeout` passes first. It answers at once when the alias already points elsewhere,
    /// so a move just before the call is never missed: it reads the alias, and if it must
    /// wait, subscribes first and reads again, so every later move arrives as an event. An
    /// alias that is deleted is not a move: the wait goes on until it points to a version.
    ///
    /// While it waits it holds one listening connection (see
    /// [`subscribe_model_events`](Self::subscribe_model_events)); it also reads the alias
    /// again every 2 seconds, which catches moves made by other clients' SQL (they send no
    /// event) and by the library while the listening connection was being reopened.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use std::time::Duration;
    /// let mut serving = repo.get_model_aliases("ranker")?.get("champion").cloned();
    /// loop {
    ///     match repo.wait_for_alias_change("ranker", "champion", serving.as_deref(),
    ///                                      Duration::from_secs(3600))? {
    ///         Some(version) => {
    ///             let model = repo.load_model("ranker", &version)?;
    ///             serving = Some(version);
    ///         }
    ///         None => continue, // an hour without a move
    ///     }
    /// }
    /// # }
    /// ```
    pub fn wait_for_alias_change(
        &self,
        model_name: &str,
        alias: &str,
        current_version: Option<&str>,
        timeout: Duration,
    ) -> Result<Option<String>> {
        validate::model_name(model_name)?;
        validate::alias(alias)?;
        if let Some(version) = current_version {
            validate::name("current_version", version, validate::VERSION_MAX)?;
        }
        let deadline = Instant::now().checked_add(timeout);
        let moved = |target: Option<String>| target.filter(|v| Some(v.as_str()) != current_version);
        if let Some(version) = moved(self.alias_target(model_name, alias)?) {
            return Ok(Some(version));
        }
        let events = self.subscribe_model_events()?;
        loop {
            if let Some(version) = moved(self.alias_target(model_name, alias)?) {
                return Ok(Some(version));
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            let recheck = now + ALIAS_RECHECK;
            let wake = deadline.map_or(recheck, |d| d.min(recheck));
            loop {
                let left = wake.saturating_duration_since(Instant::now());
                match events.receiver().recv_timeout(left) {
                    Ok(event) if concerns(&event, model_name, alias) => break,
                    Ok(_) => {}
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(RepoError::Io(std::io::Error::other(
                            "the subscription of wait_for_alias_change ended",
                        )))
                    }
                }
            }
        }
    }

    /// The version an alias points to now.
    fn alias_target(&self, model_name: &str, alias: &str) -> Result<Option<String>> {
        self.timed("wait_for_alias_change", |call| {
            call.with_conn(Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(SELECT_TARGET)?;
                conn.client()
                    .query_opt(&statement, &[&model_name, &alias])?
                    .map(|row| row.try_get(0))
                    .transpose()
                    .map_err(RepoError::from)
            })
        })
    }
}

/// Whether `event` may mean the alias moved.
fn concerns(event: &ModelEvent, model_name: &str, alias: &str) -> bool {
    match event.kind {
        ModelEventKind::Resync => true,
        ModelEventKind::AliasSet | ModelEventKind::AliasRolledBack => {
            event.model_name == model_name && event.alias.as_deref() == Some(alias)
        }
        _ => false,
    }
}
