//! Cache entries: CBOR values under string keys with a TTL judged by the database clock;
//! reads, writes, glob deletes, purges of expired rows and the cache's statistics.

use std::cell::RefCell;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cache::glob::{Glob, SqlFilter};
use crate::db::background::Chore;
use crate::db::call::Call;
use crate::db::commit;
use crate::db::layout::Layout;
use crate::db::pool::{PgConnection, Pool};
use crate::db::retry::Retry;
use crate::error::{ErrorDetail, RepoError, Result};
use crate::repository::ModelRepository;
use crate::validate;

/// The longest cache key, in characters (the column is `varchar(512)`).
pub(crate) const CACHE_KEY_MAX: usize = 512;

/// Rows one reaper (or purge) statement deletes at most: small enough that a batch holds its
/// locks briefly and a shutdown waits for at most one batch.
pub(crate) const PURGE_BATCH: i64 = 10_000;

/// Figures about the prediction cache.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CacheStats {
    /// Rows in the table, expired or not.
    pub total_entries: u64,
    /// Rows not yet expired (database clock).
    pub active_entries: u64,
    /// Rows expired but not yet reaped.
    pub expired_entries: u64,
    /// Lookups that found a live entry, through this repository and its clones since `open`.
    pub hits: u64,
    /// Lookups that found nothing live, through this repository and its clones since `open`.
    pub misses: u64,
    /// `hits / (hits + misses)`, 0 before the first lookup.
    pub hit_rate: f64,
    /// Sum of `access_count` over the table (after flushing this repository's buffered hits).
    pub total_access_count: u64,
    /// Sum of the stored (serialized) value sizes, in bytes.
    pub total_bytes: u64,
}

const UPSERT: &str = "INSERT INTO prediction_cache
         (cache_key, predictions, cached_at, expires_at, access_count, last_accessed)
     VALUES ($1, $2, now(), now() + $3::int8 * interval '1 microsecond', 0, now())
     ON CONFLICT (cache_key) DO UPDATE SET
         predictions = EXCLUDED.predictions, cached_at = EXCLUDED.cached_at,
         expires_at = EXCLUDED.expires_at, access_count = 0,
         last_accessed = EXCLUDED.last_accessed";

/// The hot path: one primary-key probe, no write.
const SELECT_LIVE: &str =
    "SELECT predictions FROM prediction_cache WHERE cache_key = $1 AND expires_at > now()";

const SELECT_TTL: &str = "SELECT (EXTRACT(EPOCH FROM expires_at - now()) * 1000000)::int8
     FROM prediction_cache WHERE cache_key = $1 AND expires_at > now()";

const SELECT_STATS: &str = "SELECT count(*)::int8,
         count(*) FILTER (WHERE expires_at > now())::int8,
         coalesce(sum(access_count), 0)::int8,
         coalesce(sum(octet_length(predictions)), 0)::int8
     FROM prediction_cache";

/// Adds buffered hits; `last_accessed` becomes the database's `now()` minus the time since the
/// last hit, so no client clock is involved. Entries expired since are left alone (the reaper
/// may hold them).
/// (The times are computed in a materialized CTE, on the coordinator of a Citus cluster: see
/// `FLUSH_LOADS`.)
pub(crate) const FLUSH_HITS: &str = "WITH u AS MATERIALIZED (
         SELECT cache_key, hits, now() - age_us * interval '1 microsecond' AS at
         FROM unnest($1::text[], $2::int8[], $3::int8[]) AS l(cache_key, hits, age_us))
     UPDATE prediction_cache AS c
     SET access_count = c.access_count + u.hits, last_accessed = GREATEST(c.last_accessed, u.at)
     FROM u WHERE c.cache_key = u.cache_key AND c.expires_at > now()";

/// One bounded batch of expired rows, locked with SKIP LOCKED so that concurrent reapers
/// split the work and rows a writer is renewing are left to it; `ctid = ANY(ARRAY(...))` is a
/// TID scan of exactly the locked rows. Live rows are never read or locked.
const DELETE_EXPIRED_BATCH: &str = "DELETE FROM prediction_cache WHERE ctid = ANY(ARRAY(
         SELECT ctid FROM prediction_cache WHERE expires_at <= now()
         LIMIT $1 FOR UPDATE SKIP LOCKED))";

/// The same on a row-based Citus cluster, which allows no `FOR UPDATE` across shards: the
/// coordinator gathers a batch of expired keys from every shard, then each shard deletes its
/// own, re-checking the expiry under the row lock, so an entry renewed in between is kept.
const DELETE_EXPIRED_KEYS: &str = "DELETE FROM prediction_cache
     WHERE cache_key IN (SELECT cache_key FROM prediction_cache WHERE expires_at <= now()
                         LIMIT $1)
       AND expires_at <= now()";

impl ModelRepository {
    /// Stores `predictions` (serialized as CBOR) under `cache_key` for `ttl`, replacing any
    /// entry under that key (value, TTL, and its access count).
    ///
    /// `ttl` must be greater than zero and at most `cache_max_ttl`; the key 1..=512 characters,
    /// not blank, without NUL; otherwise `InvalidInput`. The expiry is computed by the
    /// database clock.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use std::time::Duration;
    /// repo.cache_predictions("user:42:recs", &vec![0.9_f32, 0.4, 0.1], Duration::from_secs(600))?;
    /// # Ok(()) }
    /// ```
    pub fn cache_predictions<T: Serialize + ?Sized>(
        &self,
        cache_key: &str,
        predictions: &T,
        ttl: Duration,
    ) -> Result<()> {
        self.timed("cache_predictions", |call| {
            validate_key(cache_key)?;
            let ttl_us = self.ttl_micros(ttl)?;
            let bytes = encode(predictions)?;
            store(call, cache_key, &bytes, ttl_us)?;
            self.metrics().cache_set();
            Ok(())
        })
    }

    /// [`cache_predictions`](Self::cache_predictions) with the configured `cache_default_ttl`.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// repo.cache_predictions_default("user:42:recs", &["item7", "item3"])?;
    /// # Ok(()) }
    /// ```
    pub fn cache_predictions_default<T: Serialize + ?Sized>(
        &self,
        cache_key: &str,
        predictions: &T,
    ) -> Result<()> {
        self.cache_predictions(cache_key, predictions, self.config().cache.default_ttl)
    }

    /// The value cached under `cache_key`, or `None` if there is none or it has expired (by
    /// the database clock, whether or not the reaper has removed it yet).
    ///
    /// One primary-key read and no write: the hit is counted in memory and reaches
    /// `access_count` / `last_accessed` at the next flush (reaper tick or `close`). A stored
    /// value that is not exactly one CBOR item of type `T` (another type, bytes left over,
    /// another client's pickle) is `RepoError::Serialization`.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let recs: Option<Vec<f32>> = repo.get_cached_predictions("user:42:recs")?;
    /// # Ok(()) }
    /// ```
    pub fn get_cached_predictions<T: DeserializeOwned>(
        &self,
        cache_key: &str,
    ) -> Result<Option<T>> {
        self.timed("get_cached_predictions", |call| {
            validate_key(cache_key)?;
            self.lookup(call, cache_key)
        })
    }

    /// Deletes every entry whose key matches the Redis-style glob `pattern`, in one statement,
    /// and returns how many were removed (expired entries not yet reaped included).
    ///
    /// `*` matches any run of characters, `?` one character, `[abc]` / `[^abc]` / `[a-z]` one
    /// character in (not in) the class (a reversed range `[z-a]` means `[a-z]`), and `\`
    /// makes the next character literal; every other character, SQL's `%` and `_` included,
    /// matches itself. Inside a class, `]` must be escaped and `-` is literal first or last.
    /// A pattern that starts with literal characters is served by the key index. An empty
    /// pattern, an unclosed `[`, `[]`, `[^]` or a trailing `\` is `InvalidInput`.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let removed = repo.clear_cache("user:42:*")?;
    /// repo.clear_cache("*")?; // everything
    /// # Ok(()) }
    /// ```
    pub fn clear_cache(&self, pattern: &str) -> Result<u64> {
        self.timed("clear_cache", |call| {
            let filter = Glob::parse(pattern)?.to_sql_filter();
            // A tracked write: after a lost commit reply the count stays right.
            call.run_once(|tx| delete_matching(tx, &filter))
        })
    }

    /// The server's plan (`EXPLAIN`, without running it) for the DELETE that
    /// [`clear_cache`](Self::clear_cache) would run for `pattern`: shows whether a literal
    /// prefix is served by the key index. Malformed patterns are `InvalidInput`.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// println!("{}", repo.explain_clear_cache("user:42:*")?);
    /// # Ok(()) }
    /// ```
    pub fn explain_clear_cache(&self, pattern: &str) -> Result<String> {
        let filter = Glob::parse(pattern)?.to_sql_filter();
        self.pool()
            .with_conn("explain_clear_cache", Retry::Idempotent, |conn| {
                explain_matching(conn, &filter)
            })
    }

    /// Deletes every expired entry now (in bounded batches, like the reaper) and returns how
    /// many were removed.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let purged = repo.purge_expired_cache()?;
    /// # Ok(()) }
    /// ```
    pub fn purge_expired_cache(&self) -> Result<u64> {
        self.timed_bulk("purge_expired_cache", |call| {
            purge_expired(call.pool(), self.layout(), Retry::Idempotent, &|| false)
        })
    }

    /// Counts from the table (entries, live and expired, access counts, bytes) and the
    /// in-process hit and miss counters. This repository's buffered hits are flushed first,
    /// so `total_access_count` includes them.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// let s = repo.get_cache_statistics()?;
    /// println!("{} live entries, hit rate {:.1}%", s.active_entries, 100.0 * s.hit_rate);
    /// # Ok(()) }
    /// ```
    pub fn get_cache_statistics(&self) -> Result<CacheStats> {
        self.timed("get_cache_statistics", |call| {
            self.flush_counts()?;
            let row = call.with_conn(Retry::Idempotent, |conn| {
                Ok(conn.client().query_one(SELECT_STATS, &[])?)
            })?;
            let total = non_negative(row.try_get(0)?);
            let active = non_negative(row.try_get(1)?);
            let (hits, misses) = self.counts().lookups();
            let lookups = hits + misses;
            Ok(CacheStats {
                total_entries: total,
                active_entries: active,
                expired_entries: total.saturating_sub(active),
                hits,
                misses,
                hit_rate: if lookups == 0 {
                    0.0
                } else {
                    hits as f64 / lookups as f64
                },
                total_access_count: non_negative(row.try_get(2)?),
                total_bytes: non_negative(row.try_get(3)?),
            })
        })
    }

    /// The time `cache_key` has left to live (like Redis `TTL`, by the database clock), or
    /// `None` if there is no live entry. Not counted as a hit or a miss.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// if let Some(left) = repo.cache_ttl("user:42:recs")? {
    ///     println!("expires in {left:?}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn cache_ttl(&self, cache_key: &str) -> Result<Option<Duration>> {
        self.timed("cache_ttl", |call| {
            validate_key(cache_key)?;
            let micros: Option<i64> = call.with_conn(Retry::Idempotent, |conn| {
                let statement = conn.prepare_cached(SELECT_TTL)?;
                match conn.client().query_opt(&statement, &[&cache_key])? {
                    Some(row) => Ok(Some(row.try_get(0)?)),
                    None => Ok(None),
                }
            })?;
            Ok(micros.map(|us| Duration::from_micros(us.max(0) as u64)))
        })
    }

    /// The cached value under `cache_key`; on a miss, calls `f`, stores its value for `ttl`
    /// and returns it. An error from `f` is returned and nothing is stored. A cached value
    /// that no longer decodes as `T` (the type changed) counts as a miss and is replaced.
    /// Concurrent misses on one key may each call `f`; the last write wins.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use std::time::Duration;
    /// let scores: Vec<f32> = repo.get_or_compute("user:42:scores", Duration::from_secs(300), || {
    ///     Ok(vec![0.7, 0.2]) // the expensive model call
    /// })?;
    /// # Ok(()) }
    /// ```
    pub fn get_or_compute<T, F>(&self, cache_key: &str, ttl: Duration, f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<T>,
    {
        validate_key(cache_key)?;
        let ttl_us = self.ttl_micros(ttl)?;
        match self.get_cached_predictions::<T>(cache_key) {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(RepoError::Serialization(e)) => {
                log::debug!("pg-model-repo: cached value does not decode ({e}); recomputing");
            }
            Err(e) => return Err(e),
        }
        let value = f()?;
        let bytes = encode(&value)?;
        self.timed("cache_predictions", |call| {
            store(call, cache_key, &bytes, ttl_us)
        })?;
        self.metrics().cache_set();
        Ok(value)
    }

    /// The TTL in whole microseconds (rounded up, so a tiny TTL still lies in the future),
    /// checked against (0, cache_max_ttl].
    fn ttl_micros(&self, ttl: Duration) -> Result<i64> {
        let max = self.config().cache.max_ttl;
        if ttl.is_zero() || ttl > max {
            return Err(RepoError::invalid(format!(
                "cache ttl {ttl:?} must be greater than zero and at most cache_max_ttl ({max:?})"
            )));
        }
        let micros = ttl.as_nanos().div_ceil(1000);
        i64::try_from(micros)
            .map_err(|_| RepoError::invalid(format!("cache ttl {ttl:?} is too long")))
    }

    /// The live entry's value, decoded straight from the row (its bytes are not copied),
    /// counting the hit (even when the value does not decode) or the miss.
    fn lookup<T: DeserializeOwned>(&self, call: &Call<'_>, cache_key: &str) -> Result<Option<T>> {
        let mut found = None;
        let value = call.with_conn(Retry::Idempotent, |conn| {
            found = None;
            let statement = conn.prepare_cached(SELECT_LIVE)?;
            let row = conn.client().query_opt(&statement, &[&cache_key])?;
            found = Some(row.is_some());
            match row {
                Some(row) => Ok(Some(decode(cache_key, row.try_get(0)?)?)),
                None => Ok(None),
            }
        });
        if let Some(hit) = found {
            self.record_lookup(cache_key, hit);
        }
        value
    }
}

fn store(call: &Call<'_>, cache_key: &str, bytes: &[u8], ttl_us: i64) -> Result<()> {
    call.with_conn(Retry::Idempotent, |conn| {
        let statement = conn.prepare_cached(UPSERT)?;
        conn.client()
            .execute(&statement, &[&cache_key, &bytes, &ttl_us])?;
        Ok(())
    })
}

/// Keys: 1..=512 characters, no NUL, not blank.
fn validate_key(cache_key: &str) -> Result<()> {
    validate::name("cache_key", cache_key, CACHE_KEY_MAX)
}

fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    ciborium::ser::into_writer(value, &mut bytes)
        .map_err(|e| RepoError::serialization("cannot encode the value as CBOR", e))?;
    Ok(bytes)
}

/// ciborium's default scratch size: text and byte strings up to this long are decoded through
/// it, longer ones are read into their own allocation.
const DECODE_SCRATCH: usize = 4096;

/// The stored value must be exactly one CBOR item of type `T`: bytes left after it (another
/// client's pickle, whose first byte reads as an empty CBOR array; a value with junk appended)
/// are `Serialization`, never a silently shortened value.
fn decode<T: DeserializeOwned>(cache_key: &str, bytes: &[u8]) -> Result<T> {
    thread_local! {
        /// ciborium's scratch space for short strings, reused: `from_reader` zeroes a fresh
        /// 4 KiB on every call, which cost more than decoding a small value.
        static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; DECODE_SCRATCH]);
    }
    let mut rest = bytes;
    let decoded = SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => ciborium::de::from_reader_with_buffer(&mut rest, &mut scratch),
        // Only a Deserialize impl that decodes a cached value itself gets here.
        Err(_) => ciborium::de::from_reader(&mut rest),
    });
    let value = decoded.map_err(|e| {
        RepoError::serialization(
            format!(
                "the value cached under {cache_key:?} does not decode as the requested type: {e}"
            ),
            e,
        )
    })?;
    if !rest.is_empty() {
        return Err(RepoError::Serialization(ErrorDetail::new(format!(
            "the value cached under {cache_key:?} is not one CBOR item: {} of its {} bytes \
             follow the first item (written by another client?)",
            rest.len(),
            bytes.len()
        ))));
    }
    Ok(value)
}

fn non_negative(n: i64) -> u64 {
    n.max(0) as u64
}

/// The one DELETE a glob translates to, with its parameters (the pattern's parts are always
/// bound, never spliced into the SQL).
fn delete_statement(filter: &SqlFilter) -> (&'static str, Vec<&str>) {
    match filter {
        SqlFilter::Exact(key) => (
            "DELETE FROM prediction_cache WHERE cache_key = $1",
            vec![key],
        ),
        SqlFilter::Regex(re) => (
            "DELETE FROM prediction_cache WHERE cache_key ~ $1",
            vec![re],
        ),
        SqlFilter::Range {
            lower,
            upper,
            regex,
        } => match (upper, regex) {
            (Some(upper), Some(re)) => (
                "DELETE FROM prediction_cache
                 WHERE cache_key >= $1 AND cache_key < $2 AND cache_key ~ $3",
                vec![lower, upper, re],
            ),
            (Some(upper), None) => (
                "DELETE FROM prediction_cache WHERE cache_key >= $1 AND cache_key < $2",
                vec![lower, upper],
            ),
            (None, Some(re)) => (
                "DELETE FROM prediction_cache WHERE cache_key >= $1 AND cache_key ~ $2",
                vec![lower, re],
            ),
            (None, None) => (
                "DELETE FROM prediction_cache WHERE cache_key >= $1",
                vec![lower],
            ),
        },
    }
}

fn params<'a>(values: &'a [&'a str]) -> Vec<&'a (dyn postgres::types::ToSql + Sync)> {
    values
        .iter()
        .map(|v| v as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

/// Runs the one DELETE a glob translates to.
fn delete_matching(tx: &mut postgres::Transaction<'_>, filter: &SqlFilter) -> Result<u64> {
    let (sql, values) = delete_statement(filter);
    Ok(tx.execute(sql, &params(&values))?)
}

/// `EXPLAIN` of the DELETE a glob translates to (nothing is deleted).
fn explain_matching(conn: &mut PgConnection, filter: &SqlFilter) -> Result<String> {
    let (sql, values) = delete_statement(filter);
    let rows = conn
        .client()
        .query(&format!("EXPLAIN {sql}"), &params(&values))?;
    let lines = rows
        .iter()
        .map(|row| row.try_get::<_, String>(0))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(lines.join("\n"))
}

/// The background thread's chore: expired rows deleted at every tick.
#[derive(Debug)]
pub(crate) struct PurgeExpired {
    pub(crate) layout: Layout,
}

impl Chore for PurgeExpired {
    fn what(&self) -> &'static str {
        "delete expired cache rows"
    }

    fn work(&self, pool: &Pool, stopping: &dyn Fn() -> bool) -> Result<u64> {
        // No retry loop inside a tick: the next tick is the retry, and a stop request is not
        // kept waiting by backoff sleeps while the database is away.
        let deleted = purge_expired(pool, self.layout, Retry::Never, stopping)?;
        pool.metrics().cache_reaped(deleted);
        Ok(deleted)
    }
}

/// Deletes expired rows in batches of [`PURGE_BATCH`] until a batch comes back short (none
/// left, or the rest is locked by another reaper), or `stop()` says so between batches.
/// Each batch is retried per `retry` (deleting expired rows again is harmless).
fn purge_expired(
    pool: &Pool,
    layout: Layout,
    retry: Retry,
    stop: &dyn Fn() -> bool,
) -> Result<u64> {
    let delete = match layout {
        Layout::RowBased => DELETE_EXPIRED_KEYS,
        Layout::Local | Layout::SchemaBased => DELETE_EXPIRED_BATCH,
    };
    let mut total = 0;
    loop {
        // A tracked write: a batch whose commit reply was lost is counted once, or reported.
        let deleted = commit::run_once(pool, "purge_expired_cache", retry, |tx| {
            Ok(tx.execute(delete, &[&PURGE_BATCH])?)
        })?;
        total += deleted;
        if deleted < PURGE_BATCH as u64 || stop() {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pickle.dumps([0.5, 0.25], protocol=4)`: what the seed's Python cached.
    const PICKLED_LIST: &str =
        "80049517000000000000005d9428473fe0000000000000473fd0000000000000652e";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn a_value_with_bytes_after_its_cbor_item_is_a_serialization_error() {
        let mut bytes = encode(&7u32).unwrap();
        assert_eq!(decode::<u32>("k", &bytes).unwrap(), 7);
        bytes.extend_from_slice(b"junk");
        let err = decode::<u32>("k", &bytes).unwrap_err();
        assert!(matches!(err, RepoError::Serialization(_)), "{err:?}");
        assert!(err.to_string().contains("4 of its 5 bytes"), "{err}");
    }

    #[test]
    fn a_pickled_value_is_a_serialization_error_not_an_empty_list() {
        let pickled = unhex(PICKLED_LIST);
        // Pickle's first byte (0x80, PROTO) is also CBOR's empty array.
        let err = decode::<Vec<f32>>("k", &pickled).unwrap_err();
        assert!(matches!(err, RepoError::Serialization(_)), "{err:?}");
        let err = decode::<serde_json::Value>("k", &pickled).unwrap_err();
        assert!(matches!(err, RepoError::Serialization(_)), "{err:?}");
    }

    #[test]
    fn whole_items_decode_whatever_their_shape() {
        let value = serde_json::json!({"recommendations": [1, 2, 3], "scores": [0.9, 0.8]});
        let bytes = encode(&value).unwrap();
        assert_eq!(decode::<serde_json::Value>("k", &bytes).unwrap(), value);
        // An indefinite-length array (as other CBOR encoders write it) ends at its break byte.
        let indefinite = [0x9f, 0x01, 0x02, 0xff];
        assert_eq!(decode::<Vec<u8>>("k", &indefinite).unwrap(), vec![1, 2]);
        assert!(decode::<Vec<u8>>("k", &[]).is_err());
    }
}
