//! Model versions: save (idempotent re-save, conflict on different content, revival of a
//! soft-deleted version), load with checksum verification, listings, metadata search, soft
//! delete and cleanup; and the statement that writes buffered load counts.

use std::time::SystemTime;

use postgres::types::ToSql;
use postgres::{GenericClient, Row};
use serde_json::Value;

use crate::db::call::Call;
use crate::db::deadline::stream_from_here;
use crate::db::hex_sha256;
use crate::db::pool::begin_snapshot;
use crate::db::retry::Retry;
use crate::error::{RepoError, Result};
use crate::models::aliases::{drop_aliases_to, dropped_alias_notices};
use crate::models::chunked::{
    delete_released, layout_columns, release_sets, save_chunked, stream_chunks, ChunkSource,
    ChunkedSave, Layout,
};
use crate::models::events::{notify, ModelEventKind, Notice};
use crate::models::reference::VersionRef;
use crate::repository::ModelRepository;
use crate::validate;

/// One stored model version, without its bytes.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelInfo {
    /// The model's name.
    pub model_name: String,
    /// The version's literal name.
    pub version: String,
    /// Size of the model bytes.
    pub size_bytes: u64,
    /// SHA-256 of the bytes, lowercase hex.
    pub checksum: String,
    /// The caller's metadata object, as saved.
    pub metadata: Value,
    /// When this version was (last) saved.
    pub created_at: SystemTime,
    /// False once soft-deleted.
    pub is_active: bool,
}

/// The columns every `ModelInfo` is read from (table alias `m`), as a literal so that
/// statement constants can be built from it with `concat!`.
macro_rules! info_columns {
    () => {
        "m.model_name, m.version, m.size_bytes, m.checksum, m.metadata, m.created_at, m.is_active"
    };
}
pub(crate) use info_columns;

/// The info and the layout of a version (how its bytes are stored), for statements built at
/// run time.
pub(crate) const STORED_COLUMNS: &str = concat!(info_columns!(), ", ", layout_columns!());

/// A save of bytes in hand, stored inline; a soft-deleted row of the same version is replaced
/// (its chunks, if it had any, are deleted first).
const INSERT_INLINE: &str = concat!(
    "INSERT INTO ml_models AS m (model_name, version, model_data, metadata, checksum)
     VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (model_name, version) DO UPDATE SET
        model_data = EXCLUDED.model_data, metadata = EXCLUDED.metadata,
        checksum = EXCLUDED.checksum, is_active = true, save_seq = EXCLUDED.save_seq,
        created_at = EXCLUDED.created_at, load_count = 0, last_loaded_at = NULL,
        chunk_size = 0, chunk_count = 0, chunk_set = NULL
     WHERE NOT m.is_active RETURNING ",
    info_columns!(),
    ", m.save_seq"
);

/// The chunks of a soft-deleted version about to be replaced.
const DELETE_REPLACED_CHUNKS: &str = "DELETE FROM ml_model_chunks c USING ml_models m
     WHERE m.model_name = $1 AND m.version = $2 AND NOT m.is_active
       AND c.model_name = m.model_name AND c.version = m.version AND c.chunk_set = m.chunk_set";

/// Adds buffered loads to `load_count` and moves `last_loaded_at` (database clock); see
/// `db::counters` for the parameters.
/// The times are computed in a materialized CTE: on a Citus cluster the coordinator computes
/// them, since the shards' `SET` may call no clock function on a column.
pub(crate) const FLUSH_LOADS: &str = "WITH u AS MATERIALIZED (
         SELECT (k::jsonb)->>0 AS model_name, (k::jsonb)->>1 AS version, n,
                now() - age_us * interval '1 microsecond' AS at
         FROM unnest($1::text[], $2::int8[], $3::int8[]) AS l(k, n, age_us))
     UPDATE ml_models AS m
     SET load_count = m.load_count + u.n, last_loaded_at = GREATEST(m.last_loaded_at, u.at)
     FROM u WHERE m.model_name = u.model_name AND m.version = u.version";

impl ModelInfo {
    pub(crate) fn from_row(row: &Row) -> Result<Self> {
        let size: i64 = row.try_get("size_bytes")?;
        let checksum: Option<String> = row.try_get("checksum")?;
        Ok(ModelInfo {
            model_name: row.try_get("model_name")?,
            version: row.try_get("version")?,
            size_bytes: u64::try_from(size).unwrap_or(0),
            checksum: checksum.unwrap_or_default(),
            metadata: row.try_get("metadata")?,
            created_at: row.try_get("created_at")?,
            is_active: row.try_get("is_active")?,
        })
    }
}

const SELECT_FOR_SAVE: &str = concat!(
    "SELECT ",
    info_columns!(),
    ", m.metadata = $3 AS same_metadata, m.save_seq \
     FROM ml_models m WHERE m.model_name = $1 AND m.version = $2 FOR UPDATE"
);

const SELECT_VERSIONS: &str = concat!(
    "SELECT ",
    info_columns!(),
    " FROM ml_models m WHERE m.model_name = $1 AND m.is_active ORDER BY m.save_seq DESC"
);

const SEARCH: &str = concat!(
    "SELECT ",
    info_columns!(),
    " FROM ml_models m WHERE m.is_active AND m.metadata @> $1 ORDER BY m.save_seq DESC"
);

const SOFT_DELETE: &str = "UPDATE ml_models SET is_active = false \
     WHERE model_name = $1 AND version = $2 AND is_active";

const CLEANUP: &str = "WITH keep AS (
        SELECT version FROM ml_models WHERE model_name = $1 AND is_active
        ORDER BY save_seq DESC LIMIT $2)
     DELETE FROM ml_models WHERE model_name = $1 AND version NOT IN (SELECT version FROM keep)
     RETURNING version, chunk_set, save_seq";

/// What the caller asked to store, checked and hashed before any I/O, and where its event
/// goes.
pub(crate) struct SaveRequest<'a> {
    pub model_name: &'a str,
    pub version: &'a str,
    pub metadata: &'a Value,
    pub size: u64,
    pub checksum: String,
    /// The change events' channel.
    pub channel: &'a str,
}

impl SaveRequest<'_> {
    /// The same request for `size` bytes hashing to `checksum`.
    pub(crate) fn sized(&self, size: u64, checksum: String) -> SaveRequest<'_> {
        SaveRequest {
            model_name: self.model_name,
            version: self.version,
            metadata: self.metadata,
            size,
            checksum,
            channel: self.channel,
        }
    }

    /// Sends the event of this save from its transaction: `Saved`, or `Revived` when it
    /// replaced a soft-deleted version.
    pub(crate) fn notify_saved<C: GenericClient>(
        &self,
        client: &mut C,
        save_seq: i64,
        revived: bool,
    ) -> Result<()> {
        let kind = if revived {
            ModelEventKind::Revived
        } else {
            ModelEventKind::Saved
        };
        let event = Notice::version(kind, self.model_name, self.version, Some(save_seq));
        notify(client, self.channel, &[event])
    }

    /// Sends the event of a save that found this very content stored (`Saved`, marked as a
    /// resave), unless this is a retry of the same call: then its first attempt committed
    /// and sent the event (or a concurrent save of the same content did).
    pub(crate) fn notify_resave<C: GenericClient>(
        &self,
        client: &mut C,
        save_seq: i64,
        first_attempt: bool,
    ) -> Result<()> {
        if !first_attempt {
            return Ok(());
        }
        let mut event = Notice::version(
            ModelEventKind::Saved,
            self.model_name,
            self.version,
            Some(save_seq),
        );
        event.resave = true;
        notify(client, self.channel, &[event])
    }
}

/// What is stored under a version a save is about to write.
pub(crate) enum Stored {
    /// Nothing.
    Absent,
    /// A soft-deleted version (locked): the save replaces it.
    Inactive,
    /// The same content, active: the save answers with it.
    Same { info: ModelInfo, save_seq: i64 },
}

impl ModelRepository {
    /// Saves `data` as `version` of `model_name` with a metadata object.
    ///
    /// Saving an active version again with the same bytes and metadata returns the stored
    /// info (a retried save is harmless); with different ones it is `RepoError::Conflict`.
    /// A soft-deleted version is replaced and becomes the newest. `"latest"` and `"@…"` are
    /// not valid versions to save. Larger than `max_model_size`: `InvalidInput`. A model
    /// larger than `model_chunk_size` is stored in chunks, written over several connections
    /// and published at once.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let info = repo.save_model("ranker", "2.0", &[1, 2, 3], &serde_json::json!({"auc": 0.93}))?;
    /// println!("saved {} bytes, sha256 {}", info.size_bytes, info.checksum);
    /// # Ok(()) }
    /// ```
    pub fn save_model(
        &self,
        model_name: &str,
        version: &str,
        data: &[u8],
        metadata: &Value,
    ) -> Result<ModelInfo> {
        self.timed("save_model", |call| {
            let request = self.check_save(model_name, version, metadata, data.len() as u64)?;
            let request = request.sized(request.size, hex_sha256(data));
            if data.len() as u64 <= u64::from(self.config().models.chunk_size) {
                return store_model(call, &request, data);
            }
            save_chunked(call, &self.chunked_save(&request), ChunkSource::Slice(data))
        })
        .inspect(|info| self.metrics().model_bytes_saved(info.size_bytes))
    }

    /// How a chunked save of `request` runs with this repository's settings.
    pub(crate) fn chunked_save<'a>(&self, request: &'a SaveRequest<'a>) -> ChunkedSave<'a> {
        ChunkedSave {
            request,
            chunk_size: self.config().models.chunk_size,
            streams: self.config().models.streams as usize,
        }
    }

    /// Validates a save before any I/O; the checksum is filled in by the caller.
    pub(crate) fn check_save<'a>(
        &'a self,
        model_name: &'a str,
        version: &'a str,
        metadata: &'a Value,
        size: u64,
    ) -> Result<SaveRequest<'a>> {
        validate::model_name(model_name)?;
        validate::saved_version(version)?;
        validate::metadata(metadata)?;
        self.check_model_size(size)?;
        Ok(SaveRequest {
            model_name,
            version,
            metadata,
            size,
            checksum: String::new(),
            channel: self.events_channel(),
        })
    }

    pub(crate) fn check_model_size(&self, size: u64) -> Result<()> {
        let max = self.config().models.max_model_size;
        if size > max {
            return Err(RepoError::invalid(format!(
                "model is {size} bytes; max_model_size is {max}"
            )));
        }
        Ok(())
    }

    /// Loads the bytes of a version (`"latest"`, `"@alias"` or a literal one); `Ok(None)` when
    /// it is absent or deleted, `RepoError::Corrupt` when the bytes no longer match their
    /// checksum.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// if let Some(bytes) = repo.load_model("ranker", "@champion")? {
    ///     println!("{} bytes", bytes.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn load_model(&self, model_name: &str, version: &str) -> Result<Option<Vec<u8>>> {
        self.timed("load_model", |call| {
            Ok(self
                .fetch_model(call, model_name, version)?
                .map(|(_, data)| data))
        })
    }

    /// Like [`load_model`](Self::load_model), with the version's info.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// if let Some((info, bytes)) = repo.load_model_with_info("ranker", "latest")? {
    ///     println!("{} {} ({} bytes)", info.model_name, info.version, bytes.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn load_model_with_info(
        &self,
        model_name: &str,
        version: &str,
    ) -> Result<Option<(ModelInfo, Vec<u8>)>> {
        self.timed("load_model_with_info", |call| {
            self.fetch_model(call, model_name, version)
        })
    }

    fn fetch_model(
        &self,
        call: &Call<'_>,
        model_name: &str,
        version: &str,
    ) -> Result<Option<(ModelInfo, Vec<u8>)>> {
        validate::model_name(model_name)?;
        let vref = VersionRef::parse(version)?;
        let columns = format!("{STORED_COLUMNS}, m.model_data");
        let streams = self.config().models.streams as usize;
        let found = call.with_conn(Retry::Idempotent, |conn| {
            // One snapshot for the row and, for a chunked version, every chunk stream.
            let watch = conn.watch().clone();
            let mut tx = begin_snapshot(conn, None)?;
            let Some(row) = vref.select(&mut tx, model_name, &columns, "")? else {
                return Ok(None);
            };
            let info = ModelInfo::from_row(&row)?;
            let (data, hash) = match Layout::from_row(&row)? {
                Layout::Inline => {
                    let data: Vec<u8> = row.try_get("model_data")?;
                    let hash = hex_sha256(&data);
                    (data, hash)
                }
                Layout::Chunked(chunks) => {
                    drop(row);
                    // The server answered: the chunks' transfer is a stream.
                    stream_from_here(&watch);
                    let mut data = Vec::new();
                    data.try_reserve_exact(info.size_bytes as usize)
                        .map_err(|e| {
                            RepoError::Io(std::io::Error::new(
                                std::io::ErrorKind::OutOfMemory,
                                format!("no memory for a model of {} bytes: {e}", info.size_bytes),
                            ))
                        })?;
                    let hash = stream_chunks(
                        call.pool(),
                        &mut tx,
                        &info,
                        chunks,
                        streams,
                        &mut data,
                        &mut 0,
                    )?;
                    (data, hash)
                }
            };
            tx.commit()?;
            Ok(Some((info, data, hash)))
        })?;
        let Some((mut info, data, hash)) = found else {
            return Ok(None);
        };
        self.settle_checksum(call, &mut info, &hash)?;
        self.record_model_load(&info.model_name, &info.version, data.len() as u64);
        Ok(Some((info, data)))
    }

    /// Active versions of a model, newest first.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// for v in repo.get_model_versions("ranker")? {
    ///     println!("{} {} bytes", v.version, v.size_bytes);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn get_model_versions(&self, model_name: &str) -> Result<Vec<ModelInfo>> {
        self.timed("get_model_versions", |call| {
            validate::model_name(model_name)?;
            call.with_conn(Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(SELECT_VERSIONS)?;
                let rows = conn.client().query(&statement, &[&model_name])?;
                rows.iter().map(ModelInfo::from_row).collect()
            })
        })
    }

    /// Active versions (of every model) whose metadata contains `metadata_filter` (JSONB
    /// `@>`), newest first; `{}` matches all.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let prod = repo.search_models(&serde_json::json!({"stage": "prod"}))?;
    /// # Ok(()) }
    /// ```
    pub fn search_models(&self, metadata_filter: &Value) -> Result<Vec<ModelInfo>> {
        self.timed("search_models", |call| {
            validate::metadata(metadata_filter)?;
            call.with_conn(Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(SEARCH)?;
                let rows = conn.client().query(&statement, &[metadata_filter])?;
                rows.iter().map(ModelInfo::from_row).collect()
            })
        })
    }

    /// Soft-deletes a version (it stays in the table, inactive); aliases pointing to it are
    /// removed (their history stays). True if an active version was deleted.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// assert!(repo.delete_model("ranker", "1.0")?);
    /// # Ok(()) }
    /// ```
    pub fn delete_model(&self, model_name: &str, version: &str) -> Result<bool> {
        self.timed("delete_model", |call| {
            validate::model_name(model_name)?;
            let vref = VersionRef::parse(version)?;
            let channel = self.events_channel();
            // A tracked write: after a lost commit reply the answer stays right.
            call.run_once(|tx| {
                let Some(row) =
                    vref.select(tx, model_name, "m.version, m.save_seq", "FOR UPDATE")?
                else {
                    return Ok(false);
                };
                let (literal, save_seq): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
                let deleted = tx.execute(SOFT_DELETE, &[&model_name, &literal])? > 0;
                let dropped = drop_aliases_to(tx, model_name, std::slice::from_ref(&literal))?;
                if deleted {
                    let mut events = vec![Notice::version(
                        ModelEventKind::Deleted,
                        model_name,
                        &literal,
                        Some(save_seq),
                    )];
                    events.extend(dropped_alias_notices(model_name, &dropped));
                    notify(tx, channel, &events)?;
                }
                Ok(deleted)
            })
        })
    }

    /// Physically removes every version of `model_name` except the `keep_versions` newest
    /// active ones (soft-deleted versions go too; 0 keeps none). Aliases to removed versions
    /// go; their history and training metrics stay. Returns the number of versions removed.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let removed = repo.cleanup_old_models("ranker", 5)?;
    /// # Ok(()) }
    /// ```
    pub fn cleanup_old_models(&self, model_name: &str, keep_versions: usize) -> Result<u64> {
        self.timed("cleanup_old_models", |call| {
            validate::model_name(model_name)?;
            let keep = i64::try_from(keep_versions).unwrap_or(i64::MAX);
            let channel = self.events_channel();
            // A tracked write: after a lost commit reply the count stays right. Chunks of the
            // removed versions are only released inside it (a short update); their deletion,
            // bulk work, follows.
            let (removed, released) = call.run_once(|tx| {
                let rows = tx.query(CLEANUP, &[&model_name, &keep])?;
                let mut removed = Vec::with_capacity(rows.len());
                let mut chunk_sets = Vec::new();
                for row in &rows {
                    let version: String = row.try_get("version")?;
                    if let Some(set) = row.try_get::<_, Option<i64>>("chunk_set")? {
                        chunk_sets.push((version.clone(), set));
                    }
                    removed.push((row.try_get::<_, i64>("save_seq")?, version));
                }
                removed.sort_unstable_by(|a, b| b.cmp(a));
                let versions: Vec<String> = removed.iter().map(|(_, v)| v.clone()).collect();
                let dropped = drop_aliases_to(tx, model_name, &versions)?;
                release_sets(tx, model_name, &chunk_sets)?;
                let mut events: Vec<Notice<'_>> = removed
                    .iter()
                    .map(|(seq, version)| {
                        Notice::version(ModelEventKind::CleanedUp, model_name, version, Some(*seq))
                    })
                    .collect();
                events.extend(dropped_alias_notices(model_name, &dropped));
                notify(tx, channel, &events)?;
                Ok((removed.len() as u64, chunk_sets))
            })?;
            delete_released(call, model_name, &released);
            Ok(removed)
        })
    }
}

/// The transaction behind every inline save (a model up to one chunk): compare with what is
/// stored, else write the bytes.
pub(crate) fn store_model(
    call: &Call<'_>,
    request: &SaveRequest<'_>,
    data: &[u8],
) -> Result<ModelInfo> {
    let mut attempts = 0u32;
    call.with_conn(Retry::Idempotent, |conn| {
        attempts += 1;
        // The bytes go out inside (see `BlobSource::insert`): bulk work for the watchdog.
        let mut tx = conn.unbounded_client().transaction()?;
        // An identical active version answers without sending the bytes again.
        let revived = match compare_with_stored(&mut tx, request)? {
            Stored::Same { info, save_seq } => {
                request.notify_resave(&mut tx, save_seq, attempts == 1)?;
                tx.commit()?;
                return Ok(info);
            }
            Stored::Inactive => true,
            Stored::Absent => false,
        };
        crate::db::pool::unbounded(&mut tx)?;
        tx.execute(
            DELETE_REPLACED_CHUNKS,
            &[&request.model_name, &request.version],
        )?;
        let written = tx
            .query_opt(
                INSERT_INLINE,
                &[
                    &request.model_name,
                    &request.version,
                    &data,
                    request.metadata,
                    &request.checksum,
                ],
            )?
            .map(|r| Ok::<_, RepoError>((ModelInfo::from_row(&r)?, r.try_get("save_seq")?)))
            .transpose()?;
        let info = match written {
            Some((info, save_seq)) => {
                request.notify_saved(&mut tx, save_seq, revived)?;
                info
            }
            // Someone saved the same version between our check and our insert.
            None => saved_meanwhile(&mut tx, request, attempts == 1)?,
        };
        tx.commit()?;
        Ok(info)
    })
}

/// What an insert that found its version taken (saved by another session between our
/// comparison and our insert) answers: the stored version when it is the same content (a
/// resave, with its event), else `Conflict`.
pub(crate) fn saved_meanwhile<C: GenericClient>(
    client: &mut C,
    request: &SaveRequest<'_>,
    first_attempt: bool,
) -> Result<ModelInfo> {
    match compare_with_stored(client, request)? {
        Stored::Same { info, save_seq } => {
            request.notify_resave(client, save_seq, first_attempt)?;
            Ok(info)
        }
        Stored::Absent | Stored::Inactive => Err(RepoError::conflict(format!(
            "{}/{} was saved concurrently",
            request.model_name, request.version
        ))),
    }
}

/// What is stored under the request's version (locked): the same content, active; nothing;
/// or a soft-deleted version (then it may be written). `Conflict` if it is active with other
/// content.
pub(crate) fn compare_with_stored<C: GenericClient>(
    client: &mut C,
    request: &SaveRequest<'_>,
) -> Result<Stored> {
    let params: [&(dyn ToSql + Sync); 3] =
        [&request.model_name, &request.version, request.metadata];
    let Some(row) = client.query_opt(SELECT_FOR_SAVE, &params)? else {
        return Ok(Stored::Absent);
    };
    let stored = ModelInfo::from_row(&row)?;
    if !stored.is_active {
        return Ok(Stored::Inactive);
    }
    let same_metadata: bool = row.try_get("same_metadata")?;
    if stored.checksum == request.checksum && stored.size_bytes == request.size && same_metadata {
        let save_seq = row.try_get("save_seq")?;
        return Ok(Stored::Same {
            info: stored,
            save_seq,
        });
    }
    Err(RepoError::conflict(format!(
        "{}/{} is already saved with different {}",
        request.model_name,
        request.version,
        if same_metadata {
            "bytes"
        } else {
            "content or metadata"
        }
    )))
}

const FILL_CHECKSUM: &str = "UPDATE ml_models SET checksum = $3 \
     WHERE model_name = $1 AND version = $2 AND checksum IS NULL";

impl ModelRepository {
    /// [`verify_checksum`]; and a row whose checksum was cleared by hand (NULL: the library
    /// always stores one) gets the checksum its bytes hash to now, in `info` and in the
    /// table, so that every later load verifies against it.
    pub(crate) fn settle_checksum(
        &self,
        call: &Call<'_>,
        info: &mut ModelInfo,
        actual: &str,
    ) -> Result<()> {
        verify_checksum(info, actual)?;
        if !info.checksum.is_empty() {
            return Ok(());
        }
        info.checksum = actual.to_owned();
        let filled = call.with_conn(Retry::Idempotent, |conn| {
            let statement = conn.prepare_cached(FILL_CHECKSUM)?;
            let params: [&(dyn ToSql + Sync); 3] =
                [&info.model_name, &info.version, &info.checksum];
            Ok(conn.client().execute(&statement, &params)?)
        });
        match filled {
            Ok(_) => log::info!(
                "pg-model-repo: {}/{} had no checksum; stored the one its bytes hash to now",
                info.model_name,
                info.version
            ),
            Err(e) => log::warn!(
                "pg-model-repo: {}/{} has no checksum and storing one failed: {e}",
                info.model_name,
                info.version
            ),
        }
        Ok(())
    }
}

/// `Corrupt` when the bytes read no longer hash to the stored checksum.
pub(crate) fn verify_checksum(info: &ModelInfo, actual: &str) -> Result<()> {
    if info.checksum.is_empty() || info.checksum.eq_ignore_ascii_case(actual) {
        return Ok(());
    }
    Err(RepoError::corrupt(format!(
        "{}/{}: stored checksum {} but the bytes hash to {actual}",
        info.model_name, info.version, info.checksum
    )))
}
