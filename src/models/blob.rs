//! Model bytes in and out without holding them in memory: a reader is spooled to a temp file
//! while it is hashed, then framed by hand into a binary COPY straight into `ml_models`; a load streams the value out in
//! slices inside one snapshot, hashing as it writes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

use postgres::{IsolationLevel, Transaction};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::db::binary_copy;
use crate::db::error::interrupted_after;
use crate::db::error::{RepoError, Result};
use crate::db::pool::PoisonOnPanic;
use crate::db::retry::Retry;
use crate::db::to_hex;
use crate::models::versions::{
    info_columns, store_model, ModelInfo, SaveRequest, VersionRef, INFO_COLUMNS,
};
use crate::repository::ModelRepository;
use crate::validate;

/// Size of one read or write step: what a streaming call holds at once.
const CHUNK: usize = 4 << 20;

/// Where the bytes of a save come from.
pub(crate) enum BlobSource<'a> {
    /// The caller's slice, sent as one parameter.
    Slice(&'a [u8]),
    /// A spooled temp file of known length, sent by binary COPY.
    Spooled { file: File, len: u64 },
}

/// A save of bytes in hand; a soft-deleted row of the same version is replaced.
const INSERT_SLICE: &str = concat!(
    "INSERT INTO ml_models AS m (model_name, version, model_data, metadata, checksum)
     VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (model_name, version) DO UPDATE SET
        model_data = EXCLUDED.model_data, metadata = EXCLUDED.metadata,
        checksum = EXCLUDED.checksum, is_active = true, save_seq = EXCLUDED.save_seq,
        created_at = now(), load_count = 0, last_loaded_at = NULL
     WHERE NOT m.is_active RETURNING ",
    info_columns!()
);

const SELECT_SAVED: &str = concat!(
    "SELECT ",
    info_columns!(),
    " FROM ml_models m WHERE m.model_name = $1 AND m.version = $2"
);

impl BlobSource<'_> {
    /// Inserts (or revives a soft-deleted) version with these bytes; `None` if an active
    /// version with the same name appeared meanwhile.
    pub(crate) fn insert(
        &mut self,
        tx: &mut Transaction<'_>,
        request: &SaveRequest<'_>,
    ) -> Result<Option<ModelInfo>> {
        crate::db::pool::unbounded(tx)?;
        let row = match self {
            BlobSource::Slice(data) => tx.query_opt(
                INSERT_SLICE,
                &[
                    &request.model_name,
                    &request.version,
                    data,
                    request.metadata,
                    &request.checksum,
                ],
            )?,
            BlobSource::Spooled { file, len } => {
                if !copy_new_version(tx, request, file, *len)? {
                    return Ok(None);
                }
                tx.query_opt(SELECT_SAVED, &[&request.model_name, &request.version])?
            }
        };
        row.map(|r| ModelInfo::from_row(&r)).transpose()
    }
}

/// Writes the version straight into `ml_models` by binary COPY, framed by hand so that the
/// bytes stream from the spool file and never sit in memory whole. A soft-deleted row of the
/// same version (locked by the caller's comparison) is replaced. Returns false when an active
/// version with the same name was committed meanwhile (the caller then compares with it).
fn copy_new_version(
    tx: &mut Transaction<'_>,
    request: &SaveRequest<'_>,
    file: &mut File,
    len: u64,
) -> Result<bool> {
    tx.execute(DELETE_INACTIVE, &[&request.model_name, &request.version])?;
    tx.batch_execute("SAVEPOINT pg_model_repo_copy")?;
    match copy_row(tx, request, file, len) {
        Ok(()) => Ok(true),
        Err(RepoError::Conflict(_)) => {
            // 23505: a concurrent save of the same version won the race.
            tx.batch_execute("ROLLBACK TO SAVEPOINT pg_model_repo_copy")?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

const DELETE_INACTIVE: &str =
    "DELETE FROM ml_models WHERE model_name = $1 AND version = $2 AND NOT is_active";

const COPY_MODEL: &str = "COPY ml_models (model_name, version, metadata, checksum, model_data) \
     FROM STDIN (FORMAT binary)";

fn copy_row(
    tx: &mut Transaction<'_>,
    request: &SaveRequest<'_>,
    file: &mut File,
    len: u64,
) -> Result<()> {
    let field_len = i32::try_from(len)
        .map_err(|_| RepoError::invalid(format!("model of {len} bytes is too large for COPY")))?;
    // JSONB's binary input is a version byte (1) followed by the JSON text.
    let mut metadata = vec![1u8];
    serde_json::to_writer(&mut metadata, request.metadata)
        .map_err(|e| RepoError::Serialization(format!("metadata: {e}")))?;
    let mut head = Vec::with_capacity(256 + metadata.len());
    head.extend_from_slice(binary_copy::HEADER);
    binary_copy::row(&mut head, 5);
    for field in [
        request.model_name.as_bytes(),
        request.version.as_bytes(),
        &metadata,
        request.checksum.as_bytes(),
    ] {
        binary_copy::field(&mut head, field);
    }
    binary_copy::field_len(&mut head, field_len);
    file.seek(SeekFrom::Start(0))?;
    let mut writer = tx.copy_in(COPY_MODEL)?;
    writer.write_all(&head)?;
    let copied = std::io::copy(&mut file.take(len), &mut writer)?;
    if copied != len {
        return Err(RepoError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("spool file shrank: {copied} of {len} bytes"),
        )));
    }
    writer.write_all(&binary_copy::TRAILER)?;
    writer.finish()?;
    Ok(())
}

/// Copies `reader` to an anonymous temp file, hashing and counting as it goes; more than
/// `max` bytes is `InvalidInput` (and nothing was sent anywhere).
fn spool(reader: &mut dyn Read, max: u64) -> Result<(File, u64, String)> {
    let mut file = tempfile::tempfile()?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut len = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        len += n as u64;
        if len > max {
            return Err(RepoError::invalid(format!(
                "model is larger than max_model_size ({max} bytes)"
            )));
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])?;
    }
    file.flush()?;
    Ok((file, len, to_hex(&hasher.finalize())))
}

const SELECT_SLICE: &str = "SELECT substring(model_data FROM $3 FOR $4) \
     FROM ml_models WHERE model_name = $1 AND version = $2";

impl ModelRepository {
    /// Saves a model read from `reader` in constant memory (the bytes are spooled to a temp
    /// file and hashed, then streamed by binary COPY). Same rules as
    /// [`save_model`](Self::save_model).
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
        self.timed("save_model_from_reader", |call| {
            let request = self.check_save(model_name, version, metadata, 0)?;
            let (file, len, checksum) = spool(reader, self.config().max_model_size)?;
            let request = SaveRequest {
                size: len,
                checksum,
                ..request
            };
            store_model(call, &request, &mut BlobSource::Spooled { file, len })
        })
    }

    /// Streams a version's bytes to `writer` in slices, in constant memory; `Ok(None)` when it
    /// is absent or deleted. The checksum is verified as the bytes pass: on `Corrupt` (returned
    /// at the end) the caller must discard what was written. A failure after the first byte
    /// was written is not retried (the writer already holds part of the model).
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
        self.timed("load_model_to_writer", |call| {
            validate::model_name(model_name)?;
            let vref = VersionRef::parse(version)?;
            let mut written = 0u64;
            let loaded = call.run(Retry::Idempotent, |conn| {
                // The caller's writer runs mid-transaction: a panic in it poisons the session.
                let mut conn = PoisonOnPanic(conn);
                let mut tx = conn
                    .unbounded_client()
                    .build_transaction()
                    .isolation_level(IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()?;
                crate::db::pool::unbounded(&mut tx)?;
                let Some(row) = vref.select(&mut tx, model_name, INFO_COLUMNS, "")? else {
                    return Ok(None);
                };
                let info = ModelInfo::from_row(&row)?;
                let hash = stream_slices(&mut tx, &info, writer, &mut written)
                    .map_err(|e| interrupted_after("model stream", written, "bytes", e))?;
                tx.commit()?;
                Ok(Some((info, hash)))
            })?;
            let Some((mut info, hash)) = loaded else {
                return Ok(None);
            };
            self.settle_checksum(call, &mut info, &hash)?;
            self.record_model_load(&info.model_name, &info.version);
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
        let len = CHUNK as i32;
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
