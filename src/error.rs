//! The crate's one error type: a leaf every layer uses. Each variant keeps its cause as a
//! value (the server's error and its SQLSTATE, the kind of timeout, the I/O failure), never
//! written into a message to be parsed back out; the one place where a PostgreSQL error
//! becomes a variant is `From<postgres::Error>` below.

use std::fmt;
use std::time::Duration;

use postgres::error::SqlState;

/// The result type of every fallible call in this crate.
pub type Result<T> = std::result::Result<T, RepoError>;

/// The cause behind an error: a boxed error that crosses threads.
type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in a repository call.
///
/// Messages never contain a password: they name the operation, the offending input and the
/// cause, and connection strings are never part of them. The message-carrying variants hold an
/// [`ErrorDetail`] (a [`TimeoutDetail`] for `Timeout`): match them as `RepoError::Conflict(_)`,
/// and read the message with `to_string()` or [`ErrorDetail::message`].
#[non_exhaustive]
#[derive(Debug)]
pub enum RepoError {
    /// The caller's input breaks a documented rule; nothing was written.
    InvalidInput(ErrorDetail),
    /// Something the call needs (a version, an alias) does not exist.
    NotFound(ErrorDetail),
    /// The write contradicts what is stored (e.g. different bytes under an existing version).
    Conflict(ErrorDetail),
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
    Corrupt(ErrorDetail),
    /// A value could not be encoded or decoded (CBOR, JSON).
    Serialization(ErrorDetail),
    /// Pool checkout past `pool_timeout`, statement_timeout (57014), lock_timeout (55P03), a
    /// connection cut by the hung-server watchdog: [`TimeoutDetail::kind`] says which.
    Timeout(TimeoutDetail),
    /// Any other database error, with its cause.
    Database(postgres::Error),
    /// Local I/O failed while streaming (a reader, a writer, a spool file).
    Io(std::io::Error),
    /// A write's COMMIT was sent but its reply was lost (the connection died or the server
    /// hung), and the server could not be asked whether it committed: the write may or may
    /// not have taken effect. Never retried inside the library; the message says how to find
    /// out, and the source is the failure that lost the reply.
    OutcomeUnknown(ErrorDetail),
    /// The role may not do what the call needs (SQLSTATE 42501), with what to do instead
    /// (e.g. a migration attempted by an application role without DDL rights).
    PermissionDenied {
        /// What the call needed, and who can do it.
        hint: String,
        /// The server's refusal.
        source: postgres::Error,
    },
}

/// What a message-carrying [`RepoError`] variant holds: the message, and the error behind it
/// when there is one (the server's error for a mapped SQLSTATE, whose code
/// [`code`](Self::code) returns as a value).
#[derive(Debug)]
pub struct ErrorDetail {
    message: String,
    code: Option<SqlState>,
    source: Option<Cause>,
    record: Option<usize>,
}

impl ErrorDetail {
    /// A message with no cause behind it.
    pub(crate) fn new(message: impl Into<String>) -> Self {
        ErrorDetail {
            message: message.into(),
            code: None,
            source: None,
            record: None,
        }
    }

    /// A message with the error that caused it.
    pub(crate) fn caused_by(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        ErrorDetail {
            message: message.into(),
            code: None,
            source: Some(Box::new(source)),
            record: None,
        }
    }

    /// A server error, described as `Display` shows it, with its SQLSTATE.
    fn from_server(error: postgres::Error, code: SqlState) -> Self {
        ErrorDetail {
            message: describe_db_error(&error),
            code: Some(code),
            source: Some(Box::new(error)),
            record: None,
        }
    }

    /// The same cause, with `context` put in front of the message.
    pub(crate) fn with_context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The same error, naming the batch record it is about (`record N: ` in front).
    pub(crate) fn at_record(mut self, index: usize) -> Self {
        self.message = format!("record {index}: {}", self.message);
        self.record = Some(index);
        self
    }

    /// The message (what `Display` shows after the variant's phrase).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// For an error about one record of a batch (or of an iterator's records), its index.
    pub fn record(&self) -> Option<usize> {
        self.record
    }

    /// The SQLSTATE of the server error behind this one, if there is one.
    pub fn code(&self) -> Option<&SqlState> {
        self.code.as_ref()
    }
}

/// A message with no cause, for errors an application builds itself (e.g. in the closure of
/// `get_or_compute`): `RepoError::NotFound("model".into())`.
impl From<String> for ErrorDetail {
    fn from(message: String) -> Self {
        ErrorDetail::new(message)
    }
}

impl From<&str> for ErrorDetail {
    fn from(message: &str) -> Self {
        ErrorDetail::new(message)
    }
}

impl fmt::Display for ErrorDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ErrorDetail {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Which bound a [`RepoError::Timeout`] ran into.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutKind {
    /// No pooled connection within `pool_timeout` (or the repository is closing): the only
    /// kind worth retrying later ([`RepoError::is_transient`]).
    PoolCheckout,
    /// The server cancelled a statement at `statement_timeout` (SQLSTATE 57014).
    Statement,
    /// A lock was not granted within `lock_timeout` (SQLSTATE 55P03).
    Lock,
    /// The server stopped answering and the hung-server watchdog cut the connection.
    NoReply,
    /// The call's own deadline passed.
    Deadline,
}

/// What [`RepoError::Timeout`] holds: the kind of bound that was passed, and the detail.
#[derive(Debug)]
pub struct TimeoutDetail {
    kind: TimeoutKind,
    detail: ErrorDetail,
}

impl TimeoutDetail {
    /// Which bound was passed.
    pub fn kind(&self) -> TimeoutKind {
        self.kind
    }

    /// The message (what `Display` shows after "timed out: ").
    pub fn message(&self) -> &str {
        self.detail.message()
    }

    /// The SQLSTATE of the server error behind this timeout (57014, 55P03), if any.
    pub fn code(&self) -> Option<&SqlState> {
        self.detail.code()
    }
}

impl fmt::Display for TimeoutDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.detail.fmt(f)
    }
}

impl std::error::Error for TimeoutDetail {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.detail.source()
    }
}

impl RepoError {
    /// True when repeating the same call later may succeed: a pool checkout that timed out, a
    /// dropped connection, a server shutting down or restarting, a serialization failure or
    /// deadlock, too many connections.
    pub fn is_transient(&self) -> bool {
        match self {
            RepoError::Timeout(t) => t.kind == TimeoutKind::PoolCheckout,
            RepoError::Database(e) => is_transient_db_error(e),
            _ => false,
        }
    }

    /// The variant as a short snake_case name (`"timeout"`, `"not_found"`, ...): the
    /// `error.type` of the `metrics` feature.
    pub(crate) fn kind_name(&self) -> &'static str {
        match self {
            RepoError::InvalidInput(_) => "invalid_input",
            RepoError::NotFound(_) => "not_found",
            RepoError::Conflict(_) => "conflict",
            RepoError::DimensionMismatch { .. } => "dimension_mismatch",
            RepoError::Corrupt(_) => "corrupt",
            RepoError::Serialization(_) => "serialization",
            RepoError::Timeout(_) => "timeout",
            RepoError::Database(_) => "database",
            RepoError::Io(_) => "io",
            RepoError::OutcomeUnknown(_) => "outcome_unknown",
            RepoError::PermissionDenied { .. } => "permission_denied",
        }
    }

    /// The SQLSTATE of the database error behind this one, if there is one: for `Database`,
    /// and for the server's errors mapped to `Conflict` (23505), `Timeout` (57014, 55P03)
    /// and `InvalidInput` (class 22).
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            RepoError::Database(e) | RepoError::PermissionDenied { source: e, .. } => {
                e.as_db_error().map(server_code)
            }
            RepoError::Conflict(d) | RepoError::InvalidInput(d) => d.code(),
            RepoError::Timeout(t) => t.code(),
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

    /// The same error, a dimension mismatch without a batch index given `index`: for a
    /// batch whose type's registered dimension is found late (by the server).
    pub(crate) fn at_batch_index(self, index: usize) -> Self {
        match self {
            RepoError::DimensionMismatch {
                entity_type,
                expected,
                actual,
                index: None,
            } => RepoError::DimensionMismatch {
                entity_type,
                expected,
                actual,
                index: Some(index),
            },
            other => other,
        }
    }

    /// `InvalidInput` about record `index` of a batch.
    pub(crate) fn invalid_record(index: usize, msg: impl Into<String>) -> Self {
        RepoError::InvalidInput(ErrorDetail::new(msg).at_record(index))
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        RepoError::InvalidInput(ErrorDetail::new(msg))
    }

    pub(crate) fn not_found(msg: impl Into<String>) -> Self {
        RepoError::NotFound(ErrorDetail::new(msg))
    }

    pub(crate) fn conflict(msg: impl Into<String>) -> Self {
        RepoError::Conflict(ErrorDetail::new(msg))
    }

    pub(crate) fn corrupt(msg: impl Into<String>) -> Self {
        RepoError::Corrupt(ErrorDetail::new(msg))
    }

    pub(crate) fn serialization(
        msg: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        RepoError::Serialization(ErrorDetail::caused_by(msg, source))
    }

    pub(crate) fn timeout(kind: TimeoutKind, msg: impl Into<String>) -> Self {
        RepoError::Timeout(TimeoutDetail {
            kind,
            detail: ErrorDetail::new(msg),
        })
    }

    pub(crate) fn pool_timeout(detail: impl fmt::Display) -> Self {
        RepoError::timeout(
            TimeoutKind::PoolCheckout,
            format!("no pooled connection within pool_timeout: {detail}"),
        )
    }

    /// The same error with `context` in front of its message, for the message-carrying
    /// variants (the others are returned as they are).
    pub(crate) fn with_context(self, context: impl fmt::Display) -> Self {
        match self {
            RepoError::InvalidInput(d) => RepoError::InvalidInput(d.with_context(context)),
            RepoError::NotFound(d) => RepoError::NotFound(d.with_context(context)),
            RepoError::Conflict(d) => RepoError::Conflict(d.with_context(context)),
            RepoError::Corrupt(d) => RepoError::Corrupt(d.with_context(context)),
            RepoError::Serialization(d) => RepoError::Serialization(d.with_context(context)),
            RepoError::OutcomeUnknown(d) => RepoError::OutcomeUnknown(d.with_context(context)),
            RepoError::Timeout(t) => RepoError::Timeout(TimeoutDetail {
                kind: t.kind,
                detail: t.detail.with_context(context),
            }),
            other => other,
        }
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
        Some(db) => format!("{} (SQLSTATE {})", db.message(), server_code(db).code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Codes a Citus coordinator relays as XX000, by the worker's message (see [`server_code`]).
static RELAYED: [(&str, SqlState); 6] = [
    (
        "duplicate key value violates unique constraint",
        SqlState::UNIQUE_VIOLATION,
    ),
    ("violates check constraint", SqlState::CHECK_VIOLATION),
    ("violates not-null constraint", SqlState::NOT_NULL_VIOLATION),
    (
        "violates foreign key constraint",
        SqlState::FOREIGN_KEY_VIOLATION,
    ),
    (
        "value too long for type",
        SqlState::STRING_DATA_RIGHT_TRUNCATION,
    ),
    (
        "invalid input syntax",
        SqlState::INVALID_TEXT_REPRESENTATION,
    ),
];

/// The SQLSTATE of a server error. A Citus coordinator relays an error that a worker raised
/// during a COPY as XX000 (internal error, from its `ReportCopyError`) with the worker's
/// message; the code that message stands for is restored for the constraint and data errors
/// a load can meet, so they map as they do on one server.
fn server_code(db: &postgres::error::DbError) -> &SqlState {
    let code = db.code();
    if code != &SqlState::INTERNAL_ERROR || db.routine() != Some("ReportCopyError") {
        return code;
    }
    RELAYED
        .iter()
        .find(|(text, _)| db.message().contains(text))
        .map_or(code, |(_, relayed)| relayed)
}

/// Why the hung-server watchdog cut a connection: the source of the I/O error its caller
/// sees, found again by [`connection_cut_in`] when that error becomes a [`RepoError`].
#[derive(Clone, Debug)]
pub(crate) struct ConnectionCut {
    /// How long the caller had been waiting on a silent server.
    pub waited: Duration,
    /// The bound it passed, or `None` when the call's own deadline passed.
    pub bound: Option<Duration>,
}

impl fmt::Display for ConnectionCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bound {
            Some(bound) => write!(
                f,
                "no reply from the server for {:.1?} (bound {bound:?}); the connection was cut \
                 and discarded (a write it carried may or may not have taken effect)",
                self.waited
            ),
            None => write!(
                f,
                "the call's deadline passed while it waited for the server; the connection was \
                 cut and discarded (a write it carried may or may not have taken effect)"
            ),
        }
    }
}

impl std::error::Error for ConnectionCut {}

impl ConnectionCut {
    fn kind(&self) -> TimeoutKind {
        match self.bound {
            Some(_) => TimeoutKind::NoReply,
            None => TimeoutKind::Deadline,
        }
    }
}

/// Finds the [`ConnectionCut`] behind an error, if the watchdog cut its connection.
pub(crate) fn connection_cut_in<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a ConnectionCut> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(cut) = e.downcast_ref::<ConnectionCut>() {
            return Some(cut);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<ConnectionCut>())
        {
            return Some(inner);
        }
        next = e.source();
    }
    None
}

impl std::error::Error for RepoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RepoError::Database(e) | RepoError::PermissionDenied { source: e, .. } => Some(e),
            RepoError::Io(e) => Some(e),
            RepoError::InvalidInput(d)
            | RepoError::NotFound(d)
            | RepoError::Conflict(d)
            | RepoError::Corrupt(d)
            | RepoError::Serialization(d)
            | RepoError::OutcomeUnknown(d) => d.source(),
            RepoError::Timeout(t) => t.source(),
            RepoError::DimensionMismatch { .. } => None,
        }
    }
}

impl From<postgres::Error> for RepoError {
    /// The one SQLSTATE mapping: 23505 -> Conflict, 57014 and 55P03 -> Timeout, class 22 ->
    /// InvalidInput, everything else stays a `Database` error (transient or not, see
    /// [`RepoError::is_transient`]). A connection the hung-server watchdog cut is a Timeout.
    fn from(e: postgres::Error) -> Self {
        if let Some(cut) = connection_cut_in(&e) {
            let kind = cut.kind();
            return RepoError::Timeout(TimeoutDetail {
                kind,
                detail: ErrorDetail::caused_by(cut.to_string(), e),
            });
        }
        let Some(code) = e.as_db_error().map(|db| server_code(db).clone()) else {
            return RepoError::Database(e);
        };
        let timeout = |kind, what: &str, e| {
            let detail = ErrorDetail::from_server(e, code.clone()).with_context(what);
            RepoError::Timeout(TimeoutDetail { kind, detail })
        };
        match code {
            SqlState::UNIQUE_VIOLATION => {
                RepoError::Conflict(ErrorDetail::from_server(e, code.clone()))
            }
            SqlState::QUERY_CANCELED => timeout(TimeoutKind::Statement, "statement cancelled", e),
            SqlState::LOCK_NOT_AVAILABLE => timeout(TimeoutKind::Lock, "lock not available", e),
            ref c if c.code().starts_with("22") => {
                RepoError::InvalidInput(ErrorDetail::from_server(e, code.clone()))
            }
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
        assert!(!RepoError::timeout(TimeoutKind::Statement, "cancelled").is_transient());
        assert!(!RepoError::timeout(TimeoutKind::NoReply, "cut").is_transient());
        assert!(!RepoError::invalid("x").is_transient());
    }

    #[test]
    fn a_message_that_looks_like_a_sqlstate_is_not_one() {
        let conflict = RepoError::conflict("duplicate key (SQLSTATE 23505)");
        assert_eq!(conflict.code(), None);
        assert_eq!(RepoError::invalid("record 1 (of 2)").code(), None);
        assert_eq!(RepoError::pool_timeout("waited 1s").code(), None);
    }

    #[test]
    fn interrupted_streams_keep_the_original_error_as_source() {
        use std::error::Error;
        let e = interrupted_after("stream", 3, "rows", RepoError::corrupt("bad"));
        let inner = e.source().and_then(|io| io.source()).map(|c| c.to_string());
        assert_eq!(inner.as_deref(), Some("corrupt data: bad"));
        assert!(e.to_string().contains("interrupted after 3 rows"), "{e}");
        let untouched = interrupted_after("stream", 0, "rows", RepoError::corrupt("x"));
        assert!(matches!(untouched, RepoError::Corrupt(_)));
    }

    #[test]
    fn context_goes_in_front_and_the_kind_stays() {
        let e = RepoError::pool_timeout("waited 1s").with_context("migrating");
        assert!(e.is_transient());
        assert_eq!(
            e.to_string(),
            "timed out: migrating: no pooled connection within pool_timeout: waited 1s"
        );
    }

    #[test]
    fn relayed_codes_are_the_ones_a_load_can_meet() {
        let codes: Vec<&str> = RELAYED.iter().map(|(_, c)| c.code()).collect();
        assert_eq!(
            codes,
            ["23505", "23514", "23502", "23503", "22001", "22P02"]
        );
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
