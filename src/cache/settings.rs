//! The cache's settings: the default TTL and the longest one allowed.

use std::time::Duration;

use crate::error::{RepoError, Result};
use crate::validate::duration_within;

/// The longest cache TTL (cache_max_ttl and cache_default_ttl): 100 years.
pub(crate) const MAX_CACHE_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// The cache's settings (see the setters of `RepositoryConfig`).
#[derive(Clone, Debug)]
pub(crate) struct CacheSettings {
    pub(crate) default_ttl: Duration,
    pub(crate) max_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(86_400),
        }
    }
}

impl CacheSettings {
    pub(crate) fn validate(&self) -> Result<()> {
        let us = Duration::from_micros(1);
        duration_within("cache_max_ttl", self.max_ttl, us, MAX_CACHE_TTL)?;
        duration_within("cache_default_ttl", self.default_ttl, us, self.max_ttl).map_err(|_| {
            RepoError::invalid(format!(
                "cache_default_ttl is {:?}; it must be within 1µs..=cache_max_ttl ({:?})",
                self.default_ttl, self.max_ttl
            ))
        })
    }
}
