//! Connection plumbing every feature stands on: the connection settings, the pool (with
//! checkout, retry and failure handling) and its thread-affine slots, the hung-server watchdog
//! (`deadline`), host names resolved within a bound, TLS, commits whose reply may be lost, retries, the per-call wrapper (`call`)
//! and the binary COPY wire format. Nothing here knows the repository handle or any feature.

pub(crate) mod affinity;
pub(crate) mod background;
pub(crate) mod binary_copy;
pub(crate) mod call;
pub(crate) mod commit;
pub(crate) mod config;
pub(crate) mod deadline;
pub(crate) mod layout;
pub(crate) mod occupancy;
pub(crate) mod pool;
pub(crate) mod resolve;
pub(crate) mod retry;
pub(crate) mod shard;
pub(crate) mod static_key;
pub(crate) mod tls;

use sha2::{Digest, Sha256};

/// `text` as an SQL string literal, for the few statements that take no parameters (COPY):
/// always the `E'...'` form with quotes and backslashes doubled, so its meaning does not
/// depend on `standard_conforming_strings`. `text` must hold no NUL (checked names never do).
pub(crate) fn quote_literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// Lowercase hex SHA-256.
pub(crate) fn hex_sha256(bytes: &[u8]) -> String {
    to_hex(&Sha256::digest(bytes))
}

/// Lowercase hex of any bytes.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
