//! Single saves and reads of embeddings, many-key reads in one round trip, and streaming
//! reads of a whole type by binary COPY in constant memory.

use std::collections::HashMap;
use std::io::Read;

use postgres::{GenericClient, Transaction};

use crate::db::binary_copy::RowReader;
use crate::db::call::Call;
use crate::db::pool::PoisonOnPanic;
use crate::db::retry::Retry;
use crate::embeddings::check::{
    at_index, check_key, check_vector, TypeDim, ENTITY_ID_MAX, ENTITY_TYPE_MAX,
};
use crate::embeddings::registry::ensure_types;
use crate::embeddings::sql::UPSERT_ONE;
use crate::embeddings::types::{
    check_storage_dimension, decode_column, Storage, StorageCell, VectorParam,
};
use crate::error::{interrupted_after, RepoError, Result};
use crate::repository::ModelRepository;
use crate::validate;

/// The one-round-trip save of a vector whose type is registered: nothing is written (and the
/// registered dimension comes back) when it is unregistered or has another dimension. `$3`
/// is of the storage's type.
macro_rules! save_if_registered {
    ($vector_type:literal) => {
        concat!(
            "WITH reg AS ( \
                 SELECT dimension FROM embedding_types \
                 WHERE entity_type = $1::varchar AND storage IS NOT NULL), \
             saved AS ( ",
            insert_embeddings!(),
            "SELECT $1::varchar, $2::varchar, $3::",
            $vector_type,
            ", $4::int4 FROM reg WHERE reg.dimension = $4::int4",
            on_key_update!(),
            " RETURNING 1) \
             SELECT (SELECT dimension FROM reg) AS registered, (SELECT count(*) FROM saved) AS saved"
        )
    };
}

fn save_if_registered(storage: Storage) -> &'static str {
    match storage {
        Storage::Bytea => save_if_registered!("bytea"),
        Storage::Vector => save_if_registered!("vector"),
    }
}

/// A row's vector as the storage reads it: an f16 type's (pgvector only) lives in
/// `embeddings_half` and is read widened to `vector` (sql/V010), as a literal for `concat!`.
macro_rules! value_of {
    (bytea) => {
        "embeddings"
    };
    (vector) => {
        "coalesce(embeddings, embeddings_half::vector)"
    };
    (e bytea) => {
        "e.embeddings"
    };
    (e vector) => {
        "coalesce(e.embeddings, e.embeddings_half::vector)"
    };
}

/// The value expression of a storage (see [`value_of!`]).
pub(crate) fn value_expression(storage: Storage) -> &'static str {
    match storage {
        Storage::Bytea => value_of!(bytea),
        Storage::Vector => value_of!(vector),
    }
}

macro_rules! select_one {
    ($storage:tt) => {
        concat!(
            "SELECT ",
            value_of!($storage),
            " FROM embeddings WHERE entity_type = $1 AND entity_id = $2"
        )
    };
}

macro_rules! select_many {
    ($storage:tt) => {
        concat!(
            "SELECT ",
            value_of!(e $storage),
            " FROM unnest($2::text[]) WITH ORDINALITY AS k(entity_id, ord) \
             LEFT JOIN embeddings e ON e.entity_type = $1 AND e.entity_id = k.entity_id \
             ORDER BY k.ord"
        )
    };
}

fn select_one(storage: Storage) -> &'static str {
    match storage {
        Storage::Bytea => select_one!(bytea),
        Storage::Vector => select_one!(vector),
    }
}

fn select_many(storage: Storage) -> &'static str {
    match storage {
        Storage::Bytea => select_many!(bytea),
        Storage::Vector => select_many!(vector),
    }
}

/// The column type of `embeddings.embeddings` (bytea or vector), as a literal for `concat!`.
macro_rules! storage_type {
    () => {
        "SELECT t.typname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
         WHERE a.attrelid = 'embeddings'::regclass AND a.attname = 'embeddings'"
    };
}
const STORAGE_TYPE: &str = storage_type!();

/// Taken before a stream reads the column type: a conversion of the column (which needs
/// ACCESS EXCLUSIVE) then waits for the stream, so the rows come in the type read.
const LOCK_FOR_STREAM: &str = "LOCK TABLE ONLY embeddings IN ACCESS SHARE MODE";

/// Before a streaming read: how vectors are stored and the type's registered dimension.
const SET_STREAM_TYPE: &str = concat!(
    "SELECT (",
    storage_type!(),
    ") AS storage, (SELECT r.dimension FROM embedding_types r \
       WHERE r.entity_type = $1 AND r.storage IS NOT NULL) AS dimension"
);

/// The streaming read of one type. COPY takes no parameters, so the (checked) type is a
/// literal; a session setting would not reach the shards of a Citus cluster.
pub(crate) fn copy_out_type(entity_type: &str, storage: Storage) -> String {
    format!(
        "COPY (SELECT entity_id, {} FROM embeddings WHERE entity_type = {}) \
         TO STDOUT (FORMAT binary)",
        value_expression(storage),
        crate::db::quote_literal(entity_type)
    )
}

/// How a stream's rows come: the storage they are decoded from, and the type's registered
/// dimension (`None` for a type that is not registered).
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamSetup {
    pub storage: Storage,
    pub dimension: Option<usize>,
}

/// Prepares `tx` for [`copy_out_type`] of `entity_type`.
pub(crate) fn open_stream(tx: &mut Transaction<'_>, entity_type: &str) -> Result<StreamSetup> {
    tx.batch_execute(LOCK_FOR_STREAM)?;
    let row = tx.query_one(SET_STREAM_TYPE, &[&entity_type])?;
    let storage = Storage::from_type_name(row.try_get("storage")?)?;
    let dimension: Option<i32> = row.try_get("dimension")?;
    Ok(StreamSetup {
        storage,
        dimension: dimension.and_then(|d| usize::try_from(d).ok()),
    })
}

/// How this schema stores vectors now.
pub(crate) fn detect_storage<C: GenericClient>(client: &mut C) -> Result<Storage> {
    let row = client.query_one(STORAGE_TYPE, &[])?;
    Storage::from_type_name(row.try_get(0)?)
}

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
        self.timed("save_embeddings", |call| {
            check_key(entity_type, entity_id)?;
            check_vector(vector)?;
            with_storage(self.storage(), call, |storage| {
                check_storage_dimension(storage, vector.len())?;
                save_one(call, entity_type, entity_id, vector, storage)
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
        self.timed("get_embeddings", |call| {
            check_key(entity_type, entity_id)?;
            with_storage(self.storage(), call, |storage| {
                call.with_conn(Retry::Idempotent, |conn| {
                    let statement = conn.prepare_cached(select_one(storage))?;
                    let row = conn
                        .client()
                        .query_opt(&statement, &[&entity_type, &entity_id])?;
                    Ok(match row {
                        Some(r) => decode_column(&r, 0)?,
                        None => None,
                    })
                })
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
        self.timed("get_embeddings_many", |call| {
            validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
            for (i, id) in entity_ids.iter().enumerate() {
                validate::name("entity_id", id, ENTITY_ID_MAX).map_err(|e| at_index(i, e))?;
            }
            if entity_ids.is_empty() {
                return Ok(Vec::new());
            }
            with_storage(self.storage(), call, |storage| {
                call.with_conn(Retry::Idempotent, |conn| {
                    let statement = conn.prepare_cached(select_many(storage))?;
                    let rows = conn
                        .client()
                        .query(&statement, &[&entity_type, &entity_ids])?;
                    rows.iter().map(|r| decode_column(r, 0)).collect()
                })
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
        self.timed_bulk("get_all_embeddings", |call| {
            let mut all = HashMap::new();
            stream_type(call, entity_type, &mut |id, v| {
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
        self.timed_bulk("for_each_embedding", |call| {
            stream_type(call, entity_type, f)
        })
    }
}

/// Streams every (entity_id, vector) of a type to `f` by binary COPY.
fn stream_type(call: &Call<'_>, entity_type: &str, f: &mut dyn FnMut(&str, &[f32])) -> Result<u64> {
    validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
    call.with_conn(Retry::Idempotent, |conn| {
        // The caller's closure runs mid-COPY: a panic in it must not return this session.
        let mut conn = PoisonOnPanic(conn);
        let mut tx = conn
            .unbounded_client()
            .build_transaction()
            .read_only(true)
            .start()?;
        crate::db::pool::unbounded(&mut tx)?;
        let storage = open_stream(&mut tx, entity_type)?.storage;
        let mut reader = tx.copy_out(&copy_out_type(entity_type, storage))?;
        let mut delivered = 0u64;
        let result = read_rows(&mut reader, storage, &mut |id, v| {
            delivered += 1;
            f(id, v)
        });
        drop(reader);
        let interrupted = |e| interrupted_after("embedding stream", delivered, "rows", e);
        let rows = result.map_err(interrupted)?;
        tx.commit().map_err(|e| interrupted(e.into()))?;
        Ok(rows)
    })
}

/// Parses a binary COPY stream of (entity_id, vector bytes) rows, handing each to `f` with
/// reused buffers; returns the row count.
fn read_rows(
    reader: &mut dyn Read,
    storage: Storage,
    f: &mut dyn FnMut(&str, &[f32]),
) -> Result<u64> {
    let mut rows = RowReader::new(reader, 2)?;
    let mut vector = Vec::new();
    let mut count = 0u64;
    while let Some(fields) = rows.next_row()? {
        let id = std::str::from_utf8(&fields[0])
            .map_err(|e| RepoError::corrupt(format!("entity_id is not UTF-8: {e}")))?;
        storage.decode_into(&fields[1], &mut vector)?;
        f(id, &vector);
        count += 1;
    }
    Ok(count)
}

/// Saves one checked vector in the given storage.
fn save_one(
    call: &Call<'_>,
    entity_type: &str,
    entity_id: &str,
    vector: &[f32],
    storage: Storage,
) -> Result<()> {
    let value = VectorParam::new(storage, vector);
    let dimension = vector.len() as i32;
    call.with_conn(Retry::Idempotent, |conn| {
        let statement = conn.prepare_cached(save_if_registered(storage))?;
        let row = conn.client().query_one(
            &statement,
            &[&entity_type, &entity_id, value.sql(), &dimension],
        )?;
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
                // First vector of a new type: register it and create its storage in a
                // short transaction of its own, then save.
                let types = [TypeDim {
                    entity_type,
                    dimension: vector.len(),
                    first_index: 0,
                }];
                let created =
                    ensure_types(conn.client(), &types).map_err(RepoError::without_index)?;
                let saved = conn.client().execute(
                    UPSERT_ONE,
                    &[&entity_type, &entity_id, value.sql(), &dimension],
                );
                if saved.is_err() && !conn.is_broken() {
                    created.forget(conn.client());
                }
                saved?;
                Ok(())
            }
        }
    })
}

/// The storage this repository believes its schema has, read from the schema the first time.
pub(crate) fn known_storage(cell: &StorageCell, call: &Call<'_>) -> Result<Storage> {
    if let Some(storage) = cell.get() {
        return Ok(storage);
    }
    let storage = call.with_conn(Retry::Idempotent, |conn| detect_storage(conn.client()))?;
    cell.set(storage);
    Ok(storage)
}

/// Runs `f` with the storage this repository believes its schema has. Another process may
/// have converted the schema since (ModelRepository::migrate with pgvector): a statement of
/// the old storage then fails on the server. So on a database error the storage is read
/// again, and when it changed `f` runs once more with the new one.
pub(crate) fn with_storage<T>(
    cell: &StorageCell,
    call: &Call<'_>,
    mut f: impl FnMut(Storage) -> Result<T>,
) -> Result<T> {
    let believed = known_storage(cell, call)?;
    match f(believed) {
        Err(e) if e.code().is_some() => {
            let now = call.with_conn(Retry::Idempotent, |conn| detect_storage(conn.client()))?;
            if now == believed {
                return Err(e);
            }
            log::info!(
                "pg-model-repo: this schema now stores vectors as {}",
                now.sql_type()
            );
            cell.set(now);
            // Sessions set up before pgvector was installed do not find its type yet.
            call.pool().reset_sessions();
            f(now)
        }
        other => other,
    }
}
