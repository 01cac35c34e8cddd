//! Entity embeddings: the public types, batch validation, the per-type dimension registry,
//! single saves and reads, streaming reads, and the dispatch of batch loads to `copy.rs`.

use std::collections::HashMap;
use std::io::Read;
use std::time::{Duration, Instant};

use postgres::GenericClient;
use rayon::prelude::*;

use crate::copy::{self, cpu_pool, Path};
use crate::error::{RepoError, Result};
use crate::pool::PoisonOnPanic;
use crate::repository::ModelRepository;
use crate::retry::Retry;
use crate::validate;

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
    /// A record for [`ModelRepository::batch_save_embeddings`] and
    /// [`ModelRepository::load_embeddings`].
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
    /// Binary COPY over one connection, encoded in parallel, then merged with an upsert.
    Copy,
    /// Binary COPY over several connections into a staging table, then one merging
    /// transaction.
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
#[derive(Clone, Debug)]
pub struct BatchReport {
    /// Records written (inserted or updated).
    pub rows: u64,
    /// Vector bytes written: 4 x dimension per row.
    pub bytes: u64,
    /// Wall time of the call, validation included.
    pub elapsed: Duration,
}

/// Limits from API.md, "Conventions".
pub(crate) const ENTITY_TYPE_MAX: usize = 50;
pub(crate) const ENTITY_ID_MAX: usize = 255;

/// The longest vector whose bytes fit one BYTEA value (1 GiB - 1).
const MAX_DIMENSION: usize = ((1 << 30) - 1) / 4;

/// Batches at least this long are validated on the crate's rayon pool.
const PARALLEL_VALIDATION_MIN: usize = 4096;

/// Below this many records `batch_save_embeddings` upserts by `MultiRowInsert`. From here on
/// it samples 64 of the batch's keys inside the transaction: when at least half are stored
/// already (a reload) it still upserts from arrays, which skips the staging table; otherwise
/// it loads by `Copy`. Measured with `cargo run --release --example load_bench --
/// --crossover` (docs/embeddings.md).
pub const BATCH_COPY_CROSSOVER: usize = 300;

fn check_key(entity_type: &str, entity_id: &str) -> Result<()> {
    validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
    validate::name("entity_id", entity_id, ENTITY_ID_MAX)
}

fn check_vector(vector: &[f32]) -> Result<()> {
    if vector.is_empty() {
        return Err(RepoError::invalid("vector must not be empty"));
    }
    if vector.len() > MAX_DIMENSION {
        return Err(RepoError::invalid(format!(
            "vector has {} values; at most {MAX_DIMENSION} fit one value",
            vector.len()
        )));
    }
    if let Some(i) = vector.iter().position(|v| !v.is_finite()) {
        return Err(RepoError::invalid(format!(
            "vector value {i} is {} (NaN and infinities are not allowed)",
            vector[i]
        )));
    }
    Ok(())
}

/// Prefixes an error with the batch index it belongs to.
fn at_index(index: usize, error: RepoError) -> RepoError {
    match error {
        RepoError::InvalidInput(m) => RepoError::InvalidInput(format!("record {index}: {m}")),
        other => other,
    }
}

/// One entity type of a checked batch: its dimension and the first record that has it.
#[derive(Clone, Debug)]
pub(crate) struct TypeDim<'a> {
    pub entity_type: &'a str,
    pub dimension: usize,
    pub first_index: usize,
}

/// A batch that passed every client-side rule; its types sorted by name.
#[derive(Debug)]
pub(crate) struct CheckedBatch<'a> {
    pub records: &'a [Embedding],
    pub types: Vec<TypeDim<'a>>,
    pub bytes: u64,
}

/// Checks a batch before any I/O; the error names the first offending record.
pub(crate) fn check_batch(batch: &[Embedding]) -> Result<CheckedBatch<'_>> {
    let check = |e: &Embedding| {
        check_key(&e.entity_type, &e.entity_id).and_then(|()| check_vector(&e.vector))
    };
    let first_bad = if batch.len() >= PARALLEL_VALIDATION_MIN {
        cpu_pool().install(|| {
            batch
                .par_iter()
                .enumerate()
                .find_map_first(|(i, e)| check(e).err().map(|err| (i, err)))
        })
    } else {
        batch
            .iter()
            .enumerate()
            .find_map(|(i, e)| check(e).err().map(|err| (i, err)))
    };
    // Cross-record rules only matter before the first record that is bad on its own.
    let valid = first_bad.as_ref().map_or(batch.len(), |(i, _)| *i);
    let (types, mixed) = dimensions_by_type(&batch[..valid]);
    let valid = mixed.as_ref().map_or(valid, |e| e.0);
    let duplicate = first_duplicate(&batch[..valid]);

    if let Some(i) = duplicate {
        let e = &batch[i];
        return Err(RepoError::invalid(format!(
            "record {i}: duplicate key ({:?}, {:?}) in one batch",
            e.entity_type, e.entity_id
        )));
    }
    if let Some((_, error)) = mixed {
        return Err(error);
    }
    if let Some((i, error)) = first_bad {
        return Err(at_index(i, error));
    }
    let bytes = batch.iter().map(|e| 4 * e.vector.len() as u64).sum();
    Ok(CheckedBatch {
        records: batch,
        types,
        bytes,
    })
}

/// The dimension of each type (set by its first record), and the first record whose length
/// differs from its type's.
fn dimensions_by_type(records: &[Embedding]) -> (Vec<TypeDim<'_>>, Option<(usize, RepoError)>) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut types: Vec<TypeDim<'_>> = Vec::new();
    for (i, e) in records.iter().enumerate() {
        let slot = *seen.entry(e.entity_type.as_str()).or_insert_with(|| {
            types.push(TypeDim {
                entity_type: &e.entity_type,
                dimension: e.vector.len(),
                first_index: i,
            });
            types.len() - 1
        });
        let expected = types[slot].dimension;
        if e.vector.len() != expected {
            let error = RepoError::DimensionMismatch {
                entity_type: e.entity_type.clone(),
                expected,
                actual: e.vector.len(),
                index: Some(i),
            };
            types.sort_by(|a, b| a.entity_type.cmp(b.entity_type));
            return (types, Some((i, error)));
        }
    }
    types.sort_by(|a, b| a.entity_type.cmp(b.entity_type));
    (types, None)
}

/// The index of the first record whose key appeared earlier in the batch. Sorts indices
/// (4 bytes a record) rather than hashing keys, so a million-record batch costs 4 MB here.
fn first_duplicate(records: &[Embedding]) -> Option<usize> {
    if records.len() < 2 {
        return None;
    }
    let mut order: Vec<u32> = (0..records.len() as u32).collect();
    let key = |i: &u32| {
        let e = &records[*i as usize];
        (e.entity_type.as_str(), e.entity_id.as_str(), *i)
    };
    if records.len() >= PARALLEL_VALIDATION_MIN {
        cpu_pool().install(|| order.par_sort_unstable_by(|a, b| key(a).cmp(&key(b))));
    } else {
        order.sort_unstable_by(|a, b| key(a).cmp(&key(b)));
    }
    order
        .windows(2)
        .filter(|w| {
            let (a, b) = (key(&w[0]), key(&w[1]));
            a.0 == b.0 && a.1 == b.1
        })
        .map(|w| w[1] as usize)
        .min()
}

const REGISTERED_DIMENSIONS: &str = "SELECT r.entity_type::text, r.dimension \
     FROM embedding_types r WHERE r.entity_type = ANY($1::text[])";

/// Registers types in name order (so concurrent registrations cannot deadlock). A type that
/// already has rows inserted by hand takes their dimension. `DO UPDATE` (not `DO NOTHING`)
/// so that the row comes back even when a concurrent transaction registered it first: the
/// second registrant waits for the first to commit, then reads its dimension.
const REGISTER_TYPES: &str = "INSERT INTO embedding_types AS r (entity_type, dimension) \
     SELECT t.entity_type, COALESCE((SELECT e.dimension FROM embeddings e \
                                     WHERE e.entity_type = t.entity_type LIMIT 1), t.dimension) \
     FROM unnest($1::text[], $2::int4[]) AS t(entity_type, dimension) ORDER BY t.entity_type \
     ON CONFLICT (entity_type) DO UPDATE SET dimension = r.dimension \
     RETURNING r.entity_type::text, r.dimension";

/// Checks a batch's dimensions against the registry inside the write's transaction,
/// registering the types seen for the first time. The registry row of a known type is only
/// read (never locked), so concurrent writers of one type do not queue on it.
pub(crate) fn check_registry<C: GenericClient>(
    client: &mut C,
    types: &[TypeDim<'_>],
) -> Result<()> {
    let names: Vec<&str> = types.iter().map(|t| t.entity_type).collect();
    let mut registered: HashMap<String, i32> = HashMap::new();
    for row in client.query(REGISTERED_DIMENSIONS, &[&names])? {
        registered.insert(row.try_get(0)?, row.try_get(1)?);
    }
    let new: Vec<&TypeDim<'_>> = types
        .iter()
        .filter(|t| !registered.contains_key(t.entity_type))
        .collect();
    if !new.is_empty() {
        let new_names: Vec<&str> = new.iter().map(|t| t.entity_type).collect();
        let new_dims: Vec<i32> = new.iter().map(|t| t.dimension as i32).collect();
        for row in client.query(REGISTER_TYPES, &[&new_names, &new_dims])? {
            registered.insert(row.try_get(0)?, row.try_get(1)?);
        }
    }
    let mismatch = types
        .iter()
        .filter_map(|t| {
            let expected = *registered.get(t.entity_type)? as usize;
            (expected != t.dimension).then_some((t, expected))
        })
        .min_by_key(|(t, _)| t.first_index);
    match mismatch {
        Some((t, expected)) => Err(RepoError::DimensionMismatch {
            entity_type: t.entity_type.to_owned(),
            expected,
            actual: t.dimension,
            index: Some(t.first_index),
        }),
        None => Ok(()),
    }
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
    if bytes.len() % 4 != 0 {
        return Err(RepoError::Corrupt(format!(
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

fn decode(bytes: &[u8]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(bytes.len() / 4);
    decode_into(bytes, &mut out)?;
    Ok(out)
}

/// The one-round-trip save of a vector whose type is registered: nothing is written (and the
/// registered dimension comes back) when it is unregistered or has another dimension.
const SAVE_IF_REGISTERED: &str = "WITH reg AS ( \
         SELECT dimension FROM embedding_types WHERE entity_type = $1::varchar), \
     saved AS ( \
         INSERT INTO embeddings AS e (entity_type, entity_id, embeddings, dimension) \
         SELECT $1::varchar, $2::varchar, $3::bytea, $4::int4 FROM reg WHERE reg.dimension = $4::int4 \
         ON CONFLICT (entity_type, entity_id) DO UPDATE \
         SET embeddings = EXCLUDED.embeddings, dimension = EXCLUDED.dimension, updated_at = now() \
         RETURNING 1) \
     SELECT (SELECT dimension FROM reg) AS registered, (SELECT count(*) FROM saved) AS saved";

/// The single-row upsert (also the `Insert` load method's statement).
pub(crate) const UPSERT_ONE: &str =
    "INSERT INTO embeddings AS e (entity_type, entity_id, embeddings, dimension) \
     VALUES ($1, $2, $3, $4) \
     ON CONFLICT (entity_type, entity_id) DO UPDATE \
     SET embeddings = EXCLUDED.embeddings, dimension = EXCLUDED.dimension, updated_at = now()";

const SELECT_ONE: &str =
    "SELECT embeddings FROM embeddings WHERE entity_type = $1 AND entity_id = $2";

const SELECT_MANY: &str = "SELECT e.embeddings \
     FROM unnest($2::text[]) WITH ORDINALITY AS k(entity_id, ord) \
     LEFT JOIN embeddings e ON e.entity_type = $1 AND e.entity_id = k.entity_id \
     ORDER BY k.ord";

/// The streaming read. COPY takes no parameters, so the type travels in a transaction-local
/// setting instead of being spliced into the SQL.
const SET_STREAM_TYPE: &str = "SELECT set_config('pg_model_repo.entity_type', $1, true)";
const COPY_OUT_TYPE: &str = "COPY (SELECT entity_id, embeddings FROM embeddings \
     WHERE entity_type = current_setting('pg_model_repo.entity_type')) TO STDOUT (FORMAT binary)";

impl ModelRepository {
    /// Saves one vector (an upsert on (entity_type, entity_id): `created_at` is kept,
    /// `updated_at` moves). The first vector saved for a type fixes its dimension; a vector
    /// of another length is [`RepoError::DimensionMismatch`]. Empty vectors, NaN or infinite
    /// values, blank or over-long ids and NUL bytes are `InvalidInput`.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// repo.save_embeddings("user", "u42", &[0.1, 0.2, 0.3])?;
    /// # Ok(()) }
    /// ```
    pub fn save_embeddings(
        &self,
        entity_type: &str,
        entity_id: &str,
        vector: &[f32],
    ) -> Result<()> {
        self.timed("save_embeddings", || {
            check_key(entity_type, entity_id)?;
            check_vector(vector)?;
            let bytes = vector_bytes(vector);
            let dimension = vector.len() as i32;
            self.with_conn("save_embeddings", Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(SAVE_IF_REGISTERED)?;
                let row = conn
                    .client()
                    .query_one(&statement, &[&entity_type, &entity_id, &bytes, &dimension])?;
                let registered: Option<i32> = row.try_get("registered")?;
                match registered {
                    Some(d) if d == dimension => Ok(()),
                    Some(d) => Err(RepoError::DimensionMismatch {
                        entity_type: entity_type.to_owned(),
                        expected: d as usize,
                        actual: vector.len(),
                        index: None,
                    }),
                    None => {
                        // First vector of a new type: register it and save in one transaction.
                        let types = [TypeDim {
                            entity_type,
                            dimension: vector.len(),
                            first_index: 0,
                        }];
                        let mut tx = conn.client().transaction()?;
                        check_registry(&mut tx, &types).map_err(|e| match e {
                            RepoError::DimensionMismatch {
                                entity_type,
                                expected,
                                actual,
                                ..
                            } => RepoError::DimensionMismatch {
                                entity_type,
                                expected,
                                actual,
                                index: None,
                            },
                            other => other,
                        })?;
                        tx.execute(UPSERT_ONE, &[&entity_type, &entity_id, &bytes, &dimension])?;
                        tx.commit()?;
                        Ok(())
                    }
                }
            })
        })
    }

    /// The vector of one entity, or `None`.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// if let Some(v) = repo.get_embeddings("user", "u42")? {
    ///     println!("{} dimensions", v.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn get_embeddings(&self, entity_type: &str, entity_id: &str) -> Result<Option<Vec<f32>>> {
        self.timed("get_embeddings", || {
            check_key(entity_type, entity_id)?;
            self.with_conn("get_embeddings", Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(SELECT_ONE)?;
                let row = conn
                    .client()
                    .query_opt(&statement, &[&entity_type, &entity_id])?;
                row.map(|r| decode(r.try_get::<_, &[u8]>(0)?)).transpose()
            })
        })
    }

    /// The vectors of many entities of one type in one round trip, in the caller's order
    /// (`None` where an id has no vector; a repeated id is answered each time).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let found = repo.get_embeddings_many("user", &["u1", "u2", "nobody"])?;
    /// assert_eq!(found.len(), 3);
    /// # Ok(()) }
    /// ```
    pub fn get_embeddings_many(
        &self,
        entity_type: &str,
        entity_ids: &[&str],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        self.timed("get_embeddings_many", || {
            validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
            for (i, id) in entity_ids.iter().enumerate() {
                validate::name("entity_id", id, ENTITY_ID_MAX).map_err(|e| at_index(i, e))?;
            }
            if entity_ids.is_empty() {
                return Ok(Vec::new());
            }
            self.with_conn("get_embeddings_many", Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(SELECT_MANY)?;
                let rows = conn
                    .client()
                    .query(&statement, &[&entity_type, &entity_ids])?;
                rows.iter()
                    .map(|r| r.try_get::<_, Option<&[u8]>>(0)?.map(decode).transpose())
                    .collect()
            })
        })
    }

    /// Every vector of a type, by entity id (built on
    /// [`for_each_embedding`](Self::for_each_embedding); for large types prefer that).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let users = repo.get_all_embeddings("user")?;
    /// println!("{} users", users.len());
    /// # Ok(()) }
    /// ```
    pub fn get_all_embeddings(&self, entity_type: &str) -> Result<HashMap<String, Vec<f32>>> {
        self.timed("get_all_embeddings", || {
            let mut all = HashMap::new();
            self.stream_type(entity_type, &mut |id, v| {
                all.insert(id.to_owned(), v.to_vec());
            })?;
            Ok(all)
        })
    }

    /// Calls `f` with every (entity_id, vector) of a type, streamed by binary `COPY … TO
    /// STDOUT` in constant memory (one row at a time, without the query timeout); returns the
    /// number of rows. Rows come in no particular order. A failure after the first row was
    /// handed to `f` is not retried (`f` would see rows twice).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let mut norms = Vec::new();
    /// let n = repo.for_each_embedding("user", &mut |id, v| {
    ///     norms.push((id.to_owned(), v.iter().map(|x| x * x).sum::<f32>().sqrt()));
    /// })?;
    /// # Ok(()) }
    /// ```
    pub fn for_each_embedding(
        &self,
        entity_type: &str,
        f: &mut dyn FnMut(&str, &[f32]),
    ) -> Result<u64> {
        self.timed("for_each_embedding", || self.stream_type(entity_type, f))
    }

    fn stream_type(&self, entity_type: &str, f: &mut dyn FnMut(&str, &[f32])) -> Result<u64> {
        validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
        self.with_conn("for_each_embedding", Retry::Idempotent, |conn| {
            // The caller's closure runs mid-COPY: a panic in it must not return this session.
            let mut conn = PoisonOnPanic(conn);
            let mut tx = conn.client().build_transaction().read_only(true).start()?;
            tx.batch_execute("SET LOCAL statement_timeout = 0")?;
            tx.execute(SET_STREAM_TYPE, &[&entity_type])?;
            let mut reader = tx.copy_out(COPY_OUT_TYPE)?;
            let mut delivered = 0u64;
            let result = read_binary_rows(&mut reader, &mut |id, v| {
                delivered += 1;
                f(id, v)
            });
            drop(reader);
            let rows = result.map_err(|e| interrupted_after(delivered, e))?;
            tx.commit()
                .map_err(|e| interrupted_after(delivered, e.into()))?;
            Ok(rows)
        })
    }

    /// Saves a batch by the fastest correct method for it: multi-row upserts below
    /// [`BATCH_COPY_CROSSOVER`] records or when most of its keys exist already, binary COPY
    /// otherwise. All or nothing: any
    /// invalid record (or a key twice in the batch) fails the call, naming the first
    /// offending record, and nothing is written.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::Embedding;
    /// let batch: Vec<Embedding> = (0..10_000)
    ///     .map(|i| Embedding::new("item", format!("i{i}"), vec![i as f32; 64]))
    ///     .collect();
    /// let report = repo.batch_save_embeddings(&batch)?;
    /// println!("{} rows, {} bytes in {:?}", report.rows, report.bytes, report.elapsed);
    /// # Ok(()) }
    /// ```
    pub fn batch_save_embeddings(&self, batch: &[Embedding]) -> Result<BatchReport> {
        let path = if batch.len() < BATCH_COPY_CROSSOVER {
            Path::Method(LoadMethod::MultiRowInsert)
        } else {
            Path::Fastest
        };
        self.load("batch_save_embeddings", batch, path, &mut |_, _| {})
    }

    /// Saves a batch by the given method (to compare methods; `batch_save_embeddings` picks
    /// one for you). Same rules as [`batch_save_embeddings`](Self::batch_save_embeddings).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::{Embedding, LoadMethod};
    /// let batch = vec![Embedding::new("item", "i1", vec![1.0, 2.0])];
    /// let report = repo.load_embeddings(&batch, LoadMethod::ParallelCopy)?;
    /// # Ok(()) }
    /// ```
    pub fn load_embeddings(&self, batch: &[Embedding], method: LoadMethod) -> Result<BatchReport> {
        self.load(
            "load_embeddings",
            batch,
            Path::Method(method),
            &mut |_, _| {},
        )
    }

    /// [`load_embeddings`](Self::load_embeddings) that reports progress: `progress(rows_sent,
    /// rows_total)` is called on the caller's thread as the batch goes out (a retried load
    /// starts again from 0).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::{Embedding, LoadMethod};
    /// let batch = vec![Embedding::new("item", "i1", vec![1.0, 2.0])];
    /// repo.load_embeddings_with_progress(&batch, LoadMethod::Copy, &mut |done, total| {
    ///     eprintln!("{done}/{total}");
    /// })?;
    /// # Ok(()) }
    /// ```
    pub fn load_embeddings_with_progress(
        &self,
        batch: &[Embedding],
        method: LoadMethod,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<BatchReport> {
        self.load("load_embeddings", batch, Path::Method(method), progress)
    }

    fn load(
        &self,
        op: &'static str,
        batch: &[Embedding],
        path: Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<BatchReport> {
        let started = Instant::now();
        self.timed(op, || {
            let checked = check_batch(batch)?;
            if !batch.is_empty() {
                let total = batch.len() as u64;
                let mut report = |done: u64| progress(done, total);
                match path {
                    Path::Method(LoadMethod::ParallelCopy) => {
                        copy::load_parallel(self, &checked, &mut report)?
                    }
                    _ => self.with_conn(op, Retry::Idempotent, |conn| {
                        copy::load_on(conn, &checked, path, &mut report)
                    })?,
                }
                log::debug!(
                    "pg-model-repo: {op} wrote {total} rows ({path:?}) in {:?}",
                    started.elapsed()
                );
            }
            Ok(BatchReport {
                rows: batch.len() as u64,
                bytes: checked.bytes,
                elapsed: started.elapsed(),
            })
        })
    }
}

/// Once rows reached the caller's callback a repeat would hand them over twice: the error is
/// then reported as an interrupted stream, which is never retried.
fn interrupted_after(delivered: u64, error: RepoError) -> RepoError {
    if delivered == 0 {
        return error;
    }
    RepoError::Io(std::io::Error::new(
        std::io::ErrorKind::Interrupted,
        format!("embedding stream interrupted after {delivered} rows: {error}"),
    ))
}

/// The binary COPY signature, flags and header extension length.
pub(crate) const COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Parses a binary COPY stream of (text, bytea) rows, handing each to `f` with reused
/// buffers; returns the row count.
pub(crate) fn read_binary_rows(
    reader: &mut dyn Read,
    f: &mut dyn FnMut(&str, &[f32]),
) -> Result<u64> {
    let mut header = [0u8; 19];
    read_exact(reader, &mut header)?;
    if &header[..11] != COPY_SIGNATURE {
        return Err(RepoError::Corrupt("not a binary COPY stream".into()));
    }
    let extension = u32::from_be_bytes([header[15], header[16], header[17], header[18]]);
    std::io::copy(&mut reader.take(u64::from(extension)), &mut std::io::sink())
        .map_err(copy::io_error)?;
    let (mut id, mut bytes, mut vector) = (Vec::new(), Vec::new(), Vec::new());
    let mut rows = 0u64;
    loop {
        let mut count = [0u8; 2];
        read_exact(reader, &mut count)?;
        match i16::from_be_bytes(count) {
            -1 => return Ok(rows),
            2 => {}
            n => return Err(RepoError::Corrupt(format!("COPY row with {n} fields"))),
        }
        read_field(reader, &mut id)?;
        read_field(reader, &mut bytes)?;
        let id = std::str::from_utf8(&id)
            .map_err(|e| RepoError::Corrupt(format!("entity_id is not UTF-8: {e}")))?;
        decode_into(&bytes, &mut vector)?;
        f(id, &vector);
        rows += 1;
    }
}

fn read_field(reader: &mut dyn Read, buf: &mut Vec<u8>) -> Result<()> {
    let mut len = [0u8; 4];
    read_exact(reader, &mut len)?;
    let len = i32::from_be_bytes(len);
    let len =
        usize::try_from(len).map_err(|_| RepoError::Corrupt("NULL in a NOT NULL column".into()))?;
    buf.resize(len, 0);
    read_exact(reader, buf)
}

fn read_exact(reader: &mut dyn Read, buf: &mut [u8]) -> Result<()> {
    reader.read_exact(buf).map_err(copy::io_error)
}
