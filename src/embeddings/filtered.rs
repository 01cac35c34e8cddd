//! Filtered similarity search: the k closest among the rows a [`SearchFilter`] lets through.
//! Where the type has an HNSW index the server answers (the planner fetches a small candidate
//! set by key and sorts it, which is exact, else scans the index iteratively, pgvector 0.8),
//! and every query left short of k is answered again exactly; without an index the answer is
//! exact.

use postgres::types::ToSql;
use postgres::GenericClient;

use crate::db::call::Call;
use crate::db::pool::PgConnection;
use crate::db::retry::Retry;
use crate::embeddings::check::ENTITY_TYPE_MAX;
use crate::embeddings::filter::{RowFilter, SearchFilter};
use crate::embeddings::index::{sql_literal, TypeInfo};
use crate::embeddings::search::{check_k, check_queries, check_query, exact_search, prefixed};
use crate::embeddings::store::known_storage;
use crate::embeddings::types::{Metric, Neighbor, Storage};
use crate::error::{RepoError, Result};
use crate::repository::ModelRepository;
use crate::validate;

/// The most index tuples one filtered HNSW scan visits (pgvector's `hnsw.max_scan_tuples`)
/// before the query is answered exactly instead.
pub const FILTERED_MAX_SCAN_TUPLES: usize = 20_000;

/// pgvector's largest `hnsw.ef_search`.
const EF_SEARCH_MAX: usize = 1000;

impl ModelRepository {
    /// The `k` entities of `entity_type` closest to `query` under `metric` among those
    /// `filter` lets through, closest first: min(k, rows passing the filter) of them, with an
    /// index or without.
    ///
    /// Where the type has an HNSW index for `metric`, the server answers: PostgreSQL's planner
    /// fetches a small candidate set (`among`) by key and sorts it, which is exact (measured:
    /// up to 500 of 20,000 rows), else pgvector's iterative index scan filters as it goes
    /// (`hnsw.iterative_scan = relaxed_order`, at most [`FILTERED_MAX_SCAN_TUPLES`] tuples);
    /// a query answered short of k is answered again exactly. Without an index the answer is
    /// exact, ties broken by entity_id. docs/embeddings.md ("Filtered search") has the
    /// measurements.
    ///
    /// The input rules of [`nearest_embeddings`](Self::nearest_embeddings), and: `among` or
    /// `exclude` longer than 100,000 ids, or an id or prefix with NUL, is `InvalidInput`; an
    /// empty `among` finds nothing (`Ok` with an empty vector).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::{Metric, SearchFilter};
    /// let filter = SearchFilter { exclude: vec!["seen1".into()], ..Default::default() };
    /// let found = repo.nearest_embeddings_filtered("item", &[0.1, 0.2, 0.3], 10, Metric::Cosine, &filter)?;
    /// # Ok(()) }
    /// ```
    pub fn nearest_embeddings_filtered(
        &self,
        entity_type: &str,
        query: &[f32],
        k: usize,
        metric: Metric,
        filter: &SearchFilter,
    ) -> Result<Vec<Neighbor>> {
        self.timed("nearest_embeddings_filtered", |call| {
            validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
            check_k(k)?;
            check_query(query, metric).map_err(|e| prefixed("query", e))?;
            let rows = RowFilter::new(filter)?;
            if rows.is_empty() {
                return Ok(Vec::new());
            }
            let mut found = self
                .filtered_search(call, entity_type, &[query], k, metric, &rows)
                .map_err(RepoError::without_index)?;
            Ok(found.pop().unwrap_or_default())
        })
    }

    /// [`nearest_embeddings_filtered`](Self::nearest_embeddings_filtered) for many queries
    /// and one filter: one answer per query, in the caller's order. The queries must share
    /// one dimension; an empty slice returns an empty vector without touching the database.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::{Metric, SearchFilter};
    /// let filter = SearchFilter { id_prefix: Some("books/".into()), ..Default::default() };
    /// let queries = vec![vec![0.1, 0.2, 0.3], vec![0.3, 0.2, 0.1]];
    /// let answers = repo.nearest_embeddings_filtered_many("item", &queries, 10, Metric::L2, &filter)?;
    /// assert_eq!(answers.len(), 2);
    /// # Ok(()) }
    /// ```
    pub fn nearest_embeddings_filtered_many(
        &self,
        entity_type: &str,
        queries: &[Vec<f32>],
        k: usize,
        metric: Metric,
        filter: &SearchFilter,
    ) -> Result<Vec<Vec<Neighbor>>> {
        self.timed("nearest_embeddings_filtered_many", |call| {
            validate::name("entity_type", entity_type, ENTITY_TYPE_MAX)?;
            check_k(k)?;
            let queries: Vec<&[f32]> = queries.iter().map(Vec::as_slice).collect();
            check_queries(entity_type, &queries, metric)?;
            let rows = RowFilter::new(filter)?;
            if queries.is_empty() || rows.is_empty() {
                return Ok(vec![Vec::new(); queries.len()]);
            }
            self.filtered_search(call, entity_type, &queries, k, metric, &rows)
        })
    }

    /// Answers checked queries: through the index with the short answers redone exactly, else
    /// exactly.
    fn filtered_search(
        &self,
        call: &Call<'_>,
        entity_type: &str,
        queries: &[&[f32]],
        k: usize,
        metric: Metric,
        filter: &RowFilter<'_>,
    ) -> Result<Vec<Vec<Neighbor>>> {
        let exact = |queries: &[&[f32]]| {
            call.with_conn(Retry::Idempotent, |conn| {
                exact_search(conn, entity_type, queries, k, metric, Some(filter))
            })
        };
        if known_storage(self.storage(), call)? != Storage::Vector {
            return exact(queries);
        }
        let Some(mut answers) =
            self.indexed_filtered(call, entity_type, queries, k, metric, filter)?
        else {
            return exact(queries);
        };
        let short: Vec<usize> = (0..answers.len())
            .filter(|&i| answers[i].len() < k)
            .collect();
        if !short.is_empty() {
            let again: Vec<&[f32]> = short.iter().map(|&i| queries[i]).collect();
            for (i, answer) in short.into_iter().zip(exact(&again)?) {
                answers[i] = answer;
            }
        }
        Ok(answers)
    }

    /// The answers of the type's index for `metric` under the filter, or `None` when it has
    /// no such index (or another dimension than the queries: the exact path then names it).
    fn indexed_filtered(
        &self,
        call: &Call<'_>,
        entity_type: &str,
        queries: &[&[f32]],
        k: usize,
        metric: Metric,
        filter: &RowFilter<'_>,
    ) -> Result<Option<Vec<Vec<Neighbor>>>> {
        let ef_search = self.config().embeddings.hnsw_ef_search as usize;
        let cache = self.index_cache();
        call.with_conn(Retry::Idempotent, |conn| {
            let Some(info) = cache.lookup(conn, entity_type, false)? else {
                return Ok(None);
            };
            if !info.indexed.contains(&metric) || queries[0].len() != info.dimension {
                return Ok(None);
            }
            match filtered_hnsw(
                conn,
                entity_type,
                &info,
                queries,
                k,
                metric,
                ef_search,
                filter,
            ) {
                // What was known of the type is stale (a refresh swapped its storage, say):
                // the exact path answers. A timeout is the caller's budget, spent.
                Err(e) if e.code().is_some() && !matches!(e, RepoError::Timeout(_)) => {
                    cache.forget(entity_type);
                    Ok(None)
                }
                other => other.map(Some),
            }
        })
    }
}

/// The filtered search through a type's index. Parameters: `$1` the query, `$2` k, then the
/// filter's parts that are present, in the order among, exclude, prefix.
fn filtered_hnsw_sql(
    entity_type: &str,
    info: &TypeInfo,
    metric: Metric,
    filter: &RowFilter<'_>,
) -> String {
    let distance = info.distance(metric);
    let mut conditions = String::new();
    let mut n = 2;
    let mut next = || {
        n += 1;
        n
    };
    if filter.among.is_some() {
        conditions += &format!(" AND entity_id = ANY(${}::text[])", next());
    }
    if !filter.exclude.is_empty() {
        conditions += &format!(" AND NOT (entity_id = ANY(${}::text[]))", next());
    }
    if filter.prefix.is_some() {
        conditions += &format!(" AND starts_with(entity_id, ${}::text)", next());
    }
    format!(
        "SELECT entity_id, distance FROM ( \
             SELECT entity_id::text AS entity_id, ({distance})::float4 AS distance \
             FROM embeddings WHERE entity_type = {}{conditions} \
             ORDER BY {distance} LIMIT $2) AS nearest \
         ORDER BY distance, entity_id",
        sql_literal(entity_type)
    )
}

/// A k above the session's ef_search needs more candidates for this query: pgvector takes
/// at most 1000. Citus passes SET LOCAL on to the shards only when told to (elsewhere
/// `citus.*` is an unused placeholder).
fn wider_scan(k: usize) -> String {
    format!(
        "SET LOCAL citus.propagate_set_commands = 'local'; SET LOCAL hnsw.ef_search = {}",
        k.min(EF_SEARCH_MAX)
    )
}

#[allow(clippy::too_many_arguments)]
fn filtered_hnsw(
    conn: &mut PgConnection,
    entity_type: &str,
    info: &TypeInfo,
    queries: &[&[f32]],
    k: usize,
    metric: Metric,
    ef_search: usize,
    filter: &RowFilter<'_>,
) -> Result<Vec<Vec<Neighbor>>> {
    let sql = filtered_hnsw_sql(entity_type, info, metric, filter);
    let statement = conn.prepare_cached_dynamic(&sql)?;
    let limit = k as i64;
    if k <= ef_search {
        return run_filtered(conn.client(), &statement, queries, limit, filter);
    }
    let mut tx = conn.client().transaction()?;
    tx.batch_execute(&wider_scan(k))?;
    let answers = run_filtered(&mut tx, &statement, queries, limit, filter)?;
    tx.commit()?;
    Ok(answers)
}

/// Runs the filtered statement once per query (the parameters of [`filtered_hnsw_sql`]).
fn run_filtered<C: GenericClient>(
    client: &mut C,
    statement: &postgres::Statement,
    queries: &[&[f32]],
    limit: i64,
    filter: &RowFilter<'_>,
) -> Result<Vec<Vec<Neighbor>>> {
    let exclude: Vec<&str> = filter.exclude.iter().copied().collect();
    let mut answers = Vec::with_capacity(queries.len());
    for q in queries {
        let vector = pgvector::Vector::from(q.to_vec());
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&vector, &limit];
        if let Some(among) = &filter.among {
            params.push(among);
        }
        if !exclude.is_empty() {
            params.push(&exclude);
        }
        if let Some(prefix) = &filter.prefix {
            params.push(prefix);
        }
        answers.push(neighbors(client, statement, &params)?);
    }
    Ok(answers)
}

fn neighbors<C: GenericClient>(
    client: &mut C,
    statement: &postgres::Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Neighbor>> {
    client
        .query(statement, params)?
        .iter()
        .map(|r| {
            Ok(Neighbor {
                entity_id: r.try_get(0)?,
                distance: r.try_get(1)?,
            })
        })
        .collect()
}
