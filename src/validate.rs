//! Input rules shared by every area: identifiers, name lengths counted in characters (as
//! PostgreSQL's varchar counts them), blank and NUL checks, metadata objects.

use std::time::Duration;

use crate::error::{RepoError, Result};

/// The most serialized metadata a model may carry.
pub const MAX_METADATA_BYTES: usize = 1 << 20;

/// A SQL identifier we create and quote ourselves: `[A-Za-z_][A-Za-z0-9_]{0,62}`.
pub(crate) fn identifier(what: &str, name: &str) -> Result<()> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(RepoError::invalid(format!(
            "{what} {name:?} must match [A-Za-z_][A-Za-z0-9_]{{0,62}}"
        )))
    }
}

/// A schema name: an [`identifier`] that does not start with `pg_`, which PostgreSQL reserves
/// for system schemas (creating one fails with 42939).
pub(crate) fn schema_name(what: &str, name: &str) -> Result<()> {
    identifier(what, name)?;
    if name.starts_with("pg_") {
        return Err(RepoError::invalid(format!(
            "{what} {name:?} starts with \"pg_\", which PostgreSQL reserves for system schemas"
        )));
    }
    Ok(())
}

/// A name or key: 1..=max characters, no NUL, not whitespace only.
pub(crate) fn name(what: &str, value: &str, max_chars: usize) -> Result<()> {
    if value.contains('\0') {
        return Err(RepoError::invalid(format!(
            "{what} must not contain a NUL byte"
        )));
    }
    if value.trim().is_empty() {
        return Err(RepoError::invalid(format!(
            "{what} must not be empty or blank"
        )));
    }
    let chars = value.chars().count();
    if chars > max_chars {
        return Err(RepoError::invalid(format!(
            "{what} is {chars} characters long; the limit is {max_chars}"
        )));
    }
    Ok(())
}

/// Limits from API.md, "Conventions".
pub(crate) const MODEL_NAME_MAX: usize = 255;
pub(crate) const VERSION_MAX: usize = 50;
pub(crate) const ALIAS_MAX: usize = 64;
pub(crate) const METRIC_NAME_MAX: usize = 255;

pub(crate) fn model_name(value: &str) -> Result<()> {
    name("model_name", value, MODEL_NAME_MAX)
}

/// A literal version (no "latest", no "@alias"): what may be saved.
pub(crate) fn saved_version(value: &str) -> Result<()> {
    name("version", value, VERSION_MAX)?;
    if value == "latest" || value.starts_with('@') {
        return Err(RepoError::invalid(format!(
            "version {value:?} is reserved (\"latest\" and \"@alias\" name other versions)"
        )));
    }
    Ok(())
}

/// An alias: 1..=64 characters of `[A-Za-z0-9_-]`, not "latest".
pub(crate) fn alias(value: &str) -> Result<()> {
    let ok_chars = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if value.is_empty() || value.len() > ALIAS_MAX || !ok_chars {
        return Err(RepoError::invalid(format!(
            "alias {value:?} must be 1..={ALIAS_MAX} characters of [A-Za-z0-9_-]"
        )));
    }
    if value == "latest" {
        return Err(RepoError::invalid("alias \"latest\" is reserved"));
    }
    Ok(())
}

/// Model metadata: a JSON object, serialized at most 1 MiB, without `\u0000` anywhere (JSONB
/// rejects it). Returns the serialized size.
pub(crate) fn metadata(value: &serde_json::Value) -> Result<usize> {
    if !value.is_object() {
        return Err(RepoError::invalid("metadata must be a JSON object"));
    }
    let text = serde_json::to_string(value)
        .map_err(|e| RepoError::serialization(format!("metadata: {e}"), e))?;
    if text.len() > MAX_METADATA_BYTES {
        return Err(RepoError::invalid(format!(
            "metadata is {} bytes serialized; the limit is {MAX_METADATA_BYTES}",
            text.len()
        )));
    }
    if contains_nul(value) {
        return Err(RepoError::invalid(
            "metadata must not contain a NUL character (\\u0000)",
        ));
    }
    Ok(text.len())
}

fn contains_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(contains_nul),
        serde_json::Value::Object(map) => {
            map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v))
        }
        _ => false,
    }
}

/// A setting's count: `InvalidInput` naming the setting unless `min <= n <= max`.
pub(crate) fn count_within(name: &str, n: u32, min: u32, max: u32) -> Result<()> {
    if (min..=max).contains(&n) {
        return Ok(());
    }
    Err(RepoError::invalid(format!(
        "{name} is {n}; it must be within {min}..={max}"
    )))
}

/// A setting's duration: `InvalidInput` naming the setting unless `min <= d <= max`.
pub(crate) fn duration_within(name: &str, d: Duration, min: Duration, max: Duration) -> Result<()> {
    if (min..=max).contains(&d) {
        return Ok(());
    }
    Err(RepoError::invalid(format!(
        "{name} is {d:?}; it must be within {min:?}..={max:?}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn identifiers_follow_the_unquoted_sql_rule() {
        for ok in ["public", "_x", "A1_b", &"a".repeat(63)] {
            assert!(identifier("schema", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1a",
            "a-b",
            "a b",
            "x\"; drop schema public; --",
            &"a".repeat(64),
            "é",
        ] {
            assert!(identifier("schema", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn schemas_may_not_take_postgresqls_reserved_prefix() {
        assert!(schema_name("schema", "pg_x").is_err());
        assert!(schema_name("schema", "pg_catalog").is_err());
        assert!(schema_name("schema", "PG_x").is_ok());
        assert!(schema_name("schema", "mypg_x").is_ok());
    }

    #[test]
    fn names_count_characters_not_bytes() {
        let at_limit = "é".repeat(VERSION_MAX);
        assert!(name("version", &at_limit, VERSION_MAX).is_ok());
        assert!(name("version", &"é".repeat(VERSION_MAX + 1), VERSION_MAX).is_err());
        assert!(name("version", " \t", VERSION_MAX).is_err());
        assert!(name("version", "a\0b", VERSION_MAX).is_err());
    }

    #[test]
    fn metadata_must_be_a_nul_free_object() {
        assert!(metadata(&json!({"a": [1, {"b": "c"}]})).is_ok());
        assert!(metadata(&json!([1])).is_err());
        assert!(metadata(&json!({"a": "x\u{0}y"})).is_err());
        assert!(metadata(&json!({"k\u{0}": 1})).is_err());
        assert!(metadata(&json!({"big": "x".repeat(MAX_METADATA_BYTES)})).is_err());
    }
}
