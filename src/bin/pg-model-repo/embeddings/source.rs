//! Where a load's rows come from: a `.npy` file with an ids file, or a Parquet file. Each is
//! checked whole before anything is written, then read in one streaming pass.

use std::path::{Path, PathBuf};

use crate::error::CliError;
use crate::ids::{self, IdLines};
use crate::npy::{self, NpyLayout, NpyRows};

/// One row read: (entity_id, vector); or why reading stopped, naming the file and row.
pub type Row = Result<Option<(String, Vec<f32>)>, String>;

/// Reads rows in file order.
pub trait RowReader {
    fn next_row(&mut self) -> Row;
}

/// A checked input.
pub enum Source {
    Npy {
        layout: NpyLayout,
        ids: PathBuf,
    },
    #[cfg(feature = "parquet")]
    Parquet(crate::parquet_io::ParquetInput),
}

impl Source {
    /// A `.npy` file and its ids file, both checked: the array's header, dtype, shape and
    /// size, and one valid, distinct id per row.
    pub fn npy(vectors: &Path, ids_path: &Path) -> Result<Self, CliError> {
        let layout = npy::inspect(vectors, false)?;
        if layout.rows == 0 {
            return Err(CliError::failed(format!(
                "{}: the array has no rows",
                vectors.display()
            )));
        }
        ids::check(ids_path, layout.rows, &vectors.display().to_string())?;
        Ok(Source::Npy {
            layout,
            ids: ids_path.to_owned(),
        })
    }

    pub fn rows(&self) -> u64 {
        match self {
            Source::Npy { layout, .. } => layout.rows,
            #[cfg(feature = "parquet")]
            Source::Parquet(input) => input.rows(),
        }
    }

    /// The file the vectors come from, for messages.
    pub fn shown(&self) -> String {
        match self {
            Source::Npy { layout, .. } => layout.path.display().to_string(),
            #[cfg(feature = "parquet")]
            Source::Parquet(input) => input.shown(),
        }
    }

    /// Whether values are narrowed from float64 (an infinity may then come from a finite
    /// value beyond float32's range).
    pub fn narrows(&self) -> bool {
        match self {
            Source::Npy { layout, .. } => layout.dtype.is_f8(),
            #[cfg(feature = "parquet")]
            Source::Parquet(input) => input.narrows(),
        }
    }

    /// Row `row` (0-based) of the input, with its id, for messages.
    pub fn describe(&self, row: u64) -> String {
        match self {
            Source::Npy { layout, ids } => {
                let id = ids::id_at(ids, row)
                    .map(|id| format!("id {id:?}, "))
                    .unwrap_or_default();
                format!(
                    "{} row {row} ({id}{} line {})",
                    layout.path.display(),
                    ids.display(),
                    row + 1
                )
            }
            #[cfg(feature = "parquet")]
            Source::Parquet(input) => input.describe(row),
        }
    }

    pub fn reader(&self) -> Result<Box<dyn RowReader>, CliError> {
        match self {
            Source::Npy { layout, ids } => Ok(Box::new(NpyIdsReader {
                vectors: NpyRows::new(layout)?,
                ids: IdLines::open(ids)?,
                vectors_shown: layout.path.display().to_string(),
                ids_shown: ids.display().to_string(),
                row: 0,
            })),
            #[cfg(feature = "parquet")]
            Source::Parquet(input) => input.reader(),
        }
    }
}

/// The rows of a `.npy` file beside the lines of its ids file.
struct NpyIdsReader {
    vectors: NpyRows,
    ids: IdLines,
    vectors_shown: String,
    ids_shown: String,
    row: u64,
}

impl RowReader for NpyIdsReader {
    fn next_row(&mut self) -> Row {
        let row = self.row;
        let vector = self
            .vectors
            .next_row()
            .map_err(|e| format!("{} row {row}: {e}", self.vectors_shown))?;
        let id = self
            .ids
            .next_id()
            .map_err(|e| format!("{} line {}: {e}", self.ids_shown, row + 1))?;
        self.row += 1;
        match (id, vector) {
            (Some(id), Some(vector)) => Ok(Some((id, vector))),
            (None, None) => Ok(None),
            // Both files were checked; one that changes while it is read is refused.
            _ => Err(format!(
                "{} and {} no longer have as many lines as rows (changed while being read?) at \
                 row {row}",
                self.ids_shown, self.vectors_shown
            )),
        }
    }
}
