//! `migrate`: apply the pending migrations, or list them (`--status`, `--dry-run`).

use pg_model_repo::{MigrationStatus, ModelRepository};
use serde_json::json;

use crate::connect;
use crate::error::{CliError, EXIT_OK};
use crate::output::{self, table, to_json};
use crate::Global;

/// Applies every pending migration to the schema (creating it if absent), in one
/// transaction; several processes may run it at once. Needs a role that may run DDL.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// List the applied files (with when) and the pending ones; change nothing.
    #[arg(long, conflicts_with = "dry_run")]
    status: bool,
    /// Say which files a migration would apply; change nothing.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(global: &Global, args: &MigrateArgs) -> Result<i32, CliError> {
    let config = connect::config(global)?;
    if args.status || args.dry_run {
        let status = ModelRepository::migration_status(&config)
            .map_err(|e| CliError::repo("cannot read the migration status", e))?;
        if args.status {
            print_status(global, &status)?;
        } else {
            print_dry_run(global, &status)?;
        }
        return Ok(EXIT_OK);
    }
    let report = ModelRepository::migrate_with_report(&config)
        .map_err(|e| CliError::repo("migration failed", e))?;
    let schema = config.schema_name().to_owned();
    output::print(
        global.format,
        json!({"schema": schema, "applied": to_json(&report)["applied"],
               "report": to_json(&report)}),
        || {
            if report.applied.is_empty() {
                format!("schema {schema} is up to date")
            } else {
                let mut text = format!("schema {schema}: applied\n");
                for name in &report.applied {
                    text.push_str(&format!("  {name}\n"));
                }
                if let Some(layout) = &report.distributed {
                    text.push_str(&format!("distributed on Citus ({layout})\n"));
                }
                text
            }
        },
    )?;
    Ok(EXIT_OK)
}

fn print_status(global: &Global, status: &MigrationStatus) -> Result<(), CliError> {
    output::print(global.format, to_json(status), || {
        let mut rows: Vec<Vec<String>> = status
            .applied
            .iter()
            .map(|a| vec![a.name.clone(), "applied".into(), output::time(a.applied_at)])
            .collect();
        rows.extend(
            status
                .pending
                .iter()
                .map(|p| vec![p.clone(), "pending".into(), String::new()]),
        );
        format!(
            "schema {}\n{}",
            status.schema,
            table(&["FILE", "STATE", "APPLIED AT"], &rows)
        )
    })
}

fn print_dry_run(global: &Global, status: &MigrationStatus) -> Result<(), CliError> {
    output::print(
        global.format,
        json!({"schema": status.schema, "dry_run": true, "would_apply": status.pending}),
        || {
            if status.pending.is_empty() {
                format!(
                    "schema {} is up to date: nothing would be applied",
                    status.schema
                )
            } else {
                let mut text = format!("schema {}: would apply\n", status.schema);
                for name in &status.pending {
                    text.push_str(&format!("  {name}\n"));
                }
                text
            }
        },
    )
}
