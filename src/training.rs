//! Training metrics: named finite numbers per model version, kept as a history of records.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::Value;

use crate::db::error::{RepoError, Result};
use crate::db::retry::Retry;
use crate::repository::ModelRepository;
use crate::validate;

/// One saved set of training metrics.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TrainingMetricsRecord {
    /// The model's name.
    pub model_name: String,
    /// The version, as given (not resolved).
    pub version: String,
    /// Metric name to value.
    pub metrics: BTreeMap<String, f64>,
    /// When the record was saved.
    pub training_date: SystemTime,
}

const NEXT_SEQ: &str = "SELECT nextval(pg_get_serial_sequence('training_metrics', 'record_seq'))";

/// Keyed by a sequence value taken beforehand, so a repeat after an unknown commit stores the
/// record once.
const INSERT: &str = "INSERT INTO training_metrics (model_name, version, metrics, record_seq)
     VALUES ($1, $2, $3, $4) ON CONFLICT (model_name, version, record_seq) DO NOTHING";

const SELECT_NEWEST: &str = "SELECT metrics FROM training_metrics
     WHERE model_name = $1 AND version = $2 ORDER BY record_seq DESC LIMIT 1";

const SELECT_HISTORY: &str = "SELECT model_name, version, metrics, training_date
     FROM training_metrics WHERE model_name = $1 ORDER BY record_seq";

impl ModelRepository {
    /// Records training metrics for a model version (a literal string: "latest" and "@alias"
    /// are not resolved, and no saved model is needed). Values must be finite; an empty map or
    /// a blank metric name is `InvalidInput`.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let metrics = [("auc".to_string(), 0.93), ("loss".to_string(), 0.21)].into();
    /// repo.save_training_metrics("ranker", "2.0", &metrics)?;
    /// # Ok(()) }
    /// ```
    pub fn save_training_metrics(
        &self,
        model_name: &str,
        version: &str,
        metrics: &BTreeMap<String, f64>,
    ) -> Result<()> {
        self.timed("save_training_metrics", |call| {
            validate::model_name(model_name)?;
            validate::name("version", version, validate::VERSION_MAX)?;
            let document = metrics_document(metrics)?;
            let seq: i64 = call.run(Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(NEXT_SEQ)?;
                Ok(conn.client().query_one(&statement, &[])?.try_get(0)?)
            })?;
            call.run(Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(INSERT)?;
                conn.client()
                    .execute(&statement, &[&model_name, &version, &document, &seq])?;
                Ok(())
            })
        })
    }

    /// The newest metrics recorded for a version, or `None`.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// if let Some(m) = repo.get_training_metrics("ranker", "2.0")? {
    ///     println!("auc {}", m["auc"]);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn get_training_metrics(
        &self,
        model_name: &str,
        version: &str,
    ) -> Result<Option<BTreeMap<String, f64>>> {
        self.timed("get_training_metrics", |call| {
            validate::model_name(model_name)?;
            validate::name("version", version, validate::VERSION_MAX)?;
            call.run(Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(SELECT_NEWEST)?;
                conn.client()
                    .query_opt(&statement, &[&model_name, &version])?
                    .map(|row| metrics_from_document(row.try_get(0)?))
                    .transpose()
            })
        })
    }

    /// Every metrics record of a model (all versions), oldest first.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// for record in repo.get_training_metrics_history("ranker")? {
    ///     println!("{} {:?}", record.version, record.metrics);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn get_training_metrics_history(
        &self,
        model_name: &str,
    ) -> Result<Vec<TrainingMetricsRecord>> {
        self.timed("get_training_metrics_history", |call| {
            validate::model_name(model_name)?;
            call.run(Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(SELECT_HISTORY)?;
                conn.client()
                    .query(&statement, &[&model_name])?
                    .iter()
                    .map(|row| {
                        Ok(TrainingMetricsRecord {
                            model_name: row.try_get(0)?,
                            version: row.try_get(1)?,
                            metrics: metrics_from_document(row.try_get(2)?)?,
                            training_date: row.try_get(3)?,
                        })
                    })
                    .collect()
            })
        })
    }
}

/// Checks the map and turns it into the JSONB object that is stored.
fn metrics_document(metrics: &BTreeMap<String, f64>) -> Result<Value> {
    if metrics.is_empty() {
        return Err(RepoError::invalid("metrics must not be empty"));
    }
    let mut object = serde_json::Map::new();
    for (name, value) in metrics {
        validate::name("metric name", name, validate::METRIC_NAME_MAX)?;
        let number = serde_json::Number::from_f64(*value)
            .filter(|_| value.is_finite())
            .ok_or_else(|| {
                RepoError::invalid(format!("metric {name:?} is {value}; values must be finite"))
            })?;
        object.insert(name.clone(), Value::Number(number));
    }
    Ok(Value::Object(object))
}

fn metrics_from_document(document: Value) -> Result<BTreeMap<String, f64>> {
    let Value::Object(object) = document else {
        return Err(RepoError::Serialization(
            "stored training metrics are not a JSON object".to_owned(),
        ));
    };
    object
        .into_iter()
        .map(|(name, value)| {
            let number = value.as_f64().ok_or_else(|| {
                RepoError::Serialization(format!("stored metric {name:?} is not a number"))
            })?;
            Ok((name, number))
        })
        .collect()
}
