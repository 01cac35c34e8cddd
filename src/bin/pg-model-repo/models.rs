//! `models …`: versions, streamed push and pull (sha256 verified), delete, cleanup, aliases.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use pg_model_repo::{ModelInfo, ModelRepository};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::connect;
use crate::error::{CliError, EXIT_FAILED, EXIT_OK};
use crate::output::{self, fields, table, to_json};
use crate::progress;
use crate::Global;

#[derive(Debug, clap::Subcommand)]
pub enum ModelsCommand {
    /// Every model (name, versions, bytes, latest), or the active versions of one.
    List(ListArgs),
    /// One model's versions and aliases, or one version (NAME:VERSION, NAME:latest,
    /// NAME@ALIAS) with its metadata, checksum, aliases and training metrics.
    Show(ShowArgs),
    /// Save FILE as version VERSION of model NAME, streamed (large files go in chunks).
    Push(PushArgs),
    /// Write a version's bytes to FILE, streamed, its sha256 verified; FILE appears only
    /// when the whole model was written and verified.
    Pull(PullArgs),
    /// Soft-delete a version (exit 1 when no active version had that name).
    Delete(DeleteArgs),
    /// Remove every version of a model but the N newest active ones, for good.
    Cleanup(CleanupArgs),
    /// Aliases: named, movable pointers to a version, with history.
    #[command(subcommand)]
    Alias(AliasCommand),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// A model name: list its active versions, newest first.
    name: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// NAME, NAME:VERSION, NAME:latest or NAME@ALIAS.
    model: String,
}

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The model's name.
    name: String,
    /// The version to save (not "latest", not "@…").
    version: String,
    /// The file to read, or - for stdin.
    file: PathBuf,
    /// Metadata, a JSON object, e.g. '{"auc": 0.91}'.
    #[arg(long, default_value = "{}")]
    metadata: String,
}

#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// The model's name.
    name: String,
    /// A version, latest, or @ALIAS.
    version: String,
    /// The file to write (replaced only once the model is verified), or - for stdout.
    file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// The model's name.
    name: String,
    /// The version to soft-delete.
    version: String,
}

#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// The model's name.
    name: String,
    /// How many of the newest active versions to keep (0 keeps none).
    #[arg(long)]
    keep: usize,
}

#[derive(Debug, clap::Subcommand)]
pub enum AliasCommand {
    /// Point ALIAS at VERSION (an active version).
    Set {
        /// The model's name.
        name: String,
        /// The alias, e.g. champion.
        alias: String,
        /// The version it points to.
        version: String,
    },
    /// Remove ALIAS (its history stays); exit 1 when there was no such alias.
    Delete(AliasArgs),
    /// Move ALIAS back to the version it pointed to before; prints that version.
    Rollback(AliasArgs),
    /// Every move of ALIAS, oldest first.
    History(AliasArgs),
}

#[derive(Debug, clap::Args)]
pub struct AliasArgs {
    /// The model's name.
    name: String,
    /// The alias.
    alias: String,
}

pub fn run(global: &Global, command: &ModelsCommand) -> Result<i32, CliError> {
    let repo = connect::open(global)?;
    let code = match command {
        ModelsCommand::List(args) => list(global, &repo, args),
        ModelsCommand::Show(args) => show(global, &repo, args),
        ModelsCommand::Push(args) => push(global, &repo, args),
        ModelsCommand::Pull(args) => pull(global, &repo, args),
        ModelsCommand::Delete(args) => delete(global, &repo, args),
        ModelsCommand::Cleanup(args) => cleanup(global, &repo, args),
        ModelsCommand::Alias(command) => alias(global, &repo, command),
    }?;
    repo.close();
    Ok(code)
}

fn info_json(info: &ModelInfo, aliases: &[String]) -> Value {
    let mut value = to_json(info);
    value["aliases"] = json!(aliases);
    value
}

fn info_fields(info: &ModelInfo, aliases: &[String]) -> String {
    fields(&[
        ("model", info.model_name.clone()),
        ("version", info.version.clone()),
        (
            "size",
            format!(
                "{} ({} bytes)",
                output::bytes(info.size_bytes),
                info.size_bytes
            ),
        ),
        ("sha256", info.checksum.clone()),
        ("created", output::time(info.created_at)),
        ("active", info.is_active.to_string()),
        ("aliases", aliases.join(", ")),
        ("metadata", info.metadata.to_string()),
    ])
}

/// The aliases of `name` that point to `version`.
fn aliases_of(repo: &ModelRepository, name: &str, version: &str) -> Result<Vec<String>, CliError> {
    Ok(repo
        .get_model_aliases(name)
        .map_err(|e| CliError::repo(format!("cannot read the aliases of {name}"), e))?
        .into_iter()
        .filter(|(_, v)| v == version)
        .map(|(a, _)| a)
        .collect())
}

fn list(global: &Global, repo: &ModelRepository, args: &ListArgs) -> Result<i32, CliError> {
    let Some(name) = &args.name else {
        let stats = repo
            .get_model_storage_stats()
            .map_err(|e| CliError::repo("cannot list the models", e))?;
        let models = to_json(&stats)["models"].clone();
        output::print(global.format, json!({"models": models}), || {
            let rows: Vec<Vec<String>> = stats
                .models
                .iter()
                .map(|m| {
                    vec![
                        m.model_name.clone(),
                        m.active_versions.to_string(),
                        output::bytes(m.total_bytes),
                        m.latest_version.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            table(&["MODEL", "ACTIVE VERSIONS", "BYTES", "LATEST"], &rows)
        })?;
        return Ok(EXIT_OK);
    };
    let versions = repo
        .get_model_versions(name)
        .map_err(|e| CliError::repo(format!("cannot list the versions of {name}"), e))?;
    let aliases = repo
        .get_model_aliases(name)
        .map_err(|e| CliError::repo(format!("cannot read the aliases of {name}"), e))?;
    let aliases_for = |version: &str| -> Vec<String> {
        aliases
            .iter()
            .filter(|(_, v)| *v == version)
            .map(|(a, _)| a.clone())
            .collect()
    };
    output::print(
        global.format,
        json!({"model": name, "versions": versions.iter()
            .map(|i| info_json(i, &aliases_for(&i.version))).collect::<Vec<_>>()}),
        || {
            let rows: Vec<Vec<String>> = versions
                .iter()
                .map(|i| {
                    vec![
                        i.version.clone(),
                        output::bytes(i.size_bytes),
                        output::time(i.created_at),
                        aliases_for(&i.version).join(","),
                        i.checksum[..12.min(i.checksum.len())].to_owned(),
                    ]
                })
                .collect();
            table(&["VERSION", "SIZE", "CREATED", "ALIASES", "SHA256"], &rows)
        },
    )?;
    Ok(EXIT_OK)
}

/// `NAME@ALIAS`, `NAME:VERSION` (`latest` included) or `NAME`.
fn parse_model_ref(text: &str) -> (&str, Option<String>) {
    if let Some((name, alias)) = text.rsplit_once('@') {
        if !name.is_empty() {
            return (name, Some(format!("@{alias}")));
        }
    }
    if let Some((name, version)) = text.rsplit_once(':') {
        if !name.is_empty() {
            return (name, Some(version.to_owned()));
        }
    }
    (text, None)
}

/// The active version `version` ("latest", "@alias" or literal) of `name`, if any.
fn resolve(
    repo: &ModelRepository,
    name: &str,
    version: &str,
) -> Result<Option<ModelInfo>, CliError> {
    let versions = repo
        .get_model_versions(name)
        .map_err(|e| CliError::repo(format!("cannot read the versions of {name}"), e))?;
    let wanted = if version == "latest" {
        return Ok(versions.into_iter().next());
    } else if let Some(alias) = version.strip_prefix('@') {
        let aliases = repo
            .get_model_aliases(name)
            .map_err(|e| CliError::repo(format!("cannot read the aliases of {name}"), e))?;
        match aliases.get(alias) {
            Some(v) => v.clone(),
            None => return Ok(None),
        }
    } else {
        version.to_owned()
    };
    Ok(versions.into_iter().find(|i| i.version == wanted))
}

fn show(global: &Global, repo: &ModelRepository, args: &ShowArgs) -> Result<i32, CliError> {
    let (name, version) = parse_model_ref(&args.model);
    let Some(version) = version else {
        return list(
            global,
            repo,
            &ListArgs {
                name: Some(name.to_owned()),
            },
        );
    };
    let info = resolve(repo, name, &version)?
        .ok_or_else(|| CliError::failed(format!("model {name} has no active version {version}")))?;
    let aliases = aliases_of(repo, name, &info.version)?;
    let metrics = repo
        .get_training_metrics(name, &info.version)
        .map_err(|e| CliError::repo("cannot read the training metrics", e))?;
    let mut value = info_json(&info, &aliases);
    value["training_metrics"] = json!(metrics);
    output::print(global.format, value, || {
        let mut text = info_fields(&info, &aliases);
        if let Some(metrics) = &metrics {
            let list: Vec<String> = metrics.iter().map(|(k, v)| format!("{k}={v}")).collect();
            text.push_str(&fields(&[("metrics", list.join(", "))]));
        }
        text
    })?;
    Ok(EXIT_OK)
}

/// A reader that moves a progress bar.
struct Counting<'a, R> {
    inner: R,
    bar: &'a ProgressBar,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

fn push(global: &Global, repo: &ModelRepository, args: &PushArgs) -> Result<i32, CliError> {
    let metadata: Value = serde_json::from_str(&args.metadata)
        .map_err(|e| CliError::usage(format!("--metadata is not JSON: {e}")))?;
    if !metadata.is_object() {
        return Err(CliError::usage(
            "--metadata must be a JSON object, e.g. '{\"auc\": 0.9}'",
        ));
    }
    let from_stdin = args.file.as_os_str() == "-";
    let shown = args.file.display().to_string();
    let mut reader: Box<dyn Read> = if from_stdin {
        Box::new(io::stdin().lock())
    } else {
        Box::new(File::open(&args.file).map_err(|e| CliError::failed(format!("{shown}: {e}")))?)
    };
    let total = if from_stdin {
        None
    } else {
        std::fs::metadata(&args.file).ok().map(|m| m.len())
    };
    let bar = progress::bytes(global.quiet, total, &format!("push {}", args.name));
    let mut counting = Counting {
        inner: &mut reader,
        bar: &bar,
    };
    let saved = repo.save_model_from_reader(&args.name, &args.version, &mut counting, &metadata);
    bar.finish_and_clear();
    let info = saved.map_err(|e| {
        CliError::repo(
            format!("cannot push {shown} as {} {}", args.name, args.version),
            e,
        )
    })?;
    let elapsed = bar.elapsed();
    output::print(global.format, info_json(&info, &[]), || {
        format!(
            "pushed {shown} as {} {} ({} in {}, sha256 {})",
            info.model_name,
            info.version,
            output::bytes(info.size_bytes),
            output::duration(elapsed),
            info.checksum
        )
    })?;
    Ok(EXIT_OK)
}

/// A writer that hashes, counts and moves a progress bar.
struct Hashing<'a, W> {
    inner: W,
    hasher: Sha256,
    written: u64,
    bar: &'a ProgressBar,
}

impl<W: Write> Write for Hashing<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        self.bar.inc(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn pull(global: &Global, repo: &ModelRepository, args: &PullArgs) -> Result<i32, CliError> {
    let (name, version) = (&args.name, &args.version);
    let to_stdout = args.file.as_os_str() == "-";
    let shown = args.file.display().to_string();
    // The size, for the bar (the stream itself resolves the version again).
    let total = resolve(repo, name, version)?.map(|i| i.size_bytes);
    let bar = progress::bytes(global.quiet, total, &format!("pull {name}"));
    let (info, sha, written) = if to_stdout {
        let mut out = Hashing {
            inner: io::BufWriter::with_capacity(1 << 20, io::stdout().lock()),
            hasher: Sha256::new(),
            written: 0,
            bar: &bar,
        };
        let info = repo.load_model_to_writer(name, version, &mut out);
        out.flush()
            .map_err(|e| CliError::failed(format!("stdout: {e}")))?;
        (info, out.hasher.finalize(), out.written)
    } else {
        let dir = parent_dir(&args.file);
        let temp = tempfile::Builder::new()
            .prefix(".pg-model-repo-pull-")
            .tempfile_in(dir)
            .map_err(|e| {
                CliError::failed(format!("{shown}: cannot create a file beside it: {e}"))
            })?;
        let mut out = Hashing {
            inner: io::BufWriter::with_capacity(1 << 20, temp),
            hasher: Sha256::new(),
            written: 0,
            bar: &bar,
        };
        let info = repo.load_model_to_writer(name, version, &mut out);
        let (sha, written) = (out.hasher.clone().finalize(), out.written);
        let temp = out
            .inner
            .into_inner()
            .map_err(|e| CliError::failed(format!("{shown}: {}", e.error())))?;
        let info = info.map_err(|e| CliError::repo(format!("cannot pull {name} {version}"), e))?;
        if let Some(info) = &info {
            verify(info, &sha, written, &shown)?;
            temp.as_file()
                .sync_all()
                .map_err(|e| CliError::failed(format!("{shown}: {e}")))?;
            temp.persist(&args.file)
                .map_err(|e| CliError::failed(format!("{shown}: {}", e.error)))?;
        }
        (Ok(info), sha, written)
    };
    bar.finish_and_clear();
    let info = info
        .map_err(|e| CliError::repo(format!("cannot pull {name} {version}"), e))?
        .ok_or_else(|| CliError::failed(format!("model {name} has no active version {version}")))?;
    verify(&info, &sha, written, &shown)?;
    let elapsed = bar.elapsed();
    if to_stdout {
        // stdout holds the model: the summary goes to stderr unless asked for quiet.
        if !global.quiet {
            eprintln!(
                "pulled {} {} ({}, sha256 verified)",
                info.model_name,
                info.version,
                output::bytes(written)
            );
        }
        return Ok(EXIT_OK);
    }
    let mut value = info_json(&info, &[]);
    value["file"] = json!(shown);
    value["verified"] = json!(true);
    output::print(global.format, value, || {
        format!(
            "pulled {} {} to {shown} ({} in {}, sha256 {} verified)",
            info.model_name,
            info.version,
            output::bytes(written),
            output::duration(elapsed),
            info.checksum
        )
    })?;
    Ok(EXIT_OK)
}

/// The bytes written hash and count to what the repository recorded.
fn verify(info: &ModelInfo, sha: &[u8], written: u64, shown: &str) -> Result<(), CliError> {
    let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
    if hex != info.checksum || written != info.size_bytes {
        return Err(CliError::failed(format!(
            "{shown}: the bytes received (sha256 {hex}, {written} bytes) do not match model {} {} \
             (sha256 {}, {} bytes); nothing was kept",
            info.model_name, info.version, info.checksum, info.size_bytes
        )));
    }
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn delete(global: &Global, repo: &ModelRepository, args: &DeleteArgs) -> Result<i32, CliError> {
    let deleted = repo
        .delete_model(&args.name, &args.version)
        .map_err(|e| CliError::repo(format!("cannot delete {} {}", args.name, args.version), e))?;
    output::print(
        global.format,
        json!({"model": args.name, "version": args.version, "deleted": deleted}),
        || {
            if deleted {
                format!("deleted {} {}", args.name, args.version)
            } else {
                format!(
                    "{} has no active version {}: nothing deleted",
                    args.name, args.version
                )
            }
        },
    )?;
    Ok(if deleted { EXIT_OK } else { EXIT_FAILED })
}

fn cleanup(global: &Global, repo: &ModelRepository, args: &CleanupArgs) -> Result<i32, CliError> {
    let removed = repo
        .cleanup_old_models(&args.name, args.keep)
        .map_err(|e| CliError::repo(format!("cannot clean up {}", args.name), e))?;
    output::print(
        global.format,
        json!({"model": args.name, "keep": args.keep, "removed": removed}),
        || {
            format!(
                "removed {removed} versions of {} (kept the {} newest)",
                args.name, args.keep
            )
        },
    )?;
    Ok(EXIT_OK)
}

fn alias(global: &Global, repo: &ModelRepository, command: &AliasCommand) -> Result<i32, CliError> {
    match command {
        AliasCommand::Set {
            name,
            alias,
            version,
        } => {
            repo.set_model_alias(name, alias, version)
                .map_err(|e| CliError::repo(format!("cannot set {name}@{alias}"), e))?;
            output::print(
                global.format,
                json!({"model": name, "alias": alias, "version": version}),
                || format!("{name}@{alias} -> {version}"),
            )?;
        }
        AliasCommand::Delete(AliasArgs { name, alias }) => {
            let deleted = repo
                .delete_model_alias(name, alias)
                .map_err(|e| CliError::repo(format!("cannot delete {name}@{alias}"), e))?;
            output::print(
                global.format,
                json!({"model": name, "alias": alias, "deleted": deleted}),
                || {
                    if deleted {
                        format!("deleted {name}@{alias}")
                    } else {
                        format!("{name} has no alias {alias}: nothing deleted")
                    }
                },
            )?;
            if !deleted {
                return Ok(EXIT_FAILED);
            }
        }
        AliasCommand::Rollback(AliasArgs { name, alias }) => {
            let version = repo
                .rollback_model_alias(name, alias)
                .map_err(|e| CliError::repo(format!("cannot roll back {name}@{alias}"), e))?;
            output::print(
                global.format,
                json!({"model": name, "alias": alias, "version": version}),
                || format!("{name}@{alias} -> {version}"),
            )?;
        }
        AliasCommand::History(AliasArgs { name, alias }) => {
            let history = repo.get_alias_history(name, alias).map_err(|e| {
                CliError::repo(format!("cannot read the history of {name}@{alias}"), e)
            })?;
            let moves: Vec<Value> = history
                .iter()
                .map(|(v, at)| json!({"version": v, "set_at": output::time(*at)}))
                .collect();
            output::print(
                global.format,
                json!({"model": name, "alias": alias, "history": moves}),
                || {
                    let rows: Vec<Vec<String>> = history
                        .iter()
                        .map(|(v, at)| vec![output::time(*at), v.clone()])
                        .collect();
                    table(&["SET AT", "VERSION"], &rows)
                },
            )?;
        }
    }
    Ok(EXIT_OK)
}
