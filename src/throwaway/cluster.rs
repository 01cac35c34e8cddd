//! A throwaway Citus cluster: a coordinator and N workers, each a [`ThrowawayServer`] of its
//! own (data directory, loopback port), with `shared_preload_libraries = 'citus'` and
//! prepared transactions enabled (Citus commits writes that span nodes with two-phase commit),
//! the `citus` extension created on every node and the workers registered with the
//! coordinator. Everything is stopped and deleted when the cluster is dropped.
//!
//! ```no_run
//! # fn main() -> pg_model_repo::Result<()> {
//! let cluster = pg_model_repo::throwaway::ThrowawayCluster::start(2)?;
//! let repo = pg_model_repo::ModelRepository::connect(&cluster.url())?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use postgres::{Client, NoTls};

use super::{find_bindir, ThrowawayServer, INSTALL_HINT};
use crate::error::{RepoError, Result};

/// What to tell a user whose PostgreSQL has no Citus.
pub const CITUS_INSTALL_HINT: &str = "the Citus extension is not installed for this \
    PostgreSQL (no citus.so in its library directory). Install Citus from its packages \
    (https://docs.citusdata.com/en/stable/installation/single_node_debian.html: \
    `curl https://install.citusdata.com/community/deb.sh | sudo bash` then `apt-get install \
    postgresql-<major>-citus-13.2`), or build it from source against this server \
    (`./configure && make && sudo make install` in a checkout of \
    https://github.com/citusdata/citus; in this workspace: \
    `bash ../shared/tools/install-pg-extensions.sh citus`)";

/// Settings every node of a throwaway cluster gets (durability as PostgreSQL's defaults, so
/// benchmarks compare it with a throwaway single server like for like; tests pass their
/// faster settings to [`ThrowawayCluster::start_with`]).
const NODE_SETTINGS: &[(&str, &str)] = &[
    ("shared_preload_libraries", "citus"),
    // Two-phase commit of writes that span nodes.
    ("max_prepared_transactions", "100"),
    ("max_connections", "300"),
    // The coordinator opens connections to the workers per shard group of a query; keep the
    // cluster's own traffic modest on a small machine.
    ("citus.max_adaptive_executor_pool_size", "4"),
];

/// A coordinator and its workers, deleted on drop.
#[derive(Debug)]
pub struct ThrowawayCluster {
    coordinator: ThrowawayServer,
    workers: Vec<ThrowawayServer>,
}

impl ThrowawayCluster {
    /// Starts a coordinator and `workers` workers (at least one) with the default node
    /// settings, and registers the workers.
    pub fn start(workers: usize) -> Result<Self> {
        Self::start_with(workers, &[])
    }

    /// As [`start`](Self::start), with extra `postgresql.conf` settings for every node.
    pub fn start_with(workers: usize, settings: &[(&str, &str)]) -> Result<Self> {
        if workers == 0 {
            return Err(RepoError::invalid(
                "a Citus cluster needs at least one worker",
            ));
        }
        ensure_citus_installed()?;
        let mut all: Vec<(&str, &str)> = NODE_SETTINGS.to_vec();
        all.extend_from_slice(settings);
        let coordinator = ThrowawayServer::start(&all)?;
        let workers = (0..workers)
            .map(|_| ThrowawayServer::start(&all))
            .collect::<Result<Vec<_>>>()?;
        let cluster = ThrowawayCluster {
            coordinator,
            workers,
        };
        cluster.register_nodes()?;
        Ok(cluster)
    }

    /// The coordinator's URL (superuser `postgres`, database `postgres`): what applications
    /// connect to.
    pub fn url(&self) -> String {
        self.coordinator.url()
    }

    /// The coordinator.
    pub fn coordinator(&self) -> &ThrowawayServer {
        &self.coordinator
    }

    /// The workers, in the order they were registered.
    pub fn workers(&self) -> &[ThrowawayServer] {
        &self.workers
    }

    /// One worker, to stop, restart or freeze it.
    pub fn worker_mut(&mut self, index: usize) -> &mut ThrowawayServer {
        &mut self.workers[index]
    }

    /// Creates database `name` on every node, with Citus set up in it as in `postgres` (Citus
    /// keeps its metadata per database). Its URLs are those of [`url`](Self::url) with
    /// `dbname={name}`.
    pub fn create_database(&self, name: &str) -> Result<()> {
        crate::validate::schema_name("database", name)?;
        for node in self.nodes() {
            connect(node, "postgres")?.batch_execute(&format!("CREATE DATABASE \"{name}\""))?;
        }
        self.register_nodes_in(name)
    }

    fn nodes(&self) -> impl Iterator<Item = &ThrowawayServer> {
        std::iter::once(&self.coordinator).chain(&self.workers)
    }

    fn register_nodes(&self) -> Result<()> {
        self.register_nodes_in("postgres")
    }

    /// Creates the extension on every node, then tells the coordinator where it and its
    /// workers are.
    fn register_nodes_in(&self, database: &str) -> Result<()> {
        for node in self.nodes() {
            connect(node, database)?.batch_execute("CREATE EXTENSION IF NOT EXISTS citus")?;
        }
        let mut coordinator = connect(&self.coordinator, database)?;
        coordinator.execute(
            "SELECT citus_set_coordinator_host('127.0.0.1', $1)",
            &[&i32::from(self.coordinator.port())],
        )?;
        for worker in &self.workers {
            coordinator.execute(
                "SELECT citus_add_node('127.0.0.1', $1)",
                &[&i32::from(worker.port())],
            )?;
        }
        Ok(())
    }
}

fn connect(server: &ThrowawayServer, database: &str) -> Result<Client> {
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname={database}",
        server.port()
    );
    Ok(Client::connect(&url, NoTls)?)
}

/// Whether the local PostgreSQL has Citus; the error says how to get it.
pub fn ensure_citus_installed() -> Result<()> {
    let bindir = find_bindir().ok_or_else(|| RepoError::not_found(INSTALL_HINT))?;
    if citus_library_dirs(&bindir)
        .iter()
        .any(|dir| dir.join("citus.so").is_file())
    {
        Ok(())
    } else {
        Err(RepoError::not_found(CITUS_INSTALL_HINT))
    }
}

/// Where a server from `bindir` loads extensions from: `<bindir>/../lib` (Debian's layout),
/// and what `pg_config --pkglibdir` says.
fn citus_library_dirs(bindir: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(parent) = bindir.parent() {
        dirs.push(parent.join("lib"));
    }
    let pg_config = bindir.join("pg_config");
    let program = if pg_config.is_file() {
        pg_config
    } else {
        PathBuf::from("pg_config")
    };
    if let Ok(out) = Command::new(program).arg("--pkglibdir").output() {
        if out.status.success() {
            dirs.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
    }
    dirs
}
