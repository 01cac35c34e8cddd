//! Taking over a database that the seed's Python repository built (issue 12, item 5): the
//! seed's exact DDL, rows in every table written as its Python code writes them (float64
//! embeddings, vectors of a bad length, pickled cache values), `migrate`, then every row
//! checked; a second `migrate` changes nothing; a failed takeover changes nothing.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use pg_model_repo::{ModelRepository, RepoError, SeedTakeoverReport};
use postgres::Client;
use serde_json::{json, Value};

use crate::common::{admin, config, drop_schema, sha256_hex, unique_schema, PLAIN_SCHEMA};
use crate::interop::{PICKLED_DICT, PICKLED_LIST};

/// The seed document's DDL, verbatim ("Database Schema").
const SEED_DDL: &str = r#"
CREATE TABLE ml_models (
    id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    model_name VARCHAR(255) NOT NULL,
    version VARCHAR(50) NOT NULL,
    model_data BYTEA NOT NULL,
    metadata JSONB NOT NULL DEFAULT '{}',
    created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    is_active BOOLEAN DEFAULT TRUE,
    
    CONSTRAINT uq_model_name_version UNIQUE (model_name, version)
);

CREATE TABLE embeddings (
    id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    entity_type VARCHAR(50) NOT NULL,
    entity_id VARCHAR(255) NOT NULL,
    embeddings BYTEA NOT NULL,
    dimension INTEGER NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    
    CONSTRAINT uq_entity_type_id UNIQUE (entity_type, entity_id)
);

CREATE TABLE prediction_cache (
    id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    cache_key VARCHAR(512) NOT NULL UNIQUE,
    predictions BYTEA NOT NULL,
    metadata JSONB NOT NULL DEFAULT '{}',
    cached_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    expires_at TIMESTAMP WITH TIME ZONE NOT NULL,
    access_count INTEGER DEFAULT 0,
    last_accessed TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    
    CONSTRAINT prediction_cache_expires_after_cached CHECK (expires_at > cached_at)
);

CREATE TABLE training_metrics (
    id UUID PRIMARY KEY DEFAULT uuid_generate_v4(),
    model_name VARCHAR(255) NOT NULL,
    version VARCHAR(50) NOT NULL,
    metrics JSONB NOT NULL,
    training_date TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP
);
"#;

/// A schema holding the seed's tables, dropped at the end of the test.
struct SeedSchema {
    schema: String,
}

impl SeedSchema {
    /// The seed's DDL in a fresh schema. `uuid_generate_v4()` comes from the uuid-ossp
    /// extension on the seed's database; here a function of that name in the test's own
    /// schema stands in, so that the test installs nothing database-wide.
    fn new() -> Self {
        let schema = unique_schema("seed");
        let seed = SeedSchema { schema };
        seed.sql()
            .batch_execute(&format!(
                "{PLAIN_SCHEMA} CREATE SCHEMA \"{s}\"; SET search_path TO \"{s}\";
                 CREATE FUNCTION uuid_generate_v4() RETURNS uuid LANGUAGE sql
                     AS 'SELECT gen_random_uuid()';
                 {SEED_DDL}",
                s = seed.schema
            ))
            .unwrap();
        seed
    }

    fn sql(&self) -> Client {
        let mut client = admin();
        client
            .batch_execute(&format!("SET search_path TO \"{}\"", self.schema))
            .unwrap();
        client
    }
}

impl Drop for SeedSchema {
    fn drop(&mut self) {
        drop_schema(&self.schema);
    }
}

fn f64_bytes(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn as_f32(values: &[f64]) -> Vec<f32> {
    values.iter().map(|v| *v as f32).collect()
}

fn uuid(n: u32) -> String {
    format!("00000000-0000-0000-0000-{n:012}")
}

/// A model as the seed stored it: the bytes of a pickle, compressible and larger than a page,
/// so that PostgreSQL compressed it.
fn big_model() -> Vec<u8> {
    let mut bytes = vec![0x80, 0x04];
    bytes.extend(b"weights ".iter().cycle().take(200_000));
    bytes
}

/// (model_name, version, id, metadata, created_at, is_active); the bytes come from
/// `model_bytes()`.
type SeedModel = (
    &'static str,
    &'static str,
    u32,
    &'static str,
    Option<&'static str>,
    Option<bool>,
);

const MODEL_ROWS: &[SeedModel] = &[
    (
        "recommendation_model",
        "1.0",
        10,
        r#"{"model_size": 200002}"#,
        Some("2024-01-01 00:00:00+00"),
        Some(true),
    ),
    (
        "recommendation_model",
        "2.0",
        3,
        r#"{"model_size": 12, "framework": "sklearn"}"#,
        Some("2024-02-01 00:00:00+00"),
        Some(true),
    ),
    (
        "ranker",
        "a",
        2,
        "{}",
        Some("2024-02-01 00:00:00+00"),
        Some(true),
    ),
    (
        "ranker",
        "b",
        1,
        "{}",
        Some("2024-02-01 00:00:00+00"),
        Some(true),
    ),
    (
        "recommendation_model",
        "0.9",
        20,
        "{}",
        Some("2024-03-01 00:00:00+00"),
        Some(false),
    ),
    (
        "odd",
        "1",
        30,
        "[1, 2]",
        Some("2024-04-01 00:00:00+00"),
        None,
    ),
    ("odd", "2", 40, "null", None, Some(true)),
];

fn model_bytes(name: &str, version: &str) -> Vec<u8> {
    if (name, version) == ("recommendation_model", "1.0") {
        big_model()
    } else {
        format!("\u{80}pickle of {name} {version}").into_bytes()
    }
}

/// The save sequence the takeover must assign: created_at order, then id (a missing
/// created_at last).
const EXPECTED_SAVE_ORDER: &[(&str, &str)] = &[
    ("recommendation_model", "1.0"),
    ("ranker", "b"),
    ("ranker", "a"),
    ("recommendation_model", "2.0"),
    ("recommendation_model", "0.9"),
    ("odd", "1"),
    ("odd", "2"),
];

fn insert_models(sql: &mut Client) {
    for (name, version, id, metadata, created_at, is_active) in MODEL_ROWS {
        let metadata: Value = serde_json::from_str(metadata).unwrap();
        sql.execute(
            "INSERT INTO ml_models (id, model_name, version, model_data, metadata, created_at,
                                    is_active)
             VALUES ($1::text::uuid, $2, $3, $4, $5, $6::text::timestamptz, $7)",
            &[
                &uuid(*id),
                name,
                version,
                &model_bytes(name, version),
                &metadata,
                created_at,
                is_active,
            ],
        )
        .unwrap();
    }
}

/// Embeddings as the seed's Python wrote them: `np.array([...]).tobytes()` (float64), a few
/// float32 arrays, and rows that are not valid vectors.
struct EmbeddingRow {
    entity_type: &'static str,
    entity_id: &'static str,
    bytes: Vec<u8>,
    dimension: i32,
    /// The float32 vector the library must read afterwards, or the quarantine reason's gist.
    expect: Result<Vec<f32>, &'static str>,
}

fn embedding_rows() -> Vec<EmbeddingRow> {
    let user123 = [0.1, 0.2, 0.3, 0.4, 0.5];
    let user1 = [1.0e-3, -2.5, 3.25, 1.0e-50, 7.0];
    let prop1 = [0.7, 0.8, 0.9];
    let row = |entity_type, entity_id, bytes, dimension, expect| EmbeddingRow {
        entity_type,
        entity_id,
        bytes,
        dimension,
        expect,
    };
    vec![
        row(
            "user",
            "user123",
            f64_bytes(&user123),
            5,
            Ok(as_f32(&user123)),
        ),
        row("user", "user1", f64_bytes(&user1), 5, Ok(as_f32(&user1))),
        row(
            "user",
            "u_float32",
            f32_bytes(&[0.5, 0.25, 0.125, 1.0, 2.0]),
            5,
            Ok(vec![0.5, 0.25, 0.125, 1.0, 2.0]),
        ),
        row(
            "property",
            "prop1",
            f64_bytes(&prop1),
            3,
            Ok(as_f32(&prop1)),
        ),
        row(
            "user",
            "bad_length",
            vec![1, 2, 3, 4, 5, 6, 7],
            5,
            Err("neither 4 x"),
        ),
        row(
            "user",
            "nan",
            f64_bytes(&[0.1, f64::NAN, 0.3, 0.4, 0.5]),
            5,
            Err("not finite"),
        ),
        row(
            "user",
            "too_big",
            f64_bytes(&[0.1, 1.0e300, 0.3, 0.4, 0.5]),
            5,
            Err("not finite"),
        ),
        row(
            "user",
            "three_dims",
            f64_bytes(&[0.1, 0.2, 0.3]),
            3,
            Err("while most vectors of the type have 5"),
        ),
        row("item", "empty", Vec::new(), 0, Err("not positive")),
    ]
}

fn insert_embeddings(sql: &mut Client, rows: &[EmbeddingRow]) {
    for (i, r) in rows.iter().enumerate() {
        sql.execute(
            "INSERT INTO embeddings (id, entity_type, entity_id, embeddings, dimension,
                                     created_at, updated_at)
             VALUES ($1::text::uuid, $2, $3, $4, $5,
                     '2024-01-01'::timestamptz + $6 * interval '1 day',
                     '2024-06-01'::timestamptz + $6 * interval '1 day')",
            &[
                &uuid(100 + i as u32),
                &r.entity_type,
                &r.entity_id,
                &r.bytes,
                &r.dimension,
                &(i as f64),
            ],
        )
        .unwrap();
    }
}

fn insert_cache(sql: &mut Client) {
    sql.batch_execute(&format!(
        "INSERT INTO prediction_cache (id, cache_key, predictions, metadata, cached_at,
                                       expires_at, access_count, last_accessed)
         VALUES ('{}', 'user123_recommendations', '\\x{PICKLED_DICT}', '{{\"model\": \"1.0\"}}',
                 now() - interval '1 minute', now() + interval '1 hour', 3, now()),
                ('{}', 'user123_scores', '\\x{PICKLED_LIST}', '{{}}',
                 now() - interval '2 hours', now() - interval '1 hour', 0, NULL),
                ('{}', 'user9_cbor', '\\xa16573636f726582fb3feccccccccccccdfb3fe999999999999a', '{{}}',
                 now(), now() + interval '1 hour', NULL, now());",
        uuid(200),
        uuid(201),
        uuid(202)
    ))
    .unwrap();
}

fn insert_metrics(sql: &mut Client) {
    // Inserted out of date order: the history follows training_date.
    sql.batch_execute(&format!(
        r#"INSERT INTO training_metrics (id, model_name, version, metrics, training_date) VALUES
           ('{}', 'recommendation_model', '2.0', '{{"accuracy": 0.97, "loss": 0.03}}', '2024-02-02 10:00:00+00'),
           ('{}', 'recommendation_model', '1.0', '{{"accuracy": 0.95, "precision": 0.92, "recall": 0.88, "f1_score": 0.90, "loss": 0.05}}', '2024-01-02 10:00:00+00'),
           ('{}', 'recommendation_model', '2.0', '{{"accuracy": "n/a"}}', '2024-02-03 10:00:00+00'),
           ('{}', 'ranker', 'a', '{{"ndcg": 0.5}}', '2024-02-01 12:00:00+00');"#,
        uuid(300),
        uuid(301),
        uuid(302),
        uuid(303)
    ))
    .unwrap();
}

/// Every row of a table as text, ordered: what "row by row" compares.
fn rows_as_text(sql: &mut Client, query: &str) -> Vec<String> {
    sql.query(query, &[])
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

const CACHE_ROWS: &str = "SELECT format('%s %s %s %s %s %s %s %s', id, cache_key,
        encode(predictions, 'hex'), metadata, cached_at, expires_at, coalesce(access_count, 0),
        last_accessed) FROM prediction_cache ORDER BY id";

const METRIC_ROWS: &str = "SELECT format('%s %s %s %s %s', id, model_name, version, metrics,
        training_date) FROM training_metrics ORDER BY id";

/// The schema's catalog and data, to compare before and after a call that must change nothing.
fn snapshot(schema: &str) -> Vec<String> {
    let mut sql = admin();
    let mut out = Vec::new();
    for query in [
        "SELECT format('%s %s %s', c.relname, c.relkind, c.reloptions) FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 ORDER BY 1",
        "SELECT format('%s.%s %s notnull=%s default=%s collation=%s storage=%s', c.relname,
                a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                pg_get_expr(d.adbin, d.adrelid), a.attcollation, a.attstorage)
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE n.nspname = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY 1",
        "SELECT format('%s %s %s', c.relname, k.conname, pg_get_constraintdef(k.oid))
         FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 ORDER BY 1",
        "SELECT format('%s %s', c.relname, t.tgname) FROM pg_trigger t
         JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 ORDER BY 1",
        "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = $1 ORDER BY 1",
    ] {
        for row in sql.query(query, &[&schema]).unwrap() {
            out.push(row.get::<_, String>(0));
        }
    }
    let tables: Vec<String> = sql
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relkind = 'r' ORDER BY 1",
            &[&schema],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for table in tables {
        let digest: String = sql
            .query_one(
                &format!(
                    "SELECT coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '')
                     FROM \"{schema}\".\"{table}\" t"
                ),
                &[],
            )
            .unwrap()
            .get(0);
        out.push(format!("{table} {digest}"));
    }
    out
}

fn constraints(sql: &mut Client, table: &str) -> BTreeMap<String, String> {
    sql.query(
        "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint
         WHERE conrelid = to_regclass($1)",
        &[&table],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn time(sql: &mut Client, literal: &str) -> SystemTime {
    sql.query_one("SELECT $1::text::timestamptz", &[&literal])
        .unwrap()
        .get(0)
}

#[test]
fn migrate_takes_over_a_database_the_seed_built_keeping_every_row() {
    let seed = SeedSchema::new();
    let mut sql = seed.sql();
    insert_models(&mut sql);
    let embeddings = embedding_rows();
    insert_embeddings(&mut sql, &embeddings);
    insert_cache(&mut sql);
    insert_metrics(&mut sql);
    let compression: Option<String> = sql
        .query_one(
            "SELECT pg_column_compression(model_data) FROM ml_models WHERE id = $1::text::uuid",
            &[&uuid(10)],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        compression.as_deref(),
        Some("pglz"),
        "the seed's big model is compressed"
    );
    let cache_before = rows_as_text(&mut sql, CACHE_ROWS);
    let metrics_before = rows_as_text(&mut sql, METRIC_ROWS);
    let started = SystemTime::now();

    let config = config(&seed.schema);
    let report = ModelRepository::migrate_with_report(&config).unwrap();
    assert_eq!(
        report.applied,
        [
            "V001__init.sql",
            "V002__resave_recomputes_checksum.sql",
            "V004__embeddings_per_type.sql",
            "V005__model_chunks.sql",
            "V007__citus_ready.sql",
            "V008__fresh_storage_loads.sql",
            "V009__models_for_every_client.sql",
            "V010__half_size_vectors.sql",
            "V011__carry_over_by_key.sql",
            "V012__load_begin_waits_its_turn_on_citus.sql"
        ]
    );
    let takeover: &SeedTakeoverReport = report.seed_takeover.as_ref().unwrap();
    assert_eq!(takeover.models, MODEL_ROWS.len() as u64);
    assert_eq!(takeover.embeddings, 4);
    assert_eq!(takeover.embeddings_converted_from_f64, 3);
    assert_eq!(takeover.embeddings_quarantined, 5);
    let first: Vec<(&str, &str)> = takeover
        .quarantined_first
        .iter()
        .map(|q| (q.entity_type.as_str(), q.entity_id.as_str()))
        .collect();
    assert_eq!(
        first,
        [
            ("item", "empty"),
            ("user", "bad_length"),
            ("user", "nan"),
            ("user", "three_dims"),
            ("user", "too_big"),
        ]
    );
    assert_eq!(takeover.entity_types, 2);
    assert_eq!(takeover.cache_entries, 3);
    assert_eq!(takeover.training_metrics, 4);

    let mut sql = seed.sql();
    check_models(&mut sql, started);
    check_embeddings(&mut sql, &embeddings);
    // Cache and metric rows: every column as it was (the types widened, not the values).
    assert_eq!(rows_as_text(&mut sql, CACHE_ROWS), cache_before);
    assert_eq!(rows_as_text(&mut sql, METRIC_ROWS), metrics_before);
    check_keys_and_columns(&mut sql);

    let repo = ModelRepository::open(config.clone()).unwrap();
    check_library_reads(&repo, &mut sql, &embeddings);
    repo.close();
}

fn check_models(sql: &mut Client, started: SystemTime) {
    let rows = sql
        .query(
            "SELECT id::text, model_name::text, version::text, model_data, metadata, created_at,
                    is_active, checksum, size_bytes, load_count,
                    pg_column_compression(model_data)
             FROM ml_models ORDER BY save_seq",
            &[],
        )
        .unwrap();
    let order: Vec<(String, String)> = rows.iter().map(|r| (r.get(1), r.get(2))).collect();
    let expected: Vec<(String, String)> = EXPECTED_SAVE_ORDER
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    assert_eq!(order, expected, "save_seq follows created_at, then id");
    for row in &rows {
        let (name, version): (String, String) = (row.get(1), row.get(2));
        let seed_row = MODEL_ROWS
            .iter()
            .find(|m| (m.0, m.1) == (name.as_str(), version.as_str()))
            .unwrap();
        let (_, _, id, metadata, created_at, is_active) = *seed_row;
        let data: Vec<u8> = row.get(3);
        assert_eq!(
            row.get::<_, String>(0),
            uuid(id),
            "{name}/{version}: id kept"
        );
        assert_eq!(
            data,
            model_bytes(&name, &version),
            "{name}/{version}: bytes kept"
        );
        let expected_metadata = match serde_json::from_str::<Value>(metadata).unwrap() {
            Value::Null => json!({}),
            v @ Value::Object(_) => v,
            other => json!({ "seed_metadata": other }),
        };
        assert_eq!(
            row.get::<_, Value>(4),
            expected_metadata,
            "{name}/{version}"
        );
        let stored_at: SystemTime = row.get(5);
        match created_at {
            Some(t) => assert_eq!(stored_at, time(sql, t), "{name}/{version}: created_at kept"),
            None => assert!(stored_at >= started - Duration::from_secs(60)),
        }
        assert_eq!(
            row.get::<_, bool>(6),
            is_active.unwrap_or(false),
            "{name}/{version}"
        );
        assert_eq!(
            row.get::<_, String>(7),
            sha256_hex(&data),
            "{name}/{version}"
        );
        assert_eq!(row.get::<_, i64>(8), data.len() as i64);
        assert_eq!(row.get::<_, i64>(9), 0);
        // Rewritten uncompressed, so streaming loads read each slice's own chunks.
        assert_eq!(row.get::<_, Option<String>>(10), None, "{name}/{version}");
    }
}

fn check_embeddings(sql: &mut Client, rows: &[EmbeddingRow]) {
    for (i, r) in rows.iter().enumerate() {
        let kept = sql
            .query_opt(
                "SELECT entity_id::text, embeddings, dimension, created_at, updated_at
                 FROM embeddings WHERE entity_type = $1 AND entity_id = $2",
                &[&r.entity_type, &r.entity_id],
            )
            .unwrap();
        let quarantined = sql
            .query_opt(
                "SELECT entity_id::text, embeddings, dimension, created_at, updated_at, reason
                 FROM embeddings_quarantine WHERE entity_type = $1 AND entity_id = $2",
                &[&r.entity_type, &r.entity_id],
            )
            .unwrap();
        let created = time(sql, "2024-01-01 00:00:00+00") + Duration::from_secs(86_400 * i as u64);
        let updated = time(sql, "2024-06-01 00:00:00+00") + Duration::from_secs(86_400 * i as u64);
        let row = match &r.expect {
            Ok(vector) => {
                assert!(quarantined.is_none(), "{}", r.entity_id);
                let row = kept.unwrap_or_else(|| panic!("{} kept", r.entity_id));
                assert_eq!(
                    row.get::<_, Vec<u8>>(1),
                    f32_bytes(vector),
                    "{}",
                    r.entity_id
                );
                row
            }
            Err(reason) => {
                assert!(kept.is_none(), "{} quarantined", r.entity_id);
                let row = quarantined.unwrap_or_else(|| panic!("{} quarantined", r.entity_id));
                assert_eq!(
                    row.get::<_, Vec<u8>>(1),
                    r.bytes,
                    "{}: bytes kept",
                    r.entity_id
                );
                let why: String = row.get(5);
                assert!(why.contains(reason), "{}: {why}", r.entity_id);
                row
            }
        };
        assert_eq!(row.get::<_, String>(0), r.entity_id);
        assert_eq!(row.get::<_, i32>(2), r.dimension, "{}", r.entity_id);
        assert_eq!(row.get::<_, SystemTime>(3), created, "{}", r.entity_id);
        assert_eq!(row.get::<_, SystemTime>(4), updated, "{}", r.entity_id);
    }
    let registry: Vec<(String, i32)> = sql
        .query(
            "SELECT entity_type::text, dimension FROM embedding_types ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        registry,
        [("property".to_string(), 3), ("user".to_string(), 5)]
    );
}

fn check_keys_and_columns(sql: &mut Client) {
    let models = constraints(sql, "ml_models");
    assert_eq!(
        models.get("ml_models_pkey").map(String::as_str),
        Some("PRIMARY KEY (model_name, version)")
    );
    assert!(!models.contains_key("uq_model_name_version"));
    let embeddings = constraints(sql, "embeddings");
    assert_eq!(
        embeddings.get("embeddings_pkey").map(String::as_str),
        Some("PRIMARY KEY (entity_type, entity_id)")
    );
    assert!(embeddings.contains_key("embeddings_bytes_match_dimension"));
    assert!(!embeddings.contains_key("uq_entity_type_id"));
    let cache = constraints(sql, "prediction_cache");
    assert_eq!(
        cache.get("prediction_cache_pkey").map(String::as_str),
        Some("PRIMARY KEY (cache_key)")
    );
    assert_eq!(
        constraints(sql, "training_metrics")
            .get("training_metrics_pkey")
            .map(String::as_str),
        Some("PRIMARY KEY (model_name, version, record_seq)")
    );
    let collation: String = sql
        .query_one(
            "SELECT collname::text FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation
             WHERE a.attrelid = to_regclass('prediction_cache') AND a.attname = 'cache_key'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(collation, "C");
    // The seed's SQL keeps working: its id columns still have their defaults.
    let id: String = sql
        .query_one(
            "INSERT INTO ml_models (model_name, version, model_data) VALUES ('py', '1', 'z')
             RETURNING id::text",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(id.len(), 36);
    sql.batch_execute(
        "INSERT INTO training_metrics (model_name, version, metrics)
             VALUES ('py', '1', '{\"auc\": 0.5}');
         INSERT INTO prediction_cache (cache_key, predictions, expires_at)
             VALUES ('py', '\\xa0', now() + interval '1 hour');
         INSERT INTO embeddings (entity_type, entity_id, embeddings, dimension)
             VALUES ('property', 'py', '\\x000000000000000000000000', 3);",
    )
    .unwrap();
    // A float64 vector is no longer accepted: the table holds float32 only.
    let f64_insert = sql.execute(
        "INSERT INTO embeddings (entity_type, entity_id, embeddings, dimension)
         VALUES ('property', 'py64', $1, 3)",
        &[&f64_bytes(&[0.1, 0.2, 0.3])],
    );
    assert!(f64_insert.is_err());
}

fn check_library_reads(repo: &ModelRepository, sql: &mut Client, rows: &[EmbeddingRow]) {
    // Models: checksums hold, "latest" follows the save sequence.
    assert_eq!(
        repo.load_model("recommendation_model", "latest")
            .unwrap()
            .unwrap(),
        model_bytes("recommendation_model", "2.0")
    );
    let mut streamed = Vec::new();
    repo.load_model_to_writer("recommendation_model", "1.0", &mut streamed)
        .unwrap();
    assert_eq!(streamed, big_model());
    assert_eq!(
        repo.load_model("ranker", "latest").unwrap().unwrap(),
        model_bytes("ranker", "a")
    );
    let versions: Vec<String> = repo
        .get_model_versions("recommendation_model")
        .unwrap()
        .into_iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, ["2.0", "1.0"]);
    assert_eq!(
        repo.get_model_aliases("recommendation_model")
            .unwrap()
            .len(),
        0
    );
    repo.save_model("recommendation_model", "3.0", b"rust", &json!({}))
        .unwrap();
    assert_eq!(
        repo.load_model("recommendation_model", "latest")
            .unwrap()
            .unwrap(),
        b"rust"
    );

    // Embeddings: the converted vectors, bit for bit; the type's dimension holds.
    for r in rows {
        let got = repo.get_embeddings(r.entity_type, r.entity_id).unwrap();
        assert_eq!(got, r.expect.clone().ok(), "{}", r.entity_id);
    }
    let users = repo.get_all_embeddings("user").unwrap();
    let mut ids: Vec<&str> = users.keys().map(String::as_str).collect();
    ids.sort();
    assert_eq!(ids, ["u_float32", "user1", "user123"]);
    assert!(matches!(
        repo.save_embeddings("user", "new", &[0.1, 0.2, 0.3]),
        Err(RepoError::DimensionMismatch { expected: 5, .. })
    ));
    repo.save_embeddings("user", "new", &[0.1, 0.2, 0.3, 0.4, 0.5])
        .unwrap();

    // Cache: pickles are not CBOR; expired entries are not returned; globs work.
    assert!(matches!(
        repo.get_cached_predictions::<Value>("user123_recommendations"),
        Err(RepoError::Serialization(_))
    ));
    assert_eq!(
        repo.get_cached_predictions::<Value>("user123_scores")
            .unwrap(),
        None
    );
    assert_eq!(
        repo.get_cached_predictions::<Value>("user9_cbor").unwrap(),
        Some(json!({"score": [0.9, 0.8]}))
    );
    assert_eq!(repo.clear_cache("user123_*").unwrap(), 2);
    assert_eq!(repo.purge_expired_cache().unwrap(), 0);

    // Training metrics: dates kept, history in date order, the non-numeric record left out.
    let history = repo
        .get_training_metrics_history("recommendation_model")
        .unwrap();
    let seen: Vec<(&str, SystemTime)> = history
        .iter()
        .map(|r| (r.version.as_str(), r.training_date))
        .collect();
    assert_eq!(
        seen,
        [
            ("1.0", time(sql, "2024-01-02 10:00:00+00")),
            ("2.0", time(sql, "2024-02-02 10:00:00+00")),
        ]
    );
    assert_eq!(history[0].metrics["recall"], 0.88);
    repo.save_training_metrics(
        "recommendation_model",
        "3.0",
        &[("accuracy".to_string(), 0.99)].into(),
    )
    .unwrap();
    let history = repo
        .get_training_metrics_history("recommendation_model")
        .unwrap();
    assert_eq!(history.last().unwrap().version, "3.0");
}

#[test]
fn a_second_migrate_after_a_takeover_changes_nothing() {
    let seed = SeedSchema::new();
    let mut sql = seed.sql();
    insert_models(&mut sql);
    insert_embeddings(&mut sql, &embedding_rows());
    insert_cache(&mut sql);
    insert_metrics(&mut sql);
    let config = config(&seed.schema);
    assert!(ModelRepository::migrate_with_report(&config)
        .unwrap()
        .seed_takeover
        .is_some());
    let before = snapshot(&seed.schema);
    let report = ModelRepository::migrate_with_report(&config).unwrap();
    assert!(report.applied.is_empty(), "{report:?}");
    assert!(report.seed_takeover.is_none());
    ModelRepository::open(config.clone()).unwrap().close();
    assert_eq!(snapshot(&seed.schema), before);
}

#[test]
fn a_takeover_that_fails_changes_nothing() {
    let seed = SeedSchema::new();
    let mut sql = seed.sql();
    insert_models(&mut sql);
    insert_embeddings(&mut sql, &embedding_rows());
    insert_cache(&mut sql);
    insert_metrics(&mut sql);
    // A view of the team's own on a column the takeover must retype (cache_key to COLLATE "C").
    sql.batch_execute("CREATE VIEW cache_keys AS SELECT cache_key FROM prediction_cache")
        .unwrap();
    let before = snapshot(&seed.schema);
    let config = config(&seed.schema);

    let err = ModelRepository::migrate(&config).unwrap_err();
    assert!(err.to_string().contains("used by a view"), "{err}");
    assert_eq!(
        snapshot(&seed.schema),
        before,
        "a failed takeover changes nothing"
    );
    let err = ModelRepository::open(config.clone().auto_migrate(false)).unwrap_err();
    assert!(matches!(err, RepoError::NotFound(_)), "{err:?}");
    assert!(
        err.to_string().contains("seed's Python repository"),
        "{err}"
    );

    sql.batch_execute("DROP VIEW cache_keys").unwrap();
    let report = ModelRepository::migrate_with_report(&config).unwrap();
    assert_eq!(
        report.seed_takeover.unwrap().models,
        MODEL_ROWS.len() as u64
    );
}

#[test]
fn a_schema_that_only_looks_like_the_seeds_is_refused_and_left_unchanged() {
    let seed = SeedSchema::new();
    let mut sql = seed.sql();
    insert_models(&mut sql);
    sql.batch_execute("ALTER TABLE embeddings DROP CONSTRAINT uq_entity_type_id")
        .unwrap();
    let before = snapshot(&seed.schema);
    let err = ModelRepository::migrate(&config(&seed.schema)).unwrap_err();
    assert!(matches!(err, RepoError::Conflict(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("embeddings has no constraint uq_entity_type_id"),
        "{err}"
    );
    assert_eq!(snapshot(&seed.schema), before);
}
