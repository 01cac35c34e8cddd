//! Similarity search benchmark: HNSW through the library against the same SQL run raw
//! through a prepared statement (library overhead), recall@10 of HNSW against the exact answer,
//! and the library's exact batch search against a numpy brute force, all in one run on one
//! server, in interleaved rounds (medians reported).
//!
//! ```text
//! cargo run --release --example search_bench -- [--rows 100000] [--dim 384] [--queries 1000]
//!     [--k 10] [--rounds 3] [--clusters 100] [--metric l2|cosine|inner_product]
//!     [--ef-search 100] [--storage f32,halfvec] [--format table|json]
//! ```
//!
//! Per storage (`f32`: pgvector `vector`; `halfvec`: types declared `VectorPrecision::F16`),
//! the unfiltered methods and the filtered ones at 1% and 10% selectivity (an entity_id
//! prefix: ids are `c<00-99>-e<n>`, category n % 100; `c00` passes 1%, `c0` 10%):
//! `library_filtered_hnsw`, `raw_sql_filtered_hnsw` (the library's statement with the same
//! session settings) and `library_filtered_exact` (the exact type, which is also the truth for
//! recall). Every row reports the type's `bytes_per_row` (heap, indexes and TOAST over rows)
//! and `index_build_s`.
//!
//! Data: `--clusters` centres drawn uniformly from [-1, 1]^dim, every vector a centre plus
//! Gaussian noise (sigma 0.15 per coordinate), seeded (rows: 42, queries: 43), so recall
//! compares across runs. The same rows are loaded twice: type `bench` gets the HNSW index,
//! `bench_exact` none (its searches are exact).
//!
//! numpy's side (`numpy_bruteforce`) reads the type by psycopg's binary `COPY … TO STDOUT`
//! into an array, then does the matrix product and argpartition over all queries; it needs
//! python3 with numpy and psycopg (`pip install numpy "psycopg[binary]"`), and the bench says
//! when they are missing. Uses `DATABASE_URL` when set, else a throwaway server.

use std::error::Error;
use std::time::{Duration, Instant};

use pg_model_repo::throwaway::database_url_or_start;
use pg_model_repo::{
    Embedding, Metric, ModelRepository, Neighbor, RepositoryConfig, SearchFilter, VectorPrecision,
    VectorStorage, DEFAULT_HNSW_EF_SEARCH, FILTERED_MAX_SCAN_TUPLES,
};

/// The selectivities of the filtered methods, with the entity_id prefix that passes each.
const SELECTIVITIES: [(f64, &str); 2] = [(0.01, "c00-"), (0.10, "c0")];
const SIGMA: f32 = 0.15;

#[derive(Debug, Clone)]
struct Args {
    rows: usize,
    dim: usize,
    queries: usize,
    k: usize,
    rounds: usize,
    clusters: usize,
    metric: Metric,
    ef_search: u32,
    storages: Vec<String>,
    json: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        rows: 100_000,
        dim: 384,
        queries: 1000,
        k: 10,
        rounds: 3,
        clusters: 100,
        metric: Metric::L2,
        ef_search: DEFAULT_HNSW_EF_SEARCH,
        storages: vec!["f32".to_owned()],
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|e| format!("{v}: {e}"));
        match flag.as_str() {
            "--rows" => a.rows = num(value()?)?,
            "--dim" => a.dim = num(value()?)?,
            "--queries" => a.queries = num(value()?)?,
            "--k" => a.k = num(value()?)?,
            "--rounds" => a.rounds = num(value()?)?.max(1),
            "--clusters" => a.clusters = num(value()?)?.max(1),
            "--ef-search" => a.ef_search = num(value()?)? as u32,
            "--metric" => a.metric = value()?.parse().map_err(|e| format!("{e}"))?,
            "--format" => a.json = value()? == "json",
            "--storage" => {
                a.storages = value()?.split(',').map(str::to_owned).collect();
                if let Some(bad) = a.storages.iter().find(|s| *s != "f32" && *s != "halfvec") {
                    return Err(format!("unknown storage {bad} (f32, halfvec)"));
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// Seeded clustered Gaussians: the generator the docs describe.
struct Generator {
    centres: Vec<Vec<f32>>,
    rng: fastrand::Rng,
}

impl Generator {
    fn new(clusters: usize, dim: usize, seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(7);
        let centres = (0..clusters)
            .map(|_| (0..dim).map(|_| rng.f32() * 2.0 - 1.0).collect())
            .collect();
        Generator {
            centres,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    fn gaussian(&mut self) -> f32 {
        // Box-Muller.
        let u = self.rng.f32().max(f32::MIN_POSITIVE);
        let v = self.rng.f32();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }

    fn next_vector(&mut self) -> Vec<f32> {
        let c = self.rng.usize(0..self.centres.len());
        let centre = self.centres[c].clone();
        centre.iter().map(|x| x + SIGMA * self.gaussian()).collect()
    }
}

/// One line of the result (one object of `--format json`).
#[derive(Debug, Clone, serde::Serialize)]
struct Measurement {
    method: &'static str,
    /// The fraction of rows the filter passes (absent when unfiltered).
    #[serde(skip_serializing_if = "Option::is_none")]
    selectivity: Option<f64>,
    storage: String,
    bytes_per_row: f64,
    index_build_s: f64,
    /// Queries answered with fewer than k neighbours.
    #[serde(skip_serializing_if = "Option::is_none")]
    short_answers: Option<usize>,
    threads: usize,
    queries: usize,
    seconds: f64,
    qps: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recall_at_10: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// The library's SQL for an indexed search (mirrors `embeddings::index::hnsw_sql` and, with a
/// prefix filter as `$3`, `embeddings::filtered::filtered_hnsw_sql`).
fn raw_sql(entity_type: &str, dim: usize, metric: Metric, half: bool, filtered: bool) -> String {
    let op = match metric {
        Metric::L2 => "<->",
        Metric::Cosine => "<=>",
        Metric::InnerProduct => "<#>",
    };
    let distance = if half {
        format!("embeddings_half::halfvec({dim}) {op} $1::vector({dim})::halfvec({dim})")
    } else {
        format!("embeddings::vector({dim}) {op} $1::vector({dim})")
    };
    let filter = if filtered {
        " AND starts_with(entity_id, $3::text)"
    } else {
        ""
    };
    format!(
        "SELECT entity_id, distance FROM ( \
             SELECT entity_id::text AS entity_id, ({distance})::float4 AS distance \
             FROM embeddings WHERE entity_type = '{entity_type}'{filter} \
             ORDER BY {distance} LIMIT $2) AS nearest \
         ORDER BY distance, entity_id"
    )
}

type Answers = Vec<Vec<String>>;

/// Times single queries split over `threads` threads; returns the measurement and answers.
fn single_queries(
    method: &'static str,
    threads: usize,
    queries: &[Vec<f32>],
    run: &(dyn Fn(usize, &[f32]) -> Vec<String> + Sync),
) -> (Measurement, Answers) {
    let started = Instant::now();
    let per = queries.len().div_ceil(threads);
    let results: Vec<Vec<(usize, Duration, Vec<String>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = queries
            .chunks(per)
            .enumerate()
            .map(|(t, chunk)| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .enumerate()
                        .map(|(i, q)| {
                            let t0 = Instant::now();
                            let ids = run(t, q);
                            (t * per + i, t0.elapsed(), ids)
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut answers = vec![Vec::new(); queries.len()];
    for (i, d, ids) in results.into_iter().flatten() {
        latencies.push(d);
        answers[i] = ids;
    }
    latencies.sort();
    let m = Measurement {
        method,
        selectivity: None,
        storage: String::new(),
        bytes_per_row: 0.0,
        index_build_s: 0.0,
        short_answers: None,
        threads,
        queries: queries.len(),
        seconds,
        qps: queries.len() as f64 / seconds,
        p50_us: Some(percentile(&latencies, 0.5)),
        p99_us: Some(percentile(&latencies, 0.99)),
        recall_at_10: None,
    };
    (m, answers)
}

fn recall(approx: &Answers, exact: &Answers, k: usize) -> f64 {
    let k = k.min(10);
    let hits: usize = approx
        .iter()
        .zip(exact)
        .map(|(a, e)| {
            let truth: std::collections::HashSet<&String> = e.iter().take(k).collect();
            a.iter().take(k).filter(|id| truth.contains(id)).count()
        })
        .sum();
    hits as f64 / (k * exact.len()) as f64
}

const NUMPY: &str = r#"
import sys, time
try:
    import numpy as np, psycopg
except ImportError as e:
    print("missing:" + str(e)); sys.exit(3)
url, schema, etype, dim, qpath, k, metric, storage = sys.argv[1:9]
dim, k = int(dim), int(k)
q = np.fromfile(qpath, dtype="<f4").reshape(-1, dim)
t0 = time.perf_counter()
ids, vecs = [], []
with psycopg.connect(url) as conn, conn.cursor() as cur:
    with cur.copy('COPY (SELECT entity_id, embeddings FROM "%s".embeddings WHERE entity_type = %%s) TO STDOUT (FORMAT binary)' % schema, (etype,)) as copy:
        copy.set_types(["text", "bytea"])
        for i, v in copy.rows():
            ids.append(i); vecs.append(v)
raw = b"".join(vecs)
if storage == "vector":
    x = np.frombuffer(raw, dtype=">f4").reshape(len(ids), dim + 1)[:, 1:].astype("<f4")
else:
    x = np.frombuffer(raw, dtype="<f4").reshape(len(ids), dim)
t_read = time.perf_counter() - t0
xn = (x * x).sum(axis=1)
out = []
for s in range(0, len(q), 100):
    qs = q[s:s + 100]
    dots = qs @ x.T
    if metric == "l2":
        d = (qs * qs).sum(axis=1)[:, None] + xn[None, :] - 2 * dots
    elif metric == "cosine":
        d = 1 - dots / np.sqrt((qs * qs).sum(axis=1)[:, None] * xn[None, :])
    else:
        d = -dots
    part = np.argpartition(d, k, axis=1)[:, :k]
    order = np.take_along_axis(d, part, axis=1).argsort(axis=1)
    out.append(np.take_along_axis(part, order, axis=1))
top = np.concatenate(out)
t = time.perf_counter() - t0
print("seconds:%f read:%f" % (t, t_read))
for row in top[:3]:
    print("ids:" + ",".join(ids[j] for j in row))
"#;

/// numpy's brute force over the exact type, timed by the script itself (its read included).
fn numpy_bruteforce(
    url: &str,
    schema: &str,
    exact_type: &str,
    args: &Args,
    queries_file: &std::path::Path,
    storage: &str,
) -> Result<Measurement, String> {
    let out = std::process::Command::new("python3")
        .args(["-c", NUMPY, url, schema, exact_type])
        .arg(args.dim.to_string())
        .arg(queries_file)
        .arg(args.k.to_string())
        .arg(args.metric.as_str())
        .arg(storage)
        .output()
        .map_err(|e| format!("python3 is not available ({e})"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(missing) = stdout.lines().find_map(|l| l.strip_prefix("missing:")) {
        return Err(format!(
            "python3 lacks numpy or psycopg ({missing}): pip install numpy \"psycopg[binary]\""
        ));
    }
    let seconds: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("seconds:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("numpy run failed: {}", String::from_utf8_lossy(&out.stderr)))?;
    Ok(Measurement {
        method: "numpy_bruteforce",
        selectivity: None,
        storage: "f32".to_owned(),
        bytes_per_row: 0.0,
        index_build_s: 0.0,
        short_answers: None,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        queries: args.queries,
        seconds,
        qps: args.queries as f64 / seconds,
        p50_us: None,
        p99_us: None,
        recall_at_10: None,
    })
}

fn main_with(args: Args) -> Result<(), Box<dyn Error>> {
    let (url, _server) = database_url_or_start(&[("max_connections", "100")])?;
    let schema = format!("search_bench_{}", std::process::id());
    let config = RepositoryConfig::new(url.clone())
        .schema(&schema)
        .pool_size(4)
        .reaper_interval(None)
        .vector_storage(VectorStorage::Pgvector)
        .hnsw_ef_search(args.ef_search);
    let repo = ModelRepository::open(config)?;
    let result = run(&repo, &url, &schema, &args);
    repo.close();
    if let Ok(mut c) = postgres::Client::connect(&url, postgres::NoTls) {
        let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"));
    }
    result
}

fn run(repo: &ModelRepository, url: &str, schema: &str, args: &Args) -> Result<(), Box<dyn Error>> {
    let mut g = Generator::new(args.clusters, args.dim, 43);
    let queries: Vec<Vec<f32>> = (0..args.queries).map(|_| g.next_vector()).collect();
    let mut result = Vec::new();
    for storage in &args.storages {
        result.extend(run_storage(repo, url, schema, args, storage, &queries)?);
    }
    report(args, &result)
}

/// One storage's types, loaded and indexed: (indexed type, exact type, bytes per row, index
/// build seconds).
fn load_storage(
    repo: &ModelRepository,
    url: &str,
    schema: &str,
    args: &Args,
    storage: &str,
) -> Result<(String, String, f64, f64), Box<dyn Error>> {
    let indexed = format!("bench_{storage}");
    let exact = format!("bench_{storage}_exact");
    let t0 = Instant::now();
    for t in [&indexed, &exact] {
        if storage == "halfvec" {
            repo.declare_embedding_type(t, args.dim, VectorPrecision::F16)?;
        }
        let mut g = Generator::new(args.clusters, args.dim, 42);
        let mut rows = (0..args.rows).map(|i| {
            Embedding::new(
                t.as_str(),
                format!("c{:02}-e{i:07}", i % 100),
                g.next_vector(),
            )
        });
        repo.replace_embeddings_iter(t, &mut rows)?;
    }
    eprintln!(
        "{storage}: loaded 2 x {} rows of {} dims in {:?}",
        args.rows,
        args.dim,
        t0.elapsed()
    );
    let t0 = Instant::now();
    repo.create_vector_index(&indexed, args.metric)?;
    let build = t0.elapsed().as_secs_f64();
    let mut c = postgres::Client::connect(url, postgres::NoTls)?;
    c.batch_execute(&format!("SET search_path TO \"{schema}\""))?;
    let bytes: i64 = c
        .query_one(
            "SELECT pg_total_relation_size(storage::regclass) FROM embedding_types \
             WHERE entity_type = $1",
            &[&indexed],
        )?
        .get(0);
    let per_row = bytes as f64 / args.rows as f64;
    eprintln!(
        "{storage}: built the HNSW index ({}) in {build:.1} s; {per_row:.0} bytes a row",
        args.metric
    );
    Ok((indexed, exact, per_row, build))
}

/// A raw session set up as the library's (search_path, the HNSW settings), with `sql`
/// prepared.
fn raw_session(
    url: &str,
    schema: &str,
    args: &Args,
    sql: &str,
) -> Result<std::sync::Mutex<(postgres::Client, postgres::Statement)>, Box<dyn Error>> {
    let mut c = postgres::Client::connect(url, postgres::NoTls)?;
    c.batch_execute(&format!(
        "SET search_path TO \"{schema}\", pgvector, public; SET hnsw.ef_search = {}; \
         SET hnsw.iterative_scan = relaxed_order; SET hnsw.max_scan_tuples = {}",
        args.ef_search, FILTERED_MAX_SCAN_TUPLES
    ))?;
    let st = c.prepare(sql)?;
    Ok(std::sync::Mutex::new((c, st)))
}

fn exact_batch(method: &'static str, seconds: f64, queries: usize) -> Measurement {
    Measurement {
        method,
        selectivity: None,
        storage: String::new(),
        bytes_per_row: 0.0,
        index_build_s: 0.0,
        short_answers: None,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        queries,
        seconds,
        qps: queries as f64 / seconds,
        p50_us: None,
        p99_us: None,
        recall_at_10: None,
    }
}

fn run_storage(
    repo: &ModelRepository,
    url: &str,
    schema: &str,
    args: &Args,
    storage: &str,
    queries: &[Vec<f32>],
) -> Result<Vec<Measurement>, Box<dyn Error>> {
    let (indexed, exact_type, per_row, build) = load_storage(repo, url, schema, args, storage)?;
    let half = storage == "halfvec";
    eprintln!(
        "{}",
        repo.explain_nearest_embeddings(&indexed, &vec![0.5; args.dim], args.k, args.metric)?
    );
    let queries_file =
        std::env::temp_dir().join(format!("search_bench_q_{}.f32", std::process::id()));
    std::fs::write(
        &queries_file,
        queries
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )?;
    let sql = raw_sql(&indexed, args.dim, args.metric, half, false);
    let raw = [
        raw_session(url, schema, args, &sql)?,
        raw_session(url, schema, args, &sql)?,
    ];
    let filtered_sql = raw_sql(&indexed, args.dim, args.metric, half, true);
    let raw_filtered = raw_session(url, schema, args, &filtered_sql)?;
    let k = args.k;
    let ids = |n: Vec<Neighbor>| n.into_iter().map(|x| x.entity_id).collect::<Vec<_>>();
    let library = |_: usize, q: &[f32]| {
        ids(repo
            .nearest_embeddings(&indexed, q, k, args.metric)
            .expect("library search"))
    };
    let raw_query = |session: &std::sync::Mutex<(postgres::Client, postgres::Statement)>,
                     q: &[f32],
                     prefix: Option<&str>| {
        let mut guard = session.lock().expect("raw session");
        let (client, statement) = &mut *guard;
        let v = pgvector::Vector::from(q.to_vec());
        let limit = k as i64;
        let rows = match prefix {
            Some(p) => client.query(&*statement, &[&v, &limit, &p]),
            None => client.query(&*statement, &[&v, &limit]),
        };
        rows.expect("raw search")
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    let raw_run = |t: usize, q: &[f32]| raw_query(&raw[t], q, None);
    // Warm-up, untimed: every session prepares its statements and settles on its plan.
    for q in queries.iter().take(50) {
        library(0, q);
        raw_run(0, q);
        raw_run(1, q);
    }
    let mut all: Vec<Vec<Measurement>> = Vec::new();
    let mut numpy_note = None;
    for round in 0..args.rounds {
        let mut this = Vec::new();
        for threads in [1, 2] {
            let (m, a) = single_queries("library_hnsw", threads, queries, &library);
            this.push((m, Some(a)));
            let (m, a) = single_queries("raw_sql_hnsw", threads, queries, &raw_run);
            this.push((m, Some(a)));
        }
        let t0 = Instant::now();
        let exact = repo.nearest_embeddings_many(&exact_type, queries, k, args.metric)?;
        let exact_answers: Answers = exact.into_iter().map(ids).collect();
        this.push((
            exact_batch(
                "library_exact_batch",
                t0.elapsed().as_secs_f64(),
                queries.len(),
            ),
            None,
        ));
        if !half {
            match numpy_bruteforce(url, schema, &exact_type, args, &queries_file, "vector") {
                Ok(m) => this.push((m, None)),
                Err(e) => numpy_note = Some(e),
            }
        }
        let mut measured = Vec::new();
        for (mut m, answers) in this {
            if let Some(a) = answers {
                m.recall_at_10 = Some(recall(&a, &exact_answers, k));
                m.short_answers = Some(a.iter().filter(|x| x.len() < k).count());
            }
            measured.push(m);
        }
        for (selectivity, prefix) in SELECTIVITIES {
            measured.extend(filtered_round(
                repo,
                args,
                queries,
                &indexed,
                &exact_type,
                selectivity,
                prefix,
                &raw_filtered,
                &raw_query,
            )?);
        }
        for m in &mut measured {
            m.storage = storage.to_owned();
            m.bytes_per_row = per_row;
            m.index_build_s = build;
            if !args.json {
                eprintln!(
                    "{storage} round {round}: {} {} x{}: {:.3} s, {:.0} q/s{}",
                    m.method,
                    m.selectivity.map_or(String::new(), |s| format!("{s}")),
                    m.threads,
                    m.seconds,
                    m.qps,
                    m.recall_at_10
                        .map_or(String::new(), |r| format!(", recall@10 {r:.3}"))
                );
            }
        }
        all.push(measured);
    }
    let _ = std::fs::remove_file(&queries_file);
    if let Some(note) = &numpy_note {
        eprintln!("numpy_bruteforce not measured: {note}");
    }
    Ok(medians(&all))
}

type RawQuery<'a> = dyn Fn(
        &std::sync::Mutex<(postgres::Client, postgres::Statement)>,
        &[f32],
        Option<&str>,
    ) -> Vec<String>
    + Sync
    + 'a;

/// One round of the filtered methods at one selectivity.
#[allow(clippy::too_many_arguments)]
fn filtered_round(
    repo: &ModelRepository,
    args: &Args,
    queries: &[Vec<f32>],
    indexed: &str,
    exact_type: &str,
    selectivity: f64,
    prefix: &str,
    raw_filtered: &std::sync::Mutex<(postgres::Client, postgres::Statement)>,
    raw_query: &RawQuery<'_>,
) -> Result<Vec<Measurement>, Box<dyn Error>> {
    let k = args.k;
    let filter = SearchFilter {
        id_prefix: Some(prefix.to_owned()),
        ..Default::default()
    };
    let ids = |n: Vec<Neighbor>| n.into_iter().map(|x| x.entity_id).collect::<Vec<_>>();
    let t0 = Instant::now();
    let exact =
        repo.nearest_embeddings_filtered_many(exact_type, queries, k, args.metric, &filter)?;
    let mut exact_m = exact_batch(
        "library_filtered_exact",
        t0.elapsed().as_secs_f64(),
        queries.len(),
    );
    let truth: Answers = exact.into_iter().map(ids).collect();
    exact_m.short_answers = Some(truth.iter().filter(|a| a.len() < k).count());
    let library = |_: usize, q: &[f32]| {
        ids(repo
            .nearest_embeddings_filtered(indexed, q, k, args.metric, &filter)
            .expect("library filtered search"))
    };
    let raw = |_: usize, q: &[f32]| raw_query(raw_filtered, q, Some(prefix));
    let mut out = Vec::new();
    for (method, run) in [
        (
            "library_filtered_hnsw",
            &library as &(dyn Fn(usize, &[f32]) -> Vec<String> + Sync),
        ),
        ("raw_sql_filtered_hnsw", &raw),
    ] {
        let (mut m, a) = single_queries(method, 1, queries, run);
        m.recall_at_10 = Some(recall(&a, &truth, k));
        m.short_answers = Some(a.iter().filter(|x| x.len() < k).count());
        out.push(m);
    }
    out.push(exact_m);
    for m in &mut out {
        m.selectivity = Some(selectivity);
    }
    Ok(out)
}

/// Medians per method, over the rounds.
fn medians(all: &[Vec<Measurement>]) -> Vec<Measurement> {
    let mut result: Vec<Measurement> = Vec::new();
    for (i, first) in all[0].iter().enumerate() {
        let col = |f: &dyn Fn(&Measurement) -> Option<f64>| -> Option<f64> {
            let v: Vec<f64> = all.iter().filter_map(|r| r.get(i)).filter_map(f).collect();
            (!v.is_empty()).then(|| median(v))
        };
        result.push(Measurement {
            seconds: col(&|m| Some(m.seconds)).unwrap_or(0.0),
            qps: col(&|m| Some(m.qps)).unwrap_or(0.0),
            p50_us: col(&|m| m.p50_us),
            p99_us: col(&|m| m.p99_us),
            recall_at_10: col(&|m| m.recall_at_10),
            short_answers: all
                .iter()
                .filter_map(|r| r.get(i))
                .filter_map(|m| m.short_answers)
                .max(),
            ..first.clone()
        });
    }
    result
}

fn report(args: &Args, result: &[Measurement]) -> Result<(), Box<dyn Error>> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(result)?);
        return Ok(());
    }
    println!(
        "{} rows x {} dims, {} queries, k {}, {}, ef_search {}, medians of {} rounds",
        args.rows, args.dim, args.queries, args.k, args.metric, args.ef_search, args.rounds
    );
    println!(
        "{:<22} {:>7} {:>5} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>5} {:>8} {:>8}",
        "method",
        "storage",
        "sel",
        "threads",
        "seconds",
        "qps",
        "p50_us",
        "p99_us",
        "recall@10",
        "short",
        "",
        "B/row",
        "build_s"
    );
    let opt = |v: Option<f64>, p: usize| v.map_or("-".to_owned(), |x| format!("{x:.p$}"));
    for m in result {
        println!(
            "{:<22} {:>7} {:>5} {:>7} {:>8.3} {:>9.1} {:>9} {:>9} {:>9} {:>9} {:>5} {:>8.0} {:>8.1}",
            m.method,
            m.storage,
            opt(m.selectivity, 2),
            m.threads,
            m.seconds,
            m.qps,
            opt(m.p50_us, 0),
            opt(m.p99_us, 0),
            opt(m.recall_at_10, 3),
            m.short_answers.map_or("-".to_owned(), |n| n.to_string()),
            "",
            m.bytes_per_row,
            m.index_build_s
        );
    }
    let find = |method: &str, storage: &str, sel: Option<f64>, threads: usize| {
        result.iter().find(|m| {
            m.method == method
                && m.storage == storage
                && m.selectivity == sel
                && (threads == 0 || m.threads == threads)
        })
    };
    for storage in &args.storages {
        for t in [1, 2] {
            if let (Some(l), Some(r)) = (
                find("library_hnsw", storage, None, t),
                find("raw_sql_hnsw", storage, None, t),
            ) {
                println!(
                    "{storage}: library / raw SQL QPS at {t} thread(s): {:.2} (target >= 0.9)",
                    l.qps / r.qps
                );
            }
        }
        for (sel, _) in SELECTIVITIES {
            if let (Some(l), Some(r)) = (
                find("library_filtered_hnsw", storage, Some(sel), 1),
                find("raw_sql_filtered_hnsw", storage, Some(sel), 1),
            ) {
                println!("{storage}: filtered {sel}: library / raw SQL QPS {:.2} (target >= 0.9), recall@10 {:.3} (target >= 0.95), short answers {:?}", l.qps / r.qps, l.recall_at_10.unwrap_or(0.0), l.short_answers);
            }
        }
        if let (Some(l), Some(n)) = (
            find("library_exact_batch", storage, None, 0),
            find("numpy_bruteforce", storage, None, 0),
        ) {
            println!(
                "{storage}: exact batch / numpy throughput: {:.2} (target >= 0.5)",
                l.qps / n.qps
            );
        }
    }
    if let (Some(h), Some(f)) = (
        find("library_hnsw", "halfvec", None, 1),
        find("library_hnsw", "f32", None, 1),
    ) {
        println!(
            "halfvec / f32: bytes per row {:.2} (target <= 0.60), index build {:.2} (target <= 0.85), halfvec recall@10 {:.3}",
            h.bytes_per_row / f.bytes_per_row,
            h.index_build_s / f.index_build_s,
            h.recall_at_10.unwrap_or(0.0)
        );
    }
    Ok(())
}

fn main() {
    let _ = env_logger::try_init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("search_bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = main_with(args) {
        eprintln!("search_bench: {e}");
        std::process::exit(1);
    }
}
