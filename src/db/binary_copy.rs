//! PostgreSQL's binary COPY format, in one place: the header and trailer, row and field
//! framing for `COPY … FROM STDIN (FORMAT binary)`, and a parser for `COPY … TO STDOUT`.
//! It knows bytes and readers only, never clients or tables.

use std::io::Read;

use crate::error::{RepoError, Result};

/// The signature, the flags field and the header extension length.
pub(crate) const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The file trailer: a field count of -1.
pub(crate) const TRAILER: [u8; 2] = (-1i16).to_be_bytes();

/// The 11-byte signature every binary COPY stream starts with.
const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Starts a row of `fields` fields.
pub(crate) fn row(out: &mut Vec<u8>, fields: i16) {
    out.extend_from_slice(&fields.to_be_bytes());
}

/// A field's length word alone, for a value whose bytes are written after it (streamed).
pub(crate) fn field_len(out: &mut Vec<u8>, len: i32) {
    out.extend_from_slice(&len.to_be_bytes());
}

/// A field holding `bytes` (text, bytea, jsonb with its version byte, …).
pub(crate) fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    field_len(out, bytes.len() as i32);
    out.extend_from_slice(bytes);
}

/// An `int4` field.
pub(crate) fn int4(out: &mut Vec<u8>, value: i32) {
    field_len(out, 4);
    out.extend_from_slice(&value.to_be_bytes());
}

/// An `int8` field.
pub(crate) fn int8(out: &mut Vec<u8>, value: i64) {
    field_len(out, 8);
    out.extend_from_slice(&value.to_be_bytes());
}

/// A `bytea` field holding the vector as little-endian f32 values (the encoder writes these
/// itself, checking each value as it goes; kept as the reference its tests compare with) (how vectors are stored),
/// without building an intermediate byte vector.
#[cfg(test)]
pub(crate) fn f32_le(out: &mut Vec<u8>, values: &[f32]) {
    field_len(out, (4 * values.len()) as i32);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// A pgvector `vector` field in its binary format: an int16 dimension, an unused int16 (0),
/// then the values as big-endian float4. The caller keeps the dimension within the type's
/// limit (16,000).
#[cfg(test)]
pub(crate) fn pgvector(out: &mut Vec<u8>, values: &[f32]) {
    field_len(out, (4 + 4 * values.len()) as i32);
    out.extend_from_slice(&(values.len() as i16).to_be_bytes());
    out.extend_from_slice(&0i16.to_be_bytes());
    for v in values {
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// An I/O error from a COPY writer or reader, with the database error inside it (if any)
/// brought back out, so its SQLSTATE still decides the variant and the retry.
pub(crate) fn io_error(e: std::io::Error) -> RepoError {
    if e.get_ref()
        .is_some_and(|inner| inner.is::<postgres::Error>())
    {
        if let Some(inner) = e.into_inner() {
            if let Ok(pg) = inner.downcast::<postgres::Error>() {
                return RepoError::from(*pg);
            }
        }
        return RepoError::Io(std::io::Error::other("COPY failed"));
    }
    RepoError::Io(e)
}

/// Reads the rows of a binary `COPY … TO STDOUT` stream of a known field count, reusing one
/// buffer per field.
pub(crate) struct RowReader<'a> {
    reader: &'a mut dyn Read,
    fields: Vec<Vec<u8>>,
}

impl<'a> RowReader<'a> {
    /// Checks the header of `reader` and skips its extension area.
    pub(crate) fn new(reader: &'a mut dyn Read, fields: usize) -> Result<Self> {
        let mut header = [0u8; 19];
        read_exact(reader, &mut header)?;
        if &header[..11] != SIGNATURE {
            return Err(RepoError::corrupt("not a binary COPY stream"));
        }
        let extension = u32::from_be_bytes([header[15], header[16], header[17], header[18]]);
        std::io::copy(&mut reader.take(u64::from(extension)), &mut std::io::sink())
            .map_err(io_error)?;
        Ok(RowReader {
            reader,
            fields: vec![Vec::new(); fields],
        })
    }

    /// The next row's fields, or `None` at the trailer. A NULL field is `Corrupt` (the
    /// columns we read are NOT NULL).
    pub(crate) fn next_row(&mut self) -> Result<Option<&[Vec<u8>]>> {
        let mut count = [0u8; 2];
        read_exact(self.reader, &mut count)?;
        match i16::from_be_bytes(count) {
            -1 => return Ok(None),
            n if n as usize == self.fields.len() => {}
            n => return Err(RepoError::corrupt(format!("COPY row with {n} fields"))),
        }
        for buf in &mut self.fields {
            read_field(self.reader, buf)?;
        }
        Ok(Some(&self.fields))
    }
}

fn read_field(reader: &mut dyn Read, buf: &mut Vec<u8>) -> Result<()> {
    let mut len = [0u8; 4];
    read_exact(reader, &mut len)?;
    let len = i32::from_be_bytes(len);
    let len = usize::try_from(len).map_err(|_| RepoError::corrupt("NULL in a NOT NULL column"))?;
    buf.resize(len, 0);
    read_exact(reader, buf)
}

fn read_exact(reader: &mut dyn Read, buf: &mut [u8]) -> Result<()> {
    reader.read_exact(buf).map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framed_rows_parse_back() {
        let mut out = HEADER.to_vec();
        for (id, v) in [("a", 1i32), ("bb", -2)] {
            row(&mut out, 2);
            field(&mut out, id.as_bytes());
            int4(&mut out, v);
        }
        out.extend_from_slice(&TRAILER);
        let mut input = &out[..];
        let mut reader = RowReader::new(&mut input, 2).unwrap();
        let mut seen = Vec::new();
        while let Some(fields) = reader.next_row().unwrap() {
            let n = i32::from_be_bytes(fields[1][..4].try_into().unwrap());
            seen.push((String::from_utf8(fields[0].clone()).unwrap(), n));
        }
        assert_eq!(seen, [("a".to_owned(), 1), ("bb".to_owned(), -2)]);
    }

    #[test]
    fn a_wrong_signature_is_corrupt() {
        let mut input = &b"NOTCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0\xff\xff"[..];
        assert!(matches!(
            RowReader::new(&mut input, 2),
            Err(RepoError::Corrupt(_))
        ));
    }
}
