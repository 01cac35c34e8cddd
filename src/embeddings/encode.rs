//! Embedding rows in binary COPY form (framed with `db::binary_copy`): each vector is checked
//! (finite values) and encoded in one loop, a chunk of records at a time, on the crate's own
//! rayon pool (CPU work only: never blocking I/O, never a pool checkout).

use std::sync::OnceLock;

use crate::db::binary_copy;
use crate::embeddings::stamps::Stamps;
use crate::embeddings::types::{Embedding, Storage};
use crate::error::{RepoError, Result};

/// Encoded bytes per chunk: what one channel slot holds.
pub(crate) const CHUNK_BYTES: usize = 2 << 20;

/// Runs CPU work (validation, encoding) on the crate's own rayon pool: never blocking I/O,
/// never a pool checkout. Should the pool fail to start, rayon's global pool serves.
pub(crate) fn on_cpu_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(cpu_threads())
            .thread_name(|i| format!("pg-model-repo-cpu-{i}"))
            .build()
            .map_err(|e| log::warn!("pg-model-repo: no rayon pool of its own ({e})"))
            .ok()
    });
    match pool {
        Some(pool) => pool.install(work),
        None => work(),
    }
}

/// Threads of the CPU pool: one per core.
pub(crate) fn cpu_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Records per chunk for vectors of `dimension` values.
pub(crate) fn rows_per_chunk(dimension: usize) -> usize {
    (CHUNK_BYTES / (4 * dimension.max(1) + 64)).clamp(16, 65_536)
}

/// What a COPY row holds besides the record: a load id in front (`embeddings_staging`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prefix {
    None,
    LoadId(i64),
}

/// The binary COPY rows of `records` (entity_type, entity_id, embeddings, dimension, with
/// the prefix in front), the vector in the storage's binary form. `first_index` is the batch
/// index of `records[0]`: a vector with a NaN or infinite value fails the chunk with
/// `InvalidInput` naming its record, found in the same loop that encodes it.
pub(crate) fn encode_chunk(
    records: &[Embedding],
    first_index: usize,
    prefix: Prefix,
    stamps: Option<&Stamps>,
    storage: Storage,
) -> Result<Vec<u8>> {
    let indexed = records
        .iter()
        .enumerate()
        .map(|(i, e)| (first_index + i, e));
    encode_indexed(indexed, prefix, stamps, storage)
}

/// [`encode_chunk`] of records given with their indexes in the caller's batch (which need not
/// follow each other: a batch put in key order).
pub(crate) fn encode_indexed<'e>(
    records: impl Iterator<Item = (usize, &'e Embedding)> + Clone,
    prefix: Prefix,
    stamps: Option<&Stamps>,
    storage: Storage,
) -> Result<Vec<u8>> {
    let fields = 4 + i16::from(prefix != Prefix::None) + 2 * i16::from(stamps.is_some());
    let size: usize = records
        .clone()
        .map(|(_, e)| 40 + e.entity_type.len() + e.entity_id.len() + 4 * e.vector.len())
        .sum();
    // The stored created_at of the chunk's keys, looked up at once (the pass that reads them
    // may still be going).
    let created = match stamps {
        Some(stamps) => stamps.created_of(records.clone().map(|(_, e)| e.entity_id.as_str()))?,
        None => Vec::new(),
    };
    let mut out = Vec::with_capacity(size);
    for (k, (index, e)) in records.enumerate() {
        binary_copy::row(&mut out, fields);
        if let Prefix::LoadId(id) = prefix {
            binary_copy::int8(&mut out, id);
        }
        binary_copy::field(&mut out, e.entity_type.as_bytes());
        binary_copy::field(&mut out, e.entity_id.as_bytes());
        let put = match storage {
            Storage::Bytea => {
                binary_copy::field_len(&mut out, (4 * e.vector.len()) as i32);
                put_floats(&mut out, &e.vector, f32::to_le_bytes)
            }
            Storage::Vector => {
                // pgvector's binary form: an int16 dimension, an unused int16, big-endian
                // float4 values.
                binary_copy::field_len(&mut out, (4 + 4 * e.vector.len()) as i32);
                out.extend_from_slice(&(e.vector.len() as i16).to_be_bytes());
                out.extend_from_slice(&0i16.to_be_bytes());
                put_floats(&mut out, &e.vector, f32::to_be_bytes)
            }
        };
        if let Err(at) = put {
            return Err(not_finite(index, at, e.vector[at]));
        }
        binary_copy::int4(&mut out, e.vector.len() as i32);
        if let Some(stamps) = stamps {
            binary_copy::int8(&mut out, created[k]);
            binary_copy::int8(&mut out, stamps.now);
        }
    }
    Ok(out)
}

/// Appends `values` as 4-byte floats in the order `bytes` gives, checking in the same loop
/// that each is finite; the index of the first that is not, if any.
#[inline]
fn put_floats(
    out: &mut Vec<u8>,
    values: &[f32],
    bytes: impl Fn(f32) -> [u8; 4],
) -> std::result::Result<(), usize> {
    let start = out.len();
    out.resize(start + 4 * values.len(), 0);
    let mut finite = true;
    for (slot, &value) in out[start..].chunks_exact_mut(4).zip(values) {
        finite &= value.is_finite();
        slot.copy_from_slice(&bytes(value));
    }
    if finite {
        Ok(())
    } else {
        Err(values.iter().position(|v| !v.is_finite()).unwrap_or(0))
    }
}

/// The error of a vector value that is NaN or infinite, as the batch checks word it.
pub(crate) fn not_finite(record: usize, value_index: usize, value: f32) -> RepoError {
    RepoError::invalid_record(
        record,
        format!("vector value {value_index} is {value} (NaN and infinities are not allowed)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(vector: Vec<f32>) -> Vec<Embedding> {
        vec![Embedding::new("t", "a", vector)]
    }

    #[test]
    fn bytea_rows_hold_little_endian_floats_and_the_dimension() {
        let bytes =
            encode_chunk(&one(vec![1.0, -2.5]), 0, Prefix::None, None, Storage::Bytea).unwrap();
        let mut expected = Vec::new();
        binary_copy::row(&mut expected, 4);
        binary_copy::field(&mut expected, b"t");
        binary_copy::field(&mut expected, b"a");
        binary_copy::f32_le(&mut expected, &[1.0, -2.5]);
        binary_copy::int4(&mut expected, 2);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn vector_rows_hold_pgvectors_binary_form() {
        let bytes = encode_chunk(
            &one(vec![1.0, -2.5]),
            0,
            Prefix::LoadId(7),
            None,
            Storage::Vector,
        )
        .unwrap();
        let mut expected = Vec::new();
        binary_copy::row(&mut expected, 5);
        binary_copy::int8(&mut expected, 7);
        binary_copy::field(&mut expected, b"t");
        binary_copy::field(&mut expected, b"a");
        binary_copy::pgvector(&mut expected, &[1.0, -2.5]);
        binary_copy::int4(&mut expected, 2);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn a_value_that_is_not_finite_names_its_record_and_position() {
        let mut records = one(vec![1.0, 2.0]);
        records.push(Embedding::new("t", "b", vec![0.0, f32::NAN, f32::INFINITY]));
        let err = encode_chunk(&records, 40, Prefix::None, None, Storage::Bytea).unwrap_err();
        assert!(matches!(err, RepoError::InvalidInput(_)));
        assert!(
            err.to_string().contains("record 41: vector value 1 is NaN"),
            "{err}"
        );
    }
}
