//! The one list of the tables the repository owns: maintenance and the health check visit
//! them, and a row-based Citus layout distributes them (`sql/citus.sql` lists the same; a unit
//! test in `citus` keeps the two in step).

/// One table of the repository.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Table {
    pub(crate) name: &'static str,
    /// Exists in some schemas only: `embedding_vector_indexes` with pgvector storage,
    /// `embeddings_quarantine` after taking over the seed's tables.
    pub(crate) optional: bool,
}

const fn always(name: &'static str) -> Table {
    Table {
        name,
        optional: false,
    }
}

const fn optional(name: &'static str) -> Table {
    Table {
        name,
        optional: true,
    }
}

/// Every table, in the order maintenance visits them.
pub(crate) const TABLES: &[Table] = &[
    always("ml_models"),
    always("ml_model_chunks"),
    always("model_aliases"),
    always("model_alias_stack"),
    always("model_alias_history"),
    always("training_metrics"),
    always("embedding_types"),
    optional("embedding_vector_indexes"),
    always("embeddings"),
    optional("embeddings_quarantine"),
    always("prediction_cache"),
];

/// The tables every schema has.
pub(crate) fn every_schema_has() -> impl Iterator<Item = &'static str> {
    TABLES.iter().filter(|t| !t.optional).map(|t| t.name)
}

/// Every table's name.
pub(crate) fn names() -> impl Iterator<Item = &'static str> {
    TABLES.iter().map(|t| t.name)
}
