//! Input rules for embeddings, checked before any I/O: keys, vectors, and whole batches
//! (one dimension per type, no key twice), naming the first offending record.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::embeddings::encode::on_cpu_pool;
use crate::embeddings::types::Embedding;
use crate::error::{RepoError, Result};
use crate::validate;

/// Limits from API.md, "Conventions".
pub(crate) const ENTITY_TYPE_MAX: usize = 50;
pub(crate) const ENTITY_ID_MAX: usize = 255;

/// The longest vector whose bytes fit one BYTEA value (1 GiB - 1).
const MAX_DIMENSION: usize = ((1 << 30) - 1) / 4;

/// Batches at least this long are validated on the crate's rayon pool.
const PARALLEL_VALIDATION_MIN: usize = 4096;

pub(crate) fn check_key(entity_type: &str, entity_id: &str) -> Result<()> {
    validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
    validate::name("entity_id", entity_id, ENTITY_ID_MAX)
}

pub(crate) fn check_vector(vector: &[f32]) -> Result<()> {
    check_shape(vector)?;
    check_values(vector)
}

/// A vector's length: not empty, and small enough for one value.
pub(crate) fn check_shape(vector: &[f32]) -> Result<()> {
    if vector.is_empty() {
        return Err(RepoError::invalid("vector must not be empty"));
    }
    if vector.len() > MAX_DIMENSION {
        return Err(RepoError::invalid(format!(
            "vector has {} values; at most {MAX_DIMENSION} fit one value",
            vector.len()
        )));
    }
    Ok(())
}

/// A vector's values: finite (no NaN, no infinity).
pub(crate) fn check_values(vector: &[f32]) -> Result<()> {
    if let Some(i) = vector.iter().position(|v| !v.is_finite()) {
        return Err(RepoError::invalid(format!(
            "vector value {i} is {} (NaN and infinities are not allowed)",
            vector[i]
        )));
    }
    Ok(())
}

/// Prefixes an error with the batch index it belongs to.
pub(crate) fn at_index(index: usize, error: RepoError) -> RepoError {
    match error {
        RepoError::InvalidInput(d) => RepoError::InvalidInput(d.at_record(index)),
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

/// Checks a batch before any I/O, except its vector values: the COPY encoder checks those in
/// the loop that encodes each vector (one pass over the values), and the other paths with
/// [`check_values`] before they write. Should the batch fail here at record k, the values of
/// the records before k are checked too, so the error still names the first offending record.
pub(crate) fn check_batch(batch: &[Embedding]) -> Result<CheckedBatch<'_>> {
    check_all_but_values(batch).map_err(|(k, error)| first_bad_value(&batch[..k]).unwrap_or(error))
}

/// The first record whose values are not all finite, as its error.
fn first_bad_value(records: &[Embedding]) -> Option<RepoError> {
    records
        .iter()
        .enumerate()
        .find_map(|(i, e)| check_values(&e.vector).err().map(|err| at_index(i, err)))
}

/// [`check_batch`], the error with the index of its record.
fn check_all_but_values(
    batch: &[Embedding],
) -> std::result::Result<CheckedBatch<'_>, (usize, RepoError)> {
    let check = |e: &Embedding| {
        check_key(&e.entity_type, &e.entity_id).and_then(|()| check_shape(&e.vector))
    };
    let first_bad = if batch.len() >= PARALLEL_VALIDATION_MIN {
        on_cpu_pool(|| {
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
        return Err((
            i,
            RepoError::invalid_record(
                i,
                format!(
                    "duplicate key ({:?}, {:?}) in one batch",
                    e.entity_type, e.entity_id
                ),
            ),
        ));
    }
    if let Some(mixed) = mixed {
        return Err(mixed);
    }
    if let Some((i, error)) = first_bad {
        return Err((i, at_index(i, error)));
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

/// The index of the first record whose key appeared earlier in the batch. Sorts one u64 a
/// record (the key's hash above its index) instead of the keys themselves: a million-record
/// batch costs 8 MB here, and the sort compares integers, not strings behind two pointers
/// (a third of the time on 100k keys). Records of equal hash are told apart by their keys.
fn first_duplicate(records: &[Embedding]) -> Option<usize> {
    if records.len() < 2 {
        return None;
    }
    let keyed = |i: usize| (key_hash(&records[i]) << 32) | i as u64;
    let order: Vec<u64> = if records.len() >= PARALLEL_VALIDATION_MIN {
        on_cpu_pool(|| {
            let mut order: Vec<u64> = (0..records.len()).into_par_iter().map(keyed).collect();
            order.par_sort_unstable();
            order
        })
    } else {
        let mut order: Vec<u64> = (0..records.len()).map(keyed).collect();
        order.sort_unstable();
        order
    };
    let index = |v: &u64| (*v & 0xffff_ffff) as usize;
    let same = |a: usize, b: usize| {
        records[a].entity_type == records[b].entity_type
            && records[a].entity_id == records[b].entity_id
    };
    // Each run of one hash is in index order: its first record whose key an earlier record
    // of the run has is the run's first duplicate.
    order
        .chunk_by(|a, b| a >> 32 == b >> 32)
        .filter(|run| run.len() > 1)
        .filter_map(|run| {
            (1..run.len()).find_map(|k| {
                let later = index(&run[k]);
                run[..k]
                    .iter()
                    .any(|earlier| same(index(earlier), later))
                    .then_some(later)
            })
        })
        .min()
}

/// 32 bits of a record's key's hash (the same in every process: fixed keys).
fn key_hash(e: &Embedding) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    e.entity_type.hash(&mut h);
    e.entity_id.hash(&mut h);
    h.finish() >> 32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first record whose key an earlier record has, by looking at every earlier one.
    fn first_duplicate_by_hand(records: &[Embedding]) -> Option<usize> {
        (0..records.len()).find(|&i| {
            records[..i].iter().any(|e| {
                e.entity_type == records[i].entity_type && e.entity_id == records[i].entity_id
            })
        })
    }

    #[test]
    fn first_duplicate_names_the_first_record_whose_key_came_before() {
        let mut rng = fastrand::Rng::with_seed(7);
        // Small batches (a sort on this thread) and large ones (on the pool), with no key
        // twice, one, and many (keys drawn from a small set, over two types).
        for (n, keys) in [
            (2, 1),
            (10, 50),
            (300, 20_000),
            (5_000, 1_000_000),
            (5_000, 4_000),
        ] {
            for _ in 0..4 {
                let records: Vec<Embedding> = (0..n)
                    .map(|_| {
                        let k = rng.usize(..keys);
                        let entity_type = if k.is_multiple_of(3) { "a" } else { "b" };
                        Embedding::new(entity_type, format!("k{}", k / 3), vec![0.0])
                    })
                    .collect();
                assert_eq!(
                    first_duplicate(&records),
                    first_duplicate_by_hand(&records),
                    "n {n}, keys {keys}"
                );
            }
        }
        // A key in two types is two keys; the same key twice is one.
        let records = vec![
            Embedding::new("a", "x", vec![0.0]),
            Embedding::new("b", "x", vec![0.0]),
            Embedding::new("ax", "", vec![0.0]),
            Embedding::new("b", "x", vec![0.0]),
        ];
        assert_eq!(first_duplicate(&records), Some(3));
    }
}
