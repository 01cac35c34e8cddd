//! The statements the embeddings' writes share: the insert prefix and upsert clause (as
//! literals for `concat!`), the single-row upsert and the COPY column list. Statements used in
//! one place stay next to the function that binds them.

/// The insert prefix every embeddings write shares, as a literal for `concat!`.
macro_rules! insert_embeddings {
    () => {
        "INSERT INTO embeddings AS e (entity_type, entity_id, embeddings, dimension) "
    };
}

/// The upsert clause every embeddings write shares: `created_at` is kept, `updated_at` moves
/// (to the new row's default, `now()`: Citus allows no function call in `DO UPDATE SET`).
/// `embeddings_half` too: an f16 type's trigger (sql/V010) has moved the proposed row's value
/// there before the conflict is seen.
macro_rules! on_key_update {
    () => {
        " ON CONFLICT (entity_type, entity_id) DO UPDATE \
         SET embeddings = EXCLUDED.embeddings, embeddings_half = EXCLUDED.embeddings_half, \
         dimension = EXCLUDED.dimension, updated_at = EXCLUDED.updated_at"
    };
}

/// The single-row upsert (the `Insert` method's statement, and `save_embeddings`' for a
/// type's first vector).
pub(crate) const UPSERT_ONE: &str = concat!(
    insert_embeddings!(),
    "VALUES ($1, $2, $3, $4)",
    on_key_update!()
);

/// The columns every COPY of embeddings rows writes, in the wire format's order.
pub(crate) const COLUMNS: &str = "entity_type, entity_id, embeddings, dimension";
