//! The process's one logger. A process has only one, and all the tests share this process:
//! env_logger as `RUST_LOG` says for every test, and a [`LogWatch`] for the tests that check
//! what gets logged.

use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

/// env_logger as `RUST_LOG` says, and, while a [`LogWatch`] is alive, a scan of every record at
/// every level.
struct TestLogger {
    env: env_logger::Logger,
}

/// What the current [`LogWatch`] saw, `None` when nothing watches.
static WATCHED: Mutex<Option<Watched>> = Mutex::new(None);
/// The level `RUST_LOG` asks for, restored when a watch ends.
static ENV_LEVEL: OnceLock<log::LevelFilter> = OnceLock::new();

struct Watched {
    secrets: Vec<String>,
    records: usize,
    leaks: Vec<String>,
}

fn watched() -> MutexGuard<'static, Option<Watched>> {
    WATCHED.lock().unwrap_or_else(PoisonError::into_inner)
}

impl log::Log for TestLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.env.enabled(metadata) || watched().is_some()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.env.matches(record) {
            self.env.log(record);
        }
        if watched().is_none() {
            return;
        }
        // Formatted outside the lock: formatting may log.
        let line = format!("{} {} {}", record.level(), record.target(), record.args());
        if let Some(w) = watched().as_mut() {
            w.records += 1;
            if w.secrets.iter().any(|s| line.contains(s.as_str())) {
                w.leaks.push(line);
            }
        }
    }

    fn flush(&self) {
        self.env.flush();
    }
}

/// Installs the process's logger (once; later calls do nothing).
pub fn init() {
    ENV_LEVEL.get_or_init(|| {
        let env = env_logger::Builder::from_default_env()
            .is_test(true)
            .build();
        let level = env.filter();
        log::set_boxed_logger(Box::new(TestLogger { env })).expect("the only logger");
        log::set_max_level(level);
        level
    });
}

/// While alive, every log record of the process, at every level, is counted and checked for
/// any of the secrets. Other tests run and log meanwhile: their records are scanned too (which
/// only makes the check stricter), but only those containing a secret are kept. One watch at a
/// time: a second waits for the first to end.
pub struct LogWatch {
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl LogWatch {
    pub fn start(secrets: &[&str]) -> Self {
        static ONE: Mutex<()> = Mutex::new(());
        init();
        let guard = ONE.lock().unwrap_or_else(PoisonError::into_inner);
        *watched() = Some(Watched {
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            records: 0,
            leaks: Vec::new(),
        });
        log::set_max_level(log::LevelFilter::Trace);
        LogWatch {
            _one_at_a_time: guard,
        }
    }

    /// How many records it saw, and those containing a secret.
    pub fn seen(&self) -> (usize, Vec<String>) {
        let w = watched();
        let w = w.as_ref().expect("watching");
        (w.records, w.leaks.clone())
    }
}

impl Drop for LogWatch {
    fn drop(&mut self) {
        log::set_max_level(*ENV_LEVEL.get().expect("installed"));
        *watched() = None;
    }
}
