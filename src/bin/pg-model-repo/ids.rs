//! Ids: text files of one entity_id per line (in the order of the vectors' rows), and the
//! checks made before a load writes anything: one id per row, none blank or too long, none
//! twice. Duplicates are found in bounded memory: 16 bytes per id (a hash and the row), and
//! only the rows whose hashes collide are read again to compare the ids themselves.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::error::CliError;

/// The longest entity_id, in characters (API.md, "Conventions").
const ENTITY_ID_MAX: usize = 255;

/// Why `id` cannot be an entity_id, if it cannot.
pub fn id_problem(id: &str) -> Option<String> {
    if id.trim().is_empty() {
        return Some("the id is blank".to_owned());
    }
    if id.contains('\0') {
        return Some("the id contains a NUL byte".to_owned());
    }
    let chars = id.chars().count();
    if chars > ENTITY_ID_MAX {
        return Some(format!(
            "the id has {chars} characters; at most {ENTITY_ID_MAX} are allowed"
        ));
    }
    None
}

/// Remembers a hash of every id; then names the rows that may be duplicates.
#[derive(Default)]
pub struct DuplicateFinder {
    hashes: Vec<(u64, u64)>,
}

impl DuplicateFinder {
    pub fn add(&mut self, row: u64, id: &str) {
        // SipHash with fixed keys: the same id always hashes alike within this process.
        let mut hasher = DefaultHasher::new();
        id.hash(&mut hasher);
        self.hashes.push((hasher.finish(), row));
    }

    /// The rows whose id hashes like another's, in row order (usually none).
    pub fn suspects(mut self) -> Vec<u64> {
        self.hashes.sort_unstable();
        let mut rows = Vec::new();
        for pair in self.hashes.windows(2) {
            if pair[0].0 == pair[1].0 {
                rows.push(pair[0].1);
                rows.push(pair[1].1);
            }
        }
        rows.sort_unstable();
        rows.dedup();
        rows
    }
}

/// The first repeated id among `(row, id)` pairs given in row order: (first row, row, id).
pub fn first_repeat(pairs: impl IntoIterator<Item = (u64, String)>) -> Option<(u64, u64, String)> {
    let mut seen: HashMap<String, u64> = HashMap::new();
    for (row, id) in pairs {
        if let Some(first) = seen.get(&id) {
            return Some((*first, row, id));
        }
        seen.insert(id, row);
    }
    None
}

/// The lines of an ids file, one id each (a trailing `\r` is dropped, so CRLF files work).
pub struct IdLines {
    path: PathBuf,
    reader: BufReader<File>,
    buf: Vec<u8>,
    line: u64,
}

impl IdLines {
    pub fn open(path: &Path) -> Result<Self, CliError> {
        let file =
            File::open(path).map_err(|e| CliError::failed(format!("{}: {e}", path.display())))?;
        Ok(IdLines {
            path: path.to_owned(),
            reader: BufReader::with_capacity(1 << 16, file),
            buf: Vec::new(),
            line: 0,
        })
    }

    /// The next id; `None` at the end of the file.
    pub fn next_id(&mut self) -> io::Result<Option<String>> {
        self.buf.clear();
        if self.reader.read_until(b'\n', &mut self.buf)? == 0 {
            return Ok(None);
        }
        self.line += 1;
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
        }
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        match std::str::from_utf8(&self.buf) {
            Ok(id) => Ok(Some(id.to_owned())),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("line {} is not UTF-8", self.line),
            )),
        }
    }

    fn error(&self, e: io::Error) -> CliError {
        CliError::failed(format!("{}: {e}", self.path.display()))
    }
}

/// Checks an ids file against `rows` vectors (from `vectors`, a file name for messages)
/// before any write: one valid id per row, no id twice.
pub fn check(path: &Path, rows: u64, vectors: &str) -> Result<(), CliError> {
    let shown = path.display();
    let mut lines = IdLines::open(path)?;
    let mut finder = DuplicateFinder::default();
    let mut count = 0u64;
    while let Some(id) = lines.next_id().map_err(|e| lines.error(e))? {
        if let Some(problem) = id_problem(&id) {
            return Err(CliError::failed(format!(
                "{shown} line {}: {problem}",
                count + 1
            )));
        }
        finder.add(count, &id);
        count += 1;
    }
    if count != rows {
        return Err(CliError::failed(format!(
            "{shown} has {count} ids and {vectors} has {rows} rows: one id per row is needed"
        )));
    }
    let suspects = finder.suspects();
    if suspects.is_empty() {
        return Ok(());
    }
    let mut lines = IdLines::open(path)?;
    let mut pairs = Vec::with_capacity(suspects.len());
    let mut next = suspects.iter().peekable();
    let mut row = 0u64;
    while let Some(id) = lines.next_id().map_err(|e| lines.error(e))? {
        if next.peek() == Some(&&row) {
            pairs.push((row, id));
            next.next();
        }
        row += 1;
    }
    if let Some((first, again, id)) = first_repeat(pairs) {
        return Err(CliError::failed(format!(
            "{shown}: duplicate id {id:?} on line {} and line {}",
            first + 1,
            again + 1
        )));
    }
    Ok(())
}

/// The id on `row` (0-based) of an ids file, for messages.
pub fn id_at(path: &Path, row: u64) -> Option<String> {
    let mut lines = IdLines::open(path).ok()?;
    for _ in 0..row {
        lines.next_id().ok()??;
    }
    lines.next_id().ok()?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_found_through_their_hashes() {
        let ids = ["a", "b", "c", "b", "a"];
        let mut finder = DuplicateFinder::default();
        for (row, id) in ids.iter().enumerate() {
            finder.add(row as u64, id);
        }
        let suspects = finder.suspects();
        assert_eq!(suspects, vec![0, 1, 3, 4]);
        let pairs = suspects.iter().map(|&r| (r, ids[r as usize].to_owned()));
        assert_eq!(first_repeat(pairs), Some((1, 3, "b".to_owned())));
    }

    #[test]
    fn bad_ids_are_named() {
        assert!(id_problem("  ").is_some());
        assert!(id_problem("a\0b").is_some());
        assert!(id_problem(&"x".repeat(256)).is_some());
        assert!(id_problem(&"é".repeat(255)).is_none());
    }
}
