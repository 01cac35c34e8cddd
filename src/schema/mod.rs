//! The repository's schema: the migrations and the SQL they embed (`migrate`), taking over the
//! seed's Python tables (`seed_takeover`), distribution on Citus (`citus`), the one list of the
//! repository's tables (`tables`), and the sweep of leftovers of work that died midway
//! (`sweep`). Uses the plumbing in `db`; knows no feature.

pub(crate) mod citus;
pub(crate) mod migrate;
pub(crate) mod seed_takeover;
pub(crate) mod settings;
pub(crate) mod sweep;
pub(crate) mod tables;
