//! Load benchmark: every `LoadMethod` against the server's own `COPY … FROM '<file>'` into an
//! identical empty table, an upsert reload of the same keys, and a full streaming read against
//! a raw `COPY … TO STDOUT`, all in one run on one server.
//!
//! ```text
//! cargo run --release --example load_bench -- [--rows 100000] [--dim 384]
//!     [--methods insert,multi_row_insert,copy,parallel_copy,upsert_reload,server_copy_file,read_stream,server_copy_out]
//!     [--format table|json] [--plot FILE.svg] [--crossover]
//! ```
//!
//! Uses `DATABASE_URL` when set (the server-side COPY then needs a local server and the
//! pg_read_server_files privilege), else a throwaway server from the local binaries.
//! `--crossover [--sizes 1,10,100]` times batches of those sizes by each method (of
//! `--methods`), fresh and as a reload, the median of 5 runs each, to place
//! `BATCH_COPY_CROSSOVER`.

use std::error::Error;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use pg_model_repo::throwaway::database_url_or_start;
use pg_model_repo::{Embedding, LoadMethod, ModelRepository, RepositoryConfig};

const ENTITY_TYPE: &str = "bench";
const COLUMNS: &str = "entity_type, entity_id, embeddings, dimension";

/// What to run.
#[derive(Debug, Clone)]
pub struct Args {
    pub rows: usize,
    pub dim: usize,
    pub methods: Vec<String>,
    pub json: bool,
    pub plot: Option<String>,
    pub crossover: bool,
    pub sizes: Vec<usize>,
    pub progress: bool,
}

/// Every measurement, in the order they run.
pub const ALL: [&str; 8] = [
    "server_copy_file",
    "insert",
    "multi_row_insert",
    "copy",
    "parallel_copy",
    "upsert_reload",
    "server_copy_out",
    "read_stream",
];

impl Default for Args {
    fn default() -> Self {
        Args {
            rows: 100_000,
            dim: 384,
            methods: ALL.iter().map(|s| s.to_string()).collect(),
            json: false,
            plot: None,
            crossover: false,
            sizes: vec![1, 10, 100, 300, 1000, 3000, 10_000],
            progress: true,
        }
    }
}

/// One line of the result table (and one object of `--format json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measurement {
    pub method: String,
    pub rows: u64,
    pub seconds: f64,
    pub rows_per_s: f64,
    pub mb_per_s: f64,
    pub ratio_to_ceiling: f64,
    #[serde(skip)]
    pub peak_rss_over_input_mib: Option<f64>,
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
            // Passed by `cargo bench`.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if out.rows == 0 || out.dim == 0 {
        return Err("--rows and --dim must be positive".into());
    }
    Ok(out)
}

fn make_batch(rows: usize, dim: usize) -> Vec<Embedding> {
    let mut rng = fastrand::Rng::with_seed(42);
    (0..rows)
        .map(|i| {
            let vector = (0..dim).map(|_| rng.f32() * 2.0 - 1.0).collect();
            Embedding::new(ENTITY_TYPE, format!("entity-{i:09}"), vector)
        })
        .collect()
}

/// A fresh schema for one measurement.
fn open(url: &str, tag: &str) -> Result<ModelRepository, Box<dyn Error>> {
    let schema = format!("bench_{tag}_{}", std::process::id());
    let mut admin = postgres::Client::connect(url, postgres::NoTls)?;
    admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
    let config = RepositoryConfig::new(url)
        .schema(&schema)
        .pool_size(4)
        .max_overflow(4)
        .reaper_interval(None);
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

fn bar(args: &Args, label: &str, total: u64) -> ProgressBar {
    if !args.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:>17} [{bar:40}] {pos}/{len} rows {per_sec} eta {eta}")
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
/// server's user can read it.
fn write_copy_file(batch: &[Embedding]) -> Result<String, Box<dyn Error>> {
    let path = format!("/tmp/pg_model_repo_bench_{}.copy", std::process::id());
    let file = std::fs::File::create(&path)?;
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
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(path)
}

/// The ceiling: the server's own COPY from the file into an empty table shaped like
/// `embeddings` (same columns, defaults, constraints, index and storage parameters).
fn server_copy_file(url: &str, path: &str) -> Result<Duration, Box<dyn Error>> {
    let repo = open(url, "ceiling")?;
    let schema = repo.config().schema_name().to_owned();
    let mut c = postgres::Client::connect(url, postgres::NoTls)?;
    c.batch_execute(&format!("SET search_path TO {schema}"))?;
    let options: Option<Vec<String>> = c
        .query_one(
            "SELECT reloptions FROM pg_class WHERE oid = 'embeddings'::regclass",
            &[],
        )?
        .get(0);
    let with = options
        .filter(|o| !o.is_empty())
        .map(|o| format!(" WITH ({})", o.join(", ")))
        .unwrap_or_default();
    c.batch_execute(&format!(
        "CREATE TABLE ceiling (LIKE embeddings INCLUDING ALL){with}"
    ))?;
    settle(url);
    let started = Instant::now();
    c.batch_execute(&format!(
        "COPY ceiling ({COLUMNS}) FROM '{}' (FORMAT binary)",
        path.replace('\'', "''")
    ))?;
    let elapsed = started.elapsed();
    drop(c);
    drop_schema(url, repo)?;
    Ok(elapsed)
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
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
    }
    Ok((bytes, started.elapsed()))
}

fn measurement(method: &str, rows: u64, dim: usize, seconds: f64) -> Measurement {
    Measurement {
        method: method.to_owned(),
        rows,
        seconds,
        rows_per_s: rows as f64 / seconds,
        mb_per_s: (rows * 4 * dim as u64) as f64 / seconds / 1e6,
        ratio_to_ceiling: f64::NAN,
        peak_rss_over_input_mib: None,
    }
}

/// Runs the benchmark and returns its measurements (write methods relative to
/// `server_copy_file`, reads relative to `server_copy_out`).
pub fn run(args: &Args) -> Result<Vec<Measurement>, Box<dyn Error>> {
    let (url, _server) = database_url_or_start(&[])?;
    if args.crossover {
        return crossover(&url, args);
    }
    let wants = |m: &str| args.methods.iter().any(|x| x == m);
    eprintln!("generating {} vectors of dimension {}", args.rows, args.dim);
    let batch = make_batch(args.rows, args.dim);
    let rows = batch.len() as u64;
    let mut results = Vec::new();

    if wants("server_copy_file") {
        let path = write_copy_file(&batch)?;
        let elapsed = server_copy_file(&url, &path);
        let _ = std::fs::remove_file(&path);
        results.push(measurement(
            "server_copy_file",
            rows,
            args.dim,
            elapsed?.as_secs_f64(),
        ));
    }

    // The repository whose table later serves the reload and the reads.
    let mut kept: Option<ModelRepository> = None;
    for method in LoadMethod::ALL {
        if !wants(method.as_str()) {
            continue;
        }
        let repo = open(&url, method.as_str())?;
        settle(&url);
        let input = current_rss();
        reset_peak_rss();
        let pb = bar(args, method.as_str(), rows);
        let report = repo
            .load_embeddings_with_progress(&batch, method, &mut |done, _| pb.set_position(done))?;
        pb.finish_and_clear();
        let mut m = measurement(
            method.as_str(),
            rows,
            args.dim,
            report.elapsed.as_secs_f64(),
        );
        m.peak_rss_over_input_mib = match (peak_rss(), input) {
            (Some(peak), Some(input)) => Some(peak.saturating_sub(input) as f64 / 1048576.0),
            _ => None,
        };
        results.push(m);
        if method == LoadMethod::Copy || kept.is_none() {
            if let Some(old) = kept.replace(repo) {
                drop_schema(&url, old)?;
            }
        } else {
            drop_schema(&url, repo)?;
        }
    }

    let needs_table = ["upsert_reload", "read_stream", "server_copy_out"];
    if needs_table.iter().any(|m| wants(m)) {
        let repo = match kept.take() {
            Some(repo) => repo,
            None => {
                let repo = open(&url, "reads")?;
                repo.load_embeddings(&batch, LoadMethod::Copy)?;
                repo
            }
        };
        if wants("upsert_reload") {
            settle(&url);
            // What a user gets: batch_save_embeddings picks the path (no progress callback).
            let report = repo.batch_save_embeddings(&batch)?;
            results.push(measurement(
                "upsert_reload",
                rows,
                args.dim,
                report.elapsed.as_secs_f64(),
            ));
            // The reads below should not pay for the reload's dead tuples.
            let schema = repo.config().schema_name().to_owned();
            let mut c = postgres::Client::connect(&url, postgres::NoTls)?;
            c.batch_execute(&format!("VACUUM ANALYZE {schema}.embeddings"))?;
        }
        if wants("server_copy_out") {
            let (_, elapsed) = server_copy_out(&url, repo.config().schema_name())?;
            results.push(measurement(
                "server_copy_out",
                rows,
                args.dim,
                elapsed.as_secs_f64(),
            ));
        }
        if wants("read_stream") {
            let started = Instant::now();
            let mut checksum = 0f64;
            let n =
                repo.for_each_embedding(ENTITY_TYPE, &mut |_, v| checksum += f64::from(v[0]))?;
            let elapsed = started.elapsed();
            std::hint::black_box(checksum);
            results.push(measurement(
                "read_stream",
                n,
                args.dim,
                elapsed.as_secs_f64(),
            ));
        }
        drop_schema(&url, repo)?;
    }
    if let Some(repo) = kept {
        drop_schema(&url, repo)?;
    }
    set_ratios(&mut results);
    Ok(results)
}

fn set_ratios(results: &mut [Measurement]) {
    let rate = |name: &str| {
        results
            .iter()
            .find(|m| m.method == name)
            .map(|m| m.rows_per_s)
    };
    let (write_ceiling, read_ceiling) = (rate("server_copy_file"), rate("server_copy_out"));
    for m in results.iter_mut() {
        let ceiling = if m.method == "read_stream" || m.method == "server_copy_out" {
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
                    let batch: Vec<Embedding> = make_batch(n, args.dim)
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
    println!(
        "{:<28} {:>9} {:>9} {:>12} {:>9} {:>9} {:>12}",
        "method", "rows", "seconds", "rows/s", "MB/s", "ratio", "peak MiB+"
    );
    for m in results {
        let peak = m
            .peak_rss_over_input_mib
            .map_or("-".to_owned(), |p| format!("{p:.1}"));
        println!(
            "{:<28} {:>9} {:>9.3} {:>12.0} {:>9.1} {:>9.3} {:>12}",
            m.method, m.rows, m.seconds, m.rows_per_s, m.mb_per_s, m.ratio_to_ceiling, peak
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
