//! Shared test setup: one real PostgreSQL for the whole suite (`DATABASE_URL`, or a throwaway
//! server from the local binaries), one fresh schema per test, dropped afterwards, and the
//! helpers several test modules use.

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use pg_model_repo::{ModelRepository, RepositoryConfig, VectorStorage};

/// Settings for the throwaway server: room for many parallel tests, no fsync (tests need no
/// durability), pg_stat_statements-free.
pub const TEST_SERVER_SETTINGS: &[(&str, &str)] = &[
    ("max_connections", "400"),
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
];

/// The server every test of the suite uses (tests that stop, restart or reconfigure a server
/// start their own). Fails loudly (never skips) when neither `DATABASE_URL` nor local
/// PostgreSQL binaries are available.
#[cfg(not(feature = "citus"))]
pub fn server_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    use pg_model_repo::throwaway::{database_url_or_start, ThrowawayServer};
    static SERVER: OnceLock<ThrowawayServer> = OnceLock::new();
    URL.get_or_init(|| {
        crate::logging::init();
        let (url, server) = database_url_or_start(TEST_SERVER_SETTINGS)
            .unwrap_or_else(|e| panic!("no PostgreSQL for the tests: {e}"));
        if let Some(server) = server {
            let _ = SERVER.set(server);
        }
        url
    })
    .clone()
}

/// With the `citus` feature, the suite's server is the coordinator of a throwaway Citus cluster
/// (two workers), whatever `DATABASE_URL` says; `MODEL_REPO_CITUS_URL` names an existing
/// coordinator instead. `MODEL_REPO_CITUS_MODE=schema` turns
/// schema-based sharding on for every new schema (so `CitusMode::Auto` makes each test's
/// schema a distributed schema); otherwise each test's schema is distributed row-based.
#[cfg(feature = "citus")]
pub fn server_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        crate::logging::init();
        if let Ok(url) = std::env::var("MODEL_REPO_CITUS_URL") {
            if !url.trim().is_empty() {
                return url;
            }
        }
        let mut settings = TEST_SERVER_SETTINGS.to_vec();
        // Fewer shards than Citus's 32: each test creates a schema of its own.
        settings.push(("citus.shard_count", "4"));
        // Prepared transactions that sessions killed mid-commit by the fault tests leave on
        // the workers are settled within a second (Citus's default: a minute), so the locks
        // they hold do not hold up other tests' DDL.
        settings.push(("citus.recover_2pc_interval", "1s"));
        if citus_schema_based() {
            settings.push(("citus.enable_schema_based_sharding", "on"));
        }
        let cluster = pg_model_repo::throwaway::ThrowawayCluster::start_with(2, &settings)
            .unwrap_or_else(|e| panic!("no Citus cluster for the tests: {e}"));
        let url = cluster.url();
        let _ = CLUSTER.set(cluster);
        url
    })
    .clone()
}

#[cfg(feature = "citus")]
static CLUSTER: OnceLock<pg_model_repo::throwaway::ThrowawayCluster> = OnceLock::new();

/// The suite's throwaway cluster (none when `MODEL_REPO_CITUS_URL` names another).
#[cfg(feature = "citus")]
pub fn citus_cluster() -> Option<&'static pg_model_repo::throwaway::ThrowawayCluster> {
    server_url();
    CLUSTER.get()
}

/// Whether the Citus suite runs schema-based (`MODEL_REPO_CITUS_MODE=schema`).
#[cfg(feature = "citus")]
pub fn citus_schema_based() -> bool {
    match std::env::var("MODEL_REPO_CITUS_MODE")
        .as_deref()
        .map(str::trim)
    {
        Ok("schema") => true,
        Ok("row") | Ok("") | Err(_) => false,
        Ok(other) => panic!("MODEL_REPO_CITUS_MODE={other:?}: use row or schema"),
    }
}

/// SQL that runs `UPDATE ml_models {tail}` below the triggers, as a disk fault would change
/// the data: with `session_replication_role = replica`. On a Citus cluster the triggers run
/// on the workers, so there the update runs on every shard, on the worker that holds it.
pub fn below_triggers(tail: &str) -> String {
    if cfg!(feature = "citus") {
        format!(
            "DO $$ BEGIN IF EXISTS (SELECT 1 FROM run_command_on_shards('ml_models', \
             $c$SET session_replication_role = replica; UPDATE %s {tail}$c$) WHERE NOT success) \
             THEN RAISE EXCEPTION 'the update failed on a shard'; END IF; END $$"
        )
    } else {
        format!(
            "SET session_replication_role = replica; UPDATE ml_models {tail}; \
             SET session_replication_role = DEFAULT;"
        )
    }
}

/// Run before a test creates a schema by hand, as on plain PostgreSQL: on a Citus cluster
/// that makes every new schema a distributed one (schema-based sharding on), this one stays
/// a regular schema, so the files of sql/ run in it as they do on one server (V001 gives a
/// sequence an owner, which Citus refuses in a distributed schema). On PostgreSQL without
/// Citus the setting is an inert placeholder.
pub const PLAIN_SCHEMA: &str = "SET citus.enable_schema_based_sharding = off;";

/// A schema name unique to this process and test.
pub fn unique_schema(tag: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "t_{}_{}_{}",
        tag,
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `url` with its own application_name, for tests that find their sessions by it.
pub fn with_application_name(url: &str, app: &str) -> String {
    if url.contains("://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}application_name={app}")
    } else {
        format!("{url} application_name={app}")
    }
}

/// The shared server's URL with its own application_name.
pub fn url_with_app_name(app: &str) -> String {
    with_application_name(&server_url(), app)
}

/// How many sessions of the shared server carry application_name `app`.
pub fn sessions_named(app: &str) -> i64 {
    admin()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0)
}

/// Terminates every session of the shared server with application_name `app`; returns how
/// many it terminated.
pub fn terminate_sessions(app: &str) -> i64 {
    admin()
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0)
}

/// A direct superuser-ish connection to the test server (not through the repository).
pub fn admin() -> postgres::Client {
    postgres::Client::connect(&server_url(), postgres::NoTls).expect("admin connection")
}

/// A test's config: its own schema, a small pool, no reaper thread unless asked. Vectors are
/// stored as `MODEL_REPO_VECTOR_STORAGE` says (auto, bytea or pgvector; default auto, which is
/// pgvector where the server has it), so CI can run the embedding tests on both storages.
pub fn config(schema: &str) -> RepositoryConfig {
    RepositoryConfig::new(server_url())
        .vector_storage(test_vector_storage())
        .schema(schema)
        .pool_size(2)
        .max_overflow(4)
        .pool_timeout(Duration::from_secs(10))
        .reaper_interval(None)
}

/// The storage `MODEL_REPO_VECTOR_STORAGE` asks for (a malformed value fails the test).
pub fn test_vector_storage() -> VectorStorage {
    match std::env::var("MODEL_REPO_VECTOR_STORAGE") {
        Ok(v) if !v.trim().is_empty() => v
            .parse()
            .unwrap_or_else(|e| panic!("MODEL_REPO_VECTOR_STORAGE: {e}")),
        _ => VectorStorage::Auto,
    }
}

/// A repository in a fresh schema, dropped (with the schema) at the end of the test.
pub struct TestRepo {
    pub repo: ModelRepository,
    pub schema: String,
}

impl TestRepo {
    pub fn new() -> Self {
        Self::with_config(|c| c)
    }

    pub fn with_config(adjust: impl FnOnce(RepositoryConfig) -> RepositoryConfig) -> Self {
        let schema = unique_schema("r");
        let repo = ModelRepository::open(adjust(config(&schema))).expect("open repository");
        TestRepo { repo, schema }
    }

    /// Runs SQL in this test's schema on a direct connection.
    pub fn sql(&self) -> postgres::Client {
        let mut client = admin();
        client
            .batch_execute(&format!("SET search_path TO \"{}\"", self.schema))
            .unwrap();
        client
    }
}

impl Deref for TestRepo {
    type Target = ModelRepository;
    fn deref(&self) -> &ModelRepository {
        &self.repo
    }
}

impl Drop for TestRepo {
    fn drop(&mut self) {
        drop_schema(&self.schema);
    }
}

/// Drops a test's schema, waiting at most 5 s a try for its locks (three tries; a schema it
/// cannot drop is left to the throwaway server, with a warning). On a Citus cluster a session
/// a test killed mid-commit can leave a prepared transaction on a worker until Citus settles it
/// (every `citus.recover_2pc_interval`); a DROP waiting for it holds the schema's reference
/// tables, and every other test's first open, which creates reference tables and so locks
/// those of the whole cluster, would wait behind it. So the drop settles them first.
pub fn drop_schema(schema: &str) {
    let Ok(mut client) = postgres::Client::connect(&server_url(), postgres::NoTls) else {
        return;
    };
    let drop = format!("SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
    for attempt in 1..=3 {
        if cfg!(feature = "citus") {
            let _ = client.batch_execute("SELECT recover_prepared_transactions()");
        }
        match client.batch_execute(&drop) {
            Ok(()) => return,
            Err(e) if attempt < 3 => log::info!("dropping schema {schema}: {e}; trying again"),
            Err(e) => log::warn!("schema {schema} left on the test server: {e}"),
        }
    }
}

/// A repository in a fresh schema that stores vectors as BYTEA, whatever the server has.
pub fn bytea_repo() -> TestRepo {
    TestRepo::with_config(|c| c.vector_storage(VectorStorage::Bytea))
}

/// Asserts that a result is `InvalidInput`.
#[track_caller]
pub fn assert_invalid<T: std::fmt::Debug>(result: pg_model_repo::Result<T>) {
    match result {
        Err(pg_model_repo::RepoError::InvalidInput(_)) => {}
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

/// Row count of a table in the test's schema.
pub fn count(repo: &TestRepo, table: &str) -> i64 {
    repo.sql()
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .unwrap()
        .get(0)
}

/// Lowercase hex SHA-256, as the repository stores checksums.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs `psql` (from the PostgreSQL binaries) on `url` with `ON_ERROR_STOP` and `args`;
/// panics with its stderr if it fails.
pub fn psql(url: &str, args: &[&str]) {
    let output = std::process::Command::new("psql")
        .arg(url)
        .args(["-v", "ON_ERROR_STOP=1", "-q"])
        .args(args)
        .output()
        .expect("psql comes with the PostgreSQL binaries");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The command documented in `file`'s header on the line that starts with `start`.
pub fn documented_command(file: &str, start: &str) -> String {
    let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .filter_map(|line| line.strip_prefix("--   "))
        .find(|command| command.starts_with(start))
        .unwrap_or_else(|| panic!("{file} documents no command starting with {start:?}"))
        .to_owned()
}

/// The Python interpreter of the cross-checks with other clients: `MODEL_REPO_PYTHON` (a
/// virtualenv's python, say), else `python3`. A test that needs packages it lacks says NOT RUN.
pub fn python() -> String {
    std::env::var("MODEL_REPO_PYTHON")
        .ok()
        .filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| "python3".to_owned())
}

/// `n` vectors of `entity_type`, ids `<prefix>000000`, `<prefix>000001`, …, every value `value`.
pub fn uniform_batch(
    entity_type: &str,
    prefix: &str,
    n: usize,
    dim: usize,
    value: f32,
) -> Vec<pg_model_repo::Embedding> {
    (0..n)
        .map(|i| {
            pg_model_repo::Embedding::new(entity_type, format!("{prefix}{i:06}"), vec![value; dim])
        })
        .collect()
}

/// The storage tables of the test's schema, attached or not (every table named
/// embeddings_<id>_<n>).
pub fn storage_tables(repo: &TestRepo) -> Vec<String> {
    repo.sql()
        .query(
            "SELECT relname::text FROM pg_class
             WHERE relnamespace = current_schema()::regnamespace AND relkind = 'r'
               AND relname ~ '^embeddings_[0-9]+_[0-9]+$' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A row trigger on `embeddings` that refuses the entity_id `poison` (check_violation,
/// "poison refused"), as another team's check would. One statement at a time: Citus sends
/// each to the workers as it is, and refuses triggers on distributed tables unless told (a
/// plain server keeps the setting as a placeholder).
pub fn refuse_poison_rows(sql: &mut postgres::Client) {
    for statement in [
        "SET citus.enable_unsafe_triggers = on",
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.entity_id = 'poison' THEN
                 RAISE check_violation USING MESSAGE = 'poison refused';
             END IF;
             RETURN NEW;
         END $$",
        "CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON embeddings
             FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    ] {
        sql.batch_execute(statement).unwrap();
    }
}
