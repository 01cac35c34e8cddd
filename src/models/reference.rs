//! How a caller names a version: literally, as `"latest"` (the newest active one) or as
//! `"@alias"`, and the active row such a reference names.

use postgres::{GenericClient, Row};

use crate::error::Result;
use crate::validate;

/// How a caller names a version: literally, as the newest active one, or through an alias.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum VersionRef {
    Literal(String),
    Latest,
    Alias(String),
}

impl VersionRef {
    /// Parses and validates `"latest"`, `"@alias"` or a literal version.
    pub(crate) fn parse(version: &str) -> Result<Self> {
        if version == "latest" {
            return Ok(VersionRef::Latest);
        }
        if let Some(alias) = version.strip_prefix('@') {
            validate::alias(alias)?;
            return Ok(VersionRef::Alias(alias.to_owned()));
        }
        validate::name("version", version, validate::VERSION_MAX)?;
        Ok(VersionRef::Literal(version.to_owned()))
    }

    /// The active row this reference names, with `columns` (table alias `m`) and an optional
    /// locking clause.
    pub(crate) fn select<C: GenericClient>(
        &self,
        client: &mut C,
        model_name: &str,
        columns: &str,
        locking: &str,
    ) -> Result<Option<Row>> {
        let (sql, key): (String, Option<&str>) = match self {
            VersionRef::Literal(v) => (
                format!(
                    "SELECT {columns} FROM ml_models m WHERE m.model_name = $1 \
                     AND m.version = $2 AND m.is_active {locking}"
                ),
                Some(v),
            ),
            VersionRef::Latest => (
                format!(
                    "SELECT {columns} FROM ml_models m WHERE m.model_name = $1 AND m.is_active \
                     ORDER BY m.save_seq DESC LIMIT 1 {locking}"
                ),
                None,
            ),
            VersionRef::Alias(a) => (
                format!(
                    "SELECT {columns} FROM ml_models m JOIN model_aliases a \
                     ON a.model_name = m.model_name AND a.version = m.version \
                     WHERE m.model_name = $1 AND a.model_name = $1 AND a.alias = $2 AND m.is_active \
                     {locking}"
                ),
                Some(a),
            ),
        };
        let row = match key {
            Some(k) => client.query_opt(sql.as_str(), &[&model_name, &k])?,
            None => client.query_opt(sql.as_str(), &[&model_name])?,
        };
        Ok(row)
    }
}
