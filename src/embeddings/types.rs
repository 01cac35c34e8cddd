//! The public embedding types (records, load methods, reports, metrics and neighbours), and
//! the bytes a vector is stored as (little-endian f32).

use std::sync::atomic::{AtomicU8, Ordering as AtomicOrdering};
use std::time::Duration;

use postgres::types::ToSql;

use crate::error::{RepoError, Result};

/// One entity's vector, as a batch load takes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    /// The kind of entity ("user", "item"): 1..=50 characters. All vectors of one type share
    /// one dimension.
    pub entity_type: String,
    /// The entity's id within its type: 1..=255 characters.
    pub entity_id: String,
    /// The vector: non-empty, every value finite.
    pub vector: Vec<f32>,
}

impl Embedding {
    /// A record for [`ModelRepository::batch_save_embeddings`](crate::ModelRepository::batch_save_embeddings) and
    /// [`ModelRepository::load_embeddings`](crate::ModelRepository::load_embeddings).
    ///
    /// ```
    /// let e = pg_model_repo::Embedding::new("user", "u1", vec![0.1, 0.2]);
    /// assert_eq!(e.vector.len(), 2);
    /// ```
    pub fn new(
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
        vector: Vec<f32>,
    ) -> Self {
        Embedding {
            entity_type: entity_type.into(),
            entity_id: entity_id.into(),
            vector,
        }
    }
}

/// How a batch reaches the table. Every method upserts on (entity_type, entity_id) and is
/// atomic: a batch is written whole, in one transaction, or not at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoadMethod {
    /// One prepared single-row upsert per record (the slow baseline).
    Insert,
    /// Upserts of about 1000 rows per statement, from arrays (`unnest`).
    MultiRowInsert,
    /// Binary COPY over one connection, encoded in parallel: into fresh storage created in the
    /// load's transaction (COPY FREEZE, the key built after) for a type without rows or a
    /// reload of most of one, straight into the type's table for new keys, else staged and
    /// merged with an upsert (docs/embeddings.md has the table of paths).
    Copy,
    /// Binary COPY over several connections: each stream straight into the fresh storage of a
    /// type without rows, a refresh or a reload (no merge pass; one short transaction builds
    /// the key and swaps it in), else into a staging table merged in one transaction.
    ParallelCopy,
}

impl LoadMethod {
    /// Every method, slowest first.
    pub const ALL: [LoadMethod; 4] = [
        LoadMethod::Insert,
        LoadMethod::MultiRowInsert,
        LoadMethod::Copy,
        LoadMethod::ParallelCopy,
    ];

    /// The method's snake_case name: `insert`, `multi_row_insert`, `copy`, `parallel_copy`.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadMethod::Insert => "insert",
            LoadMethod::MultiRowInsert => "multi_row_insert",
            LoadMethod::Copy => "copy",
            LoadMethod::ParallelCopy => "parallel_copy",
        }
    }
}

impl std::fmt::Display for LoadMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LoadMethod {
    type Err = RepoError;

    /// Parses the names [`LoadMethod::as_str`] gives.
    fn from_str(s: &str) -> Result<Self> {
        LoadMethod::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                RepoError::invalid(format!(
                    "unknown load method {s:?} (insert, multi_row_insert, copy, parallel_copy)"
                ))
            })
    }
}

/// What a batch load wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BatchReport {
    /// Records written (inserted or updated).
    pub rows: u64,
    /// Vector bytes written: 4 x dimension per row.
    pub bytes: u64,
    /// Wall time of the call, validation included.
    pub elapsed: Duration,
}

/// How a schema stores its vectors: the type of `embeddings.embeddings`.
///
/// BYTEA holds little-endian f32 values; pgvector's `vector` holds the same f32 values (its
/// binary wire format is an int16 dimension, an unused int16 and big-endian float4 values).
/// Every write is encoded for, and every read decoded from, the storage it meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Storage {
    /// Little-endian f32 bytes in a `bytea` column.
    Bytea = 1,
    /// pgvector's `vector` type.
    Vector = 2,
}

impl Storage {
    /// The storage whose column type is named `type_name` (`pg_type.typname`).
    pub(crate) fn from_type_name(type_name: &str) -> Result<Storage> {
        match type_name {
            "bytea" => Ok(Storage::Bytea),
            "vector" => Ok(Storage::Vector),
            other => Err(RepoError::corrupt(format!(
                "embeddings.embeddings has type {other}; expected bytea or vector"
            ))),
        }
    }

    /// The SQL type of the column, for casts in statements.
    pub(crate) fn sql_type(self) -> &'static str {
        match self {
            Storage::Bytea => "bytea",
            Storage::Vector => "vector",
        }
    }

    /// Decodes a stored value, as binary COPY or the binary protocol hands it over, into
    /// `out` (cleared first).
    pub(crate) fn decode_into(self, bytes: &[u8], out: &mut Vec<f32>) -> Result<()> {
        match self {
            Storage::Bytea => decode_into(bytes, out),
            Storage::Vector => decode_vector_into(bytes, out),
        }
    }
}

/// The largest vector pgvector's `vector` type holds.
pub(crate) const PGVECTOR_MAX_DIMENSION: usize = 16_000;

/// The storage a repository believes its schema has: read on first use, and again when a
/// call fails in a way a conversion by another process explains (see `store::with_storage`).
#[derive(Debug, Default)]
pub(crate) struct StorageCell(AtomicU8);

impl StorageCell {
    /// What is believed, if anything was read yet.
    pub(crate) fn get(&self) -> Option<Storage> {
        match self.0.load(AtomicOrdering::Acquire) {
            1 => Some(Storage::Bytea),
            2 => Some(Storage::Vector),
            _ => None,
        }
    }

    pub(crate) fn set(&self, storage: Storage) {
        self.0.store(storage as u8, AtomicOrdering::Release);
    }
}

/// A vector as a statement parameter of the storage's type.
#[derive(Debug)]
pub(crate) enum VectorParam {
    Bytea(Vec<u8>),
    Vector(pgvector::Vector),
}

impl VectorParam {
    pub(crate) fn new(storage: Storage, vector: &[f32]) -> Self {
        match storage {
            Storage::Bytea => VectorParam::Bytea(vector_bytes(vector)),
            Storage::Vector => VectorParam::Vector(pgvector::Vector::from(vector.to_vec())),
        }
    }

    /// The value to bind.
    pub(crate) fn sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            VectorParam::Bytea(bytes) => bytes,
            VectorParam::Vector(vector) => vector,
        }
    }
}

/// Checks a vector length against what the storage holds (pgvector: 16,000 values).
pub(crate) fn check_storage_dimension(storage: Storage, dimension: usize) -> Result<()> {
    if storage == Storage::Vector && dimension > PGVECTOR_MAX_DIMENSION {
        return Err(RepoError::invalid(format!(
            "vector has {dimension} values; this schema stores pgvector vectors, which hold at \
             most {PGVECTOR_MAX_DIMENSION}"
        )));
    }
    Ok(())
}

/// A stored value of a result column, decoded by the column's type (bytea or vector), so a
/// read is right whatever storage the schema has now.
pub(crate) fn decode_column(row: &postgres::Row, index: usize) -> Result<Option<Vec<f32>>> {
    let is_vector = row
        .columns()
        .get(index)
        .is_some_and(|c| c.type_().name() == "vector");
    if is_vector {
        let value: Option<pgvector::Vector> = row.try_get(index)?;
        Ok(value.map(Vec::from))
    } else {
        let value: Option<&[u8]> = row.try_get(index)?;
        value.map(decode).transpose()
    }
}

/// Decodes pgvector's binary format (int16 dimension, int16 unused, big-endian float4s).
fn decode_vector_into(bytes: &[u8], out: &mut Vec<f32>) -> Result<()> {
    let corrupt = || {
        RepoError::corrupt(format!(
            "a stored vector of {} bytes is not in pgvector's binary format",
            bytes.len()
        ))
    };
    let (header, values) = bytes.split_at_checked(4).ok_or_else(corrupt)?;
    let dim = i16::from_be_bytes([header[0], header[1]]);
    if dim < 0 || values.len() != 4 * dim as usize {
        return Err(corrupt());
    }
    out.clear();
    out.extend(
        values
            .chunks_exact(4)
            .map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]])),
    );
    Ok(())
}

/// A vector as the little-endian f32 bytes it is stored as.
pub(crate) fn vector_bytes(vector: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(vector.len() * 4);
    for v in vector {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Decodes stored bytes into `out` (cleared first).
pub(crate) fn decode_into(bytes: &[u8], out: &mut Vec<f32>) -> Result<()> {
    if !bytes.len().is_multiple_of(4) {
        return Err(RepoError::corrupt(format!(
            "a stored vector has {} bytes, not a multiple of 4",
            bytes.len()
        )));
    }
    out.clear();
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
    Ok(())
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(bytes.len() / 4);
    decode_into(bytes, &mut out)?;
    Ok(out)
}

/// How distance is measured, as pgvector defines it; smaller is closer for all three.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Metric {
    /// Euclidean distance (pgvector's `<->`).
    L2,
    /// 1 - cosine similarity (pgvector's `<=>`), within [0, 2].
    Cosine,
    /// The negative inner product (pgvector's `<#>`), so that smaller is closer.
    InnerProduct,
}

impl Metric {
    /// Every metric.
    pub const ALL: [Metric; 3] = [Metric::L2, Metric::Cosine, Metric::InnerProduct];

    /// The metric's snake_case name: `l2`, `cosine`, `inner_product`.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::L2 => "l2",
            Metric::Cosine => "cosine",
            Metric::InnerProduct => "inner_product",
        }
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Metric {
    type Err = RepoError;

    /// Parses the names [`Metric::as_str`] gives.
    fn from_str(s: &str) -> Result<Self> {
        Metric::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                RepoError::invalid(format!("unknown metric {s:?} (l2, cosine, inner_product)"))
            })
    }
}

/// One search result: an entity of the searched type and its distance to the query.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Neighbor {
    /// The entity's id.
    pub entity_id: String,
    /// Its distance to the query under the search's metric (smaller is closer).
    pub distance: f32,
}

/// How a type stores its values: f32 (4 bytes a dimension) or f16 (2 bytes a dimension,
/// pgvector's `halfvec`; read back widened to f32, with a relative error up to 2^-11).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum VectorPrecision {
    /// 32-bit floats, exactly as given.
    #[default]
    F32,
    /// 16-bit floats (IEEE 754 half precision): values rounded to nearest; a value whose
    /// magnitude rounds beyond 65,504 is refused at write.
    F16,
}

impl VectorPrecision {
    /// The name the registry keeps: `f32` or `f16`.
    pub fn as_str(self) -> &'static str {
        match self {
            VectorPrecision::F32 => "f32",
            VectorPrecision::F16 => "f16",
        }
    }
}
