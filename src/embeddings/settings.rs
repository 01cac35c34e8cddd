//! The embeddings' settings: how many candidates an HNSW search keeps.

use crate::embeddings::filtered::FILTERED_MAX_SCAN_TUPLES;
use crate::error::{RepoError, Result};
use crate::validate::count_within;

/// pgvector's default `hnsw.ef_search` is 40; searches here default to more candidates, for
/// a recall@10 above 0.95 on clustered data (docs/embeddings.md).
pub const DEFAULT_HNSW_EF_SEARCH: u32 = 100;

/// The embeddings' settings (see the setters of `RepositoryConfig`).
#[derive(Clone, Debug)]
pub(crate) struct EmbeddingSettings {
    pub(crate) hnsw_ef_search: u32,
    /// COPY streams of a parallel load (one connection each).
    pub(crate) load_streams: u32,
}

impl Default for EmbeddingSettings {
    fn default() -> Self {
        EmbeddingSettings {
            hnsw_ef_search: DEFAULT_HNSW_EF_SEARCH,
            load_streams: crate::embeddings::encode::cpu_threads().clamp(1, 64) as u32,
        }
    }
}

impl EmbeddingSettings {
    /// What every session sets: the search's candidate count, and pgvector 0.8's iterative
    /// index scans for filtered searches (a scan goes on past ef_search until k rows passed
    /// the filter or it visited [`FILTERED_MAX_SCAN_TUPLES`]; an unfiltered search never gets
    /// there). Older pgvector ignores the two it does not know, with a warning.
    pub(crate) fn session_settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("hnsw.ef_search", self.hnsw_ef_search.to_string()),
            ("hnsw.iterative_scan", "relaxed_order".to_owned()),
            ("hnsw.max_scan_tuples", FILTERED_MAX_SCAN_TUPLES.to_string()),
        ]
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if !(1..=1000).contains(&self.hnsw_ef_search) {
            return Err(RepoError::invalid(format!(
                "hnsw_ef_search must be within 1..=1000, not {}",
                self.hnsw_ef_search
            )));
        }
        count_within("load_streams", self.load_streams, 1, 64)
    }
}
