//! Parquet files (feature `parquet`, arrow-rs): a load's input checked before anything is
//! written (the columns and their types from the footer, then the id column alone for
//! blank, null and repeated ids), then read in record batches; and the export's writer
//! (id: string, vector: FixedSizeList of float32), row groups kept to a few MiB.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use tempfile::NamedTempFile;

use crate::embeddings::export_support::{persist, temp_beside, RowWriter};
use crate::embeddings::source::{Row, RowReader};
use crate::error::CliError;
use crate::ids::{first_repeat, id_problem, DuplicateFinder};

/// Rows per record batch read.
const BATCH_ROWS: usize = 1024;
/// Bytes of vectors per row group written.
const ROW_GROUP_BYTES: usize = 16 << 20;

/// A checked Parquet input.
pub struct ParquetInput {
    path: PathBuf,
    id_column: String,
    vector_column: String,
    id_index: usize,
    vector_index: usize,
    rows: u64,
    narrows: bool,
}

fn failed(path: &Path, what: impl std::fmt::Display) -> CliError {
    CliError::failed(format!("{}: {what}", path.display()))
}

impl ParquetInput {
    /// Checks the file: readable Parquet, both columns present and of a supported type, at
    /// least one row, and one valid, distinct id per row.
    pub fn open(path: &Path, id_column: &str, vector_column: &str) -> Result<Self, CliError> {
        let builder = builder(path)?;
        let schema = builder.schema().clone();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let find = |name: &str, role: &str| {
            schema.index_of(name).map_err(|_| {
                failed(
                    path,
                    format!(
                        "no {role} column {name:?} (columns: {}); name it with --{role}-column",
                        names.join(", ")
                    ),
                )
            })
        };
        let id_index = find(id_column, "id")?;
        let vector_index = find(vector_column, "vector")?;
        let id_type = schema.field(id_index).data_type();
        if !matches!(
            id_type,
            DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
                | DataType::Int32
                | DataType::Int64
                | DataType::UInt32
                | DataType::UInt64
        ) {
            return Err(failed(
                path,
                format!("column {id_column:?} is {id_type}; ids must be strings or integers"),
            ));
        }
        let vector_type = schema.field(vector_index).data_type();
        let narrows = match vector_type {
            DataType::FixedSizeList(item, _) | DataType::List(item) | DataType::LargeList(item) => {
                match item.data_type() {
                    DataType::Float32 => false,
                    DataType::Float64 => true,
                    _ => return Err(vector_type_error(path, vector_column, vector_type)),
                }
            }
            _ => return Err(vector_type_error(path, vector_column, vector_type)),
        };
        let rows = u64::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
        if rows == 0 {
            return Err(failed(path, "the file has no rows"));
        }
        let input = ParquetInput {
            path: path.to_owned(),
            id_column: id_column.to_owned(),
            vector_column: vector_column.to_owned(),
            id_index,
            vector_index,
            rows,
            narrows,
        };
        input.check_ids()?;
        Ok(input)
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn narrows(&self) -> bool {
        self.narrows
    }

    pub fn shown(&self) -> String {
        self.path.display().to_string()
    }

    pub fn describe(&self, row: u64) -> String {
        match self.id_at(row) {
            Some(id) => format!("{} row {row} (id {id:?})", self.path.display()),
            None => format!("{} row {row}", self.path.display()),
        }
    }

    fn ids_only(&self) -> Result<ParquetRecordBatchReader, CliError> {
        let builder = builder(&self.path)?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), [self.id_index]);
        builder
            .with_projection(mask)
            .with_batch_size(BATCH_ROWS * 8)
            .build()
            .map_err(|e| failed(&self.path, e))
    }

    /// Every id of the file, in row order, checked as it comes.
    fn for_each_id(
        &self,
        f: &mut dyn FnMut(u64, String) -> Result<(), CliError>,
    ) -> Result<(), CliError> {
        let mut row = 0u64;
        for batch in self.ids_only()? {
            let batch = batch.map_err(|e| failed(&self.path, e))?;
            let ids = batch
                .column_by_name(&self.id_column)
                .ok_or_else(|| failed(&self.path, "the id column vanished"))?;
            for i in 0..batch.num_rows() {
                let id = id_value(ids, i)
                    .ok_or_else(|| failed(&self.path, format!("row {row}: the id is null")))?;
                f(row, id)?;
                row += 1;
            }
        }
        Ok(())
    }

    fn check_ids(&self) -> Result<(), CliError> {
        let mut finder = DuplicateFinder::default();
        self.for_each_id(&mut |row, id| {
            if let Some(problem) = id_problem(&id) {
                return Err(failed(&self.path, format!("row {row}: {problem}")));
            }
            finder.add(row, &id);
            Ok(())
        })?;
        let suspects = finder.suspects();
        if suspects.is_empty() {
            return Ok(());
        }
        let mut pairs = Vec::new();
        let mut next = suspects.iter().peekable();
        self.for_each_id(&mut |row, id| {
            if next.peek() == Some(&&row) {
                pairs.push((row, id));
                next.next();
            }
            Ok(())
        })?;
        if let Some((first, again, id)) = first_repeat(pairs) {
            return Err(failed(
                &self.path,
                format!("duplicate id {id:?} in row {first} and row {again}"),
            ));
        }
        Ok(())
    }

    fn id_at(&self, wanted: u64) -> Option<String> {
        let mut found = None;
        let _ = self.for_each_id(&mut |row, id| {
            if row == wanted {
                found = Some(id);
                return Err(CliError::failed("found"));
            }
            Ok(())
        });
        found
    }

    pub fn reader(&self) -> Result<Box<dyn RowReader>, CliError> {
        let builder = builder(&self.path)?;
        let mask =
            ProjectionMask::roots(builder.parquet_schema(), [self.id_index, self.vector_index]);
        let batches = builder
            .with_projection(mask)
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| failed(&self.path, e))?;
        Ok(Box::new(ParquetRows {
            shown: self.shown(),
            id_column: self.id_column.clone(),
            vector_column: self.vector_column.clone(),
            batches,
            batch: None,
            in_batch: 0,
            row: 0,
        }))
    }
}

fn builder(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, CliError> {
    let file = File::open(path).map_err(|e| failed(path, e))?;
    ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| failed(path, format!("not a readable Parquet file: {e}")))
}

fn vector_type_error(path: &Path, column: &str, found: &DataType) -> CliError {
    failed(
        path,
        format!(
            "column {column:?} is {found}; vectors must be a FixedSizeList or List of float32 \
             or float64"
        ),
    )
}

/// Row `i` of an id column (strings or integers); `None` when null.
fn id_value(column: &ArrayRef, i: usize) -> Option<String> {
    if column.is_null(i) {
        return None;
    }
    Some(match column.data_type() {
        DataType::Utf8 => column.as_string::<i32>().value(i).to_owned(),
        DataType::LargeUtf8 => column.as_string::<i64>().value(i).to_owned(),
        DataType::Utf8View => column.as_string_view().value(i).to_owned(),
        DataType::Int32 => column.as_primitive::<Int32Type>().value(i).to_string(),
        DataType::Int64 => column.as_primitive::<Int64Type>().value(i).to_string(),
        DataType::UInt32 => column.as_primitive::<UInt32Type>().value(i).to_string(),
        DataType::UInt64 => column.as_primitive::<UInt64Type>().value(i).to_string(),
        _ => return None,
    })
}

/// The (values, start, length) of row `i` of a vector column; `None` when the row is null.
fn vector_slice(column: &ArrayRef, i: usize) -> Option<(&ArrayRef, usize, usize)> {
    if column.is_null(i) {
        return None;
    }
    match column.data_type() {
        DataType::FixedSizeList(..) => {
            let list = column.as_fixed_size_list();
            let len = list.value_length() as usize;
            Some((list.values(), list.value_offset(i) as usize, len))
        }
        DataType::List(_) => {
            let list = column.as_list::<i32>();
            let offsets = list.value_offsets();
            let start = offsets[i] as usize;
            Some((list.values(), start, offsets[i + 1] as usize - start))
        }
        DataType::LargeList(_) => {
            let list = column.as_list::<i64>();
            let offsets = list.value_offsets();
            let start = offsets[i] as usize;
            Some((list.values(), start, offsets[i + 1] as usize - start))
        }
        _ => None,
    }
}

/// Float32 values as they are, float64 narrowed (beyond float32's range: infinite, which the
/// library's finite check refuses); `None` if one is null.
fn floats(values: &ArrayRef, start: usize, len: usize) -> Option<Vec<f32>> {
    if values.null_count() > 0 && (start..start + len).any(|j| values.is_null(j)) {
        return None;
    }
    match values.data_type() {
        DataType::Float32 => {
            Some(values.as_primitive::<Float32Type>().values()[start..start + len].to_vec())
        }
        DataType::Float64 => Some(
            values.as_primitive::<Float64Type>().values()[start..start + len]
                .iter()
                .map(|&v| v as f32)
                .collect(),
        ),
        _ => None,
    }
}

struct ParquetRows {
    shown: String,
    id_column: String,
    vector_column: String,
    batches: ParquetRecordBatchReader,
    batch: Option<RecordBatch>,
    in_batch: usize,
    row: u64,
}

impl RowReader for ParquetRows {
    fn next_row(&mut self) -> Row {
        let row = self.row;
        while self
            .batch
            .as_ref()
            .is_none_or(|b| self.in_batch == b.num_rows())
        {
            match self.batches.next() {
                None => return Ok(None),
                Some(batch) => {
                    // The reader decodes a batch ahead: the fault is at or after `row`.
                    self.batch =
                        Some(batch.map_err(|e| {
                            format!("{} (reading from row {row}): {e}", self.shown)
                        })?);
                    self.in_batch = 0;
                }
            }
        }
        let batch = self.batch.as_ref().expect("a batch with rows left");
        let i = self.in_batch;
        let missing = || format!("{}: a column vanished while reading", self.shown);
        let ids = batch.column_by_name(&self.id_column).ok_or_else(missing)?;
        let vectors = batch
            .column_by_name(&self.vector_column)
            .ok_or_else(missing)?;
        let id =
            id_value(ids, i).ok_or_else(|| format!("{} row {row}: the id is null", self.shown))?;
        let (values, start, len) = vector_slice(vectors, i)
            .ok_or_else(|| format!("{} row {row} (id {id:?}): the vector is null", self.shown))?;
        let vector = floats(values, start, len).ok_or_else(|| {
            format!(
                "{} row {row} (id {id:?}): the vector holds a null value",
                self.shown
            )
        })?;
        self.in_batch += 1;
        self.row += 1;
        Ok(Some((id, vector)))
    }
}

/// Writes (id, vector) rows to a Parquet file, in row groups of about [`ROW_GROUP_BYTES`].
pub struct ParquetExport {
    path: PathBuf,
    temp: Option<NamedTempFile>,
    writer: Option<ArrowWriter<NamedTempFile>>,
    schema: Option<Arc<Schema>>,
    dimension: usize,
    ids: Vec<String>,
    values: Vec<f32>,
}

impl ParquetExport {
    pub fn create(path: &Path) -> Result<Self, CliError> {
        Ok(ParquetExport {
            path: path.to_owned(),
            temp: Some(temp_beside(path)?),
            writer: None,
            schema: None,
            dimension: 0,
            ids: Vec::new(),
            values: Vec::new(),
        })
    }

    fn start(&mut self, dimension: usize) -> std::io::Result<()> {
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new(
                "vector",
                DataType::FixedSizeList(item, dimension as i32),
                false,
            ),
        ]));
        let rows_per_group = (ROW_GROUP_BYTES / (4 * dimension)).max(BATCH_ROWS);
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_size(rows_per_group)
            .build();
        let temp = self.temp.take().expect("the file is created once");
        let writer = ArrowWriter::try_new(temp, schema.clone(), Some(props))
            .map_err(std::io::Error::other)?;
        self.writer = Some(writer);
        self.schema = Some(schema);
        self.dimension = dimension;
        Ok(())
    }

    fn flush_batch(&mut self) -> std::io::Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        let schema = self.schema.clone().expect("started");
        let DataType::FixedSizeList(item, size) = schema.field(1).data_type().clone() else {
            unreachable!("the vector column is a FixedSizeList");
        };
        let values = Float32Array::from(std::mem::take(&mut self.values));
        let vectors = FixedSizeListArray::try_new(item, size, Arc::new(values), None)
            .map_err(std::io::Error::other)?;
        let ids = StringArray::from_iter_values(self.ids.drain(..));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(ids), Arc::new(vectors)])
            .map_err(std::io::Error::other)?;
        self.writer
            .as_mut()
            .expect("started")
            .write(&batch)
            .map_err(std::io::Error::other)
    }
}

impl RowWriter for ParquetExport {
    fn push(&mut self, id: &str, vector: &[f32]) -> std::io::Result<()> {
        if self.writer.is_none() {
            self.start(vector.len())?;
        }
        if vector.len() != self.dimension {
            return Err(std::io::Error::other(format!(
                "a vector of {} values among vectors of {}",
                vector.len(),
                self.dimension
            )));
        }
        self.ids.push(id.to_owned());
        self.values.extend_from_slice(vector);
        if self.ids.len() == BATCH_ROWS {
            self.flush_batch()?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(), CliError> {
        self.flush_batch().map_err(|e| failed(&self.path, e))?;
        let writer = self
            .writer
            .take()
            .ok_or_else(|| failed(&self.path, "no rows to write"))?;
        let temp = writer.into_inner().map_err(|e| failed(&self.path, e))?;
        persist(temp, &self.path)
    }
}
