//! The tool's errors and their exit codes, and the logger that passes the library's warnings
//! to stderr; both scrub the database password from what they print.

use pg_model_repo::RepoError;

use crate::connect::scrub;

/// Exit code of a command that worked.
pub const EXIT_OK: i32 = 0;
/// Exit code of an operation that failed (the database, a bad input file, a refused value).
pub const EXIT_FAILED: i32 = 1;
/// Exit code of a command line that is wrong (clap uses it too).
pub const EXIT_USAGE: i32 = 2;
/// `health`: the repository works but is degraded.
pub const EXIT_DEGRADED: i32 = 3;
/// `health`: the repository is unhealthy (or unreachable).
pub const EXIT_UNHEALTHY: i32 = 4;

/// Why a command stopped.
#[derive(Debug)]
pub enum CliError {
    /// The command line is wrong: exit 2.
    Usage(String),
    /// The operation failed: exit 1.
    Failed(String),
}

impl CliError {
    /// A failed operation whose message names what failed.
    pub fn failed(message: impl Into<String>) -> Self {
        CliError::Failed(message.into())
    }

    /// A wrong command line.
    pub fn usage(message: impl Into<String>) -> Self {
        CliError::Usage(message.into())
    }

    /// A library error, with what the tool was doing.
    pub fn repo(context: impl std::fmt::Display, error: RepoError) -> Self {
        CliError::Failed(format!("{context}: {error}"))
    }

    /// Prints the error on stderr, without the password; returns the exit code.
    pub fn report(&self) -> i32 {
        let (message, code) = match self {
            CliError::Usage(m) => (m, EXIT_USAGE),
            CliError::Failed(m) => (m, EXIT_FAILED),
        };
        eprintln!("pg-model-repo: error: {}", scrub(message));
        if code == EXIT_USAGE {
            eprintln!("For more information, try '--help'.");
        }
        code
    }
}

impl From<RepoError> for CliError {
    fn from(error: RepoError) -> Self {
        CliError::Failed(error.to_string())
    }
}

/// The library's log on stderr, scrubbed: warnings by default, more with
/// `MODEL_REPO_LOG=info|debug|trace` (`off` silences it). A message repeated (a retried
/// connection) is printed once.
struct StderrLog {
    last: std::sync::Mutex<String>,
}

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let message = scrub(&record.args().to_string());
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if *last == message {
                return;
            }
            let level = record.level().as_str().to_lowercase();
            eprintln!("pg-model-repo: {level}: {message}");
            *last = message;
        }
    }

    fn flush(&self) {}
}

pub fn install_logger() {
    static LOG: StderrLog = StderrLog {
        last: std::sync::Mutex::new(String::new()),
    };
    let level = match std::env::var("MODEL_REPO_LOG")
        .ok()
        .as_deref()
        .map(str::trim)
    {
        Some("off") => log::LevelFilter::Off,
        Some("error") => log::LevelFilter::Error,
        Some("info") => log::LevelFilter::Info,
        Some("debug") => log::LevelFilter::Debug,
        Some("trace") => log::LevelFilter::Trace,
        _ => log::LevelFilter::Warn,
    };
    if log::set_logger(&LOG).is_ok() {
        log::set_max_level(level);
    }
}
