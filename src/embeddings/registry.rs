//! The per-type registry: the first vector saved for a type fixes its dimension and creates
//! its storage (a partition of `embeddings` whose CHECK enforces the dimension). A new type is
//! registered in a short transaction of its own (`embedding_type_ensure`, sql/V004), before
//! the write that needs it, so a long load never holds the partition lock; the write's
//! transaction then checks the dimensions again against what is registered
//! ([`in_load_transaction`]).

use std::collections::HashMap;

use postgres::{GenericClient, Transaction};

use crate::db::pool::{begin_unbounded, PgConnection};
use crate::embeddings::check::TypeDim;
use crate::error::{RepoError, Result};

const REGISTERED_DIMENSIONS: &str = "SELECT r.entity_type::text, r.dimension \
     FROM embedding_types r WHERE r.entity_type = ANY($1::text[]) AND r.storage IS NOT NULL";

/// Registers a type and creates its storage unless both exist; returns the registered
/// dimension and whether this call created the type. Commits on its own (autocommit).
const ENSURE_TYPE: &str = "SELECT registered, created FROM embedding_type_ensure($1, $2)";

/// Drops a type this call created if its storage is still empty (its first write failed).
const FORGET_TYPE: &str = "SELECT embedding_type_forget($1)";

/// The registered dimension of every type in `names` that has storage.
fn registered<C: GenericClient>(client: &mut C, names: &[&str]) -> Result<HashMap<String, i32>> {
    let mut found = HashMap::new();
    for row in client.query(REGISTERED_DIMENSIONS, &[&names])? {
        found.insert(row.try_get(0)?, row.try_get(1)?);
    }
    Ok(found)
}

/// Types a write registered before it ran, so that a failed write can take them back.
#[derive(Debug, Default)]
pub(crate) struct NewTypes(Vec<String>);

impl NewTypes {
    /// After a failed write: drops each type it registered whose storage is still empty, so a
    /// write that stored nothing fixed no dimension. Best effort (logged), on the same
    /// connection if it still works.
    pub(crate) fn forget<C: GenericClient>(self, client: &mut C) {
        for entity_type in self.0 {
            if let Err(e) = client.query_one(FORGET_TYPE, &[&entity_type]) {
                log::warn!(
                    "pg-model-repo: could not unregister entity type {entity_type:?} after a \
                     failed first write ({e}); its dimension stays registered"
                );
                return;
            }
        }
    }
}

/// Checks the known types of a batch, then registers the new ones (in name order, so
/// concurrent registrations cannot deadlock), each in its own short transaction, outside any
/// transaction of the caller's. Known types cost one read. Returns the types this call
/// created.
pub(crate) fn ensure_types<C: GenericClient>(
    client: &mut C,
    types: &[TypeDim<'_>],
) -> Result<NewTypes> {
    let names: Vec<&str> = types.iter().map(|t| t.entity_type).collect();
    let mut known = registered(client, &names)?;
    // A mismatch among the known types fails the write before anything is registered.
    let (old, new): (Vec<_>, Vec<_>) = types
        .iter()
        .cloned()
        .partition(|t| known.contains_key(t.entity_type));
    compare(&old, &known)?;
    let mut created = NewTypes::default();
    for t in new {
        let dimension = t.dimension as i32;
        let row = client.query_one(ENSURE_TYPE, &[&t.entity_type, &dimension])?;
        known.insert(t.entity_type.to_owned(), row.try_get(0)?);
        if row.try_get(1)? {
            created.0.push(t.entity_type.to_owned());
        }
    }
    if let Err(e) = compare(types, &known) {
        created.forget(client);
        return Err(e);
    }
    Ok(created)
}

/// Checks a batch's dimensions against the registry inside the write's transaction (a
/// concurrent full refresh may have changed a dimension, a drop may have removed a type).
/// The registry rows are only read, never locked, so writers of one type do not queue.
pub(crate) fn check_registry<C: GenericClient>(
    client: &mut C,
    types: &[TypeDim<'_>],
) -> Result<()> {
    let names: Vec<&str> = types.iter().map(|t| t.entity_type).collect();
    let known = registered(client, &names)?;
    if let Some(gone) = types.iter().find(|t| !known.contains_key(t.entity_type)) {
        return Err(RepoError::conflict(format!(
            "entity type {:?} was dropped while this write was under way",
            gone.entity_type
        )));
    }
    compare(types, &known)
}

/// The first record (by batch index) whose type is registered with another dimension.
fn compare(types: &[TypeDim<'_>], registered: &HashMap<String, i32>) -> Result<()> {
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

/// Runs `write` inside a load's one transaction: new types registered first (each in a short
/// transaction of its own), then, without statement_timeout, the batch's dimensions checked
/// against the registry, `write`, and the commit.
pub(crate) fn in_load_transaction<T>(
    conn: &mut PgConnection,
    types: &[TypeDim<'_>],
    write: impl FnOnce(&mut Transaction<'_>) -> Result<T>,
) -> Result<T> {
    let created = ensure_types(conn.client(), types)?;
    let written = write_checked(conn, types, write);
    if written.is_err() && !conn.is_broken() {
        created.forget(conn.client());
    }
    written
}

fn write_checked<T>(
    conn: &mut PgConnection,
    types: &[TypeDim<'_>],
    write: impl FnOnce(&mut Transaction<'_>) -> Result<T>,
) -> Result<T> {
    let mut tx = begin_unbounded(conn)?;
    check_registry(&mut tx, types)?;
    let out = write(&mut tx)?;
    tx.commit()?;
    Ok(out)
}
