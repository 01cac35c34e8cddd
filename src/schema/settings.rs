//! The schema's settings: whether `open` migrates, how vectors are stored (BYTEA or
//! pgvector), and whether and how the tables are distributed on Citus.

use crate::error::{RepoError, Result};

/// How a repository stores its vectors: as little-endian f32 bytes (BYTEA), or in pgvector's
/// `vector` type (the same f32 values; needed for HNSW indexes).
///
/// The `vector` extension lives once per database in a schema of its own (`pgvector`, created
/// with it) or wherever it was installed before, never inside a repository's schema.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum VectorStorage {
    /// A new schema (no vectors yet) uses pgvector where the extension is installed or can be
    /// created, BYTEA elsewhere; a schema that has vectors keeps the storage it has, so an
    /// extension installed later never rewrites a table behind anyone's back.
    #[default]
    Auto,
    /// BYTEA, even where pgvector is available. A schema converted earlier stays converted
    /// (there is no way back; a warning says so).
    Bytea,
    /// pgvector's `vector` type. `open` (with `auto_migrate`) and
    /// [`ModelRepository::migrate`](crate::ModelRepository::migrate) convert a BYTEA schema,
    /// rows included: the conversion rewrites the embeddings table under an exclusive lock
    /// (readers and writers of every type wait until it commits). Without pgvector on the
    /// server it is `InvalidInput`.
    Pgvector,
}

impl VectorStorage {
    /// The setting's name: `auto`, `bytea`, `pgvector`.
    pub fn as_str(self) -> &'static str {
        match self {
            VectorStorage::Auto => "auto",
            VectorStorage::Bytea => "bytea",
            VectorStorage::Pgvector => "pgvector",
        }
    }
}

impl std::str::FromStr for VectorStorage {
    type Err = RepoError;

    /// Parses the names [`VectorStorage::as_str`] gives (any case).
    fn from_str(s: &str) -> Result<Self> {
        parse_named(
            s,
            "vector storage",
            &[
                VectorStorage::Auto,
                VectorStorage::Bytea,
                VectorStorage::Pgvector,
            ],
            VectorStorage::as_str,
        )
    }
}

/// Whether and how a repository distributes its tables on a database with the Citus
/// extension (a coordinator of a Citus cluster). On a database without Citus only `Off` and
/// `Auto` open; `Auto` then does nothing.
///
/// The mode is fixed when a schema is created: `open` and
/// [`ModelRepository::migrate`](crate::ModelRepository::migrate) distribute the schema's tables
/// as part of the migration, under the same advisory lock, and an interrupted distribution
/// is finished by the next open. `sql/citus.sql` runs the same statements by hand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CitusMode {
    /// Follow the database: with the `citus` extension, a schema Citus made a distributed
    /// schema (listed in `citus_schemas`, because `citus.enable_schema_based_sharding` was on
    /// when it was created) is schema-based, any other schema row-based. Without the
    /// extension, a plain PostgreSQL schema.
    #[default]
    Auto,
    /// Never distribute: the tables stay local to the coordinator (a schema Citus already
    /// distributed is used as it is).
    Off,
    /// Row-based: embeddings hash-distributed by entity id, the cache by key, the model
    /// tables co-located by model name, the type registry a reference table on every node.
    RowBased,
    /// Schema-based sharding: the whole schema lives on one node (its own co-location
    /// group), so many repositories spread over the cluster, one schema each.
    SchemaBased,
}

impl CitusMode {
    /// The setting's name: `auto`, `off`, `row`, `schema`.
    pub fn as_str(self) -> &'static str {
        match self {
            CitusMode::Auto => "auto",
            CitusMode::Off => "off",
            CitusMode::RowBased => "row",
            CitusMode::SchemaBased => "schema",
        }
    }
}

impl std::str::FromStr for CitusMode {
    type Err = RepoError;

    /// Parses the names [`CitusMode::as_str`] gives (any case).
    fn from_str(s: &str) -> Result<Self> {
        parse_named(
            s,
            "Citus mode",
            &[
                CitusMode::Auto,
                CitusMode::Off,
                CitusMode::RowBased,
                CitusMode::SchemaBased,
            ],
            CitusMode::as_str,
        )
    }
}

/// How to get pgvector, for errors that need it.
pub(crate) const PGVECTOR_INSTALL_HINT: &str = "Install pgvector on the server (Debian/Ubuntu: \
    `apt-get install postgresql-<major>-pgvector`; from source: `git clone \
    https://github.com/pgvector/pgvector && cd pgvector && make && make install`; managed \
    services ship it), then convert the schema with ModelRepository::migrate and \
    RepositoryConfig::vector_storage(VectorStorage::Pgvector).";

/// The one of `all` whose `name` is `s` (any case, blanks around ignored); otherwise
/// `InvalidInput` listing the names: "unknown {what} \"x\" (a, b, c)".
fn parse_named<T: Copy>(s: &str, what: &str, all: &[T], name: fn(T) -> &'static str) -> Result<T> {
    all.iter()
        .copied()
        .find(|v| name(*v).eq_ignore_ascii_case(s.trim()))
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|v| name(*v)).collect();
            RepoError::invalid(format!("unknown {what} {s:?} ({})", names.join(", ")))
        })
}

/// What the migrations need to know besides the connection.
#[derive(Clone, Debug)]
pub(crate) struct MigrationSettings {
    pub(crate) auto_migrate: bool,
    pub(crate) vector_storage: VectorStorage,
    pub(crate) citus: CitusMode,
}

impl Default for MigrationSettings {
    fn default() -> Self {
        MigrationSettings {
            auto_migrate: true,
            vector_storage: VectorStorage::Auto,
            citus: CitusMode::Auto,
        }
    }
}
