//! Load benchmark: every `LoadMethod`, a full refresh (`replace_embeddings`), an upsert reload
//! and psycopg 3 into the seed's embeddings table, against the server's own `COPY … FROM
//! '<file>'` into the same table shape the library loads into; and a full streaming read
//! against a raw `COPY … TO STDOUT`. All on one server, in interleaved rounds.
//!
//! ```text
//! cargo run --release --example load_bench -- [--rows 100000] [--dim 384] [--rounds 3]
//!     [--methods server_copy_file,client_copy_file,server_copy_parallel,insert,multi_row_insert,copy,
//!                parallel_copy,copy_append,parallel_copy_append,psycopg_seed_schema,
//!                replace,replace_iter,upsert_reload,reload_rebuild,server_copy_out,read_stream]
//!     [--streams 1,2,4] [--format table|json] [--plot FILE.svg] [--crossover] [--citus]
//! ```
//!
//! `copy` and `parallel_copy` load the rows into a new type; `copy_append` and
//! `parallel_copy_append` load them as new keys into a type that holds as many rows already;
//! `upsert_reload` saves the same keys again with `batch_save_embeddings` (what a nightly
//! refresh does), `reload_rebuild` with `load_embeddings(…, Copy)`: both report
//! `bytes_per_row_after`, the type's storage right after the load, before any VACUUM.
//! `replace_iter` is `replace_embeddings_iter` from rows made as they are pulled (its
//! `peak MiB+` is what the refresh holds in memory).
//! `server_copy_parallel` is the physical limit of parallel streams: the server's own COPYs of
//! 1/N of the file each, at once, into an unindexed table of the type's shape, the key built
//! after. The parallel methods (`parallel_copy`, `parallel_copy_append`,
//! `server_copy_parallel`) run once per `--streams` value (default: the number of cores);
//! their lines carry it as `streams`.
//!
//! `--citus` runs every selected method (but `psycopg_seed_schema`) twice per round: on a
//! throwaway single server, then through the coordinator of a throwaway Citus cluster (two
//! workers, on this same machine) into the repository's distributed tables (row-based). The
//! cluster's lines are named `citus:<method>`; their ratio is to the cluster's own ceiling
//! (`citus:server_copy_file`: the coordinator's COPY of the same file into the same
//! distributed table), and `ratio_to_single_server` compares each with the same method on the
//! single server.
//!
//! Every round runs each selected method once, each in a fresh schema, with a CHECKPOINT
//! before each timed load (the ceiling's time includes creating the type's storage, as a
//! library load of a new type does); a method's `rows_per_s` is its median over the rounds (min and max
//! beside it), and its ratio is that median over the ceiling's median. `bytes_per_row` is the
//! table's size on disk after the load (heap, indexes and TOAST, summed over partitions) over
//! the rows it holds.
//!
//! `psycopg_seed_schema` runs `python3` on a small script (written to a temp file) that reads
//! the ceiling's binary COPY file and loads its rows with psycopg 3; when python3 with psycopg
//! is missing, or the server lacks the `uuid-ossp` extension the seed's table needs (created
//! if missing), the method is left out with a note on stderr.
//!
//! Uses `DATABASE_URL` when set (the server-side COPY then needs a local server and the
//! pg_read_server_files privilege), else a throwaway server from the local binaries.
//! `--crossover [--sizes 1,10,100]` times batches of those sizes by each method (of
//! `--methods`), fresh and as a reload, the median of 5 runs each, to place
//! `BATCH_COPY_CROSSOVER`.

use std::collections::HashMap;
use std::error::Error;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use pg_model_repo::throwaway::{
    database_url_or_start, process_cpu_seconds, ThrowawayCluster, ThrowawayServer,
};
use pg_model_repo::{Embedding, LoadMethod, ModelRepository, RepositoryConfig, VectorStorage};

const ENTITY_TYPE: &str = "bench";
const COLUMNS: &str = "entity_type, entity_id, embeddings, dimension";

/// What to run.
#[derive(Debug, Clone)]
pub struct Args {
    /// COPY streams of the parallel methods, each value a run of its own.
    pub streams: Vec<usize>,
    pub rows: usize,
    pub dim: usize,
    pub rounds: usize,
    pub methods: Vec<String>,
    pub json: bool,
    pub plot: Option<String>,
    pub crossover: bool,
    pub sizes: Vec<usize>,
    pub progress: bool,
    /// Also through a throwaway Citus cluster's coordinator (see the module doc).
    pub citus: bool,
}

/// Every measurement, in the order they are reported (the ceilings first). Within a round
/// they run in this order too, except that `upsert_reload` and the reads run right after the
/// `LoadMethod`s, on the table `copy` loaded.
pub const ALL: [&str; 16] = [
    "server_copy_file",
    "client_copy_file",
    "server_copy_parallel",
    "insert",
    "multi_row_insert",
    "copy",
    "parallel_copy",
    "copy_append",
    "parallel_copy_append",
    "psycopg_seed_schema",
    "replace",
    "replace_iter",
    "upsert_reload",
    "reload_rebuild",
    "server_copy_out",
    "read_stream",
];

/// The methods that run once per `--streams` value.
const PARALLEL: [&str; 3] = [
    "parallel_copy",
    "parallel_copy_append",
    "server_copy_parallel",
];

impl Default for Args {
    fn default() -> Self {
        Args {
            streams: vec![std::thread::available_parallelism().map_or(2, |n| n.get())],
            rows: 100_000,
            dim: 384,
            rounds: 3,
            methods: ALL.iter().map(|s| s.to_string()).collect(),
            json: false,
            plot: None,
            crossover: false,
            sizes: vec![1, 10, 100, 300, 1000, 3000, 10_000],
            progress: true,
            citus: false,
        }
    }
}

/// One line of the result table (and one object of `--format json`): the median over the
/// rounds, with the slowest and fastest round.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measurement {
    pub method: String,
    /// For a parallel method: its COPY streams.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streams: Option<usize>,
    pub rows: u64,
    /// The median round's seconds (`rows / rows_per_s`).
    pub seconds: f64,
    /// The median over the rounds.
    pub rows_per_s: f64,
    pub min_rows_per_s: f64,
    pub max_rows_per_s: f64,
    pub mb_per_s: f64,
    /// The median against the ceiling's median (`server_copy_file` for writes,
    /// `server_copy_out` for reads).
    pub ratio_to_ceiling: f64,
    /// Table + indexes + TOAST on disk after the load, over the rows stored (the median over
    /// the rounds); `null` for reads.
    pub bytes_per_row: Option<f64>,
    /// For a reload: the type's storage right after it (heap, indexes, TOAST over the rows),
    /// before any VACUUM (the median over the rounds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_row_after: Option<f64>,
    /// For a `citus:` line: its median against the same method's on the single server.
    pub ratio_to_single_server: Option<f64>,
    /// For a `citus:` load: CPU microseconds per row the coordinator spent (median).
    pub coordinator_cpu_us_per_row: Option<f64>,
    /// For a `citus:` load: CPU microseconds per row all workers together spent (median).
    pub workers_cpu_us_per_row: Option<f64>,
    /// For a `citus:` load: CPU microseconds per row this client process spent (median).
    pub client_cpu_us_per_row: Option<f64>,
    #[serde(skip)]
    pub peak_rss_over_input_mib: Option<f64>,
}

/// One method's result in one round.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rows: u64,
    seconds: f64,
    bytes_per_row: Option<f64>,
    peak_rss_over_input_mib: Option<f64>,
    /// CPU seconds the cluster's coordinator and its workers spent on the load.
    cluster_cpu: Option<(f64, f64)>,
    /// CPU seconds this process (the client) spent on it, where measured with the cluster's.
    client_cpu: Option<f64>,
}

impl Sample {
    fn timed(rows: u64, elapsed: Duration) -> Sample {
        Sample {
            rows,
            seconds: elapsed.as_secs_f64(),
            bytes_per_row: None,
            peak_rss_over_input_mib: None,
            cluster_cpu: None,
            client_cpu: None,
        }
    }
}

/// Reads the CPU seconds a Citus cluster's coordinator and workers have used so far.
type CpuProbe<'a> = &'a dyn Fn() -> (f64, f64);

/// `f`'s sample with the cluster CPU it cost, when there is a cluster to ask.
fn with_cpu(
    probe: Option<CpuProbe<'_>>,
    f: impl FnOnce() -> Result<Sample, Box<dyn Error>>,
) -> Result<Sample, Box<dyn Error>> {
    let before = probe.map(|p| p());
    let own = process_cpu_seconds(std::process::id(), false);
    let mut sample = f()?;
    if let (Some(p), Some((c0, w0))) = (probe, before) {
        let (c1, w1) = p();
        sample.cluster_cpu = Some((c1 - c0, w1 - w0));
        sample.client_cpu = Some(process_cpu_seconds(std::process::id(), false) - own);
    }
    Ok(sample)
}

pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut out = Args::default();
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--rows" => {
                out.rows = value("--rows")?
                    .parse()
                    .map_err(|e| format!("--rows: {e}"))?
            }
            "--dim" => out.dim = value("--dim")?.parse().map_err(|e| format!("--dim: {e}"))?,
            "--rounds" => {
                out.rounds = value("--rounds")?
                    .parse()
                    .map_err(|e| format!("--rounds: {e}"))?
            }
            "--methods" => {
                let list = value("--methods")?;
                out.methods = list.split(',').map(|s| s.trim().to_owned()).collect();
                if let Some(bad) = out.methods.iter().find(|m| !ALL.contains(&m.as_str())) {
                    return Err(format!("unknown method {bad:?}; known: {}", ALL.join(",")));
                }
            }
            "--format" => match value("--format")?.as_str() {
                "json" => out.json = true,
                "table" => out.json = false,
                other => return Err(format!("--format json|table, not {other:?}")),
            },
            "--plot" => out.plot = Some(value("--plot")?),
            "--crossover" => out.crossover = true,
            "--sizes" => {
                out.sizes = value("--sizes")?
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|e| format!("--sizes: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--no-progress" => out.progress = false,
            "--streams" => {
                out.streams = value("--streams")?
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|e| format!("--streams: {e}")))
                    .collect::<Result<_, _>>()?;
                if out.streams.contains(&0) {
                    return Err("--streams values must be positive".into());
                }
            }
            "--citus" => out.citus = true,
            // Passed by `cargo bench`.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if out.rows == 0 || out.dim == 0 || out.rounds == 0 {
        return Err("--rows, --dim and --rounds must be positive".into());
    }
    Ok(out)
}

/// `rows` vectors of the bench type with ids `entity-000000000`…, from a seeded generator.
fn make_batch(rows: usize, dim: usize, seed: u64) -> Vec<Embedding> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..rows)
        .map(|i| {
            let vector = (0..dim).map(|_| rng.f32() * 2.0 - 1.0).collect();
            Embedding::new(ENTITY_TYPE, format!("entity-{i:09}"), vector)
        })
        .collect()
}

fn schema_name(tag: &str) -> String {
    format!("bench_{tag}_{}", std::process::id())
}

/// A fresh schema for one measurement.
fn open(url: &str, tag: &str) -> Result<ModelRepository, Box<dyn Error>> {
    open_streams(url, tag, None)
}

/// A fresh schema whose parallel loads run `streams` COPY streams (the library's default
/// without).
fn open_streams(
    url: &str,
    tag: &str,
    streams: Option<usize>,
) -> Result<ModelRepository, Box<dyn Error>> {
    let schema = schema_name(tag);
    let mut admin = postgres::Client::connect(url, postgres::NoTls)?;
    admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
    // BYTEA: the ceiling's COPY file holds the vectors as bytes, in the library's BYTEA
    // layout (where pgvector is installed, a new schema would use its type).
    let config = RepositoryConfig::new(url)
        .schema(&schema)
        .pool_size(4)
        .max_overflow(8)
        .reaper_interval(None)
        .vector_storage(VectorStorage::Bytea);
    let config = match streams {
        Some(n) => config.load_streams(n as u32),
        None => config,
    };
    Ok(ModelRepository::open(config)?)
}

fn drop_schema(url: &str, repo: ModelRepository) -> Result<(), Box<dyn Error>> {
    let schema = repo.config().schema_name().to_owned();
    repo.close();
    let mut admin = postgres::Client::connect(url, postgres::NoTls)?;
    admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
    Ok(())
}

/// A checkpoint before each timed load, so one load does not pay for the last one's dirty
/// pages (ignored where not permitted).
fn settle(url: &str) {
    if let Ok(mut c) = postgres::Client::connect(url, postgres::NoTls) {
        let _ = c.batch_execute("CHECKPOINT");
    }
}

/// Summed over the partition tree; a table outside one (the seed's) has an empty tree.
const TABLE_BYTES: &str = "SELECT coalesce( \
        (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree(to_regclass($1))), \
        pg_total_relation_size(to_regclass($1)))::float8";

/// On-disk bytes of `table` (heap, indexes, TOAST, summed over its partitions, if any) over
/// the rows it holds.
fn bytes_per_row(url: &str, table: &str) -> Result<f64, Box<dyn Error>> {
    let mut c = postgres::Client::connect(url, postgres::NoTls)?;
    let bytes: f64 = c.query_one(TABLE_BYTES, &[&table])?.try_get(0)?;
    let rows: i64 = c
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])?
        .try_get(0)?;
    Ok(bytes / rows.max(1) as f64)
}

/// The repository's own account of its table's size (summed over a cluster's shards).
fn repo_bytes_per_row(repo: &ModelRepository) -> Result<f64, Box<dyn Error>> {
    let stats = repo.get_embeddings_stats()?;
    Ok(stats.table_bytes as f64 / stats.total_embeddings.max(1) as f64)
}

fn bar(args: &Args, label: &str, total: u64) -> ProgressBar {
    if !args.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:>19} [{bar:40}] {pos}/{len} rows {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(label.to_owned());
    bar
}

/// Peak resident memory of this process (VmHWM), in bytes.
fn peak_rss() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

fn current_rss() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets VmHWM to the current RSS (Linux: `5` to clear_refs), so each load's peak is its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The binary COPY file of the batch, as the library would send it, written where the
/// server's user can read it; deleted on drop.
struct CopyFile {
    path: String,
}

impl CopyFile {
    fn write(batch: &[Embedding]) -> Result<CopyFile, Box<dyn Error>> {
        Self::write_to(
            batch,
            format!("/tmp/pg_model_repo_bench_{}.copy", std::process::id()),
        )
    }

    /// The batch in `n` files of about equal parts, for `n` server-side COPYs at once.
    fn write_parts(batch: &[Embedding], n: usize) -> Result<Vec<CopyFile>, Box<dyn Error>> {
        batch
            .chunks(batch.len().div_ceil(n))
            .enumerate()
            .map(|(i, part)| {
                Self::write_to(
                    part,
                    format!(
                        "/tmp/pg_model_repo_bench_{}_{n}_{i}.copy",
                        std::process::id()
                    ),
                )
            })
            .collect()
    }

    fn write_to(batch: &[Embedding], path: String) -> Result<CopyFile, Box<dyn Error>> {
        let file = std::fs::File::create(&path)?;
        let copy_file = CopyFile { path };
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0")?;
        for e in batch {
            out.write_all(&4i16.to_be_bytes())?;
            for text in [&e.entity_type, &e.entity_id] {
                out.write_all(&(text.len() as i32).to_be_bytes())?;
                out.write_all(text.as_bytes())?;
            }
            out.write_all(&((4 * e.vector.len()) as i32).to_be_bytes())?;
            for v in &e.vector {
                out.write_all(&v.to_le_bytes())?;
            }
            out.write_all(&4i32.to_be_bytes())?;
            out.write_all(&(e.vector.len() as i32).to_be_bytes())?;
        }
        out.write_all(&(-1i16).to_be_bytes())?;
        out.flush()?;
        drop(out);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&copy_file.path, std::fs::Permissions::from_mode(0o644))?;
        }
        Ok(copy_file)
    }
}

impl Drop for CopyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The ceiling: the server's own COPY from the file into the table the library loads into,
/// in a fresh repository schema: the type is registered (its empty partition with its CHECKs
/// and key index), then the file is copied into the partitioned `embeddings`, whose rows
/// route into that partition. Both are timed, as a library load of a new type does both.
fn server_copy_file(
    url: &str,
    path: &str,
    dim: usize,
    cpu: Option<CpuProbe<'_>>,
) -> Result<Sample, Box<dyn Error>> {
    let sql = format!(
        "COPY embeddings ({COLUMNS}) FROM '{}' (FORMAT binary)",
        path.replace('\'', "''")
    );
    into_a_new_type(url, "ceiling", dim, cpu, |c| Ok(c.execute(&sql, &[])?))
}

/// The ceiling of any client: the ceiling's file, read into memory before the clock starts,
/// sent as it is by one `COPY … FROM STDIN` in 1 MiB writes into the same table as the
/// ceiling (no encoding, no check). Its ratio to `server_copy_file` is what carrying the rows
/// over a connection costs on this machine.
fn client_copy_file(
    url: &str,
    path: &str,
    dim: usize,
    cpu: Option<CpuProbe<'_>>,
) -> Result<Sample, Box<dyn Error>> {
    let bytes = std::fs::read(path)?;
    into_a_new_type(url, "client_ceiling", dim, cpu, |c| {
        let mut copy = c.copy_in(&format!(
            "COPY embeddings ({COLUMNS}) FROM STDIN (FORMAT binary)"
        ))?;
        for piece in bytes.chunks(1 << 20) {
            copy.write_all(piece)?;
        }
        Ok(copy.finish()?)
    })
}

/// Times, in a fresh repository schema, the registration of the bench's type and then
/// `copy` (which returns the rows it stored) on a plain session of its own.
fn into_a_new_type(
    url: &str,
    name: &str,
    dim: usize,
    cpu: Option<CpuProbe<'_>>,
    copy: impl FnOnce(&mut postgres::Client) -> Result<u64, Box<dyn Error>>,
) -> Result<Sample, Box<dyn Error>> {
    let repo = open(url, name)?;
    let mut c = postgres::Client::connect(url, postgres::NoTls)?;
    c.batch_execute(&format!(
        "SET search_path TO {}",
        repo.config().schema_name()
    ))?;
    settle(url);
    let mut sample = with_cpu(cpu, || {
        let started = Instant::now();
        c.query_one(
            "SELECT * FROM embedding_type_ensure($1, $2)",
            &[&ENTITY_TYPE, &(dim as i32)],
        )?;
        let registered = started.elapsed();
        let rows = copy(&mut c)?;
        let elapsed = started.elapsed();
        eprintln!("    (the type's storage took {registered:?} of {elapsed:?})");
        Ok(Sample::timed(rows, elapsed))
    })?;
    drop(c);
    sample.bytes_per_row = Some(repo_bytes_per_row(&repo)?);
    drop_schema(url, repo)?;
    Ok(sample)
}

/// The physical limit of parallel streams: `parts.len()` sessions at once, each the server's
/// own COPY of one part file into one unindexed table of the type's shape (distributed
/// first, through a Citus coordinator), then the key. Timed from the table's creation.
fn server_copy_parallel(
    url: &str,
    parts: &[CopyFile],
    citus: bool,
) -> Result<Sample, Box<dyn Error>> {
    let repo = open(url, "ceiling_parallel")?;
    let schema = repo.config().schema_name().to_owned();
    let connect = || -> Result<postgres::Client, Box<dyn Error>> {
        let mut c = postgres::Client::connect(url, postgres::NoTls)?;
        c.batch_execute(&format!("SET search_path TO {schema}"))?;
        Ok(c)
    };
    let mut c = connect()?;
    let mut sessions: Vec<postgres::Client> = (0..parts.len())
        .map(|_| connect())
        .collect::<Result<_, _>>()?;
    settle(url);
    let started = Instant::now();
    c.batch_execute(
        "CREATE TABLE unindexed (LIKE embeddings INCLUDING DEFAULTS) WITH (fillfactor = 100)",
    )?;
    if citus {
        c.batch_execute(
            "SELECT create_distributed_table('unindexed', 'entity_id', colocate_with => 'embeddings')",
        )?;
    }
    let rows: u64 = std::thread::scope(|scope| {
        let copies: Vec<_> = sessions
            .iter_mut()
            .zip(parts)
            .map(|(session, part)| {
                scope.spawn(move || {
                    session.execute(
                        &format!(
                            "COPY unindexed ({COLUMNS}) FROM '{}' (FORMAT binary)",
                            part.path.replace('\'', "''")
                        ),
                        &[],
                    )
                })
            })
            .collect();
        copies
            .into_iter()
            .map(|h| h.join().expect("a COPY thread"))
            .sum::<Result<u64, postgres::Error>>()
    })?;
    c.batch_execute("ALTER TABLE unindexed ADD PRIMARY KEY (entity_type, entity_id)")?;
    let sample = Sample::timed(rows, started.elapsed());
    drop(c);
    drop(sessions);
    drop_schema(url, repo)?;
    Ok(sample)
}

/// The seed's embeddings table (/work/shared/seed DDL, unchanged).
const SEED_EMBEDDINGS: &str = "CREATE TABLE embeddings (
    id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    entity_type VARCHAR(50) NOT NULL,
    entity_id VARCHAR(255) NOT NULL,
    embeddings BYTEA NOT NULL,
    dimension INTEGER NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT uq_entity_type_id UNIQUE (entity_type, entity_id)
)";

/// psycopg 3's idiomatic binary COPY, one `write_row` per record, one transaction. Reads the
/// rows from the ceiling's binary COPY file before the clock starts (as bytes for the vector,
/// str for the keys: what a Python pipeline hands psycopg), then times the COPY and the
/// commit. Prints `{"rows": …, "seconds": …}`.
const PSYCOPG_SCRIPT: &str = r#"
import json, struct, sys, time
import psycopg

url, table, path = sys.argv[1:4]
i2, i4 = struct.Struct(">h").unpack_from, struct.Struct(">i").unpack_from
with open(path, "rb") as f:
    data = f.read()
pos, rows = 19, []  # past the signature, the flags and the header extension length
while True:
    (n,) = i2(data, pos)
    pos += 2
    if n == -1:
        break
    fields = []
    for _ in range(n):
        (size,) = i4(data, pos)
        fields.append(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    entity_type, entity_id, vector, dimension = fields
    rows.append((entity_type.decode(), entity_id.decode(), vector, i4(dimension, 0)[0]))
del data

with psycopg.connect(url) as conn:
    with conn.cursor() as cur:
        started = time.perf_counter()
        with cur.copy(
            f"COPY {table} (entity_type, entity_id, embeddings, dimension) "
            "FROM STDIN (FORMAT binary)"
        ) as copy:
            copy.set_types(["varchar", "varchar", "bytea", "int4"])
            for row in rows:
                copy.write_row(row)
        conn.commit()
        seconds = time.perf_counter() - started
print(json.dumps({"rows": len(rows), "seconds": seconds}))
"#;

/// Whether `python3` can import psycopg (3), and the server can give the seed's table its
/// `uuid_generate_v4()`; says why not on stderr.
fn psycopg_ready(url: &str) -> bool {
    let python = Command::new("python3")
        .args(["-c", "import psycopg"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !python.is_ok_and(|s| s.success()) {
        eprintln!(
            "psycopg_seed_schema left out: python3 with psycopg 3 is not available \
             (pip install \"psycopg[binary]\")"
        );
        return false;
    }
    let extension = postgres::Client::connect(url, postgres::NoTls)
        .and_then(|mut c| c.batch_execute("CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\""));
    if let Err(e) = extension {
        eprintln!("psycopg_seed_schema left out: the seed's table needs uuid-ossp ({e})");
        return false;
    }
    true
}

/// psycopg 3 into the seed's exact embeddings table, in a fresh schema.
fn psycopg_seed_schema(url: &str, path: &str) -> Result<Sample, Box<dyn Error>> {
    let schema = schema_name("psycopg");
    let table = format!("{schema}.embeddings");
    let mut admin = postgres::Client::connect(url, postgres::NoTls)?;
    admin.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; \
         SET search_path TO {schema}, public; {SEED_EMBEDDINGS}"
    ))?;
    let mut script = tempfile::Builder::new()
        .prefix("load_bench_psycopg_")
        .suffix(".py")
        .tempfile()?;
    script.write_all(PSYCOPG_SCRIPT.as_bytes())?;
    script.flush()?;
    settle(url);
    let output = Command::new("python3")
        .arg(script.path())
        .args([url, &table, path])
        .stderr(Stdio::inherit())
        .output()?;
    if !output.status.success() {
        return Err(format!("the psycopg script failed ({})", output.status).into());
    }
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let (Some(rows), Some(seconds)) = (answer["rows"].as_u64(), answer["seconds"].as_f64()) else {
        return Err(format!("the psycopg script answered {answer}").into());
    };
    let sample = Sample {
        rows,
        seconds,
        bytes_per_row: Some(bytes_per_row(url, &table)?),
        peak_rss_over_input_mib: None,
        cluster_cpu: None,
        client_cpu: None,
    };
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))?;
    Ok(sample)
}

/// `replace_embeddings` of a type that holds as many rows already (loaded untimed by `Copy`),
/// with other vectors for the same ids.
fn replace(
    url: &str,
    args: &Args,
    old: &[Embedding],
    new: &[Embedding],
) -> Result<Sample, Box<dyn Error>> {
    let repo = open(url, "replace")?;
    repo.load_embeddings(old, LoadMethod::Copy)?;
    settle(url);
    let pb = bar(args, "replace", new.len() as u64);
    let report = repo
        .replace_embeddings_with_progress(ENTITY_TYPE, new, &mut |done, _| pb.set_position(done))?;
    pb.finish_and_clear();
    let mut sample = Sample::timed(report.rows, report.elapsed);
    sample.bytes_per_row = Some(repo_bytes_per_row(&repo)?);
    drop_schema(url, repo)?;
    Ok(sample)
}

/// A raw `COPY … TO STDOUT (FORMAT binary)` of the type's rows, read and thrown away: the
/// ceiling of a streaming read.
fn server_copy_out(url: &str, schema: &str) -> Result<(u64, Duration), Box<dyn Error>> {
    let mut c = postgres::Client::connect(url, postgres::NoTls)?;
    c.batch_execute(&format!("SET search_path TO {schema}"))?;
    let started = Instant::now();
    let mut reader = c.copy_out(
        "COPY (SELECT entity_id, embeddings FROM embeddings WHERE entity_type = 'bench') \
         TO STDOUT (FORMAT binary)",
    )?;
    let bytes = std::io::copy(&mut reader, &mut std::io::sink())?;
    Ok((bytes, started.elapsed()))
}

fn measurement(method: &str, rows: u64, dim: usize, seconds: f64) -> Measurement {
    let rows_per_s = rows as f64 / seconds;
    // A parallel method's samples are kept as `method@streams`.
    let (method, streams) = match method.split_once('@') {
        Some((m, n)) => (m, n.parse().ok()),
        None => (method, None),
    };
    Measurement {
        streams,
        bytes_per_row_after: None,
        method: method.to_owned(),
        rows,
        seconds,
        rows_per_s,
        min_rows_per_s: rows_per_s,
        max_rows_per_s: rows_per_s,
        mb_per_s: (rows * 4 * dim as u64) as f64 / seconds / 1e6,
        ratio_to_ceiling: f64::NAN,
        bytes_per_row: None,
        ratio_to_single_server: None,
        coordinator_cpu_us_per_row: None,
        workers_cpu_us_per_row: None,
        client_cpu_us_per_row: None,
        peak_rss_over_input_mib: None,
    }
}

/// The median of sorted values (the mean of the middle two for an even count).
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// One method's rounds as one line: median, min and max rows/s, the median bytes per row,
/// the highest peak RSS.
fn summarize(method: &str, dim: usize, samples: &[Sample]) -> Measurement {
    let rows = samples[0].rows;
    let mut rates: Vec<f64> = samples.iter().map(|s| s.rows as f64 / s.seconds).collect();
    rates.sort_by(f64::total_cmp);
    let rate = median(&rates);
    let mut m = measurement(method, rows, dim, rows as f64 / rate);
    m.min_rows_per_s = rates[0];
    m.max_rows_per_s = rates[rates.len() - 1];
    let mut sizes: Vec<f64> = samples.iter().filter_map(|s| s.bytes_per_row).collect();
    sizes.sort_by(f64::total_cmp);
    m.bytes_per_row = (!sizes.is_empty()).then(|| median(&sizes));
    if method.ends_with("reload") || method.ends_with("reload_rebuild") {
        m.bytes_per_row_after = m.bytes_per_row;
    }
    m.peak_rss_over_input_mib = samples
        .iter()
        .filter_map(|s| s.peak_rss_over_input_mib)
        .reduce(f64::max);
    let per_row_us = |pick: fn((f64, f64)) -> f64| {
        let mut v: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.cluster_cpu.map(|c| pick(c) * 1e6 / s.rows as f64))
            .collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| median(&v))
    };
    m.coordinator_cpu_us_per_row = per_row_us(|c| c.0);
    m.workers_cpu_us_per_row = per_row_us(|c| c.1);
    let mut client: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.client_cpu.map(|c| c * 1e6 / s.rows as f64))
        .collect();
    client.sort_by(f64::total_cmp);
    m.client_cpu_us_per_row = (!client.is_empty()).then(|| median(&client));
    m
}

/// What every round works on.
struct Inputs<'a> {
    url: String,
    /// On the cluster's rounds: its CPU probe.
    cpu: Option<CpuProbe<'a>>,
    methods: Vec<String>,
    batch: Vec<Embedding>,
    /// Other vectors for the same ids: what `replace` replaces `batch` with.
    replacement: Vec<Embedding>,
    /// Rows with other keys: what the append methods find in the type before they load.
    base: Vec<Embedding>,
    copy_file: Option<CopyFile>,
    /// The batch in parts, per stream count, for `server_copy_parallel`.
    part_files: Vec<(usize, Vec<CopyFile>)>,
    streams: Vec<usize>,
}

impl Inputs<'_> {
    fn wants(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method)
    }
}

/// Runs the benchmark and returns its measurements (write methods relative to
/// `server_copy_file`, reads relative to `server_copy_out`, each on its own target).
pub fn run(args: &Args) -> Result<Vec<Measurement>, Box<dyn Error>> {
    let (url, _server) = if args.citus {
        // Both targets are throwaway servers on this machine, so they compare like for like.
        let server = ThrowawayServer::start(&[])?;
        (server.url(), Some(server))
    } else {
        database_url_or_start(&[])?
    };
    if args.crossover {
        return crossover(&url, args);
    }
    let cluster = if args.citus {
        eprintln!("starting a throwaway Citus cluster (coordinator and two workers)");
        Some(ThrowawayCluster::start(2)?)
    } else {
        None
    };
    let mut methods = args.methods.clone();
    if methods.iter().any(|m| m == "psycopg_seed_schema") && !psycopg_ready(&url) {
        methods.retain(|m| m != "psycopg_seed_schema");
    }
    eprintln!("generating {} vectors of dimension {}", args.rows, args.dim);
    let wants = |m: &str| methods.iter().any(|x| x == m);
    let batch = make_batch(args.rows, args.dim, 42);
    let replacement = if wants("replace") {
        make_batch(args.rows, args.dim, 43)
    } else {
        Vec::new()
    };
    let copy_file =
        if wants("server_copy_file") || wants("client_copy_file") || wants("psycopg_seed_schema") {
            Some(CopyFile::write(&batch)?)
        } else {
            None
        };
    let part_files = if wants("server_copy_parallel") {
        args.streams
            .iter()
            .map(|&n| Ok((n, CopyFile::write_parts(&batch, n)?)))
            .collect::<Result<_, Box<dyn Error>>>()?
    } else {
        Vec::new()
    };
    let base: Vec<Embedding> = if wants("copy_append") || wants("parallel_copy_append") {
        make_batch(args.rows, args.dim, 44)
            .into_iter()
            .map(|e| Embedding::new(ENTITY_TYPE, format!("base-{}", e.entity_id), e.vector))
            .collect()
    } else {
        Vec::new()
    };
    let probe = cluster.as_ref().map(|c| {
        move || {
            let coordinator = c.coordinator().cpu_seconds().unwrap_or(f64::NAN);
            let workers = c
                .workers()
                .iter()
                .map(|w| w.cpu_seconds().unwrap_or(f64::NAN));
            (coordinator, workers.sum())
        }
    });
    let mut inputs = Inputs {
        url,
        cpu: None,
        methods,
        batch,
        replacement,
        base,
        copy_file,
        part_files,
        streams: args.streams.clone(),
    };
    // The targets, as (url, prefix of their lines): psycopg into the seed's table only on
    // the single server (the seed's table is not distributed).
    let mut targets = vec![(inputs.url.clone(), "")];
    if let Some(cluster) = &cluster {
        targets.push((cluster.url(), "citus:"));
    }
    let single_methods = inputs.methods.clone();
    let mut samples: HashMap<String, Vec<Sample>> = HashMap::new();
    for round in 1..=args.rounds {
        eprintln!("round {round} of {}", args.rounds);
        for (url, prefix) in &targets {
            inputs.url = url.clone();
            inputs.cpu = match (prefix.is_empty(), &probe) {
                (false, Some(p)) => Some(p as CpuProbe<'_>),
                _ => None,
            };
            inputs.methods = single_methods.clone();
            if !prefix.is_empty() {
                inputs.methods.retain(|m| m != "psycopg_seed_schema");
            }
            run_round(args, &inputs, &mut |method: String, sample| {
                // Each round's figures, to judge the noise (stdout carries the summary).
                eprintln!(
                    "  {prefix}{method:<20} {:>7.3} s {:>9.0} rows/s",
                    sample.seconds,
                    sample.rows as f64 / sample.seconds
                );
                samples
                    .entry(format!("{prefix}{method}"))
                    .or_default()
                    .push(sample)
            })?;
        }
    }
    let mut results: Vec<Measurement> = Vec::new();
    for (_, prefix) in &targets {
        let mut these: Vec<Measurement> = ALL
            .iter()
            .flat_map(|m| {
                let names: Vec<String> = if PARALLEL.contains(m) {
                    args.streams
                        .iter()
                        .map(|n| format!("{prefix}{m}@{n}"))
                        .collect()
                } else {
                    vec![format!("{prefix}{m}")]
                };
                names
            })
            .filter_map(|name| samples.get(&name).map(|s| summarize(&name, args.dim, s)))
            .collect();
        set_ratios(&mut these, prefix);
        results.extend(these);
    }
    set_single_server_ratios(&mut results);
    Ok(results)
}

/// Each `citus:` line against the same method on the single server.
fn set_single_server_ratios(results: &mut [Measurement]) {
    let single: HashMap<(String, Option<usize>), f64> = results
        .iter()
        .filter(|m| !m.method.starts_with("citus:"))
        .map(|m| ((m.method.clone(), m.streams), m.rows_per_s))
        .collect();
    for m in results.iter_mut() {
        let key = m
            .method
            .strip_prefix("citus:")
            .map(|b| (b.to_owned(), m.streams));
        if let Some(base) = key.and_then(|k| single.get(&k)) {
            m.ratio_to_single_server = Some(m.rows_per_s / base);
        }
    }
}

/// Every selected method once.
fn run_round(
    args: &Args,
    inputs: &Inputs,
    record: &mut dyn FnMut(String, Sample),
) -> Result<(), Box<dyn Error>> {
    let url = inputs.url.as_str();
    let batch = &inputs.batch;
    let rows = batch.len() as u64;
    let copy_path = inputs.copy_file.as_ref().map(|f| f.path.as_str());

    if let (true, Some(path)) = (inputs.wants("server_copy_file"), copy_path) {
        record(
            "server_copy_file".to_owned(),
            server_copy_file(url, path, args.dim, inputs.cpu)?,
        );
    }

    if let (true, Some(path)) = (inputs.wants("client_copy_file"), copy_path) {
        record(
            "client_copy_file".to_owned(),
            client_copy_file(url, path, args.dim, inputs.cpu)?,
        );
    }

    for (n, parts) in &inputs.part_files {
        let citus = inputs.cpu.is_some();
        let mut sample = with_cpu(inputs.cpu, || server_copy_parallel(url, parts, citus))?;
        sample.bytes_per_row = None;
        record_as(record, "server_copy_parallel", Some(*n), sample);
    }

    // The repository whose table then serves the reload and the reads.
    let mut kept: Option<ModelRepository> = None;
    let runs = LoadMethod::ALL.into_iter().flat_map(|method| {
        let streams: Vec<Option<usize>> = if method == LoadMethod::ParallelCopy {
            inputs.streams.iter().map(|&n| Some(n)).collect()
        } else {
            vec![None]
        };
        streams.into_iter().map(move |n| (method, n))
    });
    for (method, streams) in runs {
        if !inputs.wants(method.as_str()) {
            continue;
        }
        let repo = open_streams(url, method.as_str(), streams)?;
        settle(url);
        let input = current_rss();
        reset_peak_rss();
        let pb = bar(args, method.as_str(), rows);
        let mut sample = with_cpu(inputs.cpu, || {
            let report = repo.load_embeddings_with_progress(batch, method, &mut |done, _| {
                pb.set_position(done)
            })?;
            Ok(Sample::timed(rows, report.elapsed))
        })?;
        sample.peak_rss_over_input_mib = match (peak_rss(), input) {
            (Some(peak), Some(input)) => Some(peak.saturating_sub(input) as f64 / 1048576.0),
            _ => None,
        };
        sample.bytes_per_row = Some(repo_bytes_per_row(&repo)?);
        record_as(record, method.as_str(), streams, sample);
        if method == LoadMethod::Copy || kept.is_none() {
            if let Some(old) = kept.replace(repo) {
                drop_schema(url, old)?;
            }
        } else {
            drop_schema(url, repo)?;
        }
    }

    if [
        "upsert_reload",
        "reload_rebuild",
        "read_stream",
        "server_copy_out",
    ]
    .iter()
    .any(|m| inputs.wants(m))
    {
        let repo = match kept.take() {
            Some(repo) => repo,
            None => {
                let repo = open(url, "reads")?;
                repo.load_embeddings(batch, LoadMethod::Copy)?;
                repo
            }
        };
        reload_and_read(url, inputs, &repo, record)?;
        drop_schema(url, repo)?;
    }
    if let Some(repo) = kept {
        drop_schema(url, repo)?;
    }

    for (name, method) in [
        ("copy_append", LoadMethod::Copy),
        ("parallel_copy_append", LoadMethod::ParallelCopy),
    ] {
        if !inputs.wants(name) {
            continue;
        }
        let streams: Vec<Option<usize>> = match method {
            LoadMethod::ParallelCopy => inputs.streams.iter().map(|&n| Some(n)).collect(),
            _ => vec![None],
        };
        for n in streams {
            let sample = append(url, inputs, method, n)?;
            record_as(record, name, n, sample);
        }
    }

    if let (true, Some(path)) = (inputs.wants("psycopg_seed_schema"), copy_path) {
        record(
            "psycopg_seed_schema".to_owned(),
            psycopg_seed_schema(url, path)?,
        );
    }
    if inputs.wants("replace") {
        record(
            "replace".to_owned(),
            replace(url, args, batch, &inputs.replacement)?,
        );
    }
    if inputs.wants("replace_iter") {
        record("replace_iter".to_owned(), replace_iter(url, args)?);
    }
    Ok(())
}

/// `replace_embeddings_iter` of rows made as they are pulled, none held by the caller: its
/// peak RSS over the process's before it is what the refresh itself holds.
fn replace_iter(url: &str, args: &Args) -> Result<Sample, Box<dyn Error>> {
    let repo = open(url, "replace_iter")?;
    settle(url);
    let dim = args.dim;
    let mut rows = (0..args.rows).map(|i| {
        let vector = (0..dim)
            .map(|j| ((i * 31 + j) % 1000) as f32 / 1000.0)
            .collect();
        Embedding::new(ENTITY_TYPE, format!("e{i}"), vector)
    });
    let input = current_rss();
    reset_peak_rss();
    let report = repo.replace_embeddings_iter(ENTITY_TYPE, &mut rows)?;
    let mut sample = Sample::timed(report.rows, report.elapsed);
    sample.peak_rss_over_input_mib = match (peak_rss(), input) {
        (Some(peak), Some(input)) => Some(peak.saturating_sub(input) as f64 / 1048576.0),
        _ => None,
    };
    sample.bytes_per_row = Some(repo_bytes_per_row(&repo)?);
    drop_schema(url, repo)?;
    Ok(sample)
}

/// Records a sample under `method`, or `method@streams` for a parallel one.
fn record_as(
    record: &mut dyn FnMut(String, Sample),
    method: &str,
    streams: Option<usize>,
    sample: Sample,
) {
    match streams {
        Some(n) => record(format!("{method}@{n}"), sample),
        None => record(method.to_owned(), sample),
    }
}

/// The batch's rows as new keys into a type that holds as many rows already (loaded untimed by
/// `Copy`).
fn append(
    url: &str,
    inputs: &Inputs,
    method: LoadMethod,
    streams: Option<usize>,
) -> Result<Sample, Box<dyn Error>> {
    let repo = open_streams(url, "append", streams)?;
    repo.load_embeddings(&inputs.base, LoadMethod::Copy)?;
    settle(url);
    let mut sample = with_cpu(inputs.cpu, || {
        let report = repo.load_embeddings(&inputs.batch, method)?;
        Ok(Sample::timed(report.rows, report.elapsed))
    })?;
    sample.bytes_per_row = Some(repo_bytes_per_row(&repo)?);
    drop_schema(url, repo)?;
    Ok(sample)
}

/// `upsert_reload`, `reload_rebuild`, `server_copy_out` and `read_stream` on a table holding
/// the batch (each reload writes the same keys again).
fn reload_and_read(
    url: &str,
    inputs: &Inputs,
    repo: &ModelRepository,
    record: &mut dyn FnMut(String, Sample),
) -> Result<(), Box<dyn Error>> {
    let schema = repo.config().schema_name().to_owned();
    if inputs.wants("reload_rebuild") {
        settle(url);
        let report = repo.load_embeddings(&inputs.batch, LoadMethod::Copy)?;
        let mut sample = Sample::timed(report.rows, report.elapsed);
        sample.bytes_per_row = Some(repo_bytes_per_row(repo)?);
        record("reload_rebuild".to_owned(), sample);
    }
    if inputs.wants("upsert_reload") {
        settle(url);
        // What a user gets: batch_save_embeddings picks the path (no progress callback).
        let report = repo.batch_save_embeddings(&inputs.batch)?;
        let mut sample = Sample::timed(report.rows, report.elapsed);
        // Measured before the VACUUM: the dead versions the reload leaves are its cost too.
        sample.bytes_per_row = Some(repo_bytes_per_row(repo)?);
        record("upsert_reload".to_owned(), sample);
        // The reads below should not pay for the reload's dead tuples.
        let mut c = postgres::Client::connect(url, postgres::NoTls)?;
        c.batch_execute(&format!("VACUUM ANALYZE {schema}.embeddings"))?;
    }
    if inputs.wants("server_copy_out") {
        let (_, elapsed) = server_copy_out(url, &schema)?;
        record(
            "server_copy_out".to_owned(),
            Sample::timed(inputs.batch.len() as u64, elapsed),
        );
    }
    if inputs.wants("read_stream") {
        let started = Instant::now();
        let mut checksum = 0f64;
        let n = repo.for_each_embedding(ENTITY_TYPE, &mut |_, v| checksum += f64::from(v[0]))?;
        let elapsed = started.elapsed();
        std::hint::black_box(checksum);
        record("read_stream".to_owned(), Sample::timed(n, elapsed));
    }
    Ok(())
}

fn set_ratios(results: &mut [Measurement], prefix: &str) {
    let rate = |name: &str| {
        let name = format!("{prefix}{name}");
        results
            .iter()
            .find(|m| m.method == name)
            .map(|m| m.rows_per_s)
    };
    let (write_ceiling, read_ceiling) = (rate("server_copy_file"), rate("server_copy_out"));
    for m in results.iter_mut() {
        let method = m.method.strip_prefix(prefix).unwrap_or(&m.method);
        let ceiling = if method == "read_stream" || method == "server_copy_out" {
            read_ceiling
        } else {
            write_ceiling
        };
        m.ratio_to_ceiling = ceiling.map_or(f64::NAN, |c| m.rows_per_s / c);
    }
}

/// Small batches by each method, fresh (a new type) and as a reload (same keys): the median
/// of a few runs each, to place `BATCH_COPY_CROSSOVER`.
fn crossover(url: &str, args: &Args) -> Result<Vec<Measurement>, Box<dyn Error>> {
    let repo = open(url, "crossover")?;
    let mut results = Vec::new();
    let wants = |m: LoadMethod| args.methods.iter().any(|x| x == m.as_str());
    let reps = 5;
    for &n in &args.sizes {
        for method in LoadMethod::ALL {
            if !wants(method) || (method == LoadMethod::Insert && n > 3000) {
                continue;
            }
            for phase in ["fresh", "reload"] {
                let mut times = Vec::new();
                for rep in 0..reps {
                    let ty = format!("x_{n}_{method}_{rep}");
                    let batch: Vec<Embedding> = make_batch(n, args.dim, 42)
                        .into_iter()
                        .map(|e| Embedding::new(ty.clone(), e.entity_id, e.vector))
                        .collect();
                    if phase == "reload" {
                        repo.load_embeddings(&batch, LoadMethod::Copy)?;
                    }
                    let report = repo.load_embeddings(&batch, method)?;
                    times.push(report.elapsed.as_secs_f64());
                }
                times.sort_by(f64::total_cmp);
                let median = times[reps / 2];
                let mut m =
                    measurement(&format!("{phase}_{n}_{method}"), n as u64, args.dim, median);
                m.ratio_to_ceiling = f64::NAN;
                results.push(m);
            }
        }
    }
    drop_schema(url, repo)?;
    Ok(results)
}

pub fn print_table(results: &[Measurement]) {
    let w = results.iter().map(|m| m.method.len()).fold(6, usize::max);
    println!(
        "{:<w$} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>7} {:>8} {:>9} {:>8} {:>9} {:>9}",
        "method",
        "streams",
        "rows",
        "seconds",
        "rows/s",
        "min",
        "max",
        "MB/s",
        "ratio",
        "B/row",
        "peak MiB+",
        "vs single",
        "coord us",
        "work. us"
    );
    for m in results {
        let peak = m
            .peak_rss_over_input_mib
            .map_or("-".to_owned(), |p| format!("{p:.1}"));
        let size = m
            .bytes_per_row
            .map_or("-".to_owned(), |b| format!("{b:.0}"));
        let single = m
            .ratio_to_single_server
            .map_or("-".to_owned(), |r| format!("{r:.3}"));
        let us = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        let size = m.bytes_per_row_after.map_or(size, |b| format!("{b:.0}*"));
        println!(
            "{:<w$} {:>7} {:>8} {:>8.3} {:>9.0} {:>9.0} {:>9.0} {:>8.1} {:>7.3} {:>8} {:>9} {:>8} {:>9} {:>9}",
            m.method,
            m.streams.map_or("-".to_owned(), |n| n.to_string()),
            m.rows,
            m.seconds,
            m.rows_per_s,
            m.min_rows_per_s,
            m.max_rows_per_s,
            m.mb_per_s,
            m.ratio_to_ceiling,
            size,
            peak,
            single,
            us(m.coordinator_cpu_us_per_row),
            us(m.workers_cpu_us_per_row)
        );
    }
}

/// A bar chart of rows/s per method.
pub fn plot(results: &[Measurement], path: &str, title: &str) -> Result<(), Box<dyn Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let names: Vec<String> = results.iter().map(|m| m.method.clone()).collect();
    let top = results.iter().map(|m| m.rows_per_s).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d((0..names.len()).into_segmented(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("rows/s")
        .x_labels(names.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(results.iter().enumerate().map(|(i, m)| {
        let color = if m.method.starts_with("server_") {
            RGBColor(150, 150, 150)
        } else {
            RGBColor(60, 110, 200)
        };
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), m.rows_per_s),
            ],
            color.filled(),
        );
        bar.set_margin(0, 0, 8, 8);
        bar
    }))?;
    chart.draw_series(results.iter().enumerate().map(|(i, m)| {
        Text::new(
            format!("{:.2}x", m.ratio_to_ceiling),
            (SegmentValue::CenterOf(i), m.rows_per_s + top * 0.02),
            ("sans-serif", 14),
        )
    }))?;
    root.present()?;
    Ok(())
}

/// The whole command line: run, then print (and plot).
pub fn main_with(args: Args) -> Result<(), Box<dyn Error>> {
    let results = run(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print_table(&results);
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "{} x {} embeddings: rows/s (ratio to the server's COPY)",
            args.rows, args.dim
        );
        plot(&results, path, &title)?;
        eprintln!("plot written to {path}");
    }
    Ok(())
}

#[allow(dead_code)]
fn main() {
    env_logger::init();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("load_bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = main_with(args) {
        eprintln!("load_bench: {e}");
        std::process::exit(1);
    }
}
