//! HNSW indexes per entity type (pgvector): building one (concurrently, `index_build`, or by
//! `embedding_vector_index_create`, sql/V006, with progress in the log), knowing which types have one (a short-lived cache, so
//! a search costs one round trip), and the approximate search through it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use postgres::{GenericClient, Statement};

use crate::db::pool::{begin_unbounded, PgConnection, Pool};
use crate::embeddings::index_build::build_concurrently;
use crate::embeddings::types::{Metric, Neighbor};
use crate::error::{RepoError, Result};

/// How long what is known of a type's indexes is trusted: an index another process built is
/// used at most this long after it exists (searches are exact meanwhile).
const TYPE_INFO_TTL: Duration = Duration::from_secs(2);

/// HNSW in pgvector takes vectors of at most this many dimensions.
pub(crate) const HNSW_MAX_DIMENSION: usize = 2000;

/// ... and halfvecs of at most this many.
pub(crate) const HNSW_MAX_HALF_DIMENSION: usize = 4000;

/// The most candidates `hnsw.ef_search` may ask for.
const EF_SEARCH_MAX: usize = 1000;

/// How often an index build reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

const TYPE_INFO: &str = "SELECT r.dimension, r.vector_precision = 'f16' AS half, \
         coalesce(array_agg(i.metric::text) FILTER (WHERE i.metric IS NOT NULL), '{}') AS metrics \
     FROM embedding_types r LEFT JOIN embedding_vector_indexes i ON i.entity_type = r.entity_type \
     WHERE r.entity_type = $1 AND r.storage IS NOT NULL GROUP BY r.dimension, r.vector_precision";

const CREATE_INDEX: &str = "SELECT embedding_vector_index_create($1, $2)";

const BUILD_PROGRESS: &str = "SELECT phase, tuples_done, tuples_total \
     FROM pg_stat_progress_create_index WHERE pid = $1";

/// The planner's row estimate of a type's storage (HNSW builds report no total of their own).
const ESTIMATED_ROWS: &str = "SELECT greatest(c.reltuples, 0)::int8 FROM embedding_types r \
     JOIN pg_class c ON c.oid = to_regclass(quote_ident(r.storage)) WHERE r.entity_type = $1";

/// A registered type as searches see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TypeInfo {
    pub dimension: usize,
    /// Stored as f16 (`halfvec`, sql/V010).
    pub half: bool,
    pub indexed: Vec<Metric>,
}

impl TypeInfo {
    /// The distance expression the type's HNSW indexes order by, to the query `$1` (a
    /// `vector`; rounded to f16 for an f16 type).
    pub(crate) fn distance(&self, metric: Metric) -> String {
        let d = self.dimension;
        if self.half {
            format!(
                "embeddings_half::halfvec({d}) {} $1::vector({d})::halfvec({d})",
                operator(metric)
            )
        } else {
            format!(
                "embeddings::vector({d}) {} $1::vector({d})",
                operator(metric)
            )
        }
    }
}

/// What this repository knows of its types' indexes, for [`TYPE_INFO_TTL`].
#[derive(Debug, Default)]
pub(crate) struct IndexCache {
    types: Mutex<HashMap<String, (Instant, Option<TypeInfo>)>>,
}

impl IndexCache {
    /// The type's dimension and indexed metrics (`None` for an unknown type), from the cache
    /// while it is fresh, else from the registry.
    pub(crate) fn lookup(
        &self,
        conn: &mut PgConnection,
        entity_type: &str,
        fresh: bool,
    ) -> Result<Option<TypeInfo>> {
        if !fresh {
            let cached = self
                .types
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(entity_type)
                .filter(|(at, _)| at.elapsed() < TYPE_INFO_TTL)
                .map(|(_, info)| info.clone());
            if let Some(info) = cached {
                return Ok(info);
            }
        }
        let statement = conn.prepare_cached(TYPE_INFO)?;
        let row = conn.client().query_opt(&statement, &[&entity_type])?;
        let info = match row {
            None => None,
            Some(row) => {
                let dimension: i32 = row.try_get("dimension")?;
                let metrics: Vec<String> = row.try_get("metrics")?;
                Some(TypeInfo {
                    dimension: usize::try_from(dimension).unwrap_or(0),
                    half: row.try_get("half")?,
                    indexed: metrics.iter().filter_map(|m| m.parse().ok()).collect(),
                })
            }
        };
        let mut types = self.types.lock().unwrap_or_else(|p| p.into_inner());
        if types.len() > 10_000 {
            types.clear();
        }
        types.insert(entity_type.to_owned(), (Instant::now(), info.clone()));
        Ok(info)
    }

    /// Forgets a type (after this repository changed its indexes).
    pub(crate) fn forget(&self, entity_type: &str) {
        self.types
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(entity_type);
    }
}

/// pgvector's operator for a metric.
pub(crate) fn operator(metric: Metric) -> &'static str {
    match metric {
        Metric::L2 => "<->",
        Metric::Cosine => "<=>",
        Metric::InnerProduct => "<#>",
    }
}

/// A string as a SQL literal (an escape string when it holds a backslash, so that the
/// server's standard_conforming_strings does not matter).
pub(crate) fn sql_literal(s: &str) -> String {
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// The search through a type's index: the type is a literal, so the planner keeps only its
/// partition and orders by the indexed expression; `$1` is the query, `$2` is k. The few
/// results are sorted again by (distance, entity_id) so that ties come in a stable order.
pub(crate) fn hnsw_sql(entity_type: &str, info: &TypeInfo, metric: Metric) -> String {
    let distance = info.distance(metric);
    format!(
        "SELECT entity_id, distance FROM ( \
             SELECT entity_id::text AS entity_id, ({distance})::float4 AS distance \
             FROM embeddings WHERE entity_type = {} \
             ORDER BY {distance} LIMIT $2) AS nearest \
         ORDER BY distance, entity_id",
        sql_literal(entity_type)
    )
}

/// Answers every query through the type's HNSW index, on one connection.
pub(crate) fn hnsw_search(
    conn: &mut PgConnection,
    entity_type: &str,
    info: &TypeInfo,
    queries: &[&[f32]],
    k: usize,
    metric: Metric,
    ef_search: usize,
) -> Result<Vec<Vec<Neighbor>>> {
    let sql = hnsw_sql(entity_type, info, metric);
    let limit = k as i64;
    let statement = conn.prepare_cached_dynamic(&sql)?;
    if k <= ef_search {
        return run_queries(conn.client(), &statement, queries, limit);
    }
    // An HNSW scan returns at most ef_search rows: a larger k needs more candidates, and
    // past pgvector's limit of 1000 an iterative scan.
    let mut tx = conn.client().transaction()?;
    // Citus passes SET LOCAL on to the shards only when told to (elsewhere `citus.*` is an
    // unused placeholder): a schema-based cluster's one shard answered ef_search rows.
    tx.batch_execute(&format!(
        "SET LOCAL citus.propagate_set_commands = 'local'; SET LOCAL hnsw.ef_search = {}",
        k.min(EF_SEARCH_MAX)
    ))?;
    if k > EF_SEARCH_MAX {
        tx.batch_execute("SET LOCAL hnsw.iterative_scan = strict_order")?;
    }
    let answers = run_queries(&mut tx, &statement, queries, limit)?;
    tx.commit()?;
    Ok(answers)
}

fn run_queries<C: GenericClient>(
    client: &mut C,
    statement: &Statement,
    queries: &[&[f32]],
    limit: i64,
) -> Result<Vec<Vec<Neighbor>>> {
    let mut answers = Vec::with_capacity(queries.len());
    for q in queries {
        let vector = pgvector::Vector::from(q.to_vec());
        let neighbors = client
            .query(statement, &[&vector, &limit])?
            .iter()
            .map(|r| {
                Ok(Neighbor {
                    entity_id: r.try_get(0)?,
                    distance: r.try_get(1)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        answers.push(neighbors);
    }
    Ok(answers)
}

/// The plan PostgreSQL would follow for [`hnsw_sql`] with this query.
pub(crate) fn explain_hnsw(
    conn: &mut PgConnection,
    entity_type: &str,
    info: &TypeInfo,
    query: &[f32],
    k: usize,
    metric: Metric,
) -> Result<String> {
    let sql = format!("EXPLAIN {}", hnsw_sql(entity_type, info, metric));
    let vector = pgvector::Vector::from(query.to_vec());
    let rows = conn.client().query(&sql, &[&vector, &(k as i64)])?;
    let lines = rows
        .iter()
        .map(|r| r.try_get::<_, String>(0))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(lines.join("\n"))
}

/// Builds the HNSW index of `entity_type` for `metric` on `conn` (without statement_timeout:
/// a build takes minutes on millions of vectors), while a watcher on another pooled
/// connection, if one is idle, logs the build's progress. Returns false for an unknown type.
pub(crate) fn build_index(
    pool: &Pool,
    conn: &mut PgConnection,
    entity_type: &str,
    metric: Metric,
) -> Result<bool> {
    let pid: i32 = conn
        .client()
        .query_one("SELECT pg_backend_pid()", &[])?
        .try_get(0)?;
    let started = Instant::now();
    log::info!("pg-model-repo: building the HNSW index of {entity_type:?} for {metric} search");
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    let built = std::thread::scope(|scope| {
        let watcher = pool.try_get().map(|mut watch_conn| {
            std::thread::Builder::new()
                .name("pg-model-repo-index-progress".into())
                .spawn_scoped(scope, move || {
                    watch_progress(&mut watch_conn, pid, entity_type, &stopped)
                })
        });
        let built = (|| -> Result<bool> {
            if let Some(built) = build_concurrently(conn.unbounded_client(), entity_type, metric)? {
                return Ok(built);
            }
            log::info!(
                "pg-model-repo: this role does not own the storage of {entity_type:?}: its \
                 index is built by the schema owner's function, and writers of the type wait"
            );
            let mut tx = begin_unbounded(conn)?;
            let created: bool = tx
                .query_one(CREATE_INDEX, &[&entity_type, &metric.as_str()])?
                .try_get(0)?;
            tx.commit()?;
            Ok(created)
        })();
        drop(stop);
        if let Some(Ok(handle)) = watcher {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        built
    })?;
    if built {
        log::info!(
            "pg-model-repo: built the HNSW index of {entity_type:?} for {metric} search in {:?}",
            started.elapsed()
        );
    }
    Ok(built)
}

/// Logs the progress of the index build of backend `pid` until `stopped` hangs up.
fn watch_progress(
    conn: &mut PgConnection,
    pid: i32,
    entity_type: &str,
    stopped: &crossbeam_channel::Receiver<()>,
) {
    let tick = crossbeam_channel::tick(PROGRESS_EVERY);
    let mut estimate: Option<i64> = None;
    loop {
        crossbeam_channel::select! {
            recv(stopped) -> _ => return,
            recv(tick) -> _ => {}
        }
        match conn.client().query_opt(BUILD_PROGRESS, &[&pid]) {
            Ok(Some(row)) => {
                let phase: String = row.try_get(0).unwrap_or_default();
                let done: i64 = row.try_get(1).unwrap_or(0);
                let mut total: i64 = row.try_get(2).unwrap_or(0);
                if total <= 0 {
                    // The build has analyzed the table by now: its estimate is close.
                    if estimate.is_none() {
                        estimate = conn
                            .client()
                            .query_one(ESTIMATED_ROWS, &[&entity_type])
                            .and_then(|r| r.try_get(0))
                            .ok();
                    }
                    total = estimate.unwrap_or(0);
                }
                if total > 0 {
                    log::info!(
                        "pg-model-repo: HNSW index of {entity_type:?}: {phase}, {done} of about \
                         {total} vectors ({:.0}%)",
                        100.0 * done as f64 / total as f64
                    );
                } else {
                    log::info!(
                        "pg-model-repo: HNSW index of {entity_type:?}: {phase}, {done} vectors"
                    );
                }
            }
            Ok(None) => {}
            Err(e) => {
                log::debug!("pg-model-repo: cannot watch the index build ({e})");
                return;
            }
        }
    }
}

/// Rules of an index, before any build: pgvector storage and HNSW's dimension limit.
pub(crate) fn check_indexable(entity_type: &str, info: &TypeInfo) -> Result<()> {
    let (dimension, most) = if info.half {
        (info.dimension, HNSW_MAX_HALF_DIMENSION)
    } else {
        (info.dimension, HNSW_MAX_DIMENSION)
    };
    if dimension > most {
        return Err(RepoError::invalid(format!(
            "entity type {entity_type:?} has {dimension} dimensions; pgvector's HNSW indexes \
             take at most {most}{}",
            if info.half {
                " halfvec dimensions"
            } else {
                " (4,000 for a type declared f16)"
            }
        )));
    }
    Ok(())
}
