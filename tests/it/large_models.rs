//! Models of any size: chunked storage above `model_chunk_size`, parallel streams, all-or-nothing
//! saves, per-chunk checksums, the leftover sweep of dead saves, and the migration that keeps
//! models saved before it readable. Most tests use 64 KiB chunks so that a model of a few MiB
//! has dozens of them; one saves and loads a model above the old 1 GiB cap.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_model_repo::{ModelRepository, RepoError, RepositoryConfig, MAX_BYTEA_MODEL_SIZE};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::common::{
    self, admin, assert_invalid, config, count, sha256_hex, terminate_sessions, unique_schema,
    url_with_app_name, TestRepo, PLAIN_SCHEMA,
};

const CHUNK: u32 = 64 << 10;

/// A repository that cuts models into 64 KiB chunks and uses up to 3 streams.
fn small_chunks() -> TestRepo {
    TestRepo::with_config(|c| c.model_chunk_size(CHUNK).model_streams(3))
}

/// Deterministic bytes of any length, the same whatever the read sizes: a 1 MiB + 13 byte
/// random block repeated, each repetition stamped with its number (so no two chunks are
/// alike), generated at memcpy speed.
pub struct Generated {
    block: Arc<Vec<u8>>,
    pos: u64,
    len: u64,
}

impl Generated {
    pub fn new(seed: u64, len: u64) -> Self {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let block = (0..(1 << 20) + 13)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        Generated {
            block: Arc::new(block),
            pos: 0,
            len,
        }
    }

    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        Generated::new(seed, len as u64)
            .read_exact(&mut out)
            .unwrap();
        out
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

/// Hashes what passes through a reader.
pub struct HashingReader<R> {
    pub inner: R,
    pub hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
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

pub fn hex(hasher: Sha256) -> String {
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Chunk rows of one version (any chunk set), and of the whole schema.
fn chunk_rows(repo: &TestRepo, model: &str, version: &str) -> i64 {
    repo.sql()
        .query_one(
            "SELECT count(*) FROM ml_model_chunks WHERE model_name = $1 AND version = $2",
            &[&model, &version],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_model_above_the_old_cap_saves_and_loads_with_its_sha256() {
    let free = disk_free_bytes();
    assert!(
        free > 6 << 30,
        "the 1.2 GiB test needs ~4 GiB of disk (table, WAL); {} MiB free",
        free >> 20
    );
    let repo = TestRepo::with_config(|c| c.model_streams(2));
    let size = MAX_BYTEA_MODEL_SIZE + (200 << 20); // ~1.2 GiB
    let started = Instant::now();
    let mut reader = HashingReader {
        inner: Generated::new(1, size),
        hasher: Sha256::new(),
    };
    let info = repo
        .save_model_from_reader("big", "1", &mut reader, &json!({"size": "1.2 GiB"}))
        .unwrap();
    let expected = hex(reader.hasher);
    let saved_in = started.elapsed();
    assert_eq!(info.size_bytes, size);
    assert_eq!(info.checksum, expected);

    let started = Instant::now();
    let mut sink = HashingSink::default();
    let loaded = repo
        .load_model_to_writer("big", "latest", &mut sink)
        .unwrap()
        .unwrap();
    let loaded_in = started.elapsed();
    assert_eq!(loaded, info);
    assert_eq!(sink.len, size);
    assert_eq!(
        hex(sink.hasher),
        expected,
        "the bytes read back hash the same"
    );
    log::info!("1.2 GiB model: saved in {saved_in:?}, loaded in {loaded_in:?}");

    let stats = repo.get_model_storage_stats().unwrap();
    assert_eq!(stats.total_bytes, size, "true byte counts");
    assert!(stats.table_bytes >= size, "chunks count in table_bytes");
    let chunks = size.div_ceil(u64::from(pg_model_repo::DEFAULT_MODEL_CHUNK_SIZE));
    assert_eq!(chunk_rows(&repo, "big", "1"), chunks as i64);

    // Cleanup frees the chunks with the version.
    assert_eq!(repo.cleanup_old_models("big", 0).unwrap(), 1);
    assert_eq!(count(&repo, "ml_model_chunks"), 0);
    assert!(repo.load_model("big", "1").unwrap().is_none());
}

pub fn disk_free_bytes() -> u64 {
    let output = std::process::Command::new("df")
        .args(["-Pk", &std::env::temp_dir().to_string_lossy()])
        .output()
        .expect("df");
    let text = String::from_utf8_lossy(&output.stdout);
    let kib: u64 = text
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .expect("df output");
    kib << 10
}

#[test]
fn chunked_models_work_with_every_model_method() {
    let repo = small_chunks();
    let data = Generated::bytes(2, 40 * CHUNK as usize + 123);
    let info = repo
        .save_model("m", "1", &data, &json!({"stage": "prod"}))
        .unwrap();
    assert_eq!(info.size_bytes, data.len() as u64);
    assert_eq!(info.checksum, sha256_hex(&data));
    assert_eq!(chunk_rows(&repo, "m", "1"), 41);
    let unpublished: i64 = repo
        .sql()
        .query_one(
            "SELECT count(*) FROM ml_model_chunks WHERE staged_at IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        unpublished, 0,
        "published chunks are out of the sweep's index"
    );

    assert!(repo.load_model("m", "1").unwrap().unwrap() == data);
    assert!(repo.load_model("m", "latest").unwrap().unwrap() == data);
    let (with_info, bytes) = repo.load_model_with_info("m", "latest").unwrap().unwrap();
    assert_eq!(with_info, info);
    assert!(bytes == data);
    let mut out = Vec::new();
    repo.load_model_to_writer("m", "1", &mut out)
        .unwrap()
        .unwrap();
    assert!(out == data);
    repo.set_model_alias("m", "champion", "1").unwrap();
    assert!(repo.load_model("m", "@champion").unwrap().unwrap() == data);
    assert_eq!(
        repo.get_model_versions("m").unwrap(),
        std::slice::from_ref(&info)
    );
    assert_eq!(
        repo.search_models(&json!({"stage": "prod"})).unwrap(),
        std::slice::from_ref(&info)
    );

    // A retried save answers with the stored info and stages nothing new; other bytes conflict.
    assert_eq!(
        repo.save_model("m", "1", &data, &json!({"stage": "prod"}))
            .unwrap(),
        info
    );
    let mut reader = &data[..];
    let again = repo.save_model_from_reader("m", "1", &mut reader, &json!({"stage": "prod"}));
    assert_eq!(again.unwrap(), info);
    assert_eq!(
        chunk_rows(&repo, "m", "1"),
        41,
        "the re-saves' chunks are gone"
    );
    let other = Generated::bytes(3, data.len());
    assert!(matches!(
        repo.save_model("m", "1", &other, &json!({"stage": "prod"})),
        Err(RepoError::Conflict(_))
    ));
    assert!(matches!(
        repo.save_model_from_reader("m", "1", &mut &other[..], &json!({"stage": "prod"})),
        Err(RepoError::Conflict(_))
    ));
    assert_eq!(chunk_rows(&repo, "m", "1"), 41);

    // Soft delete keeps the chunks; a revival replaces them; an inline revival drops them.
    assert!(repo.delete_model("m", "1").unwrap());
    assert!(repo.load_model("m", "1").unwrap().is_none());
    assert_eq!(chunk_rows(&repo, "m", "1"), 41);
    let revived = repo
        .save_model_from_reader("m", "1", &mut &other[..], &json!({}))
        .unwrap();
    assert_eq!(revived.checksum, sha256_hex(&other));
    assert!(repo.load_model("m", "1").unwrap().unwrap() == other);
    assert_eq!(chunk_rows(&repo, "m", "1"), 41, "the old chunk set went");
    assert!(repo.delete_model("m", "1").unwrap());
    repo.save_model("m", "1", b"small now", &json!({})).unwrap();
    assert_eq!(chunk_rows(&repo, "m", "1"), 0);
    assert_eq!(repo.load_model("m", "1").unwrap().unwrap(), b"small now");

    // Storage statistics count the true sizes; cleanup frees the chunks.
    repo.save_model("m", "2", &data, &json!({})).unwrap();
    let stats = repo.get_model_storage_stats().unwrap();
    assert_eq!(stats.total_bytes, data.len() as u64 + 9);
    assert_eq!(repo.cleanup_old_models("m", 0).unwrap(), 2);
    assert_eq!(count(&repo, "ml_model_chunks"), 0);
}

#[test]
fn a_model_of_one_chunk_stays_inline_and_one_byte_more_is_chunked() {
    let repo = small_chunks();
    for (version, len) in [("one", CHUNK as usize), ("more", CHUNK as usize + 1)] {
        let data = Generated::bytes(4, len);
        repo.save_model(version, "slice", &data, &json!({}))
            .unwrap();
        repo.save_model_from_reader(version, "reader", &mut &data[..], &json!({}))
            .unwrap();
        for v in ["slice", "reader"] {
            let (size, chunks, stored): (i64, i32, Option<i32>) = {
                let row = repo
                    .sql()
                    .query_one(
                        "SELECT size_bytes, chunk_count, octet_length(model_data) \
                         FROM ml_models WHERE model_name = $1 AND version = $2",
                        &[&version, &v],
                    )
                    .unwrap();
                (row.get(0), row.get(1), row.get(2))
            };
            assert_eq!(size, len as i64);
            if version == "one" {
                assert_eq!((chunks, stored), (0, Some(len as i32)), "inline");
            } else {
                assert_eq!((chunks, stored), (2, None), "chunked, model_data NULL");
            }
            assert!(repo.load_model(version, v).unwrap().unwrap() == data);
        }
    }
}

#[test]
fn seed_style_sql_readers_see_inline_bytes_and_a_null_model_data_for_chunked_ones() {
    let repo = small_chunks();
    let big = Generated::bytes(5, 3 * CHUNK as usize);
    repo.save_model("m", "small", b"tiny", &json!({})).unwrap();
    repo.save_model("m", "big", &big, &json!({})).unwrap();
    let mut sql = repo.sql();
    let small: Vec<u8> = sql
        .query_one(
            "SELECT model_data FROM ml_models WHERE version = 'small'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(small, b"tiny");
    // Never an empty byte string a reader could take for the model: NULL.
    let none: Option<Vec<u8>> = sql
        .query_one(
            "SELECT model_data FROM ml_models WHERE version = 'big'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(none, None);
    // SQL can still put a chunked model together, and check each chunk by its checksum.
    let row = sql
        .query_one(
            "SELECT string_agg(c.data, ''::bytea ORDER BY c.chunk_no), \
                    bool_and(c.checksum = encode(sha256(c.data), 'hex'))
             FROM ml_models m JOIN ml_model_chunks c ON c.model_name = m.model_name
              AND c.version = m.version AND c.chunk_set = m.chunk_set
             WHERE m.version = 'big'",
            &[],
        )
        .unwrap();
    let joined: Vec<u8> = row.get(0);
    assert!(joined == big);
    assert!(row.get::<_, bool>(1));
}

/// Chunk set ids come from each schema's own sequence, so two repositories' saves use the
/// same ids: a live save of set N in one repository must not spare another's dead set N.
#[test]
fn a_live_save_in_another_repository_spares_none_of_this_ones_leftovers() {
    let here = small_chunks();
    let there = small_chunks();
    while_a_save_is_paused(&there, 17, 8, 1, || {
        let live_set: i64 = there
            .sql()
            .query_one("SELECT min(chunk_set) FROM ml_model_chunks", &[])
            .unwrap()
            .get(0);
        // A save of this repository that died with the same set id, two hours ago.
        here.sql()
            .execute(
                "INSERT INTO ml_model_chunks (model_name, version, chunk_set, chunk_no, checksum, data, staged_at)
                 SELECT 'm', 'dead', $1, n, encode(sha256('\\x00'), 'hex'), '\\x00', now() - interval '2 hours'
                 FROM generate_series(0, 2) n",
                &[&live_set],
            )
            .unwrap();
        assert_eq!(here.optimize_database().unwrap().leftovers_removed, 3);
        assert_eq!(chunk_rows(&here, "m", "dead"), 0);
    });
    assert!(
        there.load_model("m", "live").unwrap().unwrap() == Generated::bytes(17, 8 * CHUNK as usize)
    );
}

/// Runs `while_paused` while a save into `repo` (model "m", version "live", `chunks` chunks of
/// `Generated` seed `seed`) is paused halfway with at least `staged` of its chunks in the
/// table; then lets the save finish, which must succeed.
fn while_a_save_is_paused(
    repo: &TestRepo,
    seed: u64,
    chunks: u64,
    staged: i64,
    while_paused: impl FnOnce(),
) {
    let (pause, paused) = std::sync::mpsc::channel::<()>();
    let (resume_tx, resume) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        // Owned by this closure: should an assertion below fail, the paused save is released
        // (its reader panics) instead of waiting forever.
        let resume_tx = resume_tx;
        let saver = s.spawn(move || {
            let mut reader = ReaderWithHook {
                inner: Generated::new(seed, chunks * u64::from(CHUNK)),
                before: chunks / 2 * u64::from(CHUNK),
                then: Some(|| {
                    pause.send(()).unwrap();
                    resume.recv().unwrap();
                }),
                read: 0,
            };
            repo.save_model_from_reader("m", "live", &mut reader, &json!({}))
        });
        paused.recv().unwrap();
        let started = Instant::now();
        while chunk_rows(repo, "m", "live") < staged {
            assert!(started.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        while_paused();
        resume_tx.send(()).unwrap();
        saver.join().unwrap().unwrap();
    });
}

/// A reader that fails after `after` bytes.
struct FailingReader {
    inner: Generated,
    after: u64,
    read: u64,
}

impl Read for FailingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.read >= self.after {
            return Err(std::io::Error::other("the source broke"));
        }
        let n = buf.len().min((self.after - self.read) as usize);
        let n = self.inner.read(&mut buf[..n])?;
        self.read += n as u64;
        Ok(n)
    }
}

#[test]
fn a_reader_failing_midway_stores_nothing() {
    let repo = small_chunks();
    let mut reader = FailingReader {
        inner: Generated::new(6, u64::MAX),
        after: 11 * u64::from(CHUNK) / 2,
        read: 0,
    };
    let result = repo.save_model_from_reader("m", "1", &mut reader, &json!({}));
    assert!(matches!(result, Err(RepoError::Io(_))), "{result:?}");
    assert!(repo.load_model("m", "1").unwrap().is_none());
    assert_eq!(count(&repo, "ml_models"), 0);
    assert_eq!(
        count(&repo, "ml_model_chunks"),
        0,
        "its staged chunks are cleared"
    );
}

/// A reader that panics after `after` bytes (a bug in the caller's code, midway).
struct PanickingReader {
    inner: FailingReader,
}

impl Read for PanickingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.inner.read(buf) {
            Err(_) => panic!("the caller's reader panics"),
            read => read,
        }
    }
}

#[test]
fn a_reader_panicking_midway_stores_nothing_and_its_chunks_are_cleared_as_after_an_error() {
    let repo = small_chunks();
    let mut reader = PanickingReader {
        inner: FailingReader {
            inner: Generated::new(6, u64::MAX),
            after: 11 * u64::from(CHUNK) / 2,
            read: 0,
        },
    };
    let saved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        repo.save_model_from_reader("m", "1", &mut reader, &json!({}))
    }));
    assert!(saved.is_err(), "the panic goes on to the caller");
    assert_eq!(count(&repo, "ml_models"), 0);
    assert_eq!(
        count(&repo, "ml_model_chunks"),
        0,
        "the chunks staged before the panic are cleared at once, not left to the sweep"
    );
    // The repository goes on working.
    let data = Generated::bytes(7, 3 * CHUNK as usize);
    repo.save_model_from_reader("m", "1", &mut &data[..], &json!({}))
        .unwrap();
    assert!(repo.load_model("m", "1").unwrap().unwrap() == data);
}

#[test]
fn a_model_past_max_model_size_is_invalid_and_stores_nothing() {
    let repo = TestRepo::with_config(|c| c.model_chunk_size(CHUNK).max_model_size(300 << 10));
    // By slice: before any I/O. By reader: as soon as it passes the limit.
    assert_invalid(repo.save_model("m", "1", &vec![1u8; (300 << 10) + 1], &json!({})));
    let mut endless = Generated::new(7, u64::MAX);
    assert_invalid(repo.save_model_from_reader("m", "1", &mut endless, &json!({})));
    assert_eq!(count(&repo, "ml_models"), 0);
    assert_eq!(count(&repo, "ml_model_chunks"), 0);
    // Exactly at the limit is fine.
    let data = Generated::bytes(7, 300 << 10);
    repo.save_model_from_reader("m", "1", &mut &data[..], &json!({}))
        .unwrap();
    assert!(repo.load_model("m", "1").unwrap().unwrap() == data);
}

#[test]
fn a_corrupted_chunk_is_corrupt_naming_the_chunk() {
    let repo = small_chunks();
    let data = Generated::bytes(8, 20 * CHUNK as usize);
    repo.save_model("m", "1", &data, &json!({})).unwrap();
    let corrupt = |sql: &str| {
        repo.sql().batch_execute(sql).unwrap();
        let loaded = repo.load_model("m", "1");
        let streamed = repo.load_model_to_writer("m", "1", &mut HashingSink::default());
        for result in [loaded.map(|_| ()), streamed.map(|_| ())] {
            match result {
                Err(RepoError::Corrupt(m)) => {
                    assert!(m.message().contains("chunk 13 of 20"), "{m}")
                }
                other => panic!("expected Corrupt, got {other:?}"),
            }
        }
    };
    // A flipped byte, a stored checksum that no longer matches, a truncated chunk, a lost one.
    corrupt(
        "UPDATE ml_model_chunks SET data = set_byte(data, 100, get_byte(data, 100) # 1) \
         WHERE chunk_no = 13",
    );
    corrupt(
        "UPDATE ml_model_chunks SET data = set_byte(data, 100, get_byte(data, 100) # 1), \
                checksum = repeat('0', 64) WHERE chunk_no = 13",
    );
    corrupt(
        "UPDATE ml_model_chunks SET data = substring(data FROM 1 FOR 100), \
                checksum = encode(sha256(substring(data FROM 1 FOR 100)), 'hex') \
         WHERE chunk_no = 13",
    );
    corrupt("DELETE FROM ml_model_chunks WHERE chunk_no = 13");
}

#[test]
fn a_whole_model_checksum_mismatch_is_corrupt() {
    let repo = small_chunks();
    let data = Generated::bytes(9, 5 * CHUNK as usize);
    repo.save_model("m", "1", &data, &json!({})).unwrap();
    repo.sql()
        .batch_execute("UPDATE ml_models SET checksum = repeat('0', 64)")
        .unwrap();
    assert!(matches!(
        repo.load_model("m", "1"),
        Err(RepoError::Corrupt(_))
    ));
    assert!(matches!(
        repo.load_model_to_writer("m", "1", &mut HashingSink::default()),
        Err(RepoError::Corrupt(_))
    ));
}

#[test]
fn any_number_of_streams_gives_the_same_model() {
    let data = Generated::bytes(10, 23 * CHUNK as usize + 7);
    for streams in [1, 2, 5] {
        let repo = TestRepo::with_config(|c| {
            c.model_chunk_size(CHUNK)
                .model_streams(streams)
                .pool_size(6)
        });
        repo.save_model_from_reader("m", "r", &mut &data[..], &json!({}))
            .unwrap();
        repo.save_model("m", "s", &data, &json!({})).unwrap();
        for v in ["r", "s"] {
            let mut out = Vec::new();
            repo.load_model_to_writer("m", v, &mut out)
                .unwrap()
                .unwrap();
            assert!(out == data, "{streams} streams, version {v}");
        }
    }
}

#[test]
fn concurrent_readers_never_see_a_partial_model() {
    let repo = small_chunks();
    let len = 30 * CHUNK as usize + 5;
    let done = AtomicBool::new(false);
    let loads = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    if let Some((info, bytes)) = repo.load_model_with_info("m", "latest").unwrap() {
                        let seed: u64 = info.version.parse().unwrap();
                        assert!(bytes == Generated::bytes(seed, len), "v{seed} is whole");
                        loads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        // Should a save below fail, the readers stop too (else the scope waits for them).
        struct StopReaders<'a>(&'a AtomicBool);
        impl Drop for StopReaders<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopReaders(&done);
        // Saves, and cleanups that remove versions while they are being read.
        for seed in 1..=8u64 {
            let data = Generated::bytes(seed, len);
            repo.save_model_from_reader("m", &seed.to_string(), &mut &data[..], &json!({}))
                .unwrap();
            std::thread::sleep(Duration::from_millis(50));
            repo.cleanup_old_models("m", 1).unwrap();
        }
    });
    assert!(loads.load(Ordering::Relaxed) > 0);
    assert_eq!(chunk_rows(&repo, "m", "8"), 31);
    assert_eq!(
        count(&repo, "ml_model_chunks"),
        31,
        "cleanup freed the others"
    );
}

/// A reader that sends `before` bytes, then calls `then` once, then `after` more bytes.
struct ReaderWithHook<F: FnMut()> {
    inner: Generated,
    before: u64,
    then: Option<F>,
    read: u64,
}

impl<F: FnMut()> Read for ReaderWithHook<F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.read >= self.before {
            if let Some(mut hook) = self.then.take() {
                hook();
            }
        }
        let cap = if self.read < self.before {
            (self.before - self.read) as usize
        } else {
            buf.len()
        };
        let n = buf.len().min(cap);
        let n = self.inner.read(&mut buf[..n])?;
        self.read += n as u64;
        Ok(n)
    }
}

#[test]
fn connections_killed_midway_leave_nothing_half_written() {
    let app = format!("large_kill_{}", std::process::id());
    let schema = unique_schema("kill");
    let open = || {
        ModelRepository::open(
            RepositoryConfig::new(url_with_app_name(&app))
                .schema(&schema)
                .pool_size(4)
                .pool_timeout(Duration::from_secs(10))
                .reaper_interval(None)
                .model_chunk_size(CHUNK)
                .model_streams(3),
        )
        .unwrap()
    };
    let repo = open();
    let len = 60 * u64::from(CHUNK);
    // By reader: the save fails (a reader cannot be read again) and leaves nothing visible.
    let mut reader = ReaderWithHook {
        inner: Generated::new(11, len),
        before: 20 * u64::from(CHUNK),
        then: Some(|| {
            // Wait until chunks reach the table, then kill every session of the repository.
            let started = Instant::now();
            while staged(&schema) == 0 && started.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(terminate_sessions(&app) > 0);
        }),
        read: 0,
    };
    let result = repo.save_model_from_reader("m", "r", &mut reader, &json!({}));
    let error = result.expect_err("the streams were killed");
    assert!(error.is_transient(), "{error:?}");
    assert!(repo.load_model("m", "r").unwrap().is_none());

    // By slice: retried whole, or reported; never half.
    let data = Generated::bytes(12, len as usize);
    let killer = {
        let app = app.clone();
        let schema = schema.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            while staged(&schema) < 10 && started.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(2));
            }
            terminate_sessions(&app)
        })
    };
    match repo.save_model("m", "s", &data, &json!({})) {
        Ok(info) => assert_eq!(info.checksum, sha256_hex(&data)),
        Err(e) => assert!(e.is_transient(), "{e:?}"),
    }
    killer.join().unwrap();
    match repo.load_model("m", "s").unwrap() {
        Some(bytes) => assert!(bytes == data),
        None => {
            repo.save_model("m", "s", &data, &json!({})).unwrap();
        }
    }
    // Whatever was staged and not published is not part of any model, and once its save's
    // sessions are gone the sweep may take it.
    let mut sql = admin();
    let orphans: i64 = sql
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{schema}\".ml_model_chunks c WHERE NOT EXISTS (\
                 SELECT 1 FROM \"{schema}\".ml_models m \
                 WHERE m.model_name = c.model_name AND m.chunk_set = c.chunk_set)"
            ),
            &[],
        )
        .unwrap()
        .get(0);
    log::info!("unpublished chunks after the kills: {orphans}");
    repo.close();
    common::drop_schema(&schema);
}

/// Chunk rows in a schema's chunk table.
fn staged(schema: &str) -> i64 {
    admin()
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".ml_model_chunks"),
            &[],
        )
        .unwrap()
        .get(0)
}

const CHILD_URL: &str = "PG_MODEL_REPO_TEST_CHILD_URL";
const CHILD_SCHEMA: &str = "PG_MODEL_REPO_TEST_CHILD_SCHEMA";

/// Not a test of its own: the child process of
/// `a_save_killed_midway_leaves_staged_chunks_that_the_sweep_removes`, which saves a model from
/// an endless, slow reader until it is killed.
#[test]
#[ignore = "the child process of a_save_killed_midway_leaves_staged_chunks_that_the_sweep_removes"]
fn child_process_saving_until_killed() {
    let url = std::env::var(CHILD_URL).expect("run by its parent test only");
    let schema = std::env::var(CHILD_SCHEMA).expect("run by its parent test only");
    let repo = ModelRepository::open(
        RepositoryConfig::new(url)
            .schema(&schema)
            .reaper_interval(None)
            .model_chunk_size(CHUNK)
            .model_streams(2),
    )
    .unwrap();
    struct Slow(Generated);
    impl Read for Slow {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            std::thread::sleep(Duration::from_millis(20));
            let n = buf.len().min(16 << 10);
            self.0.read(&mut buf[..n])
        }
    }
    let result = repo.save_model_from_reader(
        "m",
        "1",
        &mut Slow(Generated::new(13, u64::MAX)),
        &json!({}),
    );
    panic!("the save was meant to be killed, but returned {result:?}");
}

#[test]
fn a_save_killed_midway_leaves_staged_chunks_that_the_sweep_removes() {
    let repo = small_chunks();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "large_models::child_process_saving_until_killed",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_URL, url_with_app_name("large_child"))
        .env(CHILD_SCHEMA, &repo.schema)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while count(&repo, "ml_model_chunks") < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the child staged no chunks"
        );
        assert!(child.try_wait().unwrap().is_none(), "the child ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The server notices the dead client; its sessions (and their locks) end.
    let started = Instant::now();
    while common::sessions_named("large_child") > 0 {
        assert!(started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = count(&repo, "ml_model_chunks");
    assert!(left >= 4);
    assert_eq!(count(&repo, "ml_models"), 0, "nothing was published");

    // Young leftovers stay (a live save may still own them); old ones go.
    assert_eq!(repo.optimize_database().unwrap().leftovers_removed, 0);
    assert_eq!(count(&repo, "ml_model_chunks"), left);
    repo.sql()
        .batch_execute("UPDATE ml_model_chunks SET staged_at = now() - interval '2 hours'")
        .unwrap();
    let report = repo.optimize_database().unwrap();
    assert_eq!(report.leftovers_removed, left as u64);
    assert_eq!(count(&repo, "ml_model_chunks"), 0);
}

#[test]
fn the_sweep_spares_a_live_saves_chunks_and_published_ones() {
    let repo = small_chunks();
    let data = Generated::bytes(14, 12 * CHUNK as usize);
    repo.save_model("m", "published", &data, &json!({}))
        .unwrap();
    while_a_save_is_paused(&repo, 15, 12, 4, || {
        // Every chunk looks old: only the live save's lock protects its staged chunks.
        repo.sql()
            .batch_execute("UPDATE ml_model_chunks SET staged_at = now() - interval '2 hours'")
            .unwrap();
        assert_eq!(repo.optimize_database().unwrap().leftovers_removed, 0);
    });
    repo.sql()
        .batch_execute("UPDATE ml_model_chunks SET staged_at = now() - interval '2 hours'")
        .unwrap();
    assert_eq!(repo.optimize_database().unwrap().leftovers_removed, 0);
    assert!(repo.load_model("m", "published").unwrap().unwrap() == data);
    assert!(
        repo.load_model("m", "live").unwrap().unwrap() == Generated::bytes(15, 12 * CHUNK as usize)
    );
}

#[test]
fn the_migration_keeps_models_saved_before_it_readable() {
    let schema = unique_schema("premig");
    let mut sql = admin();
    // The layout before V005: every earlier file, as psql (or an older library) applied them.
    sql.batch_execute(&format!(
        "{PLAIN_SCHEMA} CREATE SCHEMA \"{schema}\"; SET search_path TO \"{schema}\""
    ))
    .unwrap();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/sql");
    let mut earlier: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with('V') && name.as_str() < "V005"
        })
        .collect();
    earlier.sort();
    assert!(!earlier.is_empty());
    for file in &earlier {
        sql.batch_execute(&std::fs::read_to_string(file).unwrap())
            .unwrap();
    }
    let big = Generated::bytes(16, 5 << 20);
    sql.execute(
        "INSERT INTO ml_models (model_name, version, model_data, metadata) VALUES ('m', 'big', $1, '{\"a\": 1}')",
        &[&big],
    )
    .unwrap();
    sql.batch_execute(
        "INSERT INTO ml_models (model_name, version, model_data) VALUES ('m', 'small', '\\x0102')",
    )
    .unwrap();

    let repo = ModelRepository::open(config(&schema).model_chunk_size(CHUNK)).unwrap();
    let (info, bytes) = repo.load_model_with_info("m", "big").unwrap().unwrap();
    assert_eq!(info.size_bytes, 5 << 20);
    assert_eq!(info.checksum, sha256_hex(&big));
    assert!(bytes == big);
    let mut out = Vec::new();
    repo.load_model_to_writer("m", "big", &mut out)
        .unwrap()
        .unwrap();
    assert!(
        out == big,
        "an inline model larger than a chunk streams out in slices"
    );
    assert_eq!(repo.load_model("m", "small").unwrap().unwrap(), [1, 2]);
    assert_eq!(
        repo.get_model_storage_stats().unwrap().total_bytes,
        (5 << 20) + 2
    );

    // size_bytes is a plain column now, still filled for rows written by hand.
    let generated: String = sql
        .query_one(
            "SELECT attgenerated::text FROM pg_attribute \
             WHERE attrelid = 'ml_models'::regclass AND attname = 'size_bytes'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(generated, "");
    sql.batch_execute(
        "INSERT INTO ml_models (model_name, version, model_data) VALUES ('m', 'hand', '\\x010203');
         UPDATE ml_models SET model_data = '\\x01' WHERE version = 'small'",
    )
    .unwrap();
    let sizes: Vec<(String, i64)> = sql
        .query(
            "SELECT version::text, size_bytes FROM ml_models WHERE version IN ('hand', 'small') ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(sizes, [("hand".to_owned(), 3), ("small".to_owned(), 1)]);
    repo.close();
    common::drop_schema(&schema);
}
