//! Model benchmark: saves and loads one large model with 1, 2 and 4 streams, against the
//! server's own ceilings for the same bytes, in interleaved rounds, and reports medians.
//!
//! ```text
//! cargo run --release --example model_bench -- [--mib 2048] [--streams 1,2,4] [--rounds 3]
//!     [--chunk-kib 4096] [--only save_1,load_1,…]
//! ```
//!
//! - `save_N`: `save_model_from_reader` with `model_streams(N)`, from a reader that generates
//!   the bytes (never held in memory); the library hashes the whole model and every chunk.
//! - `load_N`: `load_model_to_writer` into a sink that keeps nothing (the library checks every
//!   chunk's and the whole model's sha256 as it goes).
//! - `ceiling_in`: the server's own `COPY ml_model_chunks FROM '<file>' (FORMAT binary)` of
//!   the same chunk rows into an empty table shaped like the chunk table; `ceiling_in_x2`:
//!   two such COPYs at once, each of half the rows (the ceiling for parallel saves).
//! - `ceiling_out`: a raw `COPY (SELECT data … ORDER BY chunk_no) TO STDOUT (FORMAT binary)`
//!   of the stored chunks, read and thrown away.
//!
//! Every round runs every measurement once, in an order rotated from round to round, each
//! after a CHECKPOINT and on empty tables; the table shows medians (min-max in brackets).
//! Peak RSS growth is VmHWM, reset before each measurement, over the RSS before it. Uses
//! `DATABASE_URL` when set (the server-side COPY then needs a local server and the
//! pg_read_server_files privilege), else a throwaway server from the local binaries.

use std::error::Error;
use std::io::{BufWriter, Read, Write};
use std::time::Instant;

use pg_model_repo::throwaway::database_url_or_start;
use pg_model_repo::{ModelRepository, RepositoryConfig};
use sha2::{Digest, Sha256};

struct Args {
    mib: u64,
    streams: Vec<u32>,
    rounds: usize,
    chunk: u32,
    only: Option<Vec<String>>,
}

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    Ok(Args {
        mib: value("--mib").map_or(Ok(2048), |v| v.parse())?,
        streams: match value("--streams") {
            Some(v) => v.split(',').map(str::parse).collect::<Result<_, _>>()?,
            None => vec![1, 2, 4],
        },
        rounds: value("--rounds").map_or(Ok(3), |v| v.parse())?,
        chunk: match value("--chunk-kib") {
            Some(v) => v.parse::<u32>()? << 10,
            None => pg_model_repo::DEFAULT_MODEL_CHUNK_SIZE,
        },
        only: value("--only").map(|v| v.split(',').map(str::to_owned).collect()),
    })
}

/// Deterministic bytes at memcpy speed: a 1 MiB + 13 byte random block repeated, each
/// repetition stamped with its number.
struct Generated {
    block: Vec<u8>,
    pos: u64,
    len: u64,
}

impl Generated {
    fn new(len: u64) -> Self {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let block = (0..(1 << 20) + 13)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        Generated { block, pos: 0, len }
    }
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let period = self.block.len() as u64;
        let offset = (self.pos % period) as usize;
        let n = buf
            .len()
            .min((self.len - self.pos) as usize)
            .min(self.block.len() - offset);
        buf[..n].copy_from_slice(&self.block[offset..offset + n]);
        let stamp = (self.pos / period).to_le_bytes();
        for (i, b) in buf[..n]
            .iter_mut()
            .enumerate()
            .take(8usize.saturating_sub(offset))
        {
            *b ^= stamp[offset + i];
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Counts what it is given and keeps nothing.
#[derive(Default)]
struct Sink(u64);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Resets VmHWM to the current RSS and returns that RSS (KiB).
fn reset_peak() -> u64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    status_kib("VmRSS:")
}

/// Peak RSS growth since `reset_peak` returned `base`, in MiB.
fn peak_growth(base: u64) -> f64 {
    status_kib("VmHWM:").saturating_sub(base) as f64 / 1024.0
}

/// The binary COPY files of the model's chunk rows (all of them, and the two halves), as the
/// library would write them, where the server's user can read them; and the model's sha256.
fn write_copy_files(args: &Args) -> Result<([String; 3], String), Box<dyn Error>> {
    let size = args.mib << 20;
    let count = size.div_ceil(u64::from(args.chunk));
    let base = format!("/tmp/pg_model_repo_model_bench_{}", std::process::id());
    let paths = [
        format!("{base}_all.copy"),
        format!("{base}_a.copy"),
        format!("{base}_b.copy"),
    ];
    let mut files = Vec::new();
    for path in &paths {
        let mut f = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
        f.write_all(b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0")?;
        files.push(f);
    }
    let mut whole = Sha256::new();
    let mut reader = Generated::new(size);
    let mut buf = vec![0u8; args.chunk as usize];
    for no in 0..count {
        let n = (size - no * u64::from(args.chunk)).min(u64::from(args.chunk)) as usize;
        reader.read_exact(&mut buf[..n])?;
        let data = &buf[..n];
        whole.update(data);
        let checksum = hex(Sha256::digest(data).as_slice());
        let half = if no < count / 2 { 1 } else { 2 };
        for i in [0, half] {
            let f = &mut files[i];
            f.write_all(&6i16.to_be_bytes())?;
            for text in [&b"bench"[..], b"1"] {
                f.write_all(&(text.len() as i32).to_be_bytes())?;
                f.write_all(text)?;
            }
            f.write_all(&8i32.to_be_bytes())?;
            f.write_all(&1i64.to_be_bytes())?;
            f.write_all(&4i32.to_be_bytes())?;
            f.write_all(&(no as i32).to_be_bytes())?;
            f.write_all(&(checksum.len() as i32).to_be_bytes())?;
            f.write_all(checksum.as_bytes())?;
            f.write_all(&(n as i32).to_be_bytes())?;
            f.write_all(data)?;
        }
    }
    for mut f in files {
        f.write_all(&(-1i16).to_be_bytes())?;
        f.flush()?;
    }
    #[cfg(unix)]
    for path in &paths {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok((paths, hex(whole.finalize().as_slice())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One timed run: its name, seconds, and peak RSS growth (MiB) where it is ours.
struct Sample {
    name: String,
    seconds: f64,
    rss_mib: Option<f64>,
}

struct Bench<'a> {
    url: &'a str,
    schema: String,
    admin: postgres::Client,
    args: &'a Args,
    paths: [String; 3],
    checksum: String,
}

impl Bench<'_> {
    fn repo(&self, streams: u32) -> Result<ModelRepository, Box<dyn Error>> {
        Ok(ModelRepository::open(
            RepositoryConfig::new(self.url)
                .schema(&self.schema)
                .pool_size(8)
                .reaper_interval(None)
                .model_chunk_size(self.args.chunk)
                .model_streams(streams),
        )?)
    }

    /// Empty tables and a checkpoint: every measurement starts from the same state.
    fn reset(&mut self) -> Result<(), Box<dyn Error>> {
        self.admin
            .batch_execute("TRUNCATE ml_models, ml_model_chunks, ceiling; CHECKPOINT")?;
        Ok(())
    }

    fn save(&mut self, streams: u32) -> Result<Sample, Box<dyn Error>> {
        self.reset()?;
        let repo = self.repo(streams)?;
        let base = reset_peak();
        let started = Instant::now();
        let mut reader = Generated::new(self.args.mib << 20);
        let info =
            repo.save_model_from_reader("bench", "1", &mut reader, &serde_json::json!({}))?;
        let seconds = started.elapsed().as_secs_f64();
        let rss = peak_growth(base);
        if info.checksum != self.checksum || info.size_bytes != self.args.mib << 20 {
            return Err(format!(
                "saved {} bytes with sha256 {}",
                info.size_bytes, info.checksum
            )
            .into());
        }
        repo.close();
        Ok(Sample {
            name: format!("save_{streams}"),
            seconds,
            rss_mib: Some(rss),
        })
    }

    /// Loads the model saved last (saving it first if the tables are empty).
    fn load(&mut self, streams: u32) -> Result<Sample, Box<dyn Error>> {
        self.ensure_saved()?;
        let repo = self.repo(streams)?;
        self.admin.batch_execute("CHECKPOINT")?;
        let base = reset_peak();
        let started = Instant::now();
        let mut sink = Sink::default();
        let info = repo
            .load_model_to_writer("bench", "1", &mut sink)?
            .ok_or("the model is gone")?;
        let seconds = started.elapsed().as_secs_f64();
        let rss = peak_growth(base);
        // The library checked every chunk and the whole model against info.checksum.
        if info.checksum != self.checksum || sink.0 != self.args.mib << 20 {
            return Err("the model read back differs".into());
        }
        repo.close();
        Ok(Sample {
            name: format!("load_{streams}"),
            seconds,
            rss_mib: Some(rss),
        })
    }

    fn ensure_saved(&mut self) -> Result<(), Box<dyn Error>> {
        let n: i64 = self
            .admin
            .query_one("SELECT count(*) FROM ml_models", &[])?
            .get(0);
        if n == 0 {
            self.save(2)?;
        }
        Ok(())
    }

    fn ceiling_in(&mut self) -> Result<Sample, Box<dyn Error>> {
        self.reset()?;
        let started = Instant::now();
        self.admin
            .batch_execute(&copy_from("ceiling", &self.paths[0]))?;
        Ok(Sample {
            name: "ceiling_in".into(),
            seconds: started.elapsed().as_secs_f64(),
            rss_mib: None,
        })
    }

    fn ceiling_in_x2(&mut self) -> Result<Sample, Box<dyn Error>> {
        self.reset()?;
        let mut clients = Vec::new();
        for _ in 0..2 {
            let mut c = postgres::Client::connect(self.url, postgres::NoTls)?;
            c.batch_execute(&format!("SET search_path TO {}", self.schema))?;
            clients.push(c);
        }
        let started = Instant::now();
        std::thread::scope(|s| -> Result<(), Box<dyn Error>> {
            let handles: Vec<_> = clients
                .iter_mut()
                .zip(&self.paths[1..])
                .map(|(c, path)| s.spawn(move || c.batch_execute(&copy_from("ceiling", path))))
                .collect();
            for h in handles {
                h.join().map_err(|_| "a COPY thread panicked")??;
            }
            Ok(())
        })?;
        Ok(Sample {
            name: "ceiling_in_x2".into(),
            seconds: started.elapsed().as_secs_f64(),
            rss_mib: None,
        })
    }

    fn ceiling_out(&mut self) -> Result<Sample, Box<dyn Error>> {
        self.ensure_saved()?;
        self.admin.batch_execute("CHECKPOINT")?;
        let started = Instant::now();
        let mut reader = self.admin.copy_out(
            "COPY (SELECT data FROM ml_model_chunks WHERE model_name = 'bench' ORDER BY chunk_no) \
             TO STDOUT (FORMAT binary)",
        )?;
        let bytes = std::io::copy(&mut reader, &mut std::io::sink())?;
        if bytes < self.args.mib << 20 {
            return Err(format!("COPY TO gave {bytes} bytes").into());
        }
        Ok(Sample {
            name: "ceiling_out".into(),
            seconds: started.elapsed().as_secs_f64(),
            rss_mib: None,
        })
    }

    fn run(&mut self, what: &str) -> Result<Sample, Box<dyn Error>> {
        match what {
            "ceiling_in" => self.ceiling_in(),
            "ceiling_in_x2" => self.ceiling_in_x2(),
            "ceiling_out" => self.ceiling_out(),
            other => {
                let (kind, n) = other.split_once('_').ok_or("bad measurement")?;
                let n: u32 = n.parse()?;
                match kind {
                    "save" => self.save(n),
                    _ => self.load(n),
                }
            }
        }
    }
}

fn copy_from(table: &str, path: &str) -> String {
    format!(
        "COPY {table} (model_name, version, chunk_set, chunk_no, checksum, data) \
         FROM '{}' (FORMAT binary)",
        path.replace('\'', "''")
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let (url, _server) = database_url_or_start(&[])?;
    let schema = format!("model_bench_{}", std::process::id());
    eprintln!(
        "model of {} MiB in chunks of {} KiB; writing the COPY files…",
        args.mib,
        args.chunk >> 10
    );
    let (paths, checksum) = write_copy_files(&args)?;
    let mut admin = postgres::Client::connect(&url, postgres::NoTls)?;
    let opened = ModelRepository::open(RepositoryConfig::new(url.clone()).schema(&schema))?;
    opened.close();
    admin.batch_execute(&format!(
        "SET search_path TO {schema}; CREATE TABLE ceiling (LIKE ml_model_chunks INCLUDING ALL)"
    ))?;
    let mut bench = Bench {
        url: &url,
        schema: schema.clone(),
        admin,
        args: &args,
        paths: paths.clone(),
        checksum,
    };
    let mut order: Vec<String> = vec!["ceiling_in".into(), "ceiling_in_x2".into()];
    for n in &args.streams {
        order.push(format!("save_{n}"));
    }
    order.push("ceiling_out".into());
    for n in &args.streams {
        order.push(format!("load_{n}"));
    }
    if let Some(only) = &args.only {
        order.retain(|m| only.contains(m));
    }
    let mut samples: Vec<Sample> = Vec::new();
    let outcome = run_rounds(&mut bench, &args, &order, &mut samples);
    if outcome.is_ok() {
        report(&args, &order, &samples);
    }
    drop(bench);
    let mut admin = postgres::Client::connect(&url, postgres::NoTls)?;
    admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
    for path in &paths {
        let _ = std::fs::remove_file(path);
    }
    outcome
}

fn run_rounds(
    bench: &mut Bench<'_>,
    args: &Args,
    order: &[String],
    samples: &mut Vec<Sample>,
) -> Result<(), Box<dyn Error>> {
    for round in 0..args.rounds {
        let mut this_round = order.to_vec();
        this_round.rotate_left(round * order.len() / args.rounds.max(1));
        for what in &this_round {
            let sample = bench.run(what)?;
            eprintln!(
                "round {}: {what:<14} {:>7.2} s {:>7.1} MiB/s{}",
                round + 1,
                sample.seconds,
                args.mib as f64 / sample.seconds,
                sample
                    .rss_mib
                    .map(|r| format!(", peak RSS +{r:.1} MiB"))
                    .unwrap_or_default()
            );
            samples.push(sample);
        }
    }
    Ok(())
}

fn report(args: &Args, order: &[String], samples: &[Sample]) {
    let rate = |name: &str| -> f64 {
        let times: Vec<f64> = samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.seconds)
            .collect();
        args.mib as f64 / median(times)
    };
    println!(
        "model {} MiB, chunks of {} KiB, {} rounds (medians; min-max in brackets)",
        args.mib,
        args.chunk >> 10,
        args.rounds
    );
    println!("| measurement | MiB/s | peak RSS growth (MiB) | ratio |");
    println!("|---|---|---|---|");
    for name in order {
        let mine: Vec<&Sample> = samples.iter().filter(|s| &s.name == name).collect();
        let rates: Vec<f64> = mine.iter().map(|s| args.mib as f64 / s.seconds).collect();
        let (lo, hi) = (
            rates.iter().cloned().fold(f64::INFINITY, f64::min),
            rates.iter().cloned().fold(0.0, f64::max),
        );
        let rss = mine
            .iter()
            .filter_map(|s| s.rss_mib)
            .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
        // Ratios to what was measured in this run (none to what was left out).
        let to = |other: &str| {
            let r = rate(name) / rate(other);
            (!r.is_nan()).then(|| format!("{r:.2}x {other}"))
        };
        let ratios: Vec<String> = match name.as_str() {
            "save_1" | "ceiling_in_x2" => vec![to("ceiling_in")],
            n if n.starts_with("save_") => vec![to("save_1"), to("ceiling_in_x2")],
            n if n.starts_with("load_") => vec![to("ceiling_out")],
            _ => vec![],
        }
        .into_iter()
        .flatten()
        .collect();
        let ratio = ratios.join(", ");
        println!(
            "| {name} | {:.1} [{lo:.1}-{hi:.1}] | {} | {ratio} |",
            rate(name),
            rss.map(|r| format!("{r:.1}")).unwrap_or_else(|| "-".into())
        );
    }
}
