//! Model bytes in and out without holding them in memory. A save reads up to one chunk: a
//! model that fits is stored inline, a larger one goes to the chunked save with the chunks
//! already read. A load streams an inline value in slices inside one snapshot, or a chunked
//! one over several connections, hashing as it writes.

use std::io::{Read, Write};

use postgres::Transaction;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::db::pool::{begin_snapshot, PoisonOnPanic};
use crate::db::retry::Retry;
use crate::db::to_hex;
use crate::error::interrupted_after;
use crate::error::{RepoError, Result};
use crate::models::chunked::{save_chunked, stream_chunks, ChunkReader, ChunkSource, Layout};
use crate::models::reference::VersionRef;
use crate::models::versions::{store_model, ModelInfo, STORED_COLUMNS};
use crate::repository::ModelRepository;
use crate::validate;

/// Size of one slice of an inline value read at once: what a streaming load of it holds.
const SLICE: usize = 4 << 20;

const SELECT_SLICE: &str = "SELECT substring(model_data FROM $3 FOR $4) \
     FROM ml_models WHERE model_name = $1 AND version = $2";

impl ModelRepository {
    /// Saves a model read from `reader` in memory bounded by a few chunks, whatever its size:
    /// up to `model_chunk_size` bytes it is stored inline; beyond, its chunks are written over
    /// several connections as they are read, and published at once when the reader ends (a
    /// reader that fails, or passes `max_model_size`, leaves nothing stored). Same rules as
    /// [`save_model`](Self::save_model). A reader cannot be read twice, so a transient failure
    /// while a chunked model is written is returned, not retried (the publish step alone is).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let mut file = std::fs::File::open("model.onnx")?;
    /// let info = repo.save_model_from_reader("ranker", "3.0", &mut file, &serde_json::json!({}))?;
    /// # Ok(()) }
    /// ```
    pub fn save_model_from_reader(
        &self,
        model_name: &str,
        version: &str,
        reader: &mut dyn Read,
        metadata: &Value,
    ) -> Result<ModelInfo> {
        self.timed_bulk("save_model_from_reader", |call| {
            let request = self.check_save(model_name, version, metadata, 0)?;
            let config = self.config();
            let mut chunks = ChunkReader::new(
                reader,
                config.models.chunk_size,
                config.models.max_model_size,
            );
            let mut read = vec![Vec::new()];
            chunks.fill(&mut read[0])?;
            if read[0].len() == config.models.chunk_size as usize {
                let mut next = Vec::new();
                chunks.fill(&mut next)?;
                if !next.is_empty() {
                    read.push(next);
                    return save_chunked(
                        call,
                        &self.chunked_save(&request),
                        ChunkSource::Reader(chunks, read),
                    );
                }
            }
            let (size, checksum) = chunks.finish();
            store_model(call, &request.sized(size, checksum), &read[0])
        })
        .inspect(|info| self.metrics().model_bytes_saved(info.size_bytes))
    }

    /// Streams a version's bytes to `writer` in memory bounded by a few chunks (an inline
    /// value in slices; a chunked one over several connections in one snapshot, in order);
    /// `Ok(None)` when it is absent or deleted. Checksums are verified as the bytes pass: each
    /// chunk's own (a bad chunk is `Corrupt` naming it, as soon as it is read) and the whole
    /// model's at the end. On `Corrupt` the caller must discard what was written. A failure
    /// after the first byte was written is not retried (the writer already holds part of the
    /// model).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let mut out = std::fs::File::create("ranker.bin")?;
    /// let info = repo.load_model_to_writer("ranker", "latest", &mut out)?;
    /// # Ok(()) }
    /// ```
    pub fn load_model_to_writer(
        &self,
        model_name: &str,
        version: &str,
        writer: &mut dyn Write,
    ) -> Result<Option<ModelInfo>> {
        self.timed_bulk("load_model_to_writer", |call| {
            validate::model_name(model_name)?;
            let vref = VersionRef::parse(version)?;
            let mut written = 0u64;
            let streams = self.config().models.streams as usize;
            let loaded = call.with_conn(Retry::Idempotent, |conn| {
                // The caller's writer runs mid-transaction: a panic in it poisons the session.
                let mut conn = PoisonOnPanic(conn);
                let mut tx = begin_snapshot(&mut conn, None)?;
                let Some(row) = vref.select(&mut tx, model_name, STORED_COLUMNS, "")? else {
                    return Ok(None);
                };
                let info = ModelInfo::from_row(&row)?;
                let hash = match Layout::from_row(&row)? {
                    Layout::Inline => stream_slices(&mut tx, &info, writer, &mut written),
                    Layout::Chunked(chunks) => stream_chunks(
                        call.pool(),
                        &mut tx,
                        &info,
                        chunks,
                        streams,
                        writer,
                        &mut written,
                    ),
                }
                .map_err(|e| match e {
                    // Not worth a retry either, and the caller must know it as such.
                    RepoError::Corrupt(_) => e,
                    e => interrupted_after("model stream", written, "bytes", e),
                })?;
                tx.commit()?;
                Ok(Some((info, hash)))
            })?;
            let Some((mut info, hash)) = loaded else {
                return Ok(None);
            };
            self.settle_checksum(call, &mut info, &hash)?;
            self.record_model_load(&info.model_name, &info.version, written);
            Ok(Some(info))
        })
    }
}

/// Writes the value slice by slice; returns its hex SHA-256.
fn stream_slices(
    tx: &mut Transaction<'_>,
    info: &ModelInfo,
    writer: &mut dyn Write,
    written: &mut u64,
) -> Result<String> {
    let statement = tx.prepare(SELECT_SLICE)?;
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    while offset < info.size_bytes {
        // substring() counts from 1.
        // substring() takes int4: fine, a BYTEA value is under 1 GiB.
        let start = i32::try_from(offset + 1).unwrap_or(i32::MAX);
        let len = SLICE as i32;
        let row = tx.query_one(&statement, &[&info.model_name, &info.version, &start, &len])?;
        let slice: &[u8] = row.try_get(0)?;
        if slice.is_empty() {
            break;
        }
        hasher.update(slice);
        writer.write_all(slice)?;
        *written += slice.len() as u64;
        offset += slice.len() as u64;
    }
    writer.flush()?;
    Ok(to_hex(&hasher.finalize()))
}
