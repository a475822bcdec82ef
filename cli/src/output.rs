//! Output: `-o table` (columns chosen per command, any JSON shape shown sensibly),
//! `-o json` (the API's answer, pretty), `-o yaml`. Pure: values in, text out.
//!
//! The API's answers are read leniently (`serde_json::Value`): a field the CLI does not
//! know is ignored in tables and kept in JSON and YAML; a missing one shows as `-`.

use comfy_table::{presets, ContentArrangement, Table, TableComponent};
use serde_json::Value;

/// Longest cell before it is cut (tables only).
const MAX_CELL: usize = 80;

/// `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// A table column: header and the field it shows (a `/`-separated path into each row,
/// or several alternatives separated by `|`, the first present wins).
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub header: &'static str,
    pub path: &'static str,
}

pub const fn col(header: &'static str, path: &'static str) -> Column {
    Column { header, path }
}

/// The rows of a list answer: the answer itself when it is an array, else its
/// `items` (or the first array field) — so `{ "items": [...], "next_cursor": .. }` and a
/// bare array both work.
pub fn rows(value: &Value) -> Vec<&Value> {
    match value {
        Value::Array(a) => a.iter().collect(),
        Value::Object(o) => o
            .get("items")
            .and_then(Value::as_array)
            .or_else(|| o.values().find_map(Value::as_array))
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The field at `path` (see [`Column`]).
pub fn field<'a>(row: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('|').find_map(|alt| {
        alt.split('/')
            .try_fold(row, |v, key| match v {
                Value::Object(o) => o.get(key),
                Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
                _ => None,
            })
            .filter(|v| !v.is_null())
    })
}

/// A value as one table cell.
pub fn cell(value: Option<&Value>) -> String {
    let text = match value {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => if *b { "yes" } else { "no" }.to_owned(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Array(a)) if a.iter().all(|v| !v.is_object() && !v.is_array()) => a
            .iter()
            .map(|v| cell(Some(v)))
            .collect::<Vec<_>>()
            .join(","),
        Some(Value::Object(o)) if o.values().all(|v| !v.is_object() && !v.is_array()) => o
            .iter()
            .map(|(k, v)| format!("{k}={}", cell(Some(v))))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    };
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() > MAX_CELL {
        let cut: String = one_line.chars().take(MAX_CELL - 1).collect();
        format!("{cut}…")
    } else {
        one_line
    }
}

/// The table's text: columns two spaces apart, no padding at the edges.
fn finish(mut t: Table) -> String {
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    t.trim_fmt()
}

fn new_table() -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    for edge in [
        TableComponent::LeftBorder,
        TableComponent::RightBorder,
        TableComponent::VerticalLines,
    ] {
        t.remove_style(edge);
    }
    t
}

/// A list as a table with these columns; with no columns, the scalar fields of the first
/// row. An empty list is a header line and `(none)`.
pub fn table(value: &Value, columns: &[Column]) -> String {
    let rows = rows(value);
    let derived: Vec<(String, String)>;
    let columns: Vec<(String, String)> = if columns.is_empty() {
        derived = rows
            .first()
            .and_then(|r| r.as_object())
            .map(|o| {
                o.iter()
                    .filter(|(_, v)| !v.is_object() && !v.is_array())
                    .map(|(k, _)| (k.to_uppercase(), k.clone()))
                    .collect()
            })
            .unwrap_or_default();
        derived
    } else {
        columns
            .iter()
            .map(|c| (c.header.to_owned(), c.path.to_owned()))
            .collect()
    };
    let mut t = new_table();
    t.set_header(columns.iter().map(|(h, _)| h.as_str()));
    for row in &rows {
        t.add_row(columns.iter().map(|(_, p)| cell(field(row, p))));
    }
    let mut out = finish(t);
    if rows.is_empty() {
        out.push_str("\n(none)");
    }
    out.push('\n');
    out
}

/// One object as `KEY  value` lines (nested objects flattened with `.`).
pub fn detail(value: &Value) -> String {
    let mut pairs = Vec::new();
    flatten("", value, &mut pairs);
    let mut t = new_table();
    for (k, v) in pairs {
        t.add_row(vec![k, v]);
    }
    let mut out = finish(t);
    out.push('\n');
    out
}

fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(o) if !o.is_empty() => {
            for (k, v) in o {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_owned(), cell(Some(other)))),
    }
}

/// The whole answer as JSON or YAML; `None` for a table (the command picks its layout).
pub fn serialized(value: &Value, format: Format) -> Option<String> {
    match format {
        Format::Table => None,
        Format::Json => Some(format!(
            "{}\n",
            serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
        )),
        Format::Yaml => Some(serde_yaml::to_string(value).unwrap_or_else(|e| format!("# {e}\n"))),
    }
}

/// A list in the chosen format.
pub fn list(value: &Value, format: Format, columns: &[Column]) -> String {
    serialized(value, format).unwrap_or_else(|| table(value, columns))
}

/// One object in the chosen format.
pub fn one(value: &Value, format: Format) -> String {
    serialized(value, format).unwrap_or_else(|| detail(value))
}

/// Values as a line of block characters, lowest to highest; non-finite values as spaces.
pub fn sparkline(values: &[f64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let finite = values.iter().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    values
        .iter()
        .map(|&v| {
            if !v.is_finite() {
                ' '
            } else if hi <= lo {
                BARS[3]
            } else {
                let step = ((v - lo) / (hi - lo) * 7.0).round();
                // 0..=7 by construction; clamp for rounding at the edges.
                BARS[(step.clamp(0.0, 7.0)) as usize]
            }
        })
        .collect()
}

/// A point of a history series: `[ts, value]`, or an object with `value`/`v`/`avg`/
/// `mean` (and `ts`/`t`/`time`).
pub fn point_value(point: &Value) -> Option<f64> {
    match point {
        Value::Array(a) => a.get(1).and_then(Value::as_f64),
        Value::Object(_) => field(point, "value|v|avg|mean").and_then(Value::as_f64),
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
}

/// `history` as a table: one row per series, its labels, points, last, min, max and a
/// sparkline of at most `width` characters.
pub fn history_table(value: &Value, width: usize) -> String {
    let series: Vec<&Value> = match value.get("series") {
        Some(Value::Array(a)) => a.iter().collect(),
        _ if value.get("points").is_some() => vec![value],
        _ => rows(value),
    };
    let mut t = new_table();
    t.set_header(vec!["SERIES", "POINTS", "LAST", "MIN", "MAX", "TREND"]);
    for s in &series {
        let points = field(s, "points")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let values: Vec<f64> = points.iter().filter_map(point_value).collect();
        let labels = field(s, "labels").map(|l| cell(Some(l)));
        let name = match (field(s, "metric"), labels) {
            (Some(m), Some(l)) => format!("{}{{{l}}}", cell(Some(m))),
            (Some(m), None) => cell(Some(m)),
            (None, l) => l.unwrap_or_default(),
        };
        // Series of several hosts look alike without their host.
        let name = match field(s, "host_id|host") {
            Some(h) => format!("{} {name}", cell(Some(h))),
            None => name,
        };
        let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"));
        let min = values.iter().copied().reduce(f64::min);
        let max = values.iter().copied().reduce(f64::max);
        t.add_row(vec![
            name,
            values.len().to_string(),
            fmt(values.last().copied()),
            fmt(min),
            fmt(max),
            sparkline(&downsample(&values, width)),
        ]);
    }
    let mut out = finish(t);
    if series.is_empty() {
        out.push_str("\n(no data)");
    }
    out.push('\n');
    out
}

/// At most `width` values: each the mean of its bucket.
pub fn downsample(values: &[f64], width: usize) -> Vec<f64> {
    if width == 0 || values.len() <= width {
        return values.to_vec();
    }
    (0..width)
        .map(|i| {
            let lo = i * values.len() / width;
            let hi = ((i + 1) * values.len() / width).max(lo + 1);
            let bucket = &values[lo..hi];
            bucket.iter().sum::<f64>() / bucket.len() as f64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hosts() -> Value {
        json!({
            "items": [
                {"host": "gpu-1", "state": "online", "agent_version": "0.1.0",
                 "gpus": 8, "labels": {"rack": "a"}, "new_field": [1, 2]},
                {"host": "gpu-2", "state": "lost", "agent_version": null}
            ],
            "next_cursor": null
        })
    }

    const HOSTS: [Column; 4] = [
        col("HOST", "host"),
        col("STATE", "state"),
        col("AGENT", "agent_version"),
        col("RACK", "labels/rack"),
    ];

    #[test]
    fn table_shows_the_chosen_columns_and_dashes_for_missing_fields() {
        let text = list(&hosts(), Format::Table, &HOSTS);
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines,
            vec![
                vec!["HOST", "STATE", "AGENT", "RACK"],
                vec!["gpu-1", "online", "0.1.0", "a"],
                vec!["gpu-2", "lost", "-", "-"],
            ],
            "{text}"
        );
    }

    #[test]
    fn columns_start_at_the_margin_two_spaces_apart() {
        let text = table(&json!([{"a": "x", "b": "y"}, {"a": "long", "b": "z"}]), &[]);
        assert_eq!(text, "A     B\nx     y\nlong  z\n");
    }

    #[test]
    fn an_empty_list_says_none() {
        let text = list(&json!([]), Format::Table, &HOSTS);
        assert!(
            text.starts_with("HOST") && text.contains("(none)"),
            "{text}"
        );
    }

    #[test]
    fn json_and_yaml_keep_every_field() {
        let json_text = list(&hosts(), Format::Json, &HOSTS);
        let back: Value = serde_json::from_str(&json_text).expect("valid JSON");
        assert_eq!(back, hosts());
        let yaml_text = list(&hosts(), Format::Yaml, &HOSTS);
        let back: Value = serde_yaml::from_str(&yaml_text).expect("valid YAML");
        assert_eq!(back, hosts());
        assert!(yaml_text.contains("new_field"), "{yaml_text}");
    }

    #[test]
    fn without_columns_the_first_rows_scalars_are_shown() {
        let text = table(
            &json!([{"id": 7, "kind": "restart", "nested": {"a": 1}}]),
            &[],
        );
        let header: Vec<&str> = text
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        assert_eq!(header, vec!["ID", "KIND"], "{text}");
    }

    #[test]
    fn detail_flattens_nested_objects() {
        let text = one(
            &json!({"id": 3, "evidence": {"rule": "xid", "events": [1, 2]}, "note": "a\nb"}),
            Format::Table,
        );
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert!(lines.contains(&vec!["evidence.rule", "xid"]), "{text}");
        assert!(lines.contains(&vec!["evidence.events", "1,2"]), "{text}");
        assert!(lines.contains(&vec!["note", "a", "b"]), "{text}");
    }

    #[test]
    fn long_cells_are_cut() {
        let c = cell(Some(&json!("x".repeat(500))));
        assert_eq!(c.chars().count(), MAX_CELL);
        assert!(c.ends_with('…'));
    }

    #[test]
    fn sparkline_spans_lowest_to_highest() {
        assert_eq!(
            sparkline(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]),
            "▁▂▃▄▅▆▇█"
        );
        assert_eq!(sparkline(&[5.0, 5.0]), "▄▄");
        assert_eq!(sparkline(&[0.0, f64::NAN, 1.0]), "▁ █");
        assert_eq!(sparkline(&[]), "");
    }

    #[test]
    fn history_reads_points_in_either_shape() {
        let v = json!({"series": [
            {"metric": "razar_gpu_power_watts", "labels": {"gpu": "0"},
             "points": [[1, 100.0], [2, 300.0], [3, 200.0]]},
            {"metric": "m2", "points": [{"ts": 1, "value": 1.5}, {"t": 2, "avg": 2.5}]}
        ]});
        let text = history_table(&v, 40);
        assert!(text.contains("razar_gpu_power_watts{gpu=0}"), "{text}");
        assert!(text.contains("▁█▅"), "{text}");
        assert!(text.contains("2.5000"), "{text}");
        assert_eq!(downsample(&[1.0, 3.0, 5.0, 7.0], 2), vec![2.0, 6.0]);
    }
}
