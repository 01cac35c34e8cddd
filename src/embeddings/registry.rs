//! The per-type dimension registry: the first vector saved for a type fixes its dimension;
//! checked (and extended) inside each write's transaction.

use std::collections::HashMap;

use postgres::GenericClient;

use crate::db::error::{RepoError, Result};
use crate::embeddings::check::TypeDim;

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
