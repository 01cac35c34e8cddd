//! Taking over a schema that the seed's Python repository built (its exact DDL: uuid `id`
//! primary keys, `uq_model_name_version`, `uq_entity_type_id`, no save sequence): inside the
//! migration's transaction, its tables are brought to V001's shape in place, keeping every
//! row, before V001 itself runs; vectors that are not valid move to `embeddings_quarantine`.

use std::collections::HashMap;

use postgres::{GenericClient, Transaction};
use serde::Serialize;

use crate::error::{RepoError, Result};

/// What taking over the seed's tables did.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SeedTakeoverReport {
    /// Model versions in `ml_models` afterwards (all of the seed's: checksums computed, save
    /// sequence assigned in created_at order, then id).
    pub models: u64,
    /// Vectors in `embeddings` afterwards (all float32, one dimension per entity type).
    pub embeddings: u64,
    /// Of those, vectors the seed had stored as float64 (8 x dimension bytes), now float32.
    pub embeddings_converted_from_f64: u64,
    /// Rows moved to `embeddings_quarantine`: neither 4 x nor 8 x dimension bytes, a
    /// dimension other than their type's, or values that are not finite as float32.
    pub embeddings_quarantined: u64,
    /// The first quarantined rows by (entity_type, entity_id), at most ten.
    pub quarantined_first: Vec<QuarantinedEmbedding>,
    /// Entity types registered with their dimension.
    pub entity_types: u64,
    /// Entries in `prediction_cache` afterwards (kept as they were; pickled values read as
    /// `RepoError::Serialization`).
    pub cache_entries: u64,
    /// Records in `training_metrics` afterwards, with their dates.
    pub training_metrics: u64,
}

/// One row moved to `embeddings_quarantine`.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QuarantinedEmbedding {
    /// The row's entity type.
    pub entity_type: String,
    /// The row's entity id.
    pub entity_id: String,
    /// Why it is not a valid vector.
    pub reason: String,
}

/// One of the seed's tables as its DDL creates it, and the SQL that brings it to V001's shape.
struct SeedTable {
    name: &'static str,
    /// Column name and `format_type` of every column the seed's DDL declares.
    columns: &'static [(&'static str, &'static str)],
    /// Constraint name and `pg_get_constraintdef` of every constraint it declares.
    constraints: &'static [(&'static str, &'static str)],
    /// Columns V001 adds: present means the table is not (only) the seed's.
    ours: &'static [&'static str],
    sql: &'static str,
}

const VARCHAR_255: &str = "character varying(255)";
const VARCHAR_50: &str = "character varying(50)";
const TIMESTAMPTZ: &str = "timestamp with time zone";

const SEED_TABLES: &[SeedTable] = &[
    SeedTable {
        name: "ml_models",
        columns: &[
            ("id", "uuid"),
            ("model_name", VARCHAR_255),
            ("version", VARCHAR_50),
            ("model_data", "bytea"),
            ("metadata", "jsonb"),
            ("created_at", TIMESTAMPTZ),
            ("is_active", "boolean"),
        ],
        constraints: &[
            ("ml_models_pkey", "PRIMARY KEY (id)"),
            ("uq_model_name_version", "UNIQUE (model_name, version)"),
        ],
        ours: &[
            "size_bytes",
            "checksum",
            "save_seq",
            "load_count",
            "last_loaded_at",
        ],
        sql: include_str!("../../sql/seed_takeover/ml_models.sql"),
    },
    SeedTable {
        name: "embeddings",
        columns: &[
            ("id", "uuid"),
            ("entity_type", VARCHAR_50),
            ("entity_id", VARCHAR_255),
            ("embeddings", "bytea"),
            ("dimension", "integer"),
            ("created_at", TIMESTAMPTZ),
            ("updated_at", TIMESTAMPTZ),
        ],
        constraints: &[
            ("embeddings_pkey", "PRIMARY KEY (id)"),
            ("uq_entity_type_id", "UNIQUE (entity_type, entity_id)"),
        ],
        ours: &[],
        sql: include_str!("../../sql/seed_takeover/embeddings.sql"),
    },
    SeedTable {
        name: "prediction_cache",
        columns: &[
            ("id", "uuid"),
            ("cache_key", "character varying(512)"),
            ("predictions", "bytea"),
            ("metadata", "jsonb"),
            ("cached_at", TIMESTAMPTZ),
            ("expires_at", TIMESTAMPTZ),
            ("access_count", "integer"),
            ("last_accessed", TIMESTAMPTZ),
        ],
        constraints: &[
            ("prediction_cache_pkey", "PRIMARY KEY (id)"),
            ("prediction_cache_cache_key_key", "UNIQUE (cache_key)"),
            (
                "prediction_cache_expires_after_cached",
                "CHECK ((expires_at > cached_at))",
            ),
        ],
        ours: &[],
        sql: include_str!("../../sql/seed_takeover/prediction_cache.sql"),
    },
    SeedTable {
        name: "training_metrics",
        columns: &[
            ("id", "uuid"),
            ("model_name", VARCHAR_255),
            ("version", VARCHAR_50),
            ("metrics", "jsonb"),
            ("training_date", TIMESTAMPTZ),
        ],
        constraints: &[("training_metrics_pkey", "PRIMARY KEY (id)")],
        ours: &["record_seq"],
        sql: include_str!("../../sql/seed_takeover/training_metrics.sql"),
    },
];

/// A table as the catalog describes it.
#[derive(Default)]
struct Shape {
    columns: HashMap<String, String>,
    constraints: HashMap<String, String>,
}

const COLUMNS: &str =
    "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod)
     FROM pg_class c
     JOIN pg_namespace n ON n.oid = c.relnamespace
     JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
     WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND c.relname = ANY($1)";

const CONSTRAINTS: &str = "SELECT c.relname::text, k.conname::text, pg_get_constraintdef(k.oid)
     FROM pg_constraint k
     JOIN pg_class c ON c.oid = k.conrelid
     JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = current_schema() AND c.relname = ANY($1)";

/// The seed's tables present in the current schema, by name.
fn inspect<C: GenericClient>(client: &mut C) -> Result<HashMap<String, Shape>> {
    let names: Vec<&str> = SEED_TABLES.iter().map(|t| t.name).collect();
    let mut shapes: HashMap<String, Shape> = HashMap::new();
    for row in client.query(COLUMNS, &[&names])? {
        shapes
            .entry(row.try_get(0)?)
            .or_default()
            .columns
            .insert(row.try_get(1)?, row.try_get(2)?);
    }
    for row in client.query(CONSTRAINTS, &[&names])? {
        shapes
            .entry(row.try_get(0)?)
            .or_default()
            .constraints
            .insert(row.try_get(1)?, row.try_get(2)?);
    }
    Ok(shapes)
}

impl SeedTable {
    /// The seed's mark: a uuid `id` column that is the primary key.
    fn is_keyed_by_uuid(&self, shape: &Shape) -> bool {
        shape.columns.get("id").map(String::as_str) == Some("uuid")
            && shape
                .constraints
                .get(&format!("{}_pkey", self.name))
                .map(String::as_str)
                == Some("PRIMARY KEY (id)")
    }

    /// How the table differs from the seed's DDL (empty: it is the seed's).
    fn differences(&self, shape: &Shape) -> Vec<String> {
        let mut found = Vec::new();
        for (column, expected) in self.columns {
            match shape.columns.get(*column) {
                None => found.push(format!("{} has no column {column}", self.name)),
                Some(actual) if actual != expected => found.push(format!(
                    "{}.{column} is {actual}, the seed's is {expected}",
                    self.name
                )),
                Some(_) => {}
            }
        }
        for (name, expected) in self.constraints {
            match shape.constraints.get(*name) {
                None => found.push(format!("{} has no constraint {name}", self.name)),
                Some(actual) if actual != expected => found.push(format!(
                    "{}'s constraint {name} is {actual}, the seed's is {expected}",
                    self.name
                )),
                Some(_) => {}
            }
        }
        for column in self.ours {
            if shape.columns.contains_key(*column) {
                found.push(format!(
                    "{} already has this library's column {column}",
                    self.name
                ));
            }
        }
        found
    }
}

/// True when the current schema holds a table keyed the seed's way (read-only).
pub(crate) fn is_seed_schema<C: GenericClient>(client: &mut C) -> Result<bool> {
    let shapes = inspect(client)?;
    Ok(SEED_TABLES.iter().any(|table| {
        shapes
            .get(table.name)
            .is_some_and(|shape| table.is_keyed_by_uuid(shape))
    }))
}

/// A takeover under way: the seed's tables are in V001's shape, V001 still has to run.
#[derive(Debug)]
pub(crate) struct Takeover {
    embeddings: bool,
    converted: u64,
}

/// When the current schema holds the seed's tables, brings each one present to V001's shape
/// (the missing ones V001 creates) and returns the takeover to [`finish`](Takeover::finish)
/// after V001. `None` when no table is keyed the seed's way. A table that looks like the
/// seed's but differs from its DDL is `Conflict`, and nothing is changed.
pub(crate) fn begin(tx: &mut Transaction<'_>) -> Result<Option<Takeover>> {
    let shapes = inspect(tx)?;
    let present: Vec<(&SeedTable, &Shape)> = SEED_TABLES
        .iter()
        .filter_map(|table| shapes.get(table.name).map(|shape| (table, shape)))
        .collect();
    if !present
        .iter()
        .any(|(table, shape)| table.is_keyed_by_uuid(shape))
    {
        return Ok(None);
    }
    let problems: Vec<String> = present
        .iter()
        .flat_map(|(table, shape)| table.differences(shape))
        .collect();
    if !problems.is_empty() {
        return Err(RepoError::conflict(format!(
            "the schema looks like the seed's Python repository (uuid id keys) but differs from \
             its DDL, so it was left unchanged: {}",
            problems.join("; ")
        )));
    }
    log::info!(
        "pg-model-repo: taking over the seed's tables ({})",
        present
            .iter()
            .map(|(t, _)| t.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut takeover = Takeover {
        embeddings: false,
        converted: 0,
    };
    for (table, _) in &present {
        tx.batch_execute(table.sql)?;
        if table.name == "embeddings" {
            takeover.embeddings = true;
            takeover.converted = convert_vectors(tx)?;
            tx.batch_execute(BYTES_MATCH_DIMENSION)?;
        }
    }
    Ok(Some(takeover))
}

/// V001's CHECK, added once every remaining vector is float32.
const BYTES_MATCH_DIMENSION: &str = "ALTER TABLE embeddings ADD CONSTRAINT \
     embeddings_bytes_match_dimension CHECK (octet_length(embeddings) = 4 * dimension)";

/// Each type with its (now single) dimension, first saved when its first vector was.
const REGISTER_TYPES: &str = "INSERT INTO embedding_types (entity_type, dimension, created_at)
     SELECT entity_type, min(dimension), min(created_at) FROM embeddings GROUP BY entity_type
     ON CONFLICT (entity_type) DO NOTHING";

const COUNTS: &str = "SELECT (SELECT count(*) FROM ml_models), (SELECT count(*) FROM embeddings),
     (SELECT count(*) FROM embedding_types), (SELECT count(*) FROM prediction_cache),
     (SELECT count(*) FROM training_metrics)";

const QUARANTINED: &str = "SELECT count(*) FROM embeddings_quarantine";

const QUARANTINED_FIRST: &str = "SELECT entity_type::text, entity_id::text, reason
     FROM embeddings_quarantine ORDER BY entity_type, entity_id LIMIT 10";

impl Takeover {
    /// After V001: registers the entity types with their dimension and reports.
    pub(crate) fn finish(self, tx: &mut Transaction<'_>) -> Result<SeedTakeoverReport> {
        if self.embeddings {
            tx.execute(REGISTER_TYPES, &[])?;
        }
        let row = tx.query_one(COUNTS, &[])?;
        let count = |i: usize| -> Result<u64> { Ok(row.try_get::<_, i64>(i)?.max(0) as u64) };
        let mut report = SeedTakeoverReport {
            models: count(0)?,
            embeddings: count(1)?,
            embeddings_converted_from_f64: self.converted,
            embeddings_quarantined: 0,
            quarantined_first: Vec::new(),
            entity_types: count(2)?,
            cache_entries: count(3)?,
            training_metrics: count(4)?,
        };
        if self.embeddings {
            let quarantined: i64 = tx.query_one(QUARANTINED, &[])?.try_get(0)?;
            report.embeddings_quarantined = quarantined.max(0) as u64;
            report.quarantined_first = tx
                .query(QUARANTINED_FIRST, &[])?
                .iter()
                .map(|row| {
                    Ok(QuarantinedEmbedding {
                        entity_type: row.try_get(0)?,
                        entity_id: row.try_get(1)?,
                        reason: row.try_get(2)?,
                    })
                })
                .collect::<Result<_>>()?;
        }
        Ok(report)
    }
}

/// Rows read (and written back) per round trip while converting vectors.
const CONVERT_BATCH: i32 = 500;

const SCAN_VECTORS: &str =
    "SELECT entity_type::text, entity_id::text, embeddings, dimension FROM embeddings";

const REWRITE_VECTORS: &str = "UPDATE embeddings e SET embeddings = u.bytes
     FROM unnest($1::text[], $2::text[], $3::bytea[]) AS u(entity_type, entity_id, bytes)
     WHERE e.entity_type = u.entity_type AND e.entity_id = u.entity_id";

const QUARANTINE_VECTORS: &str = "WITH moved AS (
         DELETE FROM embeddings e
          USING unnest($1::text[], $2::text[], $3::text[]) AS q(entity_type, entity_id, reason)
          WHERE e.entity_type = q.entity_type AND e.entity_id = q.entity_id
         RETURNING e.entity_type, e.entity_id, e.embeddings, e.dimension, e.created_at,
                   e.updated_at, q.reason)
     INSERT INTO embeddings_quarantine
            (entity_type, entity_id, embeddings, dimension, created_at, updated_at, reason)
     SELECT entity_type, entity_id, embeddings, dimension, created_at, updated_at, reason
       FROM moved";

/// What becomes of one stored vector (its size is 4 x or 8 x its dimension by now).
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Float32 with finite values: kept as it is.
    Keep,
    /// Float64 with values finite as float32: these little-endian float32 bytes instead.
    Convert(Vec<u8>),
    /// Moved to the quarantine, for this reason.
    Quarantine(&'static str),
}

fn judge(bytes: &[u8], dimension: i32) -> Verdict {
    let dimension = usize::try_from(dimension).unwrap_or(0);
    if dimension > 0 && bytes.len() == 8 * dimension {
        // numpy's tobytes() of a float64 array on a little-endian machine.
        let mut out = Vec::with_capacity(4 * dimension);
        for c in bytes.chunks_exact(8) {
            let value = f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32;
            if !value.is_finite() {
                return Verdict::Quarantine("float64 values that are not finite as float32");
            }
            out.extend_from_slice(&value.to_le_bytes());
        }
        return Verdict::Convert(out);
    }
    if dimension > 0 && bytes.len() == 4 * dimension {
        let finite = bytes
            .chunks_exact(4)
            .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite());
        return if finite {
            Verdict::Keep
        } else {
            Verdict::Quarantine("float32 values that are not finite")
        };
    }
    Verdict::Quarantine("neither 4 x nor 8 x the dimension in bytes")
}

/// Converts the seed's float64 vectors to float32 and moves vectors with values that are not
/// finite to the quarantine, reading the table once in batches. Returns the vectors converted.
fn convert_vectors(tx: &mut Transaction<'_>) -> Result<u64> {
    let portal = tx.bind(SCAN_VECTORS, &[])?;
    let mut converted = 0;
    loop {
        let rows = tx.query_portal(&portal, CONVERT_BATCH)?;
        if rows.is_empty() {
            return Ok(converted);
        }
        let mut rewrite: (Vec<String>, Vec<String>, Vec<Vec<u8>>) = Default::default();
        let mut quarantine: (Vec<String>, Vec<String>, Vec<&str>) = Default::default();
        for row in &rows {
            let bytes: &[u8] = row.try_get(2)?;
            match judge(bytes, row.try_get(3)?) {
                Verdict::Keep => {}
                Verdict::Convert(f32_bytes) => {
                    rewrite.0.push(row.try_get(0)?);
                    rewrite.1.push(row.try_get(1)?);
                    rewrite.2.push(f32_bytes);
                }
                Verdict::Quarantine(reason) => {
                    quarantine.0.push(row.try_get(0)?);
                    quarantine.1.push(row.try_get(1)?);
                    quarantine.2.push(reason);
                }
            }
        }
        if !rewrite.0.is_empty() {
            converted += tx.execute(REWRITE_VECTORS, &[&rewrite.0, &rewrite.1, &rewrite.2])?;
        }
        if !quarantine.0.is_empty() {
            tx.execute(
                QUARANTINE_VECTORS,
                &[&quarantine.0, &quarantine.1, &quarantine.2],
            )?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f64_bytes(values: &[f64]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn float64_vectors_become_the_nearest_float32() {
        let values = [0.1, -2.5, 1e-50, 3.0e38];
        let expected: Vec<f32> = values.iter().map(|v| *v as f32).collect();
        assert_eq!(
            judge(&f64_bytes(&values), 4),
            Verdict::Convert(f32_bytes(&expected))
        );
    }

    #[test]
    fn values_beyond_float32_or_not_finite_are_quarantined() {
        assert!(matches!(
            judge(&f64_bytes(&[1.0, 1e300]), 2),
            Verdict::Quarantine(_)
        ));
        assert!(matches!(
            judge(&f64_bytes(&[f64::NAN]), 1),
            Verdict::Quarantine(_)
        ));
        assert!(matches!(
            judge(&f32_bytes(&[1.0, f32::INFINITY]), 2),
            Verdict::Quarantine(_)
        ));
        assert_eq!(judge(&f32_bytes(&[1.0, 2.0]), 2), Verdict::Keep);
        assert!(matches!(judge(&[0; 6], 2), Verdict::Quarantine(_)));
        assert!(matches!(judge(&[], 0), Verdict::Quarantine(_)));
    }
}
