//! `embeddings load`: files checked whole first, then one streaming pass feeds the library.
//!
//! A read error in mid-stream (a disk failure, a file cut short after the checks) must fail
//! the call with nothing written. The library's streaming loads are all-or-nothing and refuse
//! a bad record, so the row iterator keeps the error and yields one record the library always
//! refuses (an empty vector), then ends: the load fails, nothing of it is visible, and the
//! tool reports the kept I/O error instead of the library's complaint about the empty vector.

use std::cell::RefCell;
use std::path::PathBuf;

use indicatif::ProgressBar;
use pg_model_repo::{BatchReport, Embedding, LoadMethod, RepoError};
use serde_json::json;

use super::source::{RowReader, Source};
use crate::connect;
use crate::error::{CliError, EXIT_OK};
use crate::output;
use crate::progress;
use crate::Global;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["vectors", "parquet"])))]
pub struct LoadArgs {
    /// The entity type to load into.
    entity_type: String,
    /// Text file of ids, one per line, in the order of the vectors' rows.
    #[arg(long, requires = "vectors")]
    ids: Option<PathBuf>,
    /// A .npy file: a 2-D array (rows, dimension) of float32 or float64, little- or
    /// big-endian, C order (float64 is narrowed to float32).
    #[arg(long, requires = "ids")]
    vectors: Option<PathBuf>,
    /// A Parquet file with an id column and a vector column (FixedSizeList or List of
    /// float32 or float64); needs the `parquet` feature.
    #[arg(long, conflicts_with_all = ["ids", "vectors"])]
    parquet: Option<PathBuf>,
    /// The Parquet column of ids (strings or integers).
    #[arg(long, default_value = "id", requires = "parquet")]
    id_column: String,
    /// The Parquet column of vectors.
    #[arg(long, default_value = "vector", requires = "parquet")]
    vector_column: String,
    /// How rows are written (without --replace).
    #[arg(long, value_enum, default_value_t = Method::Copy)]
    method: Method,
    /// Replace the type's whole set atomically (readers see the old set until the commit);
    /// without it, rows are upserted beside the type's other vectors.
    #[arg(long)]
    replace: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Method {
    Insert,
    MultiRowInsert,
    Copy,
    ParallelCopy,
}

impl Method {
    fn load_method(self) -> LoadMethod {
        match self {
            Method::Insert => LoadMethod::Insert,
            Method::MultiRowInsert => LoadMethod::MultiRowInsert,
            Method::Copy => LoadMethod::Copy,
            Method::ParallelCopy => LoadMethod::ParallelCopy,
        }
    }
}

fn source(args: &LoadArgs) -> Result<Source, CliError> {
    if let (Some(vectors), Some(ids)) = (&args.vectors, &args.ids) {
        return Source::npy(vectors, ids);
    }
    let Some(path) = &args.parquet else {
        return Err(CliError::usage("give --ids and --vectors, or --parquet"));
    };
    parquet_source(path, args)
}

#[cfg(feature = "parquet")]
fn parquet_source(path: &std::path::Path, args: &LoadArgs) -> Result<Source, CliError> {
    crate::parquet_io::ParquetInput::open(path, &args.id_column, &args.vector_column)
        .map(Source::Parquet)
}

#[cfg(not(feature = "parquet"))]
fn parquet_source(_: &std::path::Path, _: &LoadArgs) -> Result<Source, CliError> {
    Err(crate::parquet_io_missing())
}

pub fn run(global: &Global, args: &LoadArgs) -> Result<i32, CliError> {
    // Every check of the files before the database is touched.
    let source = source(args)?;
    let repo = connect::open(global)?;
    let total = source.rows();
    let bar = progress::rows(
        global.quiet,
        Some(total),
        &format!("load {}", args.entity_type),
    );
    let failure = RefCell::new(None);
    let mut rows = FileRows {
        entity_type: &args.entity_type,
        reader: source.reader()?,
        failure: &failure,
        bar: &bar,
        unreported: 0,
        ended: false,
    };
    let method = args.method.load_method();
    let loaded = if args.replace {
        repo.replace_embeddings_iter(&args.entity_type, &mut rows)
    } else {
        repo.load_embeddings_iter(&mut rows, method)
    };
    bar.finish_and_clear();
    if let Some(error) = failure.into_inner() {
        return Err(CliError::failed(format!(
            "{error}; nothing was written to {}",
            args.entity_type
        )));
    }
    let report = loaded.map_err(|e| load_error(&source, &args.entity_type, e))?;
    repo.close();
    print(global, args, &source, &report)?;
    Ok(EXIT_OK)
}

/// The rows of a checked input as the library's records, moving the progress bar.
struct FileRows<'a> {
    entity_type: &'a str,
    reader: Box<dyn RowReader>,
    failure: &'a RefCell<Option<String>>,
    bar: &'a ProgressBar,
    unreported: u64,
    ended: bool,
}

impl Iterator for FileRows<'_> {
    type Item = Embedding;

    fn next(&mut self) -> Option<Embedding> {
        if self.ended {
            return None;
        }
        match self.reader.next_row() {
            Ok(Some((id, vector))) => {
                self.unreported += 1;
                if self.unreported == 4096 {
                    self.bar.inc(self.unreported);
                    self.unreported = 0;
                }
                Some(Embedding::new(self.entity_type, id, vector))
            }
            Ok(None) => {
                self.bar.inc(self.unreported);
                self.ended = true;
                None
            }
            Err(error) => {
                // See the module doc: keep the error, and make the library refuse the load.
                *self.failure.borrow_mut() = Some(error);
                self.ended = true;
                Some(Embedding::new(self.entity_type, "(read error)", Vec::new()))
            }
        }
    }
}

/// A library error, with the record index it names turned back into the file's row.
fn load_error(source: &Source, entity_type: &str, error: RepoError) -> CliError {
    let context = format!("cannot load {entity_type} from {}", source.shown());
    if let RepoError::InvalidInput(detail) = &error {
        let located = detail.record().map(|row| (row as u64, detail.message()));
        if let Some((row, why)) = located {
            let mut text = format!("{}: {why}", source.describe(row));
            if source.narrows() && (why.contains("inf") || why.contains("Inf")) {
                text.push_str(
                    " (float64 values beyond float32's range become infinite when narrowed)",
                );
            }
            return CliError::failed(format!("{text}; nothing was written to {entity_type}"));
        }
    }
    CliError::repo(context, error)
}

fn print(
    global: &Global,
    args: &LoadArgs,
    source: &Source,
    report: &BatchReport,
) -> Result<(), CliError> {
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    let rate = report.rows as f64 / secs;
    output::print(
        global.format,
        json!({"entity_type": args.entity_type, "file": source.shown(),
               "replace": args.replace, "rows": report.rows, "bytes": report.bytes,
               "elapsed": secs, "rows_per_second": rate}),
        || {
            let what = if args.replace {
                format!("replaced {} with {} rows", args.entity_type, report.rows)
            } else {
                format!("loaded {} rows into {}", report.rows, args.entity_type)
            };
            format!(
                "{what} from {} in {} ({:.0} rows/s, {}/s)",
                source.shown(),
                output::duration(report.elapsed),
                rate,
                output::bytes((report.bytes as f64 / secs) as u64)
            )
        },
    )
}
