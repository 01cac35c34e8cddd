//! Training metrics: named finite numbers per model version, kept as a history of records.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::Value;

use crate::db::retry::Retry;
use crate::error::{RepoError, Result};
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

/// The newest record with at least one numeric value (another client may have written records
/// this library cannot read; see [`readable_metrics`]).
const SELECT_NEWEST: &str = "SELECT metrics FROM training_metrics t
     WHERE model_name = $1 AND version = $2
       AND jsonb_typeof(metrics) = 'object'
       AND EXISTS (SELECT 1 FROM jsonb_each(t.metrics) m WHERE jsonb_typeof(m.value) = 'number')
     ORDER BY record_seq DESC LIMIT 1";

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
            let seq: i64 = call.with_conn(Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(NEXT_SEQ)?;
                Ok(conn.client().query_one(&statement, &[])?.try_get(0)?)
            })?;
            call.with_conn(Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(INSERT)?;
                conn.client()
                    .execute(&statement, &[&model_name, &version, &document, &seq])?;
                Ok(())
            })
        })
    }

    /// The newest metrics recorded for a version, or `None`. Values another client stored that
    /// are not numbers are left out (see
    /// [`get_training_metrics_history`](Self::get_training_metrics_history)); a record with none
    /// at all is passed over for the one before it.
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
            call.with_conn(Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(SELECT_NEWEST)?;
                let Some(row) = conn
                    .client()
                    .query_opt(&statement, &[&model_name, &version])?
                else {
                    return Ok(None);
                };
                Ok(readable_metrics(model_name, version, row.try_get(0)?))
            })
        })
    }

    /// Every metrics record of a model (all versions), oldest first.
    ///
    /// Records written by other clients may hold values that are not numbers: those values are
    /// left out of their record, and a record left with none (or that is not a JSON object) is
    /// left out of the history; each is logged at warn. The rest of the history is returned.
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
            call.with_conn(Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(SELECT_HISTORY)?;
                let mut history = Vec::new();
                for row in conn.client().query(&statement, &[&model_name])? {
                    let version: String = row.try_get(1)?;
                    let Some(metrics) = readable_metrics(model_name, &version, row.try_get(2)?)
                    else {
                        continue;
                    };
                    history.push(TrainingMetricsRecord {
                        model_name: row.try_get(0)?,
                        version,
                        metrics,
                        training_date: row.try_get(3)?,
                    });
                }
                Ok(history)
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

/// The numeric values of a stored record. Another client may have stored values that are not
/// numbers (a string, null, a nested object) or a document that is not an object: those are
/// left out, with a warning, so that one such record cannot hide the rest of a history.
/// `None` when nothing numeric is left.
fn readable_metrics(
    model_name: &str,
    version: &str,
    document: Value,
) -> Option<BTreeMap<String, f64>> {
    let Value::Object(object) = document else {
        log::warn!(
            "pg-model-repo: a training metrics record of {model_name}/{version} is not a JSON \
             object ({}); left out",
            kind(&document)
        );
        return None;
    };
    let mut metrics = BTreeMap::new();
    for (name, value) in object {
        match value.as_f64() {
            Some(number) => {
                metrics.insert(name, number);
            }
            None => log::warn!(
                "pg-model-repo: training metric {name:?} of {model_name}/{version} is {}, not a \
                 number; left out",
                kind(&value)
            ),
        }
    }
    if metrics.is_empty() {
        log::warn!(
            "pg-model-repo: a training metrics record of {model_name}/{version} has no numeric \
             value; left out"
        );
        return None;
    }
    Some(metrics)
}

/// A JSON value's kind, for log lines (never the value: it may be large).
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_that_are_not_numbers_are_left_out_of_their_record() {
        let metrics = readable_metrics("m", "1", json!({"auc": 0.9, "note": "good", "n": null}));
        assert_eq!(metrics, Some([("auc".to_string(), 0.9)].into()));
    }

    #[test]
    fn records_without_a_numeric_value_are_left_out() {
        assert_eq!(readable_metrics("m", "1", json!({"note": "good"})), None);
        assert_eq!(readable_metrics("m", "1", json!([0.9])), None);
        assert_eq!(readable_metrics("m", "1", json!({})), None);
    }
}
