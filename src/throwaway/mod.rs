//! A throwaway PostgreSQL server started from the local binaries, for examples, tests and
//! benchmarks run without `DATABASE_URL`. It lives in a temp directory, listens on 127.0.0.1
//! at a free port, and is stopped and deleted when dropped (or, if the process dies first, by
//! a small watchdog process). For fault tests it can be frozen like a hung host
//! ([`ThrowawayServer::freeze`]), and [`LostReplyProxy`] loses the replies to commits.
//!
//! ```no_run
//! # fn main() -> pg_model_repo::Result<()> {
//! let server = pg_model_repo::throwaway::ThrowawayServer::start(&[])?;
//! let repo = pg_model_repo::ModelRepository::connect(&server.url())?;
//! # Ok(()) }
//! ```

mod cluster;
mod proxy;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{RepoError, Result};

pub use cluster::{ensure_citus_installed, ThrowawayCluster, CITUS_INSTALL_HINT};
pub use proxy::LostReplyProxy;

/// What to tell a user whose machine has no PostgreSQL binaries.
pub const INSTALL_HINT: &str = "no PostgreSQL server binaries (initdb, pg_ctl) were found. \
    Install them (Debian/Ubuntu: `apt-get install postgresql`; Fedora: `dnf install \
    postgresql-server`; macOS: `brew install postgresql@15`), or point PG_BINDIR at their \
    directory, or set DATABASE_URL to an existing server";

/// A PostgreSQL server of our own, deleted on drop.
#[derive(Debug)]
pub struct ThrowawayServer {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    run_as: Option<&'static str>,
    running: bool,
}

/// How `pg_ctl` stops the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Wait for nothing: disconnect clients, shut down cleanly.
    Fast,
    /// Abort without a clean shutdown (crash recovery at next start).
    Immediate,
}

impl StopMode {
    fn flag(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// `DATABASE_URL` when it is set and not blank; otherwise the URL of a throwaway server started
/// with `settings`, whose handle must be kept alive while the URL is used.
///
/// ```no_run
/// # fn main() -> pg_model_repo::Result<()> {
/// let (url, _server) = pg_model_repo::throwaway::database_url_or_start(&[])?;
/// let repo = pg_model_repo::ModelRepository::connect(&url)?;
/// # Ok(()) }
/// ```
pub fn database_url_or_start(
    settings: &[(&str, &str)],
) -> Result<(String, Option<ThrowawayServer>)> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => Ok((url, None)),
        _ => {
            log::info!("pg-model-repo: DATABASE_URL is not set; starting a throwaway PostgreSQL");
            let server = ThrowawayServer::start(settings)?;
            Ok((server.url(), Some(server)))
        }
    }
}

impl ThrowawayServer {
    /// Initializes and starts a server with extra `postgresql.conf` settings (e.g.
    /// `("max_connections", "300")`). As root, the server runs as the `postgres` user.
    pub fn start(settings: &[(&str, &str)]) -> Result<Self> {
        let bindir = find_bindir().ok_or_else(|| RepoError::not_found(INSTALL_HINT))?;
        let run_as = if is_root() { Some("postgres") } else { None };
        let dir = make_dir(run_as)?;
        let mut server = ThrowawayServer {
            bindir,
            dir,
            port: free_port()?,
            run_as,
            running: false,
        };
        server.spawn_watchdog();
        server.initdb(settings)?;
        server.start_again()?;
        Ok(server)
    }

    /// A key/value connection string for the `postgres` superuser and database.
    pub fn url(&self) -> String {
        superuser_url(self.port)
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Stops the server (it can be started again with [`start_again`](Self::start_again)).
    pub fn stop(&mut self, mode: StopMode) -> Result<()> {
        self.pg_ctl(&["stop", "-w", "-m", mode.flag()])?;
        self.running = false;
        Ok(())
    }

    /// Starts a stopped server on the same port and data.
    pub fn start_again(&mut self) -> Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log");
        self.pg_ctl(&[
            "start",
            "-w",
            "-t",
            "60",
            "-o",
            &options,
            "-l",
            &log.to_string_lossy(),
        ])?;
        self.running = true;
        Ok(())
    }

    /// `pg_ctl restart` with the given mode.
    pub fn restart(&mut self, mode: StopMode) -> Result<()> {
        self.stop(mode)?;
        self.start_again()
    }

    /// Freezes every process of the server (SIGSTOP), as a hung host would: connections stay
    /// open and the kernel still ACKs their bytes, but nothing answers. The server resumes
    /// (SIGCONT) when the returned guard is dropped.
    pub fn freeze(&self) -> Result<Frozen> {
        let pids = self.processes()?;
        signal("STOP", &pids)?;
        Ok(Frozen { pids })
    }

    /// CPU seconds (user and system) the server has used so far: its postmaster, every child
    /// that has exited (accounted to the postmaster), and every live child. The difference
    /// of two readings is what the server spent in between, e.g. on a load.
    pub fn cpu_seconds(&self) -> Result<f64> {
        Ok(self
            .processes()?
            .into_iter()
            .enumerate()
            // The children's totals only for the postmaster: its children are counted live.
            .map(|(i, pid)| process_cpu_seconds(pid, i == 0))
            .sum())
    }

    /// The postmaster and its children.
    fn processes(&self) -> Result<Vec<u32>> {
        let pidfile = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))?;
        let postmaster: u32 = pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| RepoError::Io(std::io::Error::other("unreadable postmaster.pid")))?;
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // "pid (comm) state ppid …": the command may hold spaces, so split after ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    fn initdb(&self, settings: &[(&str, &str)]) -> Result<()> {
        let data = self.data_dir();
        self.run_tool(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        let mut conf = String::from("\n# pg-model-repo throwaway server\n");
        for (key, value) in settings {
            conf.push_str(&format!("{key} = '{}'\n", value.replace('\'', "''")));
        }
        let path = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&path)?;
        existing.push_str(&conf);
        std::fs::write(&path, existing)?;
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        let data = self.data_dir();
        let mut full = vec!["-D", data.to_str().unwrap_or_default()];
        full.extend_from_slice(args);
        self.run_tool("pg_ctl", &full)
    }

    /// Runs one of the server binaries (as `postgres` when we are root).
    fn run_tool(&self, program: &str, args: &[&str]) -> Result<()> {
        let binary = self.bindir.join(program);
        let mut command = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        let output = command
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| RepoError::Io(std::io::Error::new(e.kind(), format!("{program}: {e}"))))?;
        if output.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        Err(RepoError::Io(std::io::Error::other(format!(
            "{program} failed ({}): {}{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
        ))))
    }

    /// A shell that waits for this process to end, then stops the server and deletes its
    /// directory: cleanup even when the owner never drops (statics) or is killed.
    fn spawn_watchdog(&self) {
        let pg_ctl = self.bindir.join("pg_ctl");
        let prefix = self
            .run_as
            .map(|u| format!("runuser -u {u} -- "))
            .unwrap_or_default();
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {prefix}'{pg_ctl}' -D '{data}' stop -m immediate >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            pg_ctl = pg_ctl.display(),
            data = self.data_dir().display(),
            dir = self.dir.display(),
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

/// A frozen server (see [`ThrowawayServer::freeze`]); dropping it resumes the server.
#[derive(Debug)]
pub struct Frozen {
    pids: Vec<u32>,
}

impl Frozen {
    /// Resumes the server now.
    pub fn thaw(self) {}
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = signal("CONT", &self.pids) {
            log::error!("pg-model-repo: could not resume the frozen throwaway server: {e}");
        }
    }
}

/// `kill -<name>` of `pids`.
fn signal(name: &str, pids: &[u32]) -> Result<()> {
    // A child that exited meanwhile makes kill fail for it alone: the others got the signal.
    Command::new("kill")
        .arg(format!("-{name}"))
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status()?;
    Ok(())
}

impl Drop for ThrowawayServer {
    fn drop(&mut self) {
        if self.running {
            let _ = self.stop(StopMode::Immediate);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `PG_BINDIR`, then the newest `/usr/lib/postgresql/<major>/bin`, then `pg_config --bindir`,
/// then the directory of an `initdb` on PATH.
fn find_bindir() -> Option<PathBuf> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("PG_BINDIR").map(PathBuf::from) {
        return has_initdb(&dir).then_some(dir);
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_initdb(dir))
        .collect();
    debian.sort();
    if let Some((_, dir)) = debian.pop() {
        return Some(dir);
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(dir) = from_pg_config.filter(|d| has_initdb(d)) {
        return Some(dir);
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| has_initdb(dir))
}

/// CPU seconds (user and system) process `pid` has used so far, from `/proc/<pid>/stat`,
/// with those of its exited children when `children` (0 for a process that is gone).
pub fn process_cpu_seconds(pid: u32, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After "pid (comm) ": fields 14-17 are utime, stime, cutime, cstime (1-based).
    let ticks: f64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(if children { 4 } else { 2 })
                .filter_map(|f| f.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    ticks / clock_ticks_per_second()
}

/// `getconf CLK_TCK` (100 on Linux unless configured otherwise), asked once.
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A fresh directory the server's user may write.
fn make_dir(run_as: Option<&str>) -> Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix("pg-model-repo-")
        .tempdir()?
        .keep();
    if let Some(user) = run_as {
        let status = Command::new("chown")
            .arg(format!("{user}:"))
            .arg(&dir)
            .status()?;
        if !status.success() {
            return Err(RepoError::Io(std::io::Error::other(format!(
                "chown {user} {} failed",
                dir.display()
            ))));
        }
    }
    Ok(dir)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A key/value connection string for the `postgres` superuser and database on `port` of the
/// loopback address.
pub(crate) fn superuser_url(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname=postgres")
}
