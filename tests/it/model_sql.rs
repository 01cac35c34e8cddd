//! Every model readable by other clients (API.md, "Models in production"): `model_bytes` and
//! `model_chunks` in the schema, `model_data` NULL (never empty) for a chunked version, and the
//! Python of docs/migrating-from-python.md run as written on a 5 MiB and a 1.5 GiB model.

use std::time::Instant;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::common::{self, sha256_hex, TestRepo};
use crate::large_models::{disk_free_bytes, hex, Generated, HashingReader};

fn bytes_of(repo: &TestRepo, version: &str) -> Option<Vec<u8>> {
    repo.sql()
        .query_one("SELECT model_bytes('m', $1)", &[&version])
        .unwrap()
        .get(0)
}

fn chunks_of(repo: &TestRepo, version: &str) -> Vec<Vec<u8>> {
    repo.sql()
        .query("SELECT * FROM model_chunks('m', $1)", &[&version])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn model_bytes_and_model_chunks_read_inline_and_chunked_models_alike() {
    let repo = TestRepo::with_config(|c| c.model_chunk_size(64 << 10));
    let big = Generated::bytes(3, 5 * (64 << 10) + 17);
    repo.save_model("m", "small", b"tiny", &json!({})).unwrap();
    repo.save_model("m", "big", &big, &json!({})).unwrap();
    repo.save_model("m", "empty", b"", &json!({})).unwrap();

    assert_eq!(bytes_of(&repo, "small").unwrap(), b"tiny");
    assert!(bytes_of(&repo, "big").unwrap() == big);
    assert_eq!(bytes_of(&repo, "empty").unwrap(), b"");
    assert_eq!(chunks_of(&repo, "small"), [b"tiny".to_vec()]);
    let pieces = chunks_of(&repo, "big");
    assert_eq!(pieces.len(), 6, "one row a chunk");
    assert!(pieces.concat() == big, "in order");
    assert_eq!(chunks_of(&repo, "empty"), [Vec::<u8>::new()]);

    // Absent and soft-deleted versions: NULL, no rows.
    assert_eq!(bytes_of(&repo, "nope"), None);
    assert!(chunks_of(&repo, "nope").is_empty());
    repo.delete_model("m", "big").unwrap();
    assert_eq!(bytes_of(&repo, "big"), None);
    assert!(chunks_of(&repo, "big").is_empty());

    // A reader that does not know about chunks never gets an empty model: NULL.
    repo.save_model("m", "big2", &big, &json!({})).unwrap();
    let row = repo
        .sql()
        .query_one(
            "SELECT model_data, checksum, size_bytes FROM ml_models WHERE version = 'big2'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, Option<Vec<u8>>>(0), None);
    assert_eq!(row.get::<_, String>(1), sha256_hex(&big));
    assert_eq!(row.get::<_, i64>(2), big.len() as i64);
    // The database keeps it so: a chunked row with bytes, or an inline one without, is refused.
    let mut sql = repo.sql();
    assert!(sql
        .execute(
            "UPDATE ml_models SET model_data = 'x' WHERE version = 'big2'",
            &[]
        )
        .is_err());
    assert!(sql
        .execute(
            "INSERT INTO ml_models (model_name, version, model_data) VALUES ('m', 'null', NULL)",
            &[]
        )
        .is_err());
    // Revived inline, then chunked again: model_data follows the layout.
    repo.delete_model("m", "big2").unwrap();
    repo.save_model("m", "big2", b"now inline", &json!({}))
        .unwrap();
    assert_eq!(bytes_of(&repo, "big2").unwrap(), b"now inline");
    repo.delete_model("m", "big2").unwrap();
    repo.save_model("m", "big2", &big, &json!({})).unwrap();
    assert!(bytes_of(&repo, "big2").unwrap() == big);
}

/// Reports a cross-check that could not run (libtest captures only the print macros).
fn announce(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The Python block of docs/migrating-from-python.md that starts with `first_line`.
fn documented_python(first_line: &str) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/migrating-from-python.md"
    ))
    .unwrap();
    text.split("```python\n")
        .skip(1)
        .filter_map(|block| block.split("\n```").next())
        .find(|block| block.starts_with(first_line))
        .unwrap_or_else(|| panic!("no python block starting with {first_line:?}"))
        .to_owned()
}

/// `url` naming database `dbname` instead (a key/value string or a `postgres://` URL).
fn in_database(url: &str, dbname: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return format!("{url} dbname={dbname}");
    };
    let (url, query) = url.split_once('?').map_or((url, ""), |(u, q)| (u, q));
    let authority_end = url[scheme_end + 3..]
        .find('/')
        .map_or(url.len(), |i| scheme_end + 3 + i);
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{}/{dbname}{query}", &url[..authority_end])
}

/// A database of the test's own on the suite's server (or cluster), where it can create one:
/// a long read's snapshot there holds back no VACUUM of the suite's database (the horizon of
/// ordinary tables is per database). Else the suite's own database.
fn own_database(name: &str) -> String {
    #[cfg(feature = "citus")]
    {
        if let Some(cluster) = common::citus_cluster() {
            if cluster.create_database(name).is_ok() {
                return in_database(&cluster.url(), name);
            }
        }
        common::server_url()
    }
    #[cfg(not(feature = "citus"))]
    {
        match common::admin().batch_execute(&format!("CREATE DATABASE \"{name}\"")) {
            Ok(()) => in_database(&common::server_url(), name),
            Err(e) => {
                announce(&format!(
                    "model_sql: no database of its own ({e}); using the suite's"
                ));
                common::server_url()
            }
        }
    }
}

#[test]
fn database_urls_are_rewritten_for_another_database() {
    assert_eq!(
        in_database("host=h port=1 user=u dbname=postgres", "x"),
        "host=h port=1 user=u dbname=postgres dbname=x"
    );
    assert_eq!(
        in_database("postgres://u:p@h:1/db?sslmode=disable", "x"),
        "postgres://u:p@h:1/x?sslmode=disable"
    );
    assert_eq!(in_database("postgresql://h", "x"), "postgresql://h/x");
}

#[test]
fn the_documented_python_reads_a_5_mib_and_a_1_5_gib_model_with_sha256_checked() {
    let python = common::python();
    let probe = std::process::Command::new(&python)
        .args(["-c", "import psycopg"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        announce(&format!(
            "model_sql: python read of a 5 MiB and a 1.5 GiB model NOT RUN ({python} cannot \
             import psycopg); to run it: pip install 'psycopg[binary]'"
        ));
        return;
    }
    let free = disk_free_bytes();
    assert!(
        free > 8 << 30,
        "the 1.5 GiB test needs ~5 GiB of disk (table, WAL); {} MiB free",
        free >> 20
    );
    let script = std::env::temp_dir().join(format!("read_model_{}.py", std::process::id()));
    std::fs::write(&script, documented_python("# read_model.py")).unwrap();
    let database = format!("bigread_{}", std::process::id());
    let url = own_database(&database);
    let schema = &common::unique_schema("bigread");
    let repo = pg_model_repo::ModelRepository::open(
        pg_model_repo::RepositoryConfig::new(url.clone())
            .schema(schema)
            .pool_size(2)
            .max_overflow(4)
            .pool_timeout(std::time::Duration::from_secs(10))
            .reaper_interval(None),
    )
    .unwrap();
    let sql = || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        client
            .batch_execute(&format!("SET search_path TO {schema}"))
            .unwrap();
        client
    };
    let read = |version: &str| {
        let started = Instant::now();
        let output = std::process::Command::new(&python)
            .arg(&script)
            .args([url.as_str(), schema, "m", version])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        assert!(
            output.status.success(),
            "read_model.py {version}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        (stdout, started.elapsed())
    };

    let five = Generated::bytes(5, 5 << 20);
    let info = repo.save_model("m", "5MiB", &five, &json!({})).unwrap();
    let (out, _) = read("5MiB");
    assert_eq!(out, format!("model_bytes {} {}", 5 << 20, info.checksum));

    let size: u64 = (3 << 30) / 2;
    let mut reader = HashingReader {
        inner: Generated::new(15, size),
        hasher: Sha256::new(),
    };
    let info = repo
        .save_model_from_reader("m", "1.5GiB", &mut reader, &json!({}))
        .unwrap();
    assert_eq!(info.checksum, hex(reader.hasher));
    let (out, took) = read("1.5GiB");
    assert_eq!(out, format!("model_chunks {size} {}", info.checksum));
    // More than one bytea holds: model_bytes says what to use instead.
    let err = sql()
        .query_one("SELECT model_bytes('m', '1.5GiB')", &[])
        .unwrap_err();
    let db = err.as_db_error().expect("a database error");
    assert_eq!(db.code().code(), "54000");
    assert!(db.hint().unwrap_or("").contains("model_chunks"), "{db:?}");
    announce(&format!(
        "model_sql: the documented python read 5 MiB with model_bytes and 1.5 GiB with \
         model_chunks ({took:?}), sha256 checked"
    ));
    let _ = std::fs::remove_file(&script);
    repo.close();
    let _ = sql().batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
    #[cfg(not(feature = "citus"))]
    if url != common::server_url() {
        let _ =
            common::admin().batch_execute(&format!("DROP DATABASE \"{database}\" WITH (FORCE)"));
    }
}

#[test]
fn the_migration_turns_the_empty_model_data_of_chunked_versions_into_null() {
    use crate::common::{admin, config, unique_schema, PLAIN_SCHEMA};
    let schema = unique_schema("v009");
    let mut sql = admin();
    // The layout before V009, with a chunked version as the library wrote it then.
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
            name.starts_with('V') && name.as_str() < "V009"
        })
        .collect();
    earlier.sort();
    for file in &earlier {
        sql.batch_execute(&std::fs::read_to_string(file).unwrap())
            .unwrap();
    }
    let (a, b) = (vec![1u8; 100], vec![2u8; 50]);
    let whole = [a.clone(), b.clone()].concat();
    sql.execute(
        "INSERT INTO ml_models (model_name, version, model_data, checksum, size_bytes, \
             chunk_size, chunk_count, chunk_set, save_seq)
         VALUES ('m', 'old', ''::bytea, $1, 150, 100, 2, 9, 1)",
        &[&sha256_hex(&whole)],
    )
    .unwrap();
    for (no, data) in [(0, &a), (1, &b)] {
        sql.execute(
            "INSERT INTO ml_model_chunks (model_name, version, chunk_set, chunk_no, checksum, \
                 data, staged_at) VALUES ('m', 'old', 9, $1, $2, $3, NULL)",
            &[&no, &sha256_hex(data), data],
        )
        .unwrap();
    }
    sql.execute(
        "INSERT INTO ml_models (model_name, version, model_data, save_seq) VALUES ('m', 'inline', 'x', 2)",
        &[],
    )
    .unwrap();

    let repo = pg_model_repo::ModelRepository::open(config(&schema)).unwrap();
    let rows: Vec<(String, Option<Vec<u8>>, String, i64)> = sql
        .query(
            "SELECT version::text, model_data, checksum, save_seq FROM ml_models ORDER BY version",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        rows,
        [
            (
                "inline".to_owned(),
                Some(b"x".to_vec()),
                sha256_hex(b"x"),
                2
            ),
            // NULL now, with its checksum and save sequence as they were.
            ("old".to_owned(), None, sha256_hex(&whole), 1),
        ]
    );
    assert_eq!(repo.load_model("m", "old").unwrap().unwrap(), whole);
    assert_eq!(repo.load_model("m", "latest").unwrap().unwrap(), b"x");
    let via_sql: Vec<u8> = sql
        .query_one("SELECT model_bytes('m', 'old')", &[])
        .unwrap()
        .get(0);
    assert_eq!(via_sql, whole);
    repo.close();
    common::drop_schema(&schema);
}

/// A schema built without Citus has the streaming SQL `model_chunks`; distributing it with
/// sql/citus.sql makes it the PL/pgSQL one that Citus can run.
#[cfg(feature = "citus")]
#[test]
fn distributing_a_schema_built_without_citus_makes_model_chunks_one_citus_runs() {
    use pg_model_repo::CitusMode;
    let schema = crate::common::unique_schema("chunks");
    let local = pg_model_repo::ModelRepository::open(
        crate::common::config(&schema)
            .citus(CitusMode::Off)
            .model_chunk_size(64 << 10),
    )
    .unwrap();
    let big = Generated::bytes(8, 3 * (64 << 10) + 5);
    local.save_model("m", "big", &big, &json!({})).unwrap();
    local.close();
    let mut sql = crate::common::admin();
    // As V009 leaves it where the database has no Citus (the body does not matter here).
    sql.batch_execute(&format!(
        "SET search_path TO {schema};
         CREATE OR REPLACE FUNCTION model_chunks(model_name text, version text)
             RETURNS SETOF bytea LANGUAGE sql STABLE AS 'SELECT NULL::bytea WHERE false';"
    ))
    .unwrap();
    let search_path = format!("SET search_path TO {schema}");
    crate::common::psql(
        &common::server_url(),
        &[
            "-1",
            "-c",
            &search_path,
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/sql/citus.sql"),
        ],
    );
    let language: String = sql
        .query_one(
            "SELECT l.lanname::text FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang \
             WHERE p.oid = 'model_chunks(text, text)'::regprocedure",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(language, "plpgsql");
    let pieces: Vec<Vec<u8>> = sql
        .query("SELECT * FROM model_chunks('m', $1)", &[&"big"])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pieces.len(), 4);
    assert!(pieces.concat() == big);
    common::drop_schema(&schema);
}
