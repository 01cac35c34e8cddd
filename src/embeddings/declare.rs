//! Declaring a type before its first row: its dimension and precision
//! (`embedding_type_declare`, sql/V010), and the f16 range rule of writes to an f16 type.

use std::collections::HashSet;

use postgres::GenericClient;
use rayon::prelude::*;

use crate::db::retry::Retry;
use crate::embeddings::check::ENTITY_TYPE_MAX;
use crate::embeddings::encode::on_cpu_pool;
use crate::embeddings::types::{Embedding, VectorPrecision, PGVECTOR_MAX_DIMENSION};
use crate::error::{RepoError, Result};
use crate::repository::ModelRepository;
use crate::validate;

const DECLARE: &str = "SELECT embedding_type_declare($1, $2, $3)";

const F16_TYPES: &str = "SELECT entity_type::text FROM embedding_types \
     WHERE entity_type = ANY($1::text[]) AND vector_precision = 'f16'";

/// The smallest magnitude pgvector's halfvec refuses: it rounds to infinity in f16.
const F16_OVERFLOW: f32 = 65_520.0;

impl ModelRepository {
    /// Registers `entity_type` before its first row, with its dimension and precision:
    /// [`VectorPrecision::F16`] stores 2 bytes a dimension (pgvector's `halfvec`; reads
    /// return f32 widened from f16, within a relative error of 2^-11; a value whose
    /// magnitude is 65,520 or more is `InvalidInput` at write; HNSW indexes up to 4,000
    /// dimensions). Types never change precision silently: only this call sets it.
    ///
    /// Declaring a type again with the same values is a no-op; with other values it is
    /// [`RepoError::Conflict`] while the type has rows (drop or replace it first), else it is
    /// redeclared (its HNSW indexes are forgotten). F16 on a schema that stores vectors as
    /// BYTEA is `InvalidInput` (it needs pgvector); so is a dimension of 0 or above 16,000.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::VectorPrecision;
    /// repo.declare_embedding_type("item", 1536, VectorPrecision::F16)?;
    /// repo.save_embeddings("item", "i1", &vec![0.25; 1536])?;
    /// # Ok(()) }
    /// ```
    pub fn declare_embedding_type(
        &self,
        entity_type: &str,
        dimension: usize,
        precision: VectorPrecision,
    ) -> Result<()> {
        self.timed("declare_embedding_type", |call| {
            validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
            if dimension == 0 || dimension > PGVECTOR_MAX_DIMENSION {
                return Err(RepoError::invalid(format!(
                    "dimension must be within 1..={PGVECTOR_MAX_DIMENSION}, not {dimension}"
                )));
            }
            let dim = dimension as i32;
            let outcome: String = call
                .with_conn(Retry::Idempotent, |conn| {
                    let row = conn
                        .client()
                        .query_one(DECLARE, &[&entity_type, &dim, &precision.as_str()])?;
                    Ok(row.try_get(0)?)
                })
                .map_err(|e| match e.code().map(|c| c.code()) {
                    Some("0A000") => RepoError::invalid(e.to_string()),
                    _ => e,
                })?;
            self.index_cache().forget(entity_type);
            if outcome == "has_rows" {
                return Err(RepoError::conflict(format!(
                    "entity type {entity_type:?} has rows with another dimension or precision: \
                     drop it or replace it before declaring it as {dimension} x {}",
                    precision.as_str()
                )));
            }
            Ok(())
        })
    }
}

/// Batches of at least this many values ask the server which of their types are f16 before
/// looking at a value (one round trip, about what a scan of a million values costs), and
/// scan only those types' records: a batch of f32 types is not read twice.
const ASK_FIRST_VALUES: usize = 1 << 20;

/// The first record (by index) of `batch`, whose types are `types`, that an f16 type cannot
/// hold: `InvalidInput` naming it. A small batch is scanned first (one registry read only
/// when a value is out of f16's range); a large one asks first, then scans only its f16
/// types' records, on the rayon pool.
pub(crate) fn check_f16_range<C: GenericClient>(
    client: &mut C,
    batch: &[Embedding],
    types: &[&str],
) -> Result<()> {
    let small = batch.iter().map(|e| e.vector.len()).sum::<usize>() < ASK_FIRST_VALUES;
    let half = if small {
        let mut out_of_range: Vec<&str> = batch
            .iter()
            .filter(|e| first_out_of_f16_range(&e.vector).is_some())
            .map(|e| e.entity_type.as_str())
            .collect();
        if out_of_range.is_empty() {
            return Ok(());
        }
        out_of_range.sort_unstable();
        out_of_range.dedup();
        f16_types(client, &out_of_range)?
    } else {
        f16_types(client, types)?
    };
    if half.is_empty() {
        return Ok(());
    }
    let refused = |(i, e): (usize, &Embedding)| {
        let checked = half.contains(e.entity_type.as_str());
        checked.then(|| check_f16_record(i, e).err()).flatten()
    };
    let first = if small {
        batch.iter().enumerate().find_map(refused)
    } else {
        on_cpu_pool(|| batch.par_iter().enumerate().find_map_first(refused))
    };
    first.map_or(Ok(()), Err)
}

/// The types among `types` declared f16.
fn f16_types<C: GenericClient>(client: &mut C, types: &[&str]) -> Result<HashSet<String>> {
    client
        .query(F16_TYPES, &[&types])?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
}

/// Whether `entity_type` is declared f16 (for the iterator forms, which check each record as
/// it comes).
pub(crate) fn is_f16(call: &crate::db::call::Call<'_>, entity_type: &str) -> Result<bool> {
    call.with_conn(Retry::Idempotent, |conn| {
        Ok(!f16_types(conn.client(), &[entity_type])?.is_empty())
    })
}

/// The first value of `vector` that f16 cannot hold.
fn first_out_of_f16_range(vector: &[f32]) -> Option<usize> {
    vector.iter().position(|v| v.abs() >= F16_OVERFLOW)
}

/// One record of an f16 type: `InvalidInput` naming it when a value is outside f16's range.
pub(crate) fn check_f16_record(index: usize, e: &Embedding) -> Result<()> {
    match first_out_of_f16_range(&e.vector) {
        Some(at) => Err(RepoError::invalid_record(
            index,
            format!(
                "vector value {at} is {}, outside the range of entity type {:?}, declared f16 \
                 (magnitudes below 65,520)",
                e.vector[at], e.entity_type
            ),
        )),
        None => Ok(()),
    }
}
