//! Measures the peak memory of streaming a large model in and out.
//!
//!     cargo run --release --example stream_memory -- [--mib 256]
//!
//! The model is generated on the fly by a reader (never held in memory) and read back into a
//! hashing sink, so any growth of the process's peak RSS (VmHWM) is the library's own.

use std::io::{Read, Write};
use std::time::Instant;

use pg_model_repo::throwaway::database_url_or_start;
use pg_model_repo::{ModelRepository, RepositoryConfig};
use sha2::{Digest, Sha256};

/// Deterministic pseudo-random bytes, `remaining` of them.
struct Generated {
    remaining: u64,
    state: u64,
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.remaining as usize);
        for b in &mut buf[..n] {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            *b = self.state as u8;
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Hashes and counts what it is given, keeps nothing.
#[derive(Default)]
struct HashingSink {
    hasher: Sha256,
    len: u64,
}

impl Write for HashingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Peak resident set size of this process so far, in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() -> pg_model_repo::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let (url, _server) = database_url_or_start(&[])?;
    let schema = format!("stream_memory_{}", std::process::id());
    let repo = ModelRepository::open(
        RepositoryConfig::new(url.clone())
            .schema(&schema)
            .pool_size(2),
    )?;
    let size = mib << 20;
    let baseline = peak_rss_kib();

    let started = Instant::now();
    let mut reader = Generated {
        remaining: size,
        state: 0x9E37_79B9_7F4A_7C15,
    };
    let info = repo.save_model_from_reader("big", "1", &mut reader, &serde_json::json!({}))?;
    let save_time = started.elapsed();
    let after_save = peak_rss_kib();

    let started = Instant::now();
    let mut sink = HashingSink::default();
    repo.load_model_to_writer("big", "1", &mut sink)?;
    let load_time = started.elapsed();
    let after_load = peak_rss_kib();
    let hash: String = sink
        .hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    println!(
        "model: {} MiB, checksum match: {}",
        info.size_bytes >> 20,
        hash == info.checksum && sink.len == size
    );
    println!(
        "save_model_from_reader: {save_time:.2?} ({:.0} MiB/s), peak RSS growth {:.1} MiB",
        mib as f64 / save_time.as_secs_f64(),
        (after_save.saturating_sub(baseline)) as f64 / 1024.0
    );
    println!(
        "load_model_to_writer:   {load_time:.2?} ({:.0} MiB/s), peak RSS growth {:.1} MiB (cumulative)",
        mib as f64 / load_time.as_secs_f64(),
        (after_load.saturating_sub(baseline)) as f64 / 1024.0
    );
    repo.close();
    if let Ok(mut client) = postgres::Client::connect(&url, postgres::NoTls) {
        let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"));
    }
    Ok(())
}
