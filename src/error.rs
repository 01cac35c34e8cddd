//! The crate's one error type, and the one place where a PostgreSQL SQLSTATE or an I/O failure
//! becomes a [`RepoError`] variant and a retry decision.

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
    /// The connection pool itself failed (other than a checkout timeout).
    Pool(String),
    /// Local I/O failed while streaming (a reader, a writer, a spool file).
    Io(std::io::Error),
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

    /// The SQLSTATE of a database error, if there is one.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            RepoError::Database(e) => e.code(),
            _ => None,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        RepoError::InvalidInput(msg.into())
    }

    pub(crate) fn pool_timeout(detail: impl fmt::Display) -> Self {
        RepoError::Timeout(format!("{POOL_TIMEOUT_PREFIX}: {detail}"))
    }
}

const POOL_TIMEOUT_PREFIX: &str = "no pooled connection within pool_timeout";

/// True for database errors worth retrying: the connection is gone or the server asked us to
/// come back later. Timeouts are deliberately absent (they are the caller's budget).
pub(crate) fn is_transient_db_error(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => is_transient_sqlstate(code.code()),
        // No SQLSTATE and not closed: an I/O or protocol failure on the socket.
        None => is_connection_failure(e),
    }
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
    // tokio-postgres reports unexpected messages and EOF without a typed source.
    let text = e.to_string();
    text.contains("unexpected message")
        || text.contains("connection")
        || text.contains("end of file")
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
            RepoError::Pool(m) => write!(f, "connection pool error: {m}"),
            RepoError::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

/// The server's message with its SQLSTATE, or the client's description of a lost connection.
fn describe_db_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

impl std::error::Error for RepoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RepoError::Database(e) => Some(e),
            RepoError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<postgres::Error> for RepoError {
    /// The one SQLSTATE mapping: 23505 -> Conflict, 57014 and 55P03 -> Timeout, class 22 ->
    /// InvalidInput, everything else stays a `Database` error (transient or not, see
    /// [`RepoError::is_transient`]).
    fn from(e: postgres::Error) -> Self {
        let Some(code) = e.code().map(|c| c.code().to_owned()) else {
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
    fn transient_sqlstates_cover_connection_and_concurrency_failures() {
        for code in ["40001", "40P01", "57P01", "53300", "08006", "08001"] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "57014", "55P03", "22001", "42P01"] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
    }
}
