//! `.npy` files: the header checked (by npyz: versions 1 to 3, the Python-literal dict)
//! before anything is written, rows decoded as they are read (little- and big-endian f4/f8,
//! f8 narrowed to f32), and a writer whose shape is patched once the row count is known.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use npyz::{DType, Endianness, NpyHeader, Order, TypeChar};

use crate::error::CliError;

/// How the values of a row are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F4Le,
    F4Be,
    F8Le,
    F8Be,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F4Le | Dtype::F4Be => 4,
            Dtype::F8Le | Dtype::F8Be => 8,
        }
    }

    pub fn is_f8(self) -> bool {
        self.size() == 8
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F4Le => "<f4",
            Dtype::F4Be => ">f4",
            Dtype::F8Le => "<f8",
            Dtype::F8Be => ">f8",
        }
    }
}

/// What a checked `.npy` file holds: `rows` x `dimension` values of `dtype` from
/// `data_offset` on.
#[derive(Clone, Debug)]
pub struct NpyLayout {
    pub path: PathBuf,
    pub rows: u64,
    pub dimension: usize,
    pub dtype: Dtype,
    pub data_offset: u64,
}

/// Counts the bytes the header parser consumed (the data starts right after).
struct Counted<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// Opens `path` with an error that names it.
pub fn open(path: &Path) -> Result<File, CliError> {
    File::open(path).map_err(|e| CliError::failed(format!("{}: {e}", path.display())))
}

/// Checks a `.npy` file of vectors before anything is written: a float32 or float64 array
/// in C order, 2-D (or 1-D when `one_d_ok`, as one row), whose data is all there (a
/// truncated file, or bytes after the data, is refused).
pub fn inspect(path: &Path, one_d_ok: bool) -> Result<NpyLayout, CliError> {
    let shown = path.display();
    let file = open(path)?;
    let file_len = file
        .metadata()
        .map_err(|e| CliError::failed(format!("{shown}: {e}")))?
        .len();
    let mut counted = Counted {
        inner: file,
        read: 0,
    };
    let header = NpyHeader::from_reader(&mut counted)
        .map_err(|e| CliError::failed(format!("{shown}: not a readable .npy file: {e}")))?;
    let data_offset = counted.read;
    let dtype =
        float_dtype(&header.dtype()).map_err(|why| CliError::failed(format!("{shown}: {why}")))?;
    if header.order() == Order::Fortran {
        return Err(CliError::failed(format!(
            "{shown}: the array is in Fortran order; write it in C order \
             (numpy.ascontiguousarray)"
        )));
    }
    let shape = header.shape();
    let (rows, dimension) = match *shape {
        [rows, dimension] => (rows, dimension),
        [dimension] if one_d_ok => (1, dimension),
        _ => {
            let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
            return Err(CliError::failed(format!(
                "{shown}: a {}-D array of shape ({}); embeddings need a 2-D array \
                 (rows, dimension)",
                shape.len(),
                dims.join(", ")
            )));
        }
    };
    if dimension == 0 {
        return Err(CliError::failed(format!(
            "{shown}: the vectors have dimension 0"
        )));
    }
    let expected = rows
        .checked_mul(dimension)
        .and_then(|n| n.checked_mul(dtype.size() as u64))
        .and_then(|n| n.checked_add(data_offset))
        .ok_or_else(|| CliError::failed(format!("{shown}: the shape is too large")))?;
    let row_bytes = dimension * dtype.size() as u64;
    if file_len < expected {
        let complete = (file_len - data_offset.min(file_len)) / row_bytes;
        return Err(CliError::failed(format!(
            "{shown}: the file is truncated: its header says {rows} x {dimension} {} ({expected} \
             bytes with the header), it holds {file_len}; row {complete} and later are \
             incomplete or missing",
            dtype.as_str()
        )));
    }
    if file_len > expected {
        return Err(CliError::failed(format!(
            "{shown}: {} bytes follow the {rows} x {dimension} array its header describes",
            file_len - expected
        )));
    }
    Ok(NpyLayout {
        path: path.to_owned(),
        rows,
        dimension: usize::try_from(dimension).map_err(|_| {
            CliError::failed(format!("{shown}: dimension {dimension} is too large"))
        })?,
        dtype,
        data_offset,
    })
}

fn float_dtype(dtype: &DType) -> Result<Dtype, String> {
    let DType::Plain(ts) = dtype else {
        return Err(format!(
            "dtype {} is a structured or nested type; use float32 (f4) or float64 (f8)",
            dtype.descr()
        ));
    };
    let big = ts.endianness() == Endianness::Big;
    match (ts.type_char(), ts.size_field(), big) {
        (TypeChar::Float, 4, false) => Ok(Dtype::F4Le),
        (TypeChar::Float, 4, true) => Ok(Dtype::F4Be),
        (TypeChar::Float, 8, false) => Ok(Dtype::F8Le),
        (TypeChar::Float, 8, true) => Ok(Dtype::F8Be),
        (TypeChar::Int | TypeChar::Uint, ..) => Err(format!(
            "dtype {ts} holds integers; embeddings need float32 (f4) or float64 (f8)"
        )),
        _ => Err(format!(
            "dtype {ts} is not supported; embeddings need float32 (f4) or float64 (f8)"
        )),
    }
}

/// The rows of a checked file, read in order through a buffer.
pub struct NpyRows {
    reader: BufReader<File>,
    layout: NpyLayout,
    raw: Vec<u8>,
    next: u64,
}

impl NpyRows {
    pub fn new(layout: &NpyLayout) -> Result<Self, CliError> {
        let mut file = open(&layout.path)?;
        file.seek(SeekFrom::Start(layout.data_offset))
            .map_err(|e| CliError::failed(format!("{}: {e}", layout.path.display())))?;
        Ok(NpyRows {
            reader: BufReader::with_capacity(1 << 20, file),
            raw: vec![0; layout.dimension * layout.dtype.size()],
            layout: layout.clone(),
            next: 0,
        })
    }

    /// The next row as f32 values (f8 narrowed: values beyond f32's range become infinite,
    /// which the library's finite check refuses); `None` after the last row.
    pub fn next_row(&mut self) -> io::Result<Option<Vec<f32>>> {
        if self.next == self.layout.rows {
            return Ok(None);
        }
        self.reader.read_exact(&mut self.raw)?;
        self.next += 1;
        let raw = &self.raw;
        let row = match self.layout.dtype {
            Dtype::F4Le => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F4Be => raw
                .chunks_exact(4)
                .map(|b| f32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F8Le => raw
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                .collect(),
            Dtype::F8Be => raw
                .chunks_exact(8)
                .map(|b| f64::from_be_bytes(b.try_into().expect("8 bytes")) as f32)
                .collect(),
        };
        Ok(Some(row))
    }
}

/// Every row of a small checked file (a query vector).
pub fn read_all(layout: &NpyLayout) -> Result<Vec<Vec<f32>>, CliError> {
    let mut rows = NpyRows::new(layout)?;
    let mut all = Vec::new();
    while let Some(row) = rows
        .next_row()
        .map_err(|e| CliError::failed(format!("{}: {e}", layout.path.display())))?
    {
        all.push(row);
    }
    Ok(all)
}

/// The header's fixed length: room for any row count, so the shape can be rewritten in place.
const HEADER_LEN: usize = 128;

/// A `.npy` header (format 1.0) for `rows` x `dimension` little-endian f4 values, padded to
/// [`HEADER_LEN`] bytes.
fn header(rows: u64, dimension: usize) -> Vec<u8> {
    let dict =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dimension}), }}");
    let text_len = HEADER_LEN - 10;
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(text_len as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(HEADER_LEN - 1, b' ');
    out.push(b'\n');
    out
}

/// Writes rows of little-endian f4 to a `.npy` file whose row count is known only at the
/// end: the header is written with room to spare and rewritten by [`finish`](Self::finish).
/// (npyz's writer needs a 2-D shape up front; a streamed export learns it at the end.)
pub struct NpyWriter<W: Write + Seek> {
    out: BufWriter<W>,
    dimension: usize,
    rows: u64,
    bytes: Vec<u8>,
}

impl<W: Write + Seek> NpyWriter<W> {
    pub fn new(inner: W) -> io::Result<Self> {
        let mut out = BufWriter::with_capacity(1 << 20, inner);
        out.write_all(&header(0, 0))?;
        Ok(NpyWriter {
            out,
            dimension: 0,
            rows: 0,
            bytes: Vec::new(),
        })
    }

    /// Appends one row; every row must have the first row's length.
    pub fn push(&mut self, row: &[f32]) -> io::Result<()> {
        if self.rows == 0 {
            self.dimension = row.len();
        } else if row.len() != self.dimension {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a row of {} values among rows of {}",
                    row.len(),
                    self.dimension
                ),
            ));
        }
        self.bytes.clear();
        for v in row {
            self.bytes.extend_from_slice(&v.to_le_bytes());
        }
        self.out.write_all(&self.bytes)?;
        self.rows += 1;
        Ok(())
    }

    /// Writes the final shape into the header; returns the inner writer.
    pub fn finish(self, dimension_if_empty: usize) -> io::Result<W> {
        let dimension = if self.rows == 0 {
            dimension_if_empty
        } else {
            self.dimension
        };
        let mut inner = self.out.into_inner().map_err(|e| e.into_error())?;
        inner.seek(SeekFrom::Start(0))?;
        inner.write_all(&header(self.rows, dimension))?;
        inner.seek(SeekFrom::End(0))?;
        inner.flush()?;
        Ok(inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_header_is_read_back_by_npyz() {
        let mut cursor = io::Cursor::new(Vec::new());
        let mut writer = NpyWriter::new(&mut cursor).unwrap();
        writer.push(&[1.0, -2.5, 3.25]).unwrap();
        writer.push(&[f32::MIN_POSITIVE, 0.0, 7.0]).unwrap();
        writer.finish(3).unwrap();
        let bytes = cursor.into_inner();
        assert_eq!(bytes.len(), HEADER_LEN + 24);
        let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
        assert_eq!(npy.shape(), &[2, 3]);
        let values: Vec<f32> = npy.into_vec().unwrap();
        assert_eq!(values, vec![1.0, -2.5, 3.25, f32::MIN_POSITIVE, 0.0, 7.0]);
    }

    #[test]
    fn a_header_with_a_huge_row_count_still_fits() {
        assert_eq!(header(u64::MAX, usize::MAX).len(), HEADER_LEN);
    }
}
