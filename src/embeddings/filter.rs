//! Search filters: which entities of a type a filtered search may return (a candidate set, an
//! exclusion set, an entity_id prefix), their input rules, and the test each row passes.

use std::collections::HashSet;

use crate::error::{RepoError, Result};

/// The most ids a [`SearchFilter`]'s `among` (and `exclude`) may hold.
pub const MAX_FILTER_IDS: usize = 100_000;

/// Which entities a filtered search may return: those in `among` (when given), not in
/// `exclude`, whose entity_id starts with `id_prefix` (when given). The default lets every
/// entity through.
///
/// ```
/// let filter = pg_model_repo::SearchFilter {
///     among: Some(vec!["i1".into(), "i2".into(), "i3".into()]),
///     exclude: vec!["i2".into()],
///     id_prefix: None,
/// };
/// assert_eq!(filter.exclude.len(), 1);
/// ```
#[derive(Clone, Debug, Default)]
pub struct SearchFilter {
    /// Search only these entity_ids (at most 100,000; an empty set finds nothing).
    pub among: Option<Vec<String>>,
    /// Never return these entity_ids (at most 100,000).
    pub exclude: Vec<String>,
    /// Only entity_ids starting with this.
    pub id_prefix: Option<String>,
}

/// A checked filter, with its sets ready for row tests.
#[derive(Debug)]
pub(crate) struct RowFilter<'a> {
    pub among: Option<Vec<&'a str>>,
    pub exclude: HashSet<&'a str>,
    pub prefix: Option<&'a str>,
}

impl<'a> RowFilter<'a> {
    /// Checks `filter`: `among` and `exclude` within [`MAX_FILTER_IDS`], no NUL anywhere.
    pub(crate) fn new(filter: &'a SearchFilter) -> Result<Self> {
        if let Some(among) = &filter.among {
            check_ids("among", among)?;
        }
        check_ids("exclude", &filter.exclude)?;
        if filter
            .id_prefix
            .as_deref()
            .is_some_and(|p| p.contains('\0'))
        {
            return Err(RepoError::invalid("id_prefix must not contain NUL"));
        }
        let mut among: Option<Vec<&str>> = filter
            .among
            .as_ref()
            .map(|ids| ids.iter().map(String::as_str).collect());
        if let Some(ids) = &mut among {
            ids.sort_unstable();
            ids.dedup();
        }
        Ok(RowFilter {
            among,
            exclude: filter.exclude.iter().map(String::as_str).collect(),
            prefix: filter.id_prefix.as_deref().filter(|p| !p.is_empty()),
        })
    }

    /// True when no row can pass (an empty candidate set).
    pub(crate) fn is_empty(&self) -> bool {
        self.among.as_ref().is_some_and(Vec::is_empty)
    }

    /// Whether a row of this id may be returned.
    pub(crate) fn passes(&self, entity_id: &str) -> bool {
        self.among
            .as_ref()
            .is_none_or(|ids| ids.binary_search(&entity_id).is_ok())
            && !self.exclude.contains(entity_id)
            && self.prefix.is_none_or(|p| entity_id.starts_with(p))
    }

    /// The candidates that may pass (those not excluded, with the prefix), when a candidate
    /// set is given.
    pub(crate) fn candidates(&self) -> Option<Vec<&'a str>> {
        self.among
            .as_ref()
            .map(|ids| ids.iter().copied().filter(|id| self.passes(id)).collect())
    }
}

fn check_ids(what: &str, ids: &[String]) -> Result<()> {
    if ids.len() > MAX_FILTER_IDS {
        return Err(RepoError::invalid(format!(
            "{what} holds {} ids; at most {MAX_FILTER_IDS}",
            ids.len()
        )));
    }
    if let Some(i) = ids.iter().position(|id| id.contains('\0')) {
        return Err(RepoError::invalid(format!("{what} id {i} contains NUL")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_pass_every_part_of_the_filter() {
        let filter = SearchFilter {
            among: Some(vec!["a1".into(), "a2".into(), "b1".into()]),
            exclude: vec!["a2".into()],
            id_prefix: Some("a".into()),
        };
        let rows = RowFilter::new(&filter).unwrap();
        assert!(rows.passes("a1"));
        assert!(!rows.passes("a2"));
        assert!(!rows.passes("b1"));
        assert!(!rows.passes("a3"));
        assert_eq!(rows.candidates().unwrap(), ["a1"]);
    }
}
