//! What commands print on stdout: a human table or text by default, one JSON document with
//! `--format json`. JSON times are RFC 3339 (UTC) strings and durations are seconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::error::CliError;

/// `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable tables and text.
    Table,
    /// One JSON document on stdout.
    Json,
}

/// Prints `json` (with `--format json`) or what `human` renders.
pub fn print(format: Format, json: Value, human: impl FnOnce() -> String) -> Result<(), CliError> {
    match format {
        Format::Json => {
            let text = serde_json::to_string_pretty(&normalize(json))
                .map_err(|e| CliError::failed(format!("cannot write JSON: {e}")))?;
            println!("{text}");
        }
        Format::Table => {
            let text = human();
            if !text.is_empty() {
                println!("{}", text.trim_end_matches('\n'));
            }
        }
    }
    Ok(())
}

/// A library value as JSON, with its times and durations in the tool's shape.
pub fn to_json(value: &impl serde::Serialize) -> Value {
    normalize(serde_json::to_value(value).unwrap_or(Value::Null))
}

/// serde's shapes of `SystemTime` (`secs_since_epoch`, `nanos_since_epoch`) become RFC 3339
/// strings, and of `Duration` (`secs`, `nanos`) seconds as a number.
pub fn normalize(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let keys: Vec<&str> = map.keys().map(String::as_str).collect();
            let number = |k: &str| map.get(k).and_then(Value::as_u64);
            if keys.len() == 2 {
                if let (Some(s), Some(n)) =
                    (number("secs_since_epoch"), number("nanos_since_epoch"))
                {
                    let t = UNIX_EPOCH + Duration::new(s, n as u32);
                    return Value::String(time(t));
                }
                if let (Some(s), Some(n)) = (number("secs"), number("nanos")) {
                    return serde_json::json!(Duration::new(s, n as u32).as_secs_f64());
                }
            }
            Value::Object(map.into_iter().map(|(k, v)| (k, normalize(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(normalize).collect()),
        other => other,
    }
}

/// RFC 3339 in UTC, to the millisecond.
pub fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A byte count for people: 1.5 GiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A duration for people: 12.3 s, 45 ms.
pub fn duration(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }
}

/// Left-aligned columns under a header, two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `key: value` lines, keys aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:width$}  {v}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations_are_normalized() {
        let v = serde_json::json!({"t": {"secs_since_epoch": 0, "nanos_since_epoch": 0},
                                   "d": {"secs": 1, "nanos": 500_000_000}, "n": 3});
        let v = normalize(v);
        assert_eq!(v["t"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["d"], 1.5);
        assert_eq!(v["n"], 3);
    }
}
