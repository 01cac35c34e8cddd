//! Similarity search: the input rules, and the choice of
//! path: an HNSW index of the type for that metric (pgvector, see `index`) answers in SQL;
//! anything else is answered exactly by streaming the type once (`exact`).

use crate::db::call::Call;
use crate::db::deadline::stream_from_here;
use crate::db::pool::{unbounded, PgConnection};
use crate::db::retry::Retry;
use crate::embeddings::check::{check_vector, ENTITY_TYPE_MAX};
use crate::embeddings::exact::Scorer;
use crate::embeddings::filter::RowFilter;
use crate::embeddings::index::{build_index, check_indexable, explain_hnsw, hnsw_search};
use crate::embeddings::store::{
    copy_out_type, detect_storage, known_storage, open_stream, value_expression,
};
use crate::embeddings::types::{decode_column, Metric, Neighbor, Storage};
use crate::error::{RepoError, Result};
use crate::repository::ModelRepository;
use crate::schema::settings::PGVECTOR_INSTALL_HINT;
use crate::validate;

/// The most neighbours one search returns.
pub const MAX_NEAREST_K: usize = 10_000;

impl ModelRepository {
    /// The `k` entities of `entity_type` closest to `query` under `metric`, closest first.
    ///
    /// Without an HNSW index of the type for this metric (see
    /// [`create_vector_index`](Self::create_vector_index)) the answer is exact: the type is
    /// streamed once and scored on all cores, distances in f64, ties broken by entity_id
    /// ascending. With such an index it is approximate (pgvector's HNSW search).
    ///
    /// A query of another length than the type's dimension is
    /// [`RepoError::DimensionMismatch`]; k = 0 or above 10,000, an empty query, NaN or
    /// infinite values, and a zero query under Cosine are `InvalidInput`. An unknown type
    /// has no neighbours: `Ok` with an empty vector.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::Metric;
    /// for n in repo.nearest_embeddings("item", &[0.1, 0.2, 0.3], 10, Metric::Cosine)? {
    ///     println!("{} at {}", n.entity_id, n.distance);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn nearest_embeddings(
        &self,
        entity_type: &str,
        query: &[f32],
        k: usize,
        metric: Metric,
    ) -> Result<Vec<Neighbor>> {
        self.timed("nearest_embeddings", |call| {
            validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
            check_k(k)?;
            check_query(query, metric).map_err(|e| prefixed("query", e))?;
            let mut found = self
                .search(call, entity_type, &[query], k, metric)
                // One query: no index to name.
                .map_err(RepoError::without_index)?;
            Ok(found.pop().unwrap_or_default())
        })
    }

    /// [`nearest_embeddings`](Self::nearest_embeddings) for many queries at once: one answer
    /// per query, in the caller's order. Without an index the type is streamed once for all
    /// of them. The queries must share the type's dimension (the error names the first query
    /// that does not); an empty slice returns an empty vector without touching the database.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::Metric;
    /// let queries = vec![vec![0.1, 0.2, 0.3], vec![0.3, 0.2, 0.1]];
    /// let answers = repo.nearest_embeddings_many("item", &queries, 10, Metric::L2)?;
    /// assert_eq!(answers.len(), 2);
    /// # Ok(()) }
    /// ```
    pub fn nearest_embeddings_many(
        &self,
        entity_type: &str,
        queries: &[Vec<f32>],
        k: usize,
        metric: Metric,
    ) -> Result<Vec<Vec<Neighbor>>> {
        self.timed("nearest_embeddings_many", |call| {
            validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
            check_k(k)?;
            let queries: Vec<&[f32]> = queries.iter().map(Vec::as_slice).collect();
            check_queries(entity_type, &queries, metric)?;
            if queries.is_empty() {
                return Ok(Vec::new());
            }
            self.search(call, entity_type, &queries, k, metric)
        })
    }

    /// Builds an HNSW index of `entity_type`'s vectors for `metric`, so that searches of the
    /// type with that metric are answered by pgvector's approximate search. Needs a schema
    /// that stores vectors in pgvector's `vector` type: elsewhere it is `InvalidInput`
    /// saying how to get pgvector.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// repo.create_vector_index("item", pg_model_repo::Metric::Cosine)?;
    /// # Ok(()) }
    /// ```
    pub fn create_vector_index(&self, entity_type: &str, metric: Metric) -> Result<()> {
        self.timed_bulk("create_vector_index", |call| {
            validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
            let storage =
                call.with_conn(Retry::Idempotent, |conn| detect_storage(conn.client()))?;
            self.storage().set(storage);
            if storage == Storage::Bytea {
                return Err(RepoError::invalid(format!(
                    "an index for {metric} search of {entity_type:?} needs pgvector, and this \
                     schema stores vectors as BYTEA. {PGVECTOR_INSTALL_HINT}"
                )));
            }
            // CREATE INDEX IF NOT EXISTS and a recorded metric: repeating it is harmless.
            let built = call.with_conn(Retry::Idempotent, |conn| {
                let Some(info) = self.index_cache().lookup(conn, entity_type, true)? else {
                    return Ok(false);
                };
                check_indexable(entity_type, &info)?;
                build_index(call.pool(), conn, entity_type, metric)
            });
            self.index_cache().forget(entity_type);
            if !built? {
                return Err(RepoError::not_found(format!(
                    "entity type {entity_type:?} has no vectors to index"
                )));
            }
            Ok(())
        })
    }

    /// How a search of `entity_type` with `metric` would run: PostgreSQL's plan (EXPLAIN) of
    /// the index search where the type has an HNSW index for the metric, else a line saying
    /// that the exact search streams the type. For checking that an index is used.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// println!("{}", repo.explain_nearest_embeddings("item", &[0.1, 0.2], 10, pg_model_repo::Metric::L2)?);
    /// # Ok(()) }
    /// ```
    pub fn explain_nearest_embeddings(
        &self,
        entity_type: &str,
        query: &[f32],
        k: usize,
        metric: Metric,
    ) -> Result<String> {
        self.timed("explain_nearest_embeddings", |call| {
            validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
            check_k(k)?;
            check_query(query, metric).map_err(|e| prefixed("query", e))?;
            let exact = || format!("exact search: every {entity_type:?} vector is streamed (binary COPY) and scored by the client");
            if known_storage(self.storage(), call)? == Storage::Bytea {
                return Ok(exact());
            }
            call.with_conn(Retry::Idempotent, |conn| {
                match self.index_cache().lookup(conn, entity_type, true)? {
                    Some(info) if info.indexed.contains(&metric) && info.dimension == query.len() => {
                        explain_hnsw(conn, entity_type, &info, query, k, metric)
                    }
                    _ => Ok(exact()),
                }
            })
        })
    }

    /// Answers checked queries (one length, at least one): through the type's HNSW index
    /// for `metric` if it has one, else exactly.
    fn search(
        &self,
        call: &Call<'_>,
        entity_type: &str,
        queries: &[&[f32]],
        k: usize,
        metric: Metric,
    ) -> Result<Vec<Vec<Neighbor>>> {
        if known_storage(self.storage(), call)? == Storage::Vector {
            if let Some(answers) = self.indexed_search(call, entity_type, queries, k, metric)? {
                return Ok(answers);
            }
        }
        // Nothing reaches the caller before the end, so a failed attempt may be repeated.
        call.with_conn(Retry::Idempotent, |conn| {
            exact_search(conn, entity_type, queries, k, metric, None)
        })
    }

    /// The answers through the type's index, or `None` when it has none for `metric`. What
    /// is known of the type may be a moment old: a dimension that does not fit, or a search
    /// that fails, is checked again against the registry before it counts.
    fn indexed_search(
        &self,
        call: &Call<'_>,
        entity_type: &str,
        queries: &[&[f32]],
        k: usize,
        metric: Metric,
    ) -> Result<Option<Vec<Vec<Neighbor>>>> {
        let ef_search = self.config().embeddings.hnsw_ef_search as usize;
        let cache = self.index_cache();
        call.with_conn(Retry::Idempotent, |conn| {
            let mut fresh = false;
            loop {
                let Some(info) = cache.lookup(conn, entity_type, fresh)? else {
                    return Ok(None);
                };
                if !info.indexed.contains(&metric) {
                    return Ok(None);
                }
                if let Some(i) = queries.iter().position(|q| q.len() != info.dimension) {
                    if !fresh {
                        fresh = true;
                        continue;
                    }
                    return Err(RepoError::DimensionMismatch {
                        entity_type: entity_type.to_owned(),
                        expected: info.dimension,
                        actual: queries[i].len(),
                        index: Some(i),
                    });
                }
                match hnsw_search(conn, entity_type, &info, queries, k, metric, ef_search) {
                    Err(e) if !fresh && e.code().is_some() => {
                        cache.forget(entity_type);
                        fresh = true;
                    }
                    other => return other.map(Some),
                }
            }
        })
    }
}

pub(crate) fn check_k(k: usize) -> Result<()> {
    if k == 0 || k > MAX_NEAREST_K {
        return Err(RepoError::invalid(format!(
            "k must be within 1..={MAX_NEAREST_K}, not {k}"
        )));
    }
    Ok(())
}

/// One query's own rules: those of a stored vector, and not zero under Cosine.
pub(crate) fn check_query(query: &[f32], metric: Metric) -> Result<()> {
    check_vector(query)?;
    if metric == Metric::Cosine && query.iter().all(|v| *v == 0.0) {
        return Err(RepoError::invalid(
            "a zero vector has no cosine distance to anything",
        ));
    }
    Ok(())
}

/// Every query's rules, and one length for all (the first query's); errors name the query.
pub(crate) fn check_queries(entity_type: &str, queries: &[&[f32]], metric: Metric) -> Result<()> {
    for (i, q) in queries.iter().enumerate() {
        check_query(q, metric).map_err(|e| prefixed(&format!("query {i}"), e))?;
    }
    let Some(first) = queries.first() else {
        return Ok(());
    };
    match queries.iter().position(|q| q.len() != first.len()) {
        Some(i) => Err(RepoError::DimensionMismatch {
            entity_type: entity_type.to_owned(),
            expected: first.len(),
            actual: queries[i].len(),
            index: Some(i),
        }),
        None => Ok(()),
    }
}

pub(crate) fn prefixed(what: &str, error: RepoError) -> RepoError {
    match error {
        RepoError::InvalidInput(_) => error.with_context(what),
        other => other,
    }
}

/// The exact answer among the rows `filter` lets through: a candidate set's rows fetched by
/// key, else the type streamed once by binary COPY, scored as they arrive.
pub(crate) fn exact_search(
    conn: &mut PgConnection,
    entity_type: &str,
    queries: &[&[f32]],
    k: usize,
    metric: Metric,
    filter: Option<&RowFilter<'_>>,
) -> Result<Vec<Vec<Neighbor>>> {
    let watch = conn.watch().clone();
    let mut tx = conn.client().build_transaction().read_only(true).start()?;
    unbounded(&mut tx)?;
    let stream = open_stream(&mut tx, entity_type)?;
    // The server answered: reading the type is a stream from here on.
    stream_from_here(&watch);
    let Some(dimension) = stream.dimension else {
        // An unknown type has no neighbours.
        return Ok(vec![Vec::new(); queries.len()]);
    };
    if let Some((i, q)) = queries
        .iter()
        .enumerate()
        .find(|(_, q)| q.len() != dimension)
    {
        return Err(RepoError::DimensionMismatch {
            entity_type: entity_type.to_owned(),
            expected: dimension,
            actual: q.len(),
            index: Some(i),
        });
    }
    let started = std::time::Instant::now();
    let mut scorer = Scorer::new(metric, k, dimension, queries);
    let rows = match filter.and_then(RowFilter::candidates) {
        Some(ids) => {
            let sql = select_candidates(stream.storage);
            score_candidates(&mut tx, &sql, entity_type, &ids, dimension, &mut scorer)?
        }
        None => {
            let mut reader = tx.copy_out(&copy_out_type(entity_type, stream.storage))?;
            scorer.score_stream(&mut reader, stream.storage, filter)?
        }
    };
    tx.commit()?;
    log::debug!(
        "pg-model-repo: exact search of {} queries over {rows} rows of {entity_type:?} in {:?}",
        queries.len(),
        started.elapsed()
    );
    Ok(scorer.finish())
}

/// The rows of a candidate set.
fn select_candidates(storage: Storage) -> String {
    format!(
        "SELECT entity_id::text, {} FROM embeddings \
         WHERE entity_type = $1 AND entity_id = ANY($2::text[])",
        value_expression(storage)
    )
}

/// Scores the rows of a candidate set (fetched by key); returns how many exist.
fn score_candidates(
    tx: &mut postgres::Transaction<'_>,
    sql: &str,
    entity_type: &str,
    ids: &[&str],
    dimension: usize,
    scorer: &mut Scorer,
) -> Result<u64> {
    let mut found: Vec<(String, Vec<f32>)> = Vec::with_capacity(ids.len());
    for row in tx.query(sql, &[&entity_type, &ids])? {
        let id: String = row.try_get(0)?;
        let vector = decode_column(&row, 1)?.unwrap_or_default();
        if vector.len() != dimension {
            return Err(RepoError::corrupt(format!(
                "entity {id:?} has {} values; its type's dimension is {dimension}",
                vector.len()
            )));
        }
        found.push((id, vector));
    }
    scorer.score_rows(found.iter().map(|(id, v)| (id.as_str(), v.as_slice())));
    Ok(found.len() as u64)
}
