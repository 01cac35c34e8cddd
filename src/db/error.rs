//! The crate's one error type, and the one place where a PostgreSQL SQLSTATE or an I/O failure
//! becomes a [`RepoError`] variant and a retry decision.

use std::collections::HashMap;
use std::fmt;

use postgres::error::SqlState;

/// The result type of every fallible call in this crate.
pub type Result<T> = std::result::Result<T, RepoError>;

/// Everything that can go wrong in a repository call.
///
/// Messages never contain a password: they name the operation, the offending input and the
/// cause, and connection strings are never part of them.
#[non_exhaustive]
#[derive(Debug)]
pub enum RepoError {
    /// The caller's input breaks a documented rule; nothing was written.
    InvalidInput(String),
    /// Something the call needs (a version, an alias) does not exist.
    NotFound(String),
    /// The write contradicts what is stored (e.g. different bytes under an existing version).
    Conflict(String),
    /// A vector's length differs from its entity type's registered dimension.
    DimensionMismatch {
        /// The entity type whose dimension was violated.
        entity_type: String,
        /// The dimension registered for the type (or set by the batch's first vector).
        expected: usize,
        /// The length of the offending vector.
        actual: usize,
        /// The index of the offending record in its batch, when the call took a batch.
        index: Option<usize>,
    },
    /// Stored bytes no longer match their stored checksum.
    Corrupt(String),
    /// A value could not be encoded or decoded (CBOR, JSON).
    Serialization(String),
    /// Pool checkout past `pool_timeout`, statement_timeout (57014) or lock_timeout (55P03).
    Timeout(String),
    /// Any other database error, with its cause.
    Database(postgres::Error),
    /// Local I/O failed while streaming (a reader, a writer, a spool file).
    Io(std::io::Error),
    /// A write's COMMIT was sent but its reply was lost (the connection died or the server
    /// hung), and the server could not be asked whether it committed: the write may or may
    /// not have taken effect. Never retried inside the library; the message says how to find
    /// out.
    OutcomeUnknown(String),
    /// The role may not do what the call needs (SQLSTATE 42501), with what to do instead
    /// (e.g. a migration attempted by an application role without DDL rights).
    PermissionDenied {
        /// What the call needed, and who can do it.
        hint: String,
        /// The server's refusal.
        source: postgres::Error,
    },
}

impl RepoError {
    /// True when repeating the same call later may succeed: a pool checkout that timed out, a
    /// dropped connection, a server shutting down or restarting, a serialization failure or
    /// deadlock, too many connections.
    pub fn is_transient(&self) -> bool {
        match self {
            RepoError::Timeout(msg) => msg.starts_with(POOL_TIMEOUT_PREFIX),
            RepoError::Database(e) => is_transient_db_error(e),
            _ => false,
        }
    }

    /// The SQLSTATE of the database error behind this one, if there is one: for `Database`,
    /// and for the server's errors mapped to `Conflict` (23505), `Timeout` (57014, 55P03)
    /// and `InvalidInput` (class 22).
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            RepoError::Database(e) | RepoError::PermissionDenied { source: e, .. } => {
                e.as_db_error().map(|db| interned(server_code(db)))
            }
            RepoError::Conflict(m) | RepoError::Timeout(m) | RepoError::InvalidInput(m) => {
                sqlstate_in(m).map(interned)
            }
            _ => None,
        }
    }

    /// The same error without a batch index: for calls that take one record, not a batch.
    pub(crate) fn without_index(self) -> Self {
        match self {
            RepoError::DimensionMismatch {
                entity_type,
                expected,
                actual,
                ..
            } => RepoError::DimensionMismatch {
                entity_type,
                expected,
                actual,
                index: None,
            },
            other => other,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        RepoError::InvalidInput(msg.into())
    }

    pub(crate) fn pool_timeout(detail: impl fmt::Display) -> Self {
        RepoError::Timeout(format!("{POOL_TIMEOUT_PREFIX}: {detail}"))
    }
}

/// A stream that failed after it had handed part of its data to the caller: repeating it
/// would hand that part over twice, so it is reported as interrupted (never retried), with
/// the original error as its source.
#[derive(Debug)]
struct Interrupted {
    what: &'static str,
    delivered: u64,
    unit: &'static str,
    cause: RepoError,
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} interrupted after {} {}: {}",
            self.what, self.delivered, self.unit, self.cause
        )
    }
}

impl std::error::Error for Interrupted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.cause)
    }
}

/// `error` as it is when nothing reached the caller yet (`delivered == 0`, so a retry is
/// safe), else an `Io` error of kind `Interrupted` whose source is `error`.
pub(crate) fn interrupted_after(
    what: &'static str,
    delivered: u64,
    unit: &'static str,
    error: RepoError,
) -> RepoError {
    if delivered == 0 {
        return error;
    }
    RepoError::Io(std::io::Error::new(
        std::io::ErrorKind::Interrupted,
        Interrupted {
            what,
            delivered,
            unit,
            cause: error,
        },
    ))
}

const POOL_TIMEOUT_PREFIX: &str = "no pooled connection within pool_timeout";

/// True for database errors worth retrying: the connection is gone or the server asked us to
/// come back later. Timeouts are deliberately absent (they are the caller's budget).
pub(crate) fn is_transient_db_error(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => is_transient_sqlstate(code.code()) || is_lost_worker(e),
        // No SQLSTATE and not closed: an I/O or protocol failure on the socket.
        None => is_connection_failure(e),
    }
}

/// A Citus coordinator that could not reach a worker (down, restarting, or its connection
/// lost) says so as XX000 "connection to the remote node … failed": the coordinator's own
/// session is fine, and the same call may succeed once the worker is back.
fn is_lost_worker(e: &postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.code().code() == "XX000" && db.message().starts_with("connection to the remote node")
    })
}

fn is_transient_sqlstate(code: &str) -> bool {
    matches!(
        code,
        "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "53300" | "58030"
    ) || code.starts_with("08")
}

/// An error without a SQLSTATE that came from the connection itself (socket, protocol), as
/// opposed to one from converting a value on our side.
pub(crate) fn is_connection_failure(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if e.code().is_some() {
        return false;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    // tokio-postgres reports a protocol breakdown as "unexpected message from server" with no
    // typed source; every other failure of the socket carries an io::Error (checked above)
    // or is `is_closed()`.
    e.to_string().starts_with("unexpected message from server")
}

impl fmt::Display for RepoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RepoError::InvalidInput(m) => write!(f, "invalid input: {m}"),
            RepoError::NotFound(m) => write!(f, "not found: {m}"),
            RepoError::Conflict(m) => write!(f, "conflict: {m}"),
            RepoError::DimensionMismatch {
                entity_type,
                expected,
                actual,
                index,
            } => {
                write!(
                    f,
                    "dimension mismatch for entity type {entity_type:?}: expected {expected}, got {actual}"
                )?;
                match index {
                    Some(i) => write!(f, " (record {i})"),
                    None => Ok(()),
                }
            }
            RepoError::Corrupt(m) => write!(f, "corrupt data: {m}"),
            RepoError::Serialization(m) => write!(f, "serialization failed: {m}"),
            RepoError::Timeout(m) => write!(f, "timed out: {m}"),
            RepoError::Database(e) => write!(f, "database error: {}", describe_db_error(e)),
            RepoError::Io(e) => write!(f, "i/o error: {e}"),
            RepoError::OutcomeUnknown(m) => write!(f, "outcome unknown: {m}"),
            RepoError::PermissionDenied { hint, source } => {
                write!(
                    f,
                    "permission denied: {hint}: {}",
                    describe_db_error(source)
                )
            }
        }
    }
}

/// The server's message with its SQLSTATE, or the client's description of a lost connection
/// with its cause ("error connecting to server: Connection refused").
fn describe_db_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} {SQLSTATE_OPEN}{}{SQLSTATE_CLOSE}",
            db.message(),
            server_code(db)
        ),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// The SQLSTATE of a server error. A Citus coordinator relays an error that a worker raised
/// during a COPY as XX000 (internal error, from its `ReportCopyError`) with the worker's
/// message; the code that message stands for is restored for the constraint and data errors
/// a load can meet, so they map as they do on one server.
fn server_code(db: &postgres::error::DbError) -> &str {
    const RELAYED: &[(&str, &str)] = &[
        ("duplicate key value violates unique constraint", "23505"),
        ("violates check constraint", "23514"),
        ("violates not-null constraint", "23502"),
        ("violates foreign key constraint", "23503"),
        ("value too long for type", "22001"),
        ("invalid input syntax", "22P02"),
    ];
    let code = db.code().code();
    if code != "XX000" || db.routine() != Some("ReportCopyError") {
        return code;
    }
    RELAYED
        .iter()
        .find(|(text, _)| db.message().contains(text))
        .map_or(code, |(_, relayed)| relayed)
}

/// How a message carries the SQLSTATE of the server error it came from.
const SQLSTATE_OPEN: &str = "(SQLSTATE ";
const SQLSTATE_CLOSE: &str = ")";

/// The SQLSTATE at the end of a message built by [`describe_db_error`].
fn sqlstate_in(message: &str) -> Option<&str> {
    let rest = message.strip_suffix(SQLSTATE_CLOSE)?;
    let start = rest.rfind(SQLSTATE_OPEN)? + SQLSTATE_OPEN.len();
    let code = &rest[start..];
    (code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(code)
}

/// One `&'static SqlState` per code seen: `SqlState` values are built at run time, and the
/// codes that reach here are the few the server sends.
fn interned(code: &str) -> &'static SqlState {
    static SEEN: std::sync::OnceLock<std::sync::Mutex<HashMap<String, &'static SqlState>>> =
        std::sync::OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    seen.entry(code.to_owned())
        .or_insert_with(|| Box::leak(Box::new(SqlState::from_code(code))))
}

impl std::error::Error for RepoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RepoError::Database(e) | RepoError::PermissionDenied { source: e, .. } => Some(e),
            RepoError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<postgres::Error> for RepoError {
    /// The one SQLSTATE mapping: 23505 -> Conflict, 57014 and 55P03 -> Timeout, class 22 ->
    /// InvalidInput, everything else stays a `Database` error (transient or not, see
    /// [`RepoError::is_transient`]). A connection the hung-server watchdog cut is a Timeout.
    fn from(e: postgres::Error) -> Self {
        if let Some(expired) = crate::db::deadline::expired_in(&e) {
            return RepoError::Timeout(expired.to_string());
        }
        let Some(code) = e.as_db_error().map(|db| server_code(db).to_owned()) else {
            return RepoError::Database(e);
        };
        let message = describe_db_error(&e);
        match code.as_str() {
            "23505" => RepoError::Conflict(message),
            "57014" => RepoError::Timeout(format!("statement cancelled: {message}")),
            "55P03" => RepoError::Timeout(format!("lock not available: {message}")),
            c if c.starts_with("22") => RepoError::InvalidInput(message),
            _ => RepoError::Database(e),
        }
    }
}

impl From<std::io::Error> for RepoError {
    fn from(e: std::io::Error) -> Self {
        RepoError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pool_timeouts_are_transient_timeouts() {
        assert!(RepoError::pool_timeout("waited 1s").is_transient());
        assert!(!RepoError::Timeout("statement cancelled".into()).is_transient());
        assert!(!RepoError::invalid("x").is_transient());
    }

    #[test]
    fn mapped_errors_keep_their_sqlstate() {
        let conflict = RepoError::Conflict("duplicate key (SQLSTATE 23505)".into());
        assert_eq!(conflict.code(), Some(&SqlState::UNIQUE_VIOLATION));
        let timeout = RepoError::Timeout("statement cancelled: x (SQLSTATE 57014)".into());
        assert_eq!(timeout.code(), Some(&SqlState::QUERY_CANCELED));
        assert_eq!(RepoError::invalid("record 1 (of 2)").code(), None);
        assert_eq!(RepoError::pool_timeout("waited 1s").code(), None);
    }

    #[test]
    fn interrupted_streams_keep_the_original_error_as_source() {
        use std::error::Error;
        let e = interrupted_after("stream", 3, "rows", RepoError::Corrupt("bad".into()));
        let inner = e.source().and_then(|io| io.source()).map(|c| c.to_string());
        assert_eq!(inner.as_deref(), Some("corrupt data: bad"));
        assert!(e.to_string().contains("interrupted after 3 rows"), "{e}");
        let untouched = interrupted_after("stream", 0, "rows", RepoError::Corrupt("x".into()));
        assert!(matches!(untouched, RepoError::Corrupt(_)));
    }

    #[test]
    fn transient_sqlstates_cover_connection_and_concurrency_failures() {
        for code in ["40001", "40P01", "57P01", "53300", "08006", "08001"] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "57014", "55P03", "22001", "42P01"] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
    }
}
