//! What a change event says and how it travels: the channel of a schema, the JSON payload the
//! library's statement sends (bounded by construction) and its reading by a listener.

use std::time::{Duration, SystemTime};

use postgres::GenericClient;
use serde::{Deserialize, Serialize};

use crate::db::hex_sha256;
use crate::error::{RepoError, Result};
use crate::validate::{ALIAS_MAX, MODEL_NAME_MAX, VERSION_MAX};

/// What happened to a model (see [`ModelEvent`]).
///
/// ```no_run
/// # fn main() -> pg_model_repo::Result<()> {
/// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
/// use pg_model_repo::ModelEventKind;
/// let events = repo.subscribe_model_events()?;
/// let saves = events
///     .receiver()
///     .iter()
///     .filter(|e| matches!(e.kind, ModelEventKind::Saved | ModelEventKind::Revived));
/// # Ok(()) }
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ModelEventKind {
    /// A version was saved (`save_model`, `save_model_from_reader`), or saved again with the
    /// same content ([`ModelEvent::resave`] then says so).
    Saved,
    /// A version was soft-deleted (`delete_model`).
    Deleted,
    /// A soft-deleted version was saved again: it is active again, and the newest.
    Revived,
    /// An alias was pointed at a version (`set_model_alias`).
    AliasSet,
    /// An alias moved back down its stack (`rollback_model_alias`).
    AliasRolledBack,
    /// An alias was removed: by `delete_model_alias`, or because the version it pointed to was
    /// deleted or removed.
    AliasDeleted,
    /// A version was removed physically (`cleanup_old_models`, `apply_retention`).
    CleanedUp,
    /// The subscription's connection was lost and is back: changes made meanwhile are
    /// unknown, so re-read what you keep. Also sent after the channel buffer overflowed.
    Resync,
}

impl ModelEventKind {
    /// The name in a payload's `"kind"`.
    pub(crate) fn wire_name(self) -> &'static str {
        match self {
            ModelEventKind::Saved => "saved",
            ModelEventKind::Deleted => "deleted",
            ModelEventKind::Revived => "revived",
            ModelEventKind::AliasSet => "alias_set",
            ModelEventKind::AliasRolledBack => "alias_rolled_back",
            ModelEventKind::AliasDeleted => "alias_deleted",
            ModelEventKind::CleanedUp => "cleaned_up",
            ModelEventKind::Resync => "resync",
        }
    }

    fn from_wire(name: &str) -> Option<Self> {
        Some(match name {
            "saved" => ModelEventKind::Saved,
            "deleted" => ModelEventKind::Deleted,
            "revived" => ModelEventKind::Revived,
            "alias_set" => ModelEventKind::AliasSet,
            "alias_rolled_back" => ModelEventKind::AliasRolledBack,
            "alias_deleted" => ModelEventKind::AliasDeleted,
            "cleaned_up" => ModelEventKind::CleanedUp,
            _ => return None,
        })
    }
}

/// One change to a model, as a subscription delivers it (see
/// [`ModelRepository::subscribe_model_events`](crate::ModelRepository::subscribe_model_events)).
///
/// ```no_run
/// # fn main() -> pg_model_repo::Result<()> {
/// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
/// use pg_model_repo::ModelEventKind;
/// let events = repo.subscribe_model_events()?;
/// while let Some(event) = events.recv_timeout(std::time::Duration::from_secs(60)) {
///     match event.kind {
///         ModelEventKind::AliasSet | ModelEventKind::AliasRolledBack => {
///             println!("@{:?} of {} -> {:?}", event.alias, event.model_name, event.version)
///         }
///         ModelEventKind::Resync => println!("events were missed: re-read"),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelEvent {
    /// What happened.
    pub kind: ModelEventKind,
    /// The model; empty for `Resync`.
    pub model_name: String,
    /// The version saved, deleted, revived, removed, or aliased (for `AliasDeleted`: the
    /// version the alias pointed to).
    pub version: Option<String>,
    /// The alias, for the alias kinds.
    pub alias: Option<String>,
    /// The save sequence of `version` (the counter "newest" follows): for `Saved` and
    /// `Revived` the one the save took, for `Deleted` and `CleanedUp` the removed version's,
    /// for `AliasSet` and `AliasRolledBack` the target's; `None` for `AliasDeleted` and
    /// `Resync`.
    pub save_seq: Option<i64>,
    /// The database clock when the change's transaction sent this event: its last statement
    /// before COMMIT, so the commit follows within the time a commit takes. `None` for
    /// `Resync`.
    pub committed_at: Option<SystemTime>,
    /// For `Saved`: true when the version was already stored with the same bytes and
    /// metadata, so nothing changed (a repeated save). A save repeated by the library's own
    /// retry after a lost reply sends nothing more: its first attempt already did.
    pub resave: bool,
}

impl ModelEvent {
    /// The event a subscription sends after it reconnected.
    pub(crate) fn resync() -> Self {
        ModelEvent {
            kind: ModelEventKind::Resync,
            model_name: String::new(),
            version: None,
            alias: None,
            save_seq: None,
            committed_at: None,
            resave: false,
        }
    }
}

/// NOTIFY's limit on a payload: it must be shorter than 8000 bytes.
const NOTIFY_LIMIT: usize = 8000;

/// The longest payload the library sends, in bytes: every name is checked before any
/// statement (and read back from columns of the same bounded types), at most 255 (model
/// names), 50 (versions) and 64 (aliases) characters, and JSON escapes a character into at
/// most 6 bytes (`\u001f`); the rest is fixed keys and two 64-bit integers. Far below
/// NOTIFY's limit of 8000.
///
/// ```no_run
/// assert!(pg_model_repo::MAX_EVENT_PAYLOAD_BYTES < 8000);
/// ```
pub const MAX_EVENT_PAYLOAD_BYTES: usize = 6 * (MODEL_NAME_MAX + VERSION_MAX + ALIAS_MAX) + 200;

const _: () = assert!(MAX_EVENT_PAYLOAD_BYTES < NOTIFY_LIMIT);

/// An event one of the library's statements sends (the database adds the time).
#[derive(Clone, Debug)]
pub(crate) struct Notice<'a> {
    pub kind: ModelEventKind,
    pub model_name: &'a str,
    pub version: Option<&'a str>,
    pub alias: Option<&'a str>,
    pub save_seq: Option<i64>,
    pub resave: bool,
}

impl<'a> Notice<'a> {
    /// An event about `version` of `model_name`.
    pub(crate) fn version(
        kind: ModelEventKind,
        model_name: &'a str,
        version: &'a str,
        save_seq: Option<i64>,
    ) -> Self {
        Notice {
            kind,
            model_name,
            version: Some(version),
            alias: None,
            save_seq,
            resave: false,
        }
    }

    /// An event about `alias` of `model_name`, which points (or pointed) to `version`.
    pub(crate) fn alias(
        kind: ModelEventKind,
        model_name: &'a str,
        alias: &'a str,
        version: &'a str,
        save_seq: Option<i64>,
    ) -> Self {
        Notice {
            kind,
            model_name,
            version: Some(version),
            alias: Some(alias),
            save_seq,
            resave: false,
        }
    }

    /// The payload up to its last member's value, which the database appends (the time, in
    /// microseconds since the Unix epoch, then `}`).
    fn head(&self) -> String {
        let wire = Wire {
            kind: self.kind.wire_name(),
            model: self.model_name,
            version: self.version,
            alias: self.alias,
            save_seq: self.save_seq,
            resave: self.resave,
        };
        // Serializing borrowed strings and integers cannot fail.
        let mut head = serde_json::to_string(&wire).unwrap_or_default();
        head.pop();
        head.push_str(",\"at_us\":");
        head
    }
}

/// The payload's members in the order they are sent (`at_us` is appended by the database).
#[derive(Serialize)]
struct Wire<'a> {
    kind: &'a str,
    model: &'a str,
    version: Option<&'a str>,
    alias: Option<&'a str>,
    save_seq: Option<i64>,
    resave: bool,
}

/// A payload as received.
#[derive(Deserialize)]
struct Received {
    kind: String,
    model: String,
    version: Option<String>,
    alias: Option<String>,
    save_seq: Option<i64>,
    #[serde(default)]
    resave: bool,
    at_us: Option<i64>,
}

/// Sends `notices` on `channel`, in order, from the transaction `client` is in: they are
/// delivered if and only if it commits, when it commits. Called as the last statement before
/// the commit, so that the time they carry is the commit's.
const NOTIFY: &str = "SELECT pg_notify($1, n.head \
        || floor(extract(epoch FROM clock_timestamp()) * 1000000)::int8::text || '}') \
     FROM unnest($2::text[]) WITH ORDINALITY AS n(head, no) ORDER BY n.no";

pub(crate) fn notify<C: GenericClient>(
    client: &mut C,
    channel: &str,
    notices: &[Notice<'_>],
) -> Result<()> {
    if notices.is_empty() {
        return Ok(());
    }
    let heads: Vec<String> = notices.iter().map(Notice::head).collect();
    if let Some(long) = heads
        .iter()
        .find(|h| h.len() + 21 > MAX_EVENT_PAYLOAD_BYTES)
    {
        // Unreachable for names the library checked; said rather than sent truncated.
        return Err(RepoError::invalid(format!(
            "a change event of {} bytes is longer than {MAX_EVENT_PAYLOAD_BYTES}",
            long.len()
        )));
    }
    client.query(NOTIFY, &[&channel, &heads])?;
    Ok(())
}

/// Reads a payload the library sent; `None` for anything else sent on the channel.
pub(crate) fn parse(payload: &str) -> Option<ModelEvent> {
    let received: Received = serde_json::from_str(payload).ok()?;
    let committed_at = received.at_us.map(|us| {
        let at = Duration::from_micros(us.unsigned_abs());
        if us >= 0 {
            SystemTime::UNIX_EPOCH + at
        } else {
            SystemTime::UNIX_EPOCH - at
        }
    });
    Some(ModelEvent {
        kind: ModelEventKind::from_wire(&received.kind)?,
        model_name: received.model,
        version: received.version,
        alias: received.alias,
        save_seq: received.save_seq,
        committed_at,
        resave: received.resave,
    })
}

/// The LISTEN channel of `schema`'s events: `model_events.<schema>`, or for a schema name
/// longer than 50 characters its first 33 and 16 hex digits of its sha256 (a channel name
/// must stay under 64 bytes; schema names are ASCII). The SQL function
/// `model_events_channel()` of the schema (sql/V009) gives the same.
pub(crate) fn channel(schema: &str) -> String {
    if schema.len() <= 50 {
        return format!("model_events.{schema}");
    }
    let head: String = schema.chars().take(33).collect();
    format!(
        "model_events.{head}.{}",
        &hex_sha256(schema.as_bytes())[..16]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(head: &str, at_us: i64) -> String {
        format!("{head}{at_us}}}")
    }

    #[test]
    fn the_longest_payload_fits_the_bound() {
        // Control characters are what JSON escapes longest (`\u0001`).
        let model: String = std::iter::repeat_n('\u{1}', MODEL_NAME_MAX).collect();
        let version: String = std::iter::repeat_n('\u{1f}', VERSION_MAX).collect();
        let alias: String = std::iter::repeat_n('-', ALIAS_MAX).collect();
        let notice = Notice {
            kind: ModelEventKind::AliasRolledBack,
            model_name: &model,
            version: Some(&version),
            alias: Some(&alias),
            save_seq: Some(i64::MIN),
            resave: true,
        };
        let payload = full(&notice.head(), i64::MIN);
        assert!(
            payload.len() <= MAX_EVENT_PAYLOAD_BYTES,
            "{}",
            payload.len()
        );
        assert!(notice.head().len() + 21 <= MAX_EVENT_PAYLOAD_BYTES);
        // Four-byte characters are shorter than escapes.
        let wide: String = std::iter::repeat_n('𝄞', MODEL_NAME_MAX).collect();
        let notice = Notice::version(ModelEventKind::Saved, &wide, &version, Some(1));
        assert!(full(&notice.head(), 0).len() < payload.len());
    }

    #[test]
    fn a_payload_reads_back_as_the_event_it_describes() {
        let notice = Notice::alias(
            ModelEventKind::AliasSet,
            "m \"q\"",
            "champion",
            "2.0",
            Some(7),
        );
        let event = parse(&full(&notice.head(), 1_700_000_000_123_456)).unwrap();
        assert_eq!(event.kind, ModelEventKind::AliasSet);
        assert_eq!(event.model_name, "m \"q\"");
        assert_eq!(event.version.as_deref(), Some("2.0"));
        assert_eq!(event.alias.as_deref(), Some("champion"));
        assert_eq!(event.save_seq, Some(7));
        assert!(!event.resave);
        assert_eq!(
            event.committed_at,
            Some(SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456))
        );
        assert!(parse("hello").is_none());
        assert!(parse(r#"{"kind":"resync","model":""}"#).is_none());
    }

    #[test]
    fn channels_stay_under_postgres_name_limit() {
        assert_eq!(channel("ml"), "model_events.ml");
        let long = "s".repeat(63);
        let c = channel(&long);
        assert!(c.len() <= 63, "{c}");
        assert_ne!(c, channel(&"s".repeat(62)));
        assert_eq!(channel(&"a".repeat(50)).len(), 63);
    }
}
