//! From the global options to a repository: the URL (`--url` or `DATABASE_URL`), the schema,
//! the library's other variables, and the password kept out of everything the tool prints.

use std::sync::OnceLock;

use pg_model_repo::{ModelRepository, RepoError, RepositoryConfig};

use crate::error::CliError;
use crate::Global;

/// The connections a command's pool keeps open unless `DB_POOL_SIZE` says otherwise: a
/// command is one short-lived process, and tests run many at once.
const POOL_SIZE: u32 = 2;
/// Extra connections for parallel COPY and chunked models, unless `DB_MAX_OVERFLOW` says.
const MAX_OVERFLOW: u32 = 6;
/// How long a command waits for a connection unless `DB_POOL_TIMEOUT` says: an operator
/// (or `health` in a probe) should hear of an unreachable server in seconds.
const POOL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The configuration the global options describe: the library's own environment variables
/// (`DB_POOL_SIZE`, `QUERY_TIMEOUT`, `MODEL_REPO_SCHEMA`, …), `--url` and `--schema` over them,
/// no reaper thread, and no DDL (only `migrate` changes the schema).
pub fn config(global: &Global) -> Result<RepositoryConfig, CliError> {
    let url = global
        .url
        .as_deref()
        .filter(|u| !u.trim().is_empty())
        .ok_or_else(|| CliError::usage("no database: pass --url or set DATABASE_URL"))?
        .to_owned();
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let mut config = RepositoryConfig::from_lookup(|name| {
        if name == "DATABASE_URL" {
            Some(url.clone())
        } else {
            env(name)
        }
    })
    .map_err(|e| CliError::usage(e.to_string()))?;
    if env("DB_POOL_SIZE").is_none() {
        config = config.pool_size(POOL_SIZE);
    }
    if env("DB_MAX_OVERFLOW").is_none() {
        config = config.max_overflow(MAX_OVERFLOW);
    }
    if env("DB_POOL_TIMEOUT").is_none() {
        config = config.pool_timeout(POOL_TIMEOUT);
    }
    if let Some(schema) = &global.schema {
        config = config.schema(schema);
    }
    Ok(config.reaper_interval(None).auto_migrate(false))
}

/// Opens the repository of the global options; a schema that is not migrated says to run
/// `pg-model-repo migrate`.
pub fn open(global: &Global) -> Result<ModelRepository, CliError> {
    open_adjusted(global, |c| c)
}

/// [`open`] with a setting changed.
pub fn open_adjusted(
    global: &Global,
    adjust: impl FnOnce(RepositoryConfig) -> RepositoryConfig,
) -> Result<ModelRepository, CliError> {
    let config = adjust(config(global)?);
    let schema = config.schema_name().to_owned();
    ModelRepository::open(config).map_err(|e| match e {
        RepoError::NotFound(_) => CliError::failed(format!(
            "{e} (with this tool: pg-model-repo migrate --schema {schema})"
        )),
        RepoError::InvalidInput(_) => CliError::usage(e.to_string()),
        e => CliError::repo("cannot open the repository", e),
    })
}

static SECRETS: OnceLock<Vec<String>> = OnceLock::new();

/// Remembers the password(s) in `url`, so that [`scrub`] can take them out of any message.
pub fn remember_secrets(url: Option<&str>) {
    let mut secrets = url.map(passwords).unwrap_or_default();
    if let Ok(p) = std::env::var("PGPASSWORD") {
        secrets.push(p);
    }
    secrets.retain(|s| !s.is_empty());
    // Longest first, so that a password containing another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let _ = SECRETS.set(secrets);
}

/// `message` with every remembered password replaced by `********`.
pub fn scrub(message: &str) -> String {
    let mut out = message.to_owned();
    for secret in SECRETS.get().map(Vec::as_slice).unwrap_or_default() {
        out = out.replace(secret.as_str(), "********");
    }
    out
}

/// The passwords a connection string carries: the URL's user info (raw and percent-decoded),
/// a `password=` query parameter, or a `password=` key/value pair.
fn passwords(url: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Some((_, rest)) = url.split_once("://") {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            if let Some((_, password)) = userinfo.split_once(':') {
                found.push(password.to_owned());
                found.push(percent_decode(password));
            }
        }
        if let Some((_, query)) = rest.split_once('?') {
            for pair in query.split('&') {
                if let Some(value) = pair.strip_prefix("password=") {
                    found.push(value.to_owned());
                    found.push(percent_decode(value));
                }
            }
        }
    } else {
        let mut rest = url;
        while let Some(at) = rest.find("password") {
            let after = rest[at + "password".len()..].trim_start();
            rest = &rest[at + "password".len()..];
            let Some(value) = after.strip_prefix('=') else {
                continue;
            };
            let value = value.trim_start();
            let password = if let Some(quoted) = value.strip_prefix('\'') {
                quoted.split('\'').next().unwrap_or("").replace("\\", "")
            } else {
                value.split_whitespace().next().unwrap_or("").to_owned()
            };
            found.push(password);
        }
    }
    found
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_found_in_urls_and_key_value_strings() {
        assert!(passwords("postgres://u:s3cr%40t@h:5432/db").contains(&"s3cr@t".to_owned()));
        assert!(passwords("postgres://u:s3cr%40t@h/db").contains(&"s3cr%40t".to_owned()));
        assert!(passwords("postgres://u@h/db?password=pw1&x=y").contains(&"pw1".to_owned()));
        assert_eq!(
            passwords("host=h password='a b' user=u"),
            vec!["a b".to_owned()]
        );
        assert_eq!(
            passwords("host=h password = pw2 user=u"),
            vec!["pw2".to_owned()]
        );
        assert!(passwords("postgres://u@h/db").is_empty());
    }
}
