//! Where the schema's tables are: plain, or distributed by Citus (row- or schema-based). Found
//! by `schema::citus` when a repository opens; statements that differ by layout read it from
//! the call.

/// Where a schema's tables are, or are to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// A plain PostgreSQL schema (no Citus, or `CitusMode::Off`).
    Local,
    /// Hash-distributed tables over the workers.
    RowBased,
    /// One distributed schema, whole on one node.
    SchemaBased,
}

impl Layout {
    /// The name `sql/citus.sql` takes in `pg_model_repo.citus_mode`, and the report's.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Layout::Local => "local",
            Layout::RowBased => "row",
            Layout::SchemaBased => "schema",
        }
    }
}
