//! How to reach the database: the connection settings of `RepositoryConfig` (URL, schema,
//! pool sizes, timeouts, TLS), checked before anything connects and parsed into a
//! `postgres::Config` with our application_name, connect timeout and keepalives. Nothing here
//! shows a password.

use std::str::FromStr;
use std::time::Duration;

use crate::error::{RepoError, Result};
use crate::validate::{self, count_within, duration_within};

/// The application_name given to every connection whose URL does not name one.
pub const DEFAULT_APPLICATION_NAME: &str = "pg-model-repo";

/// The most connections one pool may open (pool_size + max_overflow): far above what one
/// PostgreSQL serves well, low enough that the pool's bookkeeping stays small.
pub(crate) const MAX_POOL_CONNECTIONS: u32 = 10_000;

/// The longest query_timeout: PostgreSQL's statement_timeout and lock_timeout are int4
/// milliseconds (about 24.8 days).
pub(crate) const MAX_QUERY_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// The longest pool_timeout, reaper_interval, slow_query_threshold and stream_idle_timeout:
/// one day. Longer waits are a mistake, and they must stay far from `Instant`'s overflow.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// The connection settings (see the setters of `RepositoryConfig` for each one's meaning).
#[derive(Clone)]
pub(crate) struct ConnectionConfig {
    pub(crate) database_url: String,
    pub(crate) schema: String,
    pub(crate) pool_size: u32,
    pub(crate) max_overflow: u32,
    pub(crate) pool_timeout: Duration,
    pub(crate) query_timeout: Duration,
    pub(crate) stream_idle_timeout: Duration,
    pub(crate) tls_root_certificate: Option<std::path::PathBuf>,
    /// Settings every session sets after ours (name, value), asked for by the features.
    pub(crate) session_settings: Vec<(&'static str, String)>,
}

impl ConnectionConfig {
    /// `database_url` with every other setting at its default.
    pub(crate) fn new(database_url: String) -> Self {
        ConnectionConfig {
            database_url,
            schema: "public".to_owned(),
            pool_size: 20,
            max_overflow: 40,
            pool_timeout: Duration::from_secs(30),
            query_timeout: Duration::from_secs(30),
            stream_idle_timeout: Duration::from_secs(600),
            tls_root_certificate: None,
            session_settings: Vec::new(),
        }
    }

    /// Checks every value against its range; the error names the setting and its range.
    pub(crate) fn validate(&self) -> Result<()> {
        validate::schema_name("schema", &self.schema)?;
        count_within("pool_size", self.pool_size, 1, MAX_POOL_CONNECTIONS)?;
        count_within("max_overflow", self.max_overflow, 0, MAX_POOL_CONNECTIONS)?;
        if self.pool_size + self.max_overflow > MAX_POOL_CONNECTIONS {
            return Err(RepoError::invalid(format!(
                "pool_size + max_overflow is {}; it must be within 1..={MAX_POOL_CONNECTIONS}",
                u64::from(self.pool_size) + u64::from(self.max_overflow)
            )));
        }
        let ms = Duration::from_millis(1);
        duration_within("pool_timeout", self.pool_timeout, ms, MAX_WAIT)?;
        duration_within("query_timeout", self.query_timeout, ms, MAX_QUERY_TIMEOUT)?;
        duration_within(
            "stream_idle_timeout",
            self.stream_idle_timeout,
            ms,
            MAX_WAIT,
        )
    }

    /// The parsed connection settings, with our application_name unless the URL gives one.
    pub(crate) fn pg_config(&self) -> Result<postgres::Config> {
        let mut pg = postgres::Config::from_str(&self.database_url)
            .map_err(|e| RepoError::invalid(format!("database_url cannot be parsed: {e}")))?;
        if pg.get_application_name().is_none() {
            pg.application_name(DEFAULT_APPLICATION_NAME);
        }
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(self.pool_timeout.min(Duration::from_secs(10)));
        }
        pg.keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        Ok(pg)
    }

    /// The connection target without credentials, for logs and Debug.
    pub(crate) fn redacted_target(&self) -> String {
        match postgres::Config::from_str(&self.database_url) {
            Ok(pg) => describe_target(&pg),
            Err(_) => "<unparsable database_url>".to_owned(),
        }
    }
}

/// `user@host:port/dbname`, never the password.
pub(crate) fn describe_target(pg: &postgres::Config) -> String {
    use postgres::config::Host;
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = pg.get_ports().iter().map(u16::to_string).collect();
    format!(
        "{}@{}:{}/{}",
        pg.get_user().unwrap_or("<default user>"),
        if hosts.is_empty() {
            "<default host>".to_owned()
        } else {
            hosts.join(",")
        },
        if ports.is_empty() {
            "5432".to_owned()
        } else {
            ports.join(",")
        },
        pg.get_dbname().unwrap_or("<default db>"),
    )
}
