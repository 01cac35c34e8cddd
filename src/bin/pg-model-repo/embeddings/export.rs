//! `embeddings export`: every vector of a type, streamed by the library's
//! `for_each_embedding` into a `.npy` file and an ids file (or a Parquet file). The files
//! are written beside their destinations under temporary names and renamed into place only
//! when complete.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::json;
use tempfile::NamedTempFile;

use crate::connect;
use crate::error::{CliError, EXIT_OK};
use crate::npy::NpyWriter;
use crate::output;
use crate::progress;
use crate::Global;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("output").required(true).args(["vectors", "parquet"])))]
pub struct ExportArgs {
    /// The entity type to export.
    entity_type: String,
    /// The ids file to write, one id per line in the order of the rows.
    #[arg(long, requires = "vectors")]
    ids: Option<PathBuf>,
    /// The .npy file to write: (rows, dimension) little-endian float32.
    #[arg(long, requires = "ids")]
    vectors: Option<PathBuf>,
    /// A Parquet file to write instead: columns id (string) and vector (FixedSizeList of
    /// float32); needs the `parquet` feature.
    #[arg(long, conflicts_with_all = ["ids", "vectors"])]
    parquet: Option<PathBuf>,
}

/// Where the rows go.
pub trait RowWriter {
    fn push(&mut self, id: &str, vector: &[f32]) -> io::Result<()>;
    /// Completes the files and moves them into place.
    fn finish(self: Box<Self>) -> Result<(), CliError>;
}

pub fn run(global: &Global, args: &ExportArgs) -> Result<i32, CliError> {
    let (mut writer, shown) = writer(args)?;
    let repo = connect::open(global)?;
    let bar = progress::rows(global.quiet, None, &format!("export {}", args.entity_type));
    let mut failure: Option<io::Error> = None;
    let mut unreported = 0u64;
    let streamed = repo.for_each_embedding(&args.entity_type, &mut |id, vector| {
        if failure.is_none() {
            if let Err(e) = writer.push(id, vector) {
                failure = Some(e);
            }
        }
        unreported += 1;
        if unreported == 4096 {
            bar.inc(unreported);
            unreported = 0;
        }
    });
    bar.finish_and_clear();
    let elapsed = bar.elapsed();
    let rows =
        streamed.map_err(|e| CliError::repo(format!("cannot export {}", args.entity_type), e))?;
    if let Some(e) = failure {
        return Err(CliError::failed(format!("{shown}: {e}; nothing was kept")));
    }
    if rows == 0 {
        return Err(CliError::failed(format!(
            "{} has no vectors: nothing was exported",
            args.entity_type
        )));
    }
    writer.finish()?;
    repo.close();
    let rate = rows as f64 / elapsed.as_secs_f64().max(1e-9);
    output::print(
        global.format,
        json!({"entity_type": args.entity_type, "rows": rows, "files": shown,
               "elapsed": elapsed.as_secs_f64(), "rows_per_second": rate}),
        || {
            format!(
                "exported {rows} rows of {} to {shown} in {} ({rate:.0} rows/s)",
                args.entity_type,
                output::duration(elapsed)
            )
        },
    )?;
    Ok(EXIT_OK)
}

fn writer(args: &ExportArgs) -> Result<(Box<dyn RowWriter>, String), CliError> {
    if let (Some(vectors), Some(ids)) = (&args.vectors, &args.ids) {
        let shown = format!("{} and {}", vectors.display(), ids.display());
        return Ok((Box::new(NpyExport::create(vectors, ids)?), shown));
    }
    let Some(path) = &args.parquet else {
        return Err(CliError::usage("give --ids and --vectors, or --parquet"));
    };
    parquet_writer(path)
}

#[cfg(feature = "parquet")]
fn parquet_writer(path: &Path) -> Result<(Box<dyn RowWriter>, String), CliError> {
    Ok((
        Box::new(crate::parquet_io::ParquetExport::create(path)?),
        path.display().to_string(),
    ))
}

#[cfg(not(feature = "parquet"))]
fn parquet_writer(_: &Path) -> Result<(Box<dyn RowWriter>, String), CliError> {
    Err(crate::parquet_io_missing())
}

/// A temporary file beside `path`, to be renamed onto it.
pub fn temp_beside(path: &Path) -> Result<NamedTempFile, CliError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    tempfile::Builder::new()
        .prefix(".pg-model-repo-export-")
        .tempfile_in(dir)
        .map_err(|e| CliError::failed(format!("{}: cannot write beside it: {e}", path.display())))
}

/// Moves a completed temporary file onto `path`. Not fsynced (as numpy.save and pyarrow do
/// not): an export can be run again, and syncing 1.5 GB costs seconds; a reader never sees a
/// partial file under `path`, but after a power cut the file may be incomplete.
pub fn persist(temp: NamedTempFile, path: &Path) -> Result<(), CliError> {
    temp.persist(path)
        .map_err(|e| CliError::failed(format!("{}: {}", path.display(), e.error)))?;
    Ok(())
}

struct NpyExport {
    vectors: NpyWriter<NamedTempFile>,
    ids: BufWriter<NamedTempFile>,
    vectors_path: PathBuf,
    ids_path: PathBuf,
}

impl NpyExport {
    fn create(vectors: &Path, ids: &Path) -> Result<Self, CliError> {
        let npy = NpyWriter::new(temp_beside(vectors)?)
            .map_err(|e| CliError::failed(format!("{}: {e}", vectors.display())))?;
        Ok(NpyExport {
            vectors: npy,
            ids: BufWriter::with_capacity(1 << 16, temp_beside(ids)?),
            vectors_path: vectors.to_owned(),
            ids_path: ids.to_owned(),
        })
    }
}

impl RowWriter for NpyExport {
    fn push(&mut self, id: &str, vector: &[f32]) -> io::Result<()> {
        if id.contains(['\n', '\r']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("id {id:?} holds a line break and cannot be written to an ids file"),
            ));
        }
        self.vectors.push(vector)?;
        self.ids.write_all(id.as_bytes())?;
        self.ids.write_all(b"\n")
    }

    fn finish(self: Box<Self>) -> Result<(), CliError> {
        let this = *self;
        let vectors = this
            .vectors
            .finish(0)
            .map_err(|e| CliError::failed(format!("{}: {e}", this.vectors_path.display())))?;
        let ids = this
            .ids
            .into_inner()
            .map_err(|e| CliError::failed(format!("{}: {}", this.ids_path.display(), e.error())))?;
        persist(vectors, &this.vectors_path)?;
        persist(ids, &this.ids_path)
    }
}
