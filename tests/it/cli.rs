//! The `pg-model-repo` binary (feature `cli`), run as a process against the suite's server,
//! its output parsed: every command, round trips bit-exact, every bad input refused with a
//! message naming the file (and row) and nothing written, exit codes, and the password kept
//! out of every output. Files come from numpy and pyarrow where python3 has them
//! (`MODEL_REPO_PYTHON` names another interpreter), and are written by the tests otherwise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::common::{admin, count, drop_schema, server_url, unique_schema, TestRepo};

const BIN: &str = env!("CARGO_BIN_EXE_pg-model-repo");

/// Runs the binary with `args`, against `url`, with none of the caller's settings.
fn run_with(url: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("MODEL_REPO_SCHEMA")
        .env_remove("DB_POOL_SIZE")
        .env_remove("DB_POOL_TIMEOUT")
        .env_remove("MODEL_REPO_LOG")
        .output()
        .expect("run pg-model-repo")
}

/// Runs the binary on the test's schema.
fn run(schema: &str, args: &[&str]) -> Output {
    let mut all = vec!["--schema", schema];
    all.extend_from_slice(args);
    run_with(&server_url(), &all)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success; returns stdout.
#[track_caller]
fn ok(out: Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Asserts success and parses stdout as JSON.
#[track_caller]
fn ok_json(out: Output) -> Value {
    let text = ok(out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Asserts exit `code` and returns stderr.
#[track_caller]
fn fails(out: Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    stderr(&out)
}

/// A scratch directory, removed at the end of the test.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// A `.npy` file (format 1.0) of `descr` with `shape`, holding `data` as is.
fn write_npy(path: &str, descr: &str, shape: &[usize], data: &[u8]) {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

fn f4_le(rows: &[Vec<f32>]) -> Vec<u8> {
    rows.iter()
        .flatten()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn write_ids(path: &str, ids: &[String]) {
    let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// Vectors whose bits exercise the round trip: signs, zeros of both signs, subnormals,
/// extremes, values with every mantissa bit.
fn tricky_rows(rows: usize, dim: usize) -> Vec<Vec<f32>> {
    let special = [
        -0.0f32,
        0.0,
        f32::MIN_POSITIVE / 3.0,
        f32::MAX,
        f32::MIN,
        1.0 + f32::EPSILON,
        -1.5e-30,
        std::f32::consts::PI,
    ];
    let mut state = 0x9e3779b97f4a7c15u64;
    (0..rows)
        .map(|r| {
            (0..dim)
                .map(|c| {
                    if (r + c) % 7 == 0 {
                        special[(r * dim + c) % special.len()]
                    } else {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        let v = f32::from_bits((state >> 32) as u32);
                        if v.is_finite() {
                            v
                        } else {
                            1.25
                        }
                    }
                })
                .collect()
        })
        .collect()
}

fn ids(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Every stored vector of a type, by id, as bits.
fn stored_bits(repo: &TestRepo, entity_type: &str) -> HashMap<String, Vec<u32>> {
    repo.get_all_embeddings(entity_type)
        .unwrap()
        .into_iter()
        .map(|(id, v)| (id, v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

fn expected_bits(ids: &[String], rows: &[Vec<f32>]) -> HashMap<String, Vec<u32>> {
    ids.iter()
        .cloned()
        .zip(rows.iter().map(|r| r.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// The rows of an exported `.npy` (little-endian f4, as the tool writes) with its ids file.
fn read_export(npy: &str, ids_file: &str) -> HashMap<String, Vec<u32>> {
    let bytes = std::fs::read(npy).unwrap();
    let file = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = file.shape().to_vec();
    assert_eq!(shape.len(), 2, "{shape:?}");
    let values: Vec<f32> = file.into_vec().unwrap();
    let ids: Vec<String> = std::fs::read_to_string(ids_file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len() as u64, shape[0]);
    let dim = shape[1] as usize;
    ids.into_iter()
        .zip(
            values
                .chunks(dim.max(1))
                .map(|c| c.iter().map(|x| x.to_bits()).collect()),
        )
        .collect()
}

fn type_count(repo: &TestRepo, entity_type: &str) -> usize {
    repo.get_all_embeddings(entity_type).unwrap().len()
}

// ---- migrate ----

#[test]
fn migrate_dry_run_and_status_change_nothing_then_migrate_applies_the_pending_files() {
    let schema = unique_schema("cli_mig");
    let dry = ok_json(run(&schema, &["migrate", "--dry-run", "--format", "json"]));
    let would: Vec<Value> = dry["would_apply"].as_array().unwrap().clone();
    assert_eq!(would[0], "V001__init.sql", "{dry}");
    let status = ok_json(run(&schema, &["--format", "json", "migrate", "--status"]));
    assert_eq!(status["pending"].as_array().unwrap(), &would);
    assert!(status["applied"].as_array().unwrap().is_empty());
    let exists: bool = admin()
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname::text = $1)",
            &[&schema],
        )
        .unwrap()
        .get(0);
    assert!(!exists, "--status and --dry-run must run no DDL");

    let applied = ok_json(run(&schema, &["migrate", "--format", "json"]));
    let after = ok_json(run(&schema, &["migrate", "--status", "--format", "json"]));
    let again = ok(run(&schema, &["migrate"]));
    drop_schema(&schema);
    assert_eq!(applied["applied"][0], "V001__init.sql", "{applied}");
    assert!(after["pending"].as_array().unwrap().is_empty(), "{after}");
    let names: Vec<&Value> = after["applied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["name"])
        .collect();
    assert_eq!(names.len(), applied["applied"].as_array().unwrap().len());
    // Times come out as RFC 3339.
    let at = after["applied"][0]["applied_at"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(at).is_ok(), "{at}");
    assert!(again.contains("up to date"), "{again}");
}

#[test]
fn a_command_on_a_schema_never_migrated_says_to_run_migrate_and_creates_nothing() {
    let schema = unique_schema("cli_nomig");
    let err = fails(run(&schema, &["models", "list"]), 1);
    assert!(err.contains("pg-model-repo migrate"), "{err}");
    let exists: bool = admin()
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname::text = $1)",
            &[&schema],
        )
        .unwrap()
        .get(0);
    assert!(!exists);
}

// ---- models ----

#[test]
fn models_push_and_pull_round_trip_bit_exact_inline_and_chunked() {
    let repo = TestRepo::new();
    let dir = scratch();
    let small: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 3) as u8).collect();
    // Past the 4 MiB chunk size: stored in chunks, streamed over several connections.
    let large: Vec<u8> = (0..9_500_000u32).map(|i| (i ^ (i >> 9)) as u8).collect();
    std::fs::write(p(dir.path(), "small.bin"), &small).unwrap();
    std::fs::write(p(dir.path(), "large.bin"), &large).unwrap();
    let pushed = ok_json(run(
        &repo.schema,
        &[
            "models",
            "push",
            "ranker",
            "1.0",
            &p(dir.path(), "small.bin"),
            "--metadata",
            r#"{"auc": 0.91}"#,
            "--format",
            "json",
        ],
    ));
    assert_eq!(pushed["checksum"], crate::common::sha256_hex(&small));
    assert_eq!(pushed["metadata"], json!({"auc": 0.91}));
    ok(run(
        &repo.schema,
        &[
            "models",
            "push",
            "ranker",
            "2.0",
            &p(dir.path(), "large.bin"),
        ],
    ));
    ok(run(
        &repo.schema,
        &["models", "alias", "set", "ranker", "champion", "1.0"],
    ));

    let pulled = ok_json(run(
        &repo.schema,
        &[
            "--format",
            "json",
            "models",
            "pull",
            "ranker",
            "latest",
            &p(dir.path(), "out_large"),
        ],
    ));
    assert_eq!(pulled["verified"], true);
    assert!(std::fs::read(p(dir.path(), "out_large")).unwrap() == large);
    ok(run(
        &repo.schema,
        &[
            "models",
            "pull",
            "ranker",
            "@champion",
            &p(dir.path(), "out_small"),
        ],
    ));
    assert_eq!(std::fs::read(p(dir.path(), "out_small")).unwrap(), small);
    // To stdout: the bytes alone.
    let out = run(&repo.schema, &["models", "pull", "ranker", "1.0", "-"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout, small);
    // From stdin.
    let mut child = Command::new(BIN)
        .args(["--url", &server_url(), "--schema", &repo.schema])
        .args(["models", "push", "ranker", "3.0", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&small).unwrap();
    }
    assert!(child.wait_with_output().unwrap().status.success());
    assert_eq!(repo.load_model("ranker", "3.0").unwrap().unwrap(), small);

    // An absent version: exit 1, and no file appears.
    let err = fails(
        run(
            &repo.schema,
            &["models", "pull", "ranker", "9.9", &p(dir.path(), "none")],
        ),
        1,
    );
    assert!(err.contains("9.9"), "{err}");
    assert!(!dir.path().join("none").exists());
    // Nothing but the pulled files is left in the directory (no temporary files).
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["large.bin", "out_large", "out_small", "small.bin"]);
}

#[test]
fn a_corrupt_model_is_refused_on_pull_and_no_file_is_left() {
    let repo = TestRepo::new();
    let dir = scratch();
    repo.save_model("m", "1", b"good bytes", &json!({}))
        .unwrap();
    repo.sql()
        .batch_execute(&crate::common::below_triggers(
            "SET model_data = 'bad bytes!'::bytea WHERE model_name = 'm'",
        ))
        .unwrap();
    let err = fails(
        run(
            &repo.schema,
            &["models", "pull", "m", "1", &p(dir.path(), "out")],
        ),
        1,
    );
    assert!(
        err.to_lowercase().contains("corrupt") || err.contains("sha256"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn models_list_show_delete_cleanup_and_every_alias_command() {
    let repo = TestRepo::new();
    for v in ["1", "2", "3"] {
        repo.save_model("ranker", v, format!("w{v}").as_bytes(), &json!({"v": v}))
            .unwrap();
    }
    repo.save_model("other", "a", b"x", &json!({})).unwrap();
    repo.save_training_metrics("ranker", "2", &[("auc".to_owned(), 0.93)].into())
        .unwrap();
    let all = ok_json(run(&repo.schema, &["models", "list", "--format", "json"]));
    let names: Vec<&str> = all["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model_name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"ranker") && names.contains(&"other"),
        "{all}"
    );
    let table = ok(run(&repo.schema, &["models", "list"]));
    assert!(table.starts_with("MODEL"), "{table}");

    ok(run(
        &repo.schema,
        &["models", "alias", "set", "ranker", "champion", "1"],
    ));
    ok(run(
        &repo.schema,
        &["models", "alias", "set", "ranker", "champion", "2"],
    ));
    let versions = ok_json(run(
        &repo.schema,
        &["models", "list", "ranker", "--format", "json"],
    ));
    let listed: Vec<&str> = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["3", "2", "1"]);
    assert_eq!(versions["versions"][1]["aliases"], json!(["champion"]));

    let shown = ok_json(run(
        &repo.schema,
        &["models", "show", "ranker@champion", "--format", "json"],
    ));
    assert_eq!(shown["version"], "2");
    assert_eq!(shown["training_metrics"], json!({"auc": 0.93}));
    assert_eq!(shown["checksum"], crate::common::sha256_hex(b"w2"));
    let latest = ok_json(run(
        &repo.schema,
        &["models", "show", "ranker:latest", "--format", "json"],
    ));
    assert_eq!(latest["version"], "3");
    let human = ok(run(&repo.schema, &["models", "show", "ranker:1"]));
    assert!(human.contains("sha256") && human.contains(&crate::common::sha256_hex(b"w1")));
    fails(run(&repo.schema, &["models", "show", "ranker:7"]), 1);

    let rolled = ok_json(run(
        &repo.schema,
        &[
            "models", "alias", "rollback", "ranker", "champion", "--format", "json",
        ],
    ));
    assert_eq!(rolled["version"], "1");
    let history = ok_json(run(
        &repo.schema,
        &[
            "models", "alias", "history", "ranker", "champion", "--format", "json",
        ],
    ));
    let moves: Vec<&str> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["version"].as_str().unwrap())
        .collect();
    assert_eq!(moves, ["1", "2", "1"]);
    ok(run(
        &repo.schema,
        &["models", "alias", "delete", "ranker", "champion"],
    ));
    assert!(repo.get_model_aliases("ranker").unwrap().is_empty());
    fails(
        run(
            &repo.schema,
            &["models", "alias", "delete", "ranker", "champion"],
        ),
        1,
    );
    // An alias to a version that does not exist: the library's NotFound, exit 1.
    fails(
        run(
            &repo.schema,
            &["models", "alias", "set", "ranker", "x", "42"],
        ),
        1,
    );

    let deleted = ok_json(run(
        &repo.schema,
        &["models", "delete", "ranker", "3", "--format", "json"],
    ));
    assert_eq!(deleted["deleted"], true);
    fails(run(&repo.schema, &["models", "delete", "ranker", "3"]), 1);
    let cleaned = ok_json(run(
        &repo.schema,
        &[
            "models", "cleanup", "ranker", "--keep", "1", "--format", "json",
        ],
    ));
    assert_eq!(cleaned["removed"], 2);
    let left: Vec<String> = repo
        .get_model_versions("ranker")
        .unwrap()
        .into_iter()
        .map(|i| i.version)
        .collect();
    assert_eq!(left, ["2"]);
}

#[test]
fn bad_metadata_and_bad_names_are_refused() {
    let repo = TestRepo::new();
    let dir = scratch();
    std::fs::write(p(dir.path(), "m.bin"), b"abc").unwrap();
    let file = p(dir.path(), "m.bin");
    let err = fails(
        run(
            &repo.schema,
            &["models", "push", "m", "1", &file, "--metadata", "{nope"],
        ),
        2,
    );
    assert!(err.contains("--metadata"), "{err}");
    fails(
        run(
            &repo.schema,
            &["models", "push", "m", "1", &file, "--metadata", "[1]"],
        ),
        2,
    );
    // A version the library refuses (reserved): exit 1 with its message.
    let err = fails(
        run(&repo.schema, &["models", "push", "m", "latest", &file]),
        1,
    );
    assert!(err.contains("latest"), "{err}");
    let err = fails(
        run(
            &repo.schema,
            &["models", "push", "m", "1", &p(dir.path(), "missing")],
        ),
        1,
    );
    assert!(err.contains("missing"), "{err}");
    assert!(repo.get_model_versions("m").unwrap().is_empty());
}

// ---- embeddings ----

#[test]
fn npy_load_and_export_round_trip_bit_exact_with_and_without_replace() {
    let repo = TestRepo::new();
    let dir = scratch();
    let rows = tricky_rows(300, 17);
    let names = ids(300, "u");
    write_npy(&p(dir.path(), "v.npy"), "<f4", &[300, 17], &f4_le(&rows));
    write_ids(&p(dir.path(), "ids.txt"), &names);
    let out = run(
        &repo.schema,
        &[
            "embeddings",
            "load",
            "user",
            "--ids",
            &p(dir.path(), "ids.txt"),
            "--vectors",
            &p(dir.path(), "v.npy"),
            "--format",
            "json",
        ],
    );
    // stderr is not a terminal here: no progress bar, nothing at all.
    assert_eq!(stderr(&out), "");
    let report = ok_json(out);
    assert_eq!(report["rows"], 300);
    assert_eq!(report["bytes"], 300 * 17 * 4);
    assert_eq!(stored_bits(&repo, "user"), expected_bits(&names, &rows));

    // Every method, each into a type of its own.
    for method in ["insert", "multi-row-insert", "copy", "parallel-copy"] {
        let t = format!("m_{}", method.replace('-', "_"));
        ok(run(
            &repo.schema,
            &[
                "embeddings",
                "load",
                &t,
                "--ids",
                &p(dir.path(), "ids.txt"),
                "--vectors",
                &p(dir.path(), "v.npy"),
                "--method",
                method,
            ],
        ));
        assert_eq!(
            stored_bits(&repo, &t),
            expected_bits(&names, &rows),
            "{method}"
        );
    }

    let exported = ok_json(run(
        &repo.schema,
        &[
            "embeddings",
            "export",
            "user",
            "--ids",
            &p(dir.path(), "out.txt"),
            "--vectors",
            &p(dir.path(), "out.npy"),
            "--format",
            "json",
        ],
    ));
    assert_eq!(exported["rows"], 300);
    assert_eq!(
        read_export(&p(dir.path(), "out.npy"), &p(dir.path(), "out.txt")),
        expected_bits(&names, &rows)
    );

    // A full refresh with another dimension: the old set goes.
    let fresh = tricky_rows(50, 5);
    let fresh_ids = ids(50, "n");
    write_npy(&p(dir.path(), "f.npy"), "<f4", &[50, 5], &f4_le(&fresh));
    write_ids(&p(dir.path(), "f.txt"), &fresh_ids);
    let replaced = ok_json(run(
        &repo.schema,
        &[
            "embeddings",
            "load",
            "user",
            "--replace",
            "--ids",
            &p(dir.path(), "f.txt"),
            "--vectors",
            &p(dir.path(), "f.npy"),
            "--format",
            "json",
        ],
    ));
    assert_eq!(replaced["rows"], 50);
    assert_eq!(
        stored_bits(&repo, "user"),
        expected_bits(&fresh_ids, &fresh)
    );
    // Without --replace: upserted beside the others.
    let more = tricky_rows(10, 5);
    let more_ids = ids(10, "extra");
    write_npy(&p(dir.path(), "more.npy"), "<f4", &[10, 5], &f4_le(&more));
    write_ids(&p(dir.path(), "more.txt"), &more_ids);
    ok(run(
        &repo.schema,
        &[
            "embeddings",
            "load",
            "user",
            "--ids",
            &p(dir.path(), "more.txt"),
            "--vectors",
            &p(dir.path(), "more.npy"),
        ],
    ));
    assert_eq!(type_count(&repo, "user"), 60);
}

#[test]
fn big_endian_and_float64_files_load_as_the_same_float32_values() {
    let repo = TestRepo::new();
    let dir = scratch();
    let rows = tricky_rows(40, 6);
    let names = ids(40, "e");
    write_ids(&p(dir.path(), "ids.txt"), &names);
    let be: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    write_npy(&p(dir.path(), "be.npy"), ">f4", &[40, 6], &be);
    // float64 holding exactly the float32 values: narrowing gives the same bits back.
    let f8le: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|v| f64::from(*v).to_le_bytes())
        .collect();
    write_npy(&p(dir.path(), "le8.npy"), "<f8", &[40, 6], &f8le);
    let f8be: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|v| f64::from(*v).to_be_bytes())
        .collect();
    write_npy(&p(dir.path(), "be8.npy"), ">f8", &[40, 6], &f8be);
    for (t, file) in [("be4", "be.npy"), ("le8", "le8.npy"), ("be8", "be8.npy")] {
        ok(run(
            &repo.schema,
            &[
                "embeddings",
                "load",
                t,
                "--ids",
                &p(dir.path(), "ids.txt"),
                "--vectors",
                &p(dir.path(), file),
            ],
        ));
        assert_eq!(
            stored_bits(&repo, t),
            expected_bits(&names, &rows),
            "{file}"
        );
    }
    // float64 values between float32's: rounded to the nearest, as `as f32` does.
    let precise = [0.1f64, 1.0 / 3.0, -2.0e-40, 123456.789];
    let bytes: Vec<u8> = precise.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(&p(dir.path(), "p.npy"), "<f8", &[1, 4], &bytes);
    write_ids(&p(dir.path(), "p.txt"), &["only".to_owned()]);
    ok(run(
        &repo.schema,
        &[
            "embeddings",
            "load",
            "precise",
            "--ids",
            &p(dir.path(), "p.txt"),
            "--vectors",
            &p(dir.path(), "p.npy"),
        ],
    ));
    let stored = repo.get_embeddings("precise", "only").unwrap().unwrap();
    let expected: Vec<f32> = precise.iter().map(|v| *v as f32).collect();
    assert_eq!(stored, expected);
}

/// Runs a load of `vectors` and `ids` into `t` (with `--replace` if asked); expects exit 1
/// and returns stderr.
fn refused_load(repo: &TestRepo, t: &str, vectors: &str, ids: &str, replace: bool) -> String {
    let mut args = vec!["embeddings", "load", t, "--ids", ids, "--vectors", vectors];
    if replace {
        args.push("--replace");
    }
    fails(run(&repo.schema, &args), 1)
}

#[test]
fn every_bad_npy_input_is_refused_naming_the_file_and_nothing_is_written() {
    let repo = TestRepo::new();
    let dir = scratch();
    let d = |n: &str| p(dir.path(), n);
    let rows = tricky_rows(20, 4);
    let names = ids(20, "b");
    write_ids(&d("ids.txt"), &names);
    write_npy(&d("good.npy"), "<f4", &[20, 4], &f4_le(&rows));
    // A type that holds vectors already: refused loads leave them as they are.
    ok(run(
        &repo.schema,
        &[
            "embeddings",
            "load",
            "kept",
            "--ids",
            &d("ids.txt"),
            "--vectors",
            &d("good.npy"),
        ],
    ));

    let check = |vectors: &str, ids: &str, wants: &[&str]| {
        for (t, replace) in [
            ("fresh", false),
            ("kept", false),
            ("kept", true),
            ("fresh", true),
        ] {
            let err = refused_load(&repo, t, vectors, ids, replace);
            for w in wants {
                assert!(
                    err.contains(w),
                    "{vectors} {ids} ({t}, replace {replace}): want {w:?} in {err}"
                );
            }
            assert!(!err.contains("panicked"), "{err}");
        }
        assert_eq!(type_count(&repo, "fresh"), 0, "{vectors}");
        assert_eq!(
            stored_bits(&repo, "kept"),
            expected_bits(&names, &rows),
            "{vectors}"
        );
    };

    // Missing files.
    check(&d("absent.npy"), &d("ids.txt"), &["absent.npy"]);
    check(&d("good.npy"), &d("absent.txt"), &["absent.txt"]);
    // Truncated: the header promises more than the file holds.
    let mut bytes = std::fs::read(d("good.npy")).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(d("trunc.npy"), &bytes).unwrap();
    check(
        &d("trunc.npy"),
        &d("ids.txt"),
        &["trunc.npy", "truncated", "row 19"],
    );
    // Not a .npy file at all.
    std::fs::write(d("text.npy"), b"id,vector\n1,2\n").unwrap();
    check(&d("text.npy"), &d("ids.txt"), &["text.npy", ".npy"]);
    // Integers.
    let ints: Vec<u8> = (0..80i64).flat_map(|v| v.to_le_bytes()).collect();
    write_npy(&d("int.npy"), "<i8", &[20, 4], &ints);
    check(&d("int.npy"), &d("ids.txt"), &["int.npy", "integers"]);
    // 1-D and 3-D arrays.
    write_npy(&d("one.npy"), "<f4", &[80], &f4_le(&rows));
    check(&d("one.npy"), &d("ids.txt"), &["one.npy", "1-D"]);
    write_npy(&d("three.npy"), "<f4", &[5, 2, 8], &f4_le(&rows));
    check(&d("three.npy"), &d("ids.txt"), &["three.npy", "3-D"]);
    // NaN and infinity in a row: the library's check, mapped back to the file's row and id.
    let mut bad = rows.clone();
    bad[13][2] = f32::NAN;
    write_npy(&d("nan.npy"), "<f4", &[20, 4], &f4_le(&bad));
    check(
        &d("nan.npy"),
        &d("ids.txt"),
        &["nan.npy row 13", "\"b13\"", "line 14", "NaN"],
    );
    let mut bad = rows.clone();
    bad[19][0] = f32::NEG_INFINITY;
    write_npy(&d("inf.npy"), "<f4", &[20, 4], &f4_le(&bad));
    check(&d("inf.npy"), &d("ids.txt"), &["inf.npy row 19", "inf"]);
    // A float64 beyond float32's range becomes infinite when narrowed, and is refused.
    let mut wide: Vec<f64> = rows.iter().flatten().map(|v| f64::from(*v)).collect();
    wide[4 * 7 + 1] = 1e300;
    let bytes: Vec<u8> = wide.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(&d("wide.npy"), "<f8", &[20, 4], &bytes);
    check(
        &d("wide.npy"),
        &d("ids.txt"),
        &["wide.npy row 7", "float32's range"],
    );
    // Fewer and more ids than rows.
    write_ids(&d("few.txt"), &names[..19]);
    check(
        &d("good.npy"),
        &d("few.txt"),
        &["few.txt", "19 ids", "20 rows"],
    );
    let mut many = names.clone();
    many.push("b_extra".to_owned());
    write_ids(&d("many.txt"), &many);
    check(
        &d("good.npy"),
        &d("many.txt"),
        &["many.txt", "21 ids", "20 rows"],
    );
    // A duplicate id, and a blank one.
    let mut dup = names.clone();
    dup[15] = "b3".to_owned();
    write_ids(&d("dup.txt"), &dup);
    check(
        &d("good.npy"),
        &d("dup.txt"),
        &["dup.txt", "duplicate id \"b3\"", "line 4", "line 16"],
    );
    let mut blank = names.clone();
    blank[6] = "   ".to_owned();
    write_ids(&d("blank.txt"), &blank);
    check(
        &d("good.npy"),
        &d("blank.txt"),
        &["blank.txt line 7", "blank"],
    );
    // A type whose dimension differs (without --replace): the library's DimensionMismatch.
    let other = tricky_rows(20, 3);
    write_npy(&d("dim3.npy"), "<f4", &[20, 3], &f4_le(&other));
    let err = refused_load(&repo, "kept", &d("dim3.npy"), &d("ids.txt"), false);
    assert!(
        err.contains("dim3.npy") && err.contains("dimension"),
        "{err}"
    );
    assert_eq!(stored_bits(&repo, "kept"), expected_bits(&names, &rows));
}

#[test]
fn export_and_drop_and_stats_and_nearest() {
    let repo = TestRepo::new();
    let dir = scratch();
    let d = |n: &str| p(dir.path(), n);
    for i in 0..10 {
        repo.save_embeddings("item", &format!("i{i}"), &[i as f32, 0.0, 1.0])
            .unwrap();
    }
    let stats = ok_json(run(
        &repo.schema,
        &["embeddings", "stats", "--format", "json"],
    ));
    let item = stats["entity_types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["entity_type"] == "item")
        .unwrap()
        .clone();
    assert_eq!(item["count"], 10);
    assert_eq!(item["dimension"], 3);

    let near = ok_json(run(
        &repo.schema,
        &[
            "embeddings",
            "nearest",
            "item",
            "--id",
            "i4",
            "-k",
            "2",
            "--format",
            "json",
        ],
    ));
    let found: Vec<&str> = near["results"][0]["neighbors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["entity_id"].as_str().unwrap())
        .collect();
    assert_eq!(found, ["i3", "i5"], "{near}");
    write_npy(&d("q.npy"), "<f4", &[3], &f4_le(&[vec![8.9, 0.0, 1.0]]));
    let near = ok_json(run(
        &repo.schema,
        &[
            "embeddings",
            "nearest",
            "item",
            "--vector",
            &d("q.npy"),
            "-k",
            "1",
            "--metric",
            "l2",
            "--format",
            "json",
        ],
    ));
    assert_eq!(near["results"][0]["neighbors"][0]["entity_id"], "i9");
    write_npy(
        &d("q2.npy"),
        "<f4",
        &[2, 3],
        &f4_le(&[vec![0.1, 0.0, 1.0], vec![6.2, 0.0, 1.0]]),
    );
    let near = ok_json(run(
        &repo.schema,
        &[
            "embeddings",
            "nearest",
            "item",
            "--vector",
            &d("q2.npy"),
            "-k",
            "1",
            "--format",
            "json",
        ],
    ));
    assert_eq!(near["results"][0]["neighbors"][0]["entity_id"], "i0");
    assert_eq!(near["results"][1]["neighbors"][0]["entity_id"], "i6");
    fails(
        run(
            &repo.schema,
            &["embeddings", "nearest", "item", "--id", "nobody"],
        ),
        1,
    );
    fails(
        run(
            &repo.schema,
            &["embeddings", "nearest", "item", "--id", "i1", "-k", "0"],
        ),
        1,
    );
    // Neither --id nor --vector: usage.
    fails(run(&repo.schema, &["embeddings", "nearest", "item"]), 2);

    // Exporting a type with no vectors writes no file.
    fails(
        run(
            &repo.schema,
            &[
                "embeddings",
                "export",
                "ghost",
                "--ids",
                &d("g.txt"),
                "--vectors",
                &d("g.npy"),
            ],
        ),
        1,
    );
    assert!(!dir.path().join("g.npy").exists() && !dir.path().join("g.txt").exists());

    let dropped = ok_json(run(
        &repo.schema,
        &["embeddings", "drop", "item", "--format", "json"],
    ));
    assert_eq!(dropped["removed"], 10);
    assert_eq!(type_count(&repo, "item"), 0);
    let human = ok(run(&repo.schema, &["embeddings", "stats"]));
    assert!(human.contains("TYPE"), "{human}");
}

// ---- cache, health, stats, optimize ----

#[test]
fn cache_stats_clear_and_purge() {
    let repo = TestRepo::new();
    for i in 0..5 {
        repo.cache_predictions(
            &format!("user{i}_recs"),
            &vec![i],
            std::time::Duration::from_secs(600),
        )
        .unwrap();
    }
    repo.cache_predictions("item_1", &1, std::time::Duration::from_secs(600))
        .unwrap();
    let stats = ok_json(run(&repo.schema, &["cache", "stats", "--format", "json"]));
    assert_eq!(stats["total_entries"], 6);
    let cleared = ok_json(run(
        &repo.schema,
        &["cache", "clear", "user*", "--format", "json"],
    ));
    assert_eq!(cleared["removed"], 5);
    assert_eq!(count(&repo, "prediction_cache"), 1);
    repo.sql()
        .batch_execute(
            "UPDATE prediction_cache SET cached_at = now() - interval '2 minutes', \
             expires_at = now() - interval '1 minute'",
        )
        .unwrap();
    let purged = ok_json(run(&repo.schema, &["cache", "purge", "--format", "json"]));
    assert_eq!(purged["purged"], 1);
    // A malformed glob: the library's InvalidInput, exit 1.
    fails(run(&repo.schema, &["cache", "clear", "[abc"]), 1);
}

#[test]
fn health_exits_0_healthy_3_degraded_4_unhealthy() {
    let repo = TestRepo::new();
    let healthy = ok_json(run(&repo.schema, &["health", "--format", "json"]));
    assert_eq!(healthy["status"], "healthy");
    assert_eq!(healthy["checks"]["database"]["ok"], true);
    let degraded = run(
        &repo.schema,
        &["health", "--degraded-above-ms", "0", "--format", "json"],
    );
    assert_eq!(degraded.status.code(), Some(3), "{}", stderr(&degraded));
    let report: Value = serde_json::from_slice(&degraded.stdout).unwrap();
    assert_eq!(report["status"], "degraded");
    // Nothing listens on port 1.
    let out = Command::new(BIN)
        .args(["health", "--url", "postgres://nobody@127.0.0.1:1/db"])
        .env("DB_POOL_TIMEOUT", "1")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stdout(&out).contains("unhealthy"));
}

#[test]
fn stats_and_optimize_report_what_the_library_says() {
    let repo = TestRepo::new();
    repo.save_model("m", "1", b"12345", &json!({})).unwrap();
    repo.save_embeddings("t", "a", &[1.0, 2.0]).unwrap();
    let stats = ok_json(run(&repo.schema, &["stats", "--format", "json"]));
    assert_eq!(stats["models"]["total_models"], 1);
    assert_eq!(stats["models"]["total_bytes"], 5);
    assert_eq!(stats["embeddings"]["total_embeddings"], 1);
    assert!(stats["embeddings"]["entity_types"][0]["last_update"].is_string());
    let optimized = ok_json(run(
        &repo.schema,
        &["optimize", "--format", "json", "--quiet"],
    ));
    assert!(!optimized["tables"].as_array().unwrap().is_empty());
    assert!(optimized["elapsed"].is_number(), "{optimized}");
    let human = ok(run(&repo.schema, &["stats"]));
    assert!(human.contains("models: 1"), "{human}");
}

// ---- the command line ----

#[test]
fn global_options_work_before_and_after_the_subcommand() {
    let repo = TestRepo::new();
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    let url = server_url();
    for args in [
        vec![
            "--url",
            &url,
            "--schema",
            &repo.schema,
            "--format",
            "json",
            "models",
            "list",
        ],
        vec![
            "models",
            "list",
            "--url",
            &url,
            "--schema",
            &repo.schema,
            "--format",
            "json",
        ],
        vec![
            "models",
            "--format",
            "json",
            "list",
            "--schema",
            &repo.schema,
            "--quiet",
        ],
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .env("DATABASE_URL", &url)
            .output()
            .unwrap();
        let value: Value = serde_json::from_str(&ok(out)).unwrap();
        assert_eq!(value["models"][0]["model_name"], "m", "{args:?}");
    }
    // MODEL_REPO_SCHEMA, the library's variable, names the schema too.
    let out = Command::new(BIN)
        .args(["models", "list", "--format", "json"])
        .env("DATABASE_URL", &url)
        .env("MODEL_REPO_SCHEMA", &repo.schema)
        .output()
        .unwrap();
    assert_eq!(ok_json(out)["models"][0]["model_name"], "m");
}

#[test]
fn bad_usage_exits_2() {
    for args in [
        vec!["bogus"],
        vec!["models"],
        vec!["models", "list", "--format", "xml"],
        vec!["embeddings", "load", "t", "--ids", "a.txt"],
        vec![
            "embeddings",
            "load",
            "t",
            "--vectors",
            "v.npy",
            "--ids",
            "i",
            "--parquet",
            "p",
        ],
        vec!["models", "cleanup", "m", "--keep", "-1"],
    ] {
        let out = run_with(&server_url(), &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    // No database named anywhere.
    let out = Command::new(BIN)
        .args(["models", "list"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("DATABASE_URL"));
    // --help is the manual, exit 0.
    let out = run_with(&server_url(), &["embeddings", "load", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("--replace"));
}

/// `url` with `password` in it (trust authentication ignores it).
fn with_password(url: &str, password: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (userinfo, host) = rest.split_once('@').unwrap_or(("postgres", rest));
            let user = userinfo.split(':').next().unwrap();
            format!("{scheme}://{user}:{password}@{host}")
        }
        None => format!("{url} password={password}"),
    }
}

#[test]
fn the_password_never_appears_in_any_output() {
    const SECRET: &str = "Sup3rS3cretPw";
    let repo = TestRepo::new();
    let dir = scratch();
    let d = |n: &str| p(dir.path(), n);
    write_npy(
        &d("nan.npy"),
        "<f4",
        &[1, 2],
        &f4_le(&[vec![f32::NAN, 1.0]]),
    );
    write_ids(&d("ids.txt"), &["a".to_owned()]);
    let good = with_password(&server_url(), SECRET);
    let unreachable = format!("postgres://someone:{SECRET}@127.0.0.1:1/db");
    let malformed = format!("postgres://someone:{SECRET}@127.0.0.1:notaport/db");
    let schema = repo.schema.clone();
    let (ids_file, nan_file) = (d("ids.txt"), d("nan.npy"));
    let cases: Vec<(String, Vec<&str>)> = vec![
        (good.clone(), vec!["health"]),
        (good.clone(), vec!["health", "--format", "json"]),
        (
            good.clone(),
            vec!["migrate", "--status", "--schema", &schema],
        ),
        (good.clone(), vec!["models", "list", "--schema", &schema]),
        (
            good.clone(),
            vec!["models", "show", "nope:1", "--schema", &schema],
        ),
        (
            good.clone(),
            vec![
                "models",
                "push",
                "m",
                "latest",
                "/nonexistent",
                "--schema",
                &schema,
            ],
        ),
        (
            good.clone(),
            vec![
                "embeddings",
                "load",
                "t",
                "--ids",
                &ids_file,
                "--vectors",
                &nan_file,
                "--schema",
                &schema,
            ],
        ),
        (
            good.clone(),
            vec!["models", "list", "--schema", "bad schema!"],
        ),
        (good.clone(), vec!["--help"]),
        (good.clone(), vec!["models", "list", "--bogus"]),
        (unreachable.clone(), vec!["health", "--format", "json"]),
        (unreachable.clone(), vec!["models", "list"]),
        (malformed.clone(), vec!["health"]),
        (malformed.clone(), vec!["migrate"]),
    ];
    for (url, args) in cases {
        for via_env in [false, true] {
            let mut command = Command::new(BIN);
            command
                .args(&args)
                .env("DB_POOL_TIMEOUT", "1")
                .env("MODEL_REPO_LOG", "debug");
            if via_env {
                command.env("DATABASE_URL", &url);
            } else {
                command.env_remove("DATABASE_URL").arg("--url").arg(&url);
            }
            let out = command.output().unwrap();
            let all = format!("{}{}", stdout(&out), stderr(&out));
            assert!(
                !all.contains(SECRET),
                "{args:?} (env {via_env}) printed the password:\n{all}"
            );
        }
    }
}

// ---- Parquet ----

#[cfg(feature = "parquet")]
mod parquet_files {
    use std::sync::Arc;

    use arrow_array::builder::{FixedSizeListBuilder, Float32Builder, Float64Builder, ListBuilder};
    use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;

    use super::*;

    /// Writes `columns` to a Parquet file, in row groups of `group` rows.
    pub fn write(path: &str, columns: Vec<(&str, ArrayRef)>, group: usize) {
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let props = WriterProperties::builder()
            .set_max_row_group_size(group)
            .build();
        let file = std::fs::File::create(path).unwrap();
        let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    }

    pub fn fixed_f32(rows: &[Vec<f32>]) -> ArrayRef {
        let dim = rows[0].len() as i32;
        let mut b = FixedSizeListBuilder::new(Float32Builder::new(), dim);
        for r in rows {
            b.values().append_slice(r);
            b.append(true);
        }
        Arc::new(b.finish())
    }

    pub fn list_f64(rows: &[Vec<f64>]) -> ArrayRef {
        let mut b = ListBuilder::new(Float64Builder::new());
        for r in rows {
            b.values().append_slice(r);
            b.append(true);
        }
        Arc::new(b.finish())
    }

    pub fn strings(ids: &[String]) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(ids))
    }

    /// The (id, vector) rows of a Parquet file the tool exported.
    pub fn read_export(path: &str) -> HashMap<String, Vec<u32>> {
        use arrow_array::cast::AsArray;
        use arrow_array::types::Float32Type;
        let file = std::fs::File::open(path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let mut out = HashMap::new();
        for batch in reader {
            let batch = batch.unwrap();
            let ids = batch
                .column_by_name("id")
                .unwrap()
                .as_string::<i32>()
                .clone();
            let vectors = batch
                .column_by_name("vector")
                .unwrap()
                .as_fixed_size_list()
                .clone();
            for i in 0..batch.num_rows() {
                let v = vectors.value(i);
                let bits = v
                    .as_primitive::<Float32Type>()
                    .values()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                out.insert(ids.value(i).to_owned(), bits);
            }
        }
        out
    }

    #[test]
    fn parquet_load_and_export_round_trip_bit_exact() {
        let repo = TestRepo::new();
        let dir = scratch();
        let d = |n: &str| p(dir.path(), n);
        let rows = tricky_rows(500, 8);
        let names = ids(500, "p");
        write(
            &d("f32.parquet"),
            vec![("id", strings(&names)), ("vector", fixed_f32(&rows))],
            128,
        );
        let loaded = ok_json(run(
            &repo.schema,
            &[
                "embeddings",
                "load",
                "pq",
                "--parquet",
                &d("f32.parquet"),
                "--format",
                "json",
            ],
        ));
        assert_eq!(loaded["rows"], 500);
        assert_eq!(stored_bits(&repo, "pq"), expected_bits(&names, &rows));

        // List of float64 in other columns, integer ids, as a full refresh.
        let wide: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| r.iter().map(|v| f64::from(*v)).collect())
            .collect();
        let int_ids: Vec<i64> = (0..500).collect();
        write(
            &d("f64.parquet"),
            vec![
                ("key", Arc::new(Int64Array::from(int_ids)) as ArrayRef),
                ("emb", list_f64(&wide)),
            ],
            100,
        );
        ok(run(
            &repo.schema,
            &[
                "embeddings",
                "load",
                "pq",
                "--replace",
                "--parquet",
                &d("f64.parquet"),
                "--id-column",
                "key",
                "--vector-column",
                "emb",
            ],
        ));
        let by_int: Vec<String> = (0..500).map(|i| i.to_string()).collect();
        assert_eq!(stored_bits(&repo, "pq"), expected_bits(&by_int, &rows));

        ok(run(
            &repo.schema,
            &["embeddings", "export", "pq", "--parquet", &d("out.parquet")],
        ));
        assert_eq!(
            read_export(&d("out.parquet")),
            expected_bits(&by_int, &rows)
        );
    }

    #[test]
    fn every_bad_parquet_input_is_refused_and_nothing_is_written() {
        let repo = TestRepo::new();
        let dir = scratch();
        let d = |n: &str| p(dir.path(), n);
        let rows = tricky_rows(30, 4);
        let names = ids(30, "q");
        let load = |file: &str, extra: &[&str], replace: bool| {
            let mut args = vec!["embeddings", "load", "pq", "--parquet", file];
            args.extend_from_slice(extra);
            if replace {
                args.push("--replace");
            }
            run(&repo.schema, &args)
        };
        let check = |file: &str, extra: &[&str], wants: &[&str]| {
            for replace in [false, true] {
                let err = fails(load(file, extra, replace), 1);
                for w in wants {
                    assert!(err.contains(w), "{file}: want {w:?} in {err}");
                }
            }
            assert_eq!(type_count(&repo, "pq"), 0, "{file}");
        };
        write(
            &d("good.parquet"),
            vec![("id", strings(&names)), ("vector", fixed_f32(&rows))],
            10,
        );
        check(&d("absent.parquet"), &[], &["absent.parquet"]);
        check(
            &d("good.parquet"),
            &["--vector-column", "embedding"],
            &["good.parquet", "\"embedding\"", "id, vector"],
        );
        check(
            &d("good.parquet"),
            &["--id-column", "user"],
            &["good.parquet", "\"user\""],
        );
        // A vector column of another type (strings), and a list of integers.
        write(
            &d("strvec.parquet"),
            vec![("id", strings(&names)), ("vector", strings(&names))],
            10,
        );
        check(
            &d("strvec.parquet"),
            &[],
            &["strvec.parquet", "\"vector\"", "FixedSizeList or List"],
        );
        let mut ints =
            arrow_array::builder::ListBuilder::new(arrow_array::builder::Int32Builder::new());
        for _ in 0..30 {
            ints.values().append_slice(&[1, 2]);
            ints.append(true);
        }
        write(
            &d("intvec.parquet"),
            vec![
                ("id", strings(&names)),
                ("vector", Arc::new(ints.finish()) as ArrayRef),
            ],
            10,
        );
        check(
            &d("intvec.parquet"),
            &[],
            &["intvec.parquet", "FixedSizeList or List"],
        );
        // An id column of floats.
        let floats = Arc::new(arrow_array::Float64Array::from(vec![1.5; 30])) as ArrayRef;
        write(
            &d("floatid.parquet"),
            vec![("id", floats), ("vector", fixed_f32(&rows))],
            10,
        );
        check(
            &d("floatid.parquet"),
            &[],
            &["floatid.parquet", "strings or integers"],
        );
        // A duplicate id, and NaN in a row.
        let mut dup = names.clone();
        dup[21] = "q2".to_owned();
        write(
            &d("dup.parquet"),
            vec![("id", strings(&dup)), ("vector", fixed_f32(&rows))],
            10,
        );
        check(
            &d("dup.parquet"),
            &[],
            &["dup.parquet", "duplicate id \"q2\"", "row 2", "row 21"],
        );
        let mut bad = rows.clone();
        bad[25][3] = f32::NAN;
        write(
            &d("nan.parquet"),
            vec![("id", strings(&names)), ("vector", fixed_f32(&bad))],
            10,
        );
        check(
            &d("nan.parquet"),
            &[],
            &["nan.parquet row 25", "\"q25\"", "NaN"],
        );
        // Not a Parquet file.
        std::fs::write(d("text.parquet"), "id,vector\n").unwrap();
        check(&d("text.parquet"), &[], &["text.parquet", "Parquet"]);
    }

    /// A read error in mid-stream: the footer and the id column are sound (every check
    /// passes), then a page of the vector column in the last row group is garbage. The load
    /// fails naming the file, and nothing is written; a full refresh keeps the old set.
    #[test]
    fn a_read_error_in_mid_stream_fails_the_load_and_writes_nothing() {
        let repo = TestRepo::new();
        let dir = scratch();
        let d = |n: &str| p(dir.path(), n);
        let rows = tricky_rows(4000, 16);
        let names = ids(4000, "s");
        write(
            &d("s.parquet"),
            vec![("id", strings(&names)), ("vector", fixed_f32(&rows))],
            1000,
        );
        // Where the last row group's vector column starts.
        let file = std::fs::File::open(d("s.parquet")).unwrap();
        let reader = parquet::file::reader::SerializedFileReader::new(file).unwrap();
        use parquet::file::reader::FileReader;
        let meta = reader.metadata();
        let last = meta.row_group(meta.num_row_groups() - 1);
        let column = last.column(1);
        let start = column.data_page_offset() as usize;
        let len = column.compressed_size() as usize;
        let mut bytes = std::fs::read(d("s.parquet")).unwrap();
        for b in &mut bytes[start..start + len.min(64)] {
            *b = 0xff;
        }
        std::fs::write(d("broken.parquet"), &bytes).unwrap();
        ok(run(
            &repo.schema,
            &["embeddings", "load", "old", "--parquet", &d("s.parquet")],
        ));
        let broken = d("broken.parquet");
        for (t, replace) in [("new", false), ("old", true)] {
            let mut args = vec!["embeddings", "load", t, "--parquet", &broken];
            if replace {
                args.push("--replace");
            }
            let err = fails(run(&repo.schema, &args), 1);
            assert!(err.contains("broken.parquet"), "{err}");
            assert!(err.contains("nothing was written"), "{err}");
        }
        assert_eq!(type_count(&repo, "new"), 0);
        assert_eq!(stored_bits(&repo, "old"), expected_bits(&names, &rows));
    }
}

// ---- numpy and pyarrow ----

/// The Python interpreter with numpy and pyarrow, if there is one (`MODEL_REPO_PYTHON`, else
/// python3).
fn python_with_numpy_and_pyarrow() -> Option<PathBuf> {
    let python = std::env::var("MODEL_REPO_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let ok = Command::new(&python)
        .args(["-c", "import numpy, pyarrow, pyarrow.parquet"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| PathBuf::from(python))
}

/// numpy writes .npy files (f4 and f8, both byte orders) and pyarrow a Parquet file (list
/// and fixed-size list of float32, Snappy); each loads bit-exact, and numpy reads the tool's
/// exports back bit-exact.
#[test]
fn files_written_by_numpy_and_pyarrow_load_bit_exact_and_numpy_reads_the_exports() {
    let Some(python) = python_with_numpy_and_pyarrow() else {
        println!(
            "NOT RUN: files_written_by_numpy_and_pyarrow_load_bit_exact: no python3 with numpy \
             and pyarrow (set MODEL_REPO_PYTHON to an interpreter that has them)"
        );
        return;
    };
    let repo = TestRepo::new();
    let dir = scratch();
    let d = |n: &str| p(dir.path(), n);
    let script = format!(
        r#"
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
rng = np.random.default_rng(7)
v = rng.standard_normal((257, 33)).astype(np.float32)
v[0, 0] = -0.0; v[1, 1] = np.finfo(np.float32).tiny / 4; v[2, 2] = np.finfo(np.float32).max
ids = [f"py{{i}}" for i in range(257)]
np.save(r"{le4}", v)
np.save(r"{be4}", v.astype(">f4"))
np.save(r"{le8}", v.astype(np.float64))
np.save(r"{be8}", v.astype(">f8"))
open(r"{ids}", "w").write("".join(i + "\n" for i in ids))
v.astype("<f4").tofile(r"{raw}")
pq.write_table(pa.table({{"id": ids, "vector": pa.array(list(v), type=pa.list_(pa.float32()))}}), r"{list}")
pq.write_table(pa.table({{"id": ids, "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), 33)}}), r"{fixed}")
"#,
        le4 = d("le4.npy"),
        be4 = d("be4.npy"),
        le8 = d("le8.npy"),
        be8 = d("be8.npy"),
        ids = d("ids.txt"),
        raw = d("raw.f4"),
        list = d("list.parquet"),
        fixed = d("fixed.parquet"),
    );
    let out = Command::new(&python)
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = std::fs::read(d("raw.f4")).unwrap();
    let rows: Vec<Vec<f32>> = raw
        .chunks(33 * 4)
        .map(|r| {
            r.chunks(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
        .collect();
    let names = ids(257, "py");
    let expected = expected_bits(&names, &rows);
    for (t, file) in [
        ("le4", "le4.npy"),
        ("be4", "be4.npy"),
        ("le8", "le8.npy"),
        ("be8", "be8.npy"),
    ] {
        ok(run(
            &repo.schema,
            &[
                "embeddings",
                "load",
                t,
                "--ids",
                &d("ids.txt"),
                "--vectors",
                &d(file),
            ],
        ));
        assert_eq!(stored_bits(&repo, t), expected, "{file}");
    }
    let parquet_files: &[(&str, &str)] = if cfg!(feature = "parquet") {
        &[("pl", "list.parquet"), ("pf", "fixed.parquet")]
    } else {
        println!("NOT RUN: the pyarrow half (build with --features cli,parquet)");
        &[]
    };
    for (t, file) in parquet_files {
        ok(run(
            &repo.schema,
            &["embeddings", "load", t, "--parquet", &d(file)],
        ));
        assert_eq!(stored_bits(&repo, t), expected, "{file}");
    }
    // numpy reads the export; it writes what it read as raw bytes in the ids' order.
    ok(run(
        &repo.schema,
        &[
            "embeddings",
            "export",
            "le4",
            "--ids",
            &d("out.txt"),
            "--vectors",
            &d("out.npy"),
        ],
    ));
    let check = format!(
        r#"
import numpy as np
a = np.load(r"{npy}")
assert a.dtype == np.float32 and a.ndim == 2, (a.dtype, a.shape)
ids = open(r"{ids}").read().split("\n")[:-1]
order = sorted(range(len(ids)), key=lambda i: int(ids[i][2:]))
a[order].astype("<f4").tofile(r"{back}")
"#,
        npy = d("out.npy"),
        ids = d("out.txt"),
        back = d("back.f4")
    );
    let out = Command::new(&python).args(["-c", &check]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(d("back.f4")).unwrap() == raw,
        "numpy read back other bits"
    );
    if cfg!(feature = "parquet") {
        ok(run(
            &repo.schema,
            &[
                "embeddings",
                "export",
                "le4",
                "--parquet",
                &d("out.parquet"),
            ],
        ));
        let check = format!(
            r#"
import numpy as np, pyarrow.parquet as pq
t = pq.read_table(r"{pq}")
ids = t.column("id").to_pylist()
vec = np.array(t.column("vector").to_pylist(), dtype=np.float32)
order = sorted(range(len(ids)), key=lambda i: int(ids[i][2:]))
vec[order].astype("<f4").tofile(r"{back}")
"#,
            pq = d("out.parquet"),
            back = d("back2.f4")
        );
        let out = Command::new(&python).args(["-c", &check]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            std::fs::read(d("back2.f4")).unwrap() == raw,
            "pyarrow read back other bits"
        );
    }
}
