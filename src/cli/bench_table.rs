//! `vlmpipe bench table REPORT.json…`: the markdown table of `BENCHMARKS.md` from the JSON
//! reports `bench model --python … --json-out REPORT.json` writes, one per run.
//!
//! Each cell is the range of the per-run medians over the reports (one value when every run
//! rounds alike), so the dated tables in `BENCHMARKS.md` are regenerated, not typed by hand.
//! The header is [`TABLE_HEADER`]; `tests/it/benchmarks_doc.rs` checks that `BENCHMARKS.md`'s
//! tables start with it.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::Value;

/// The header of every model table in `BENCHMARKS.md`.
pub(crate) const TABLE_HEADER: &str =
    "| step | vlmpipe | transformers 5.x | ours / theirs |\n|---|---|---|---|";

/// How a row's values are printed.
#[derive(Clone, Copy)]
enum Unit {
    /// Milliseconds printed as seconds, two decimals.
    Seconds,
    /// Milliseconds, no decimals.
    Millis,
    /// MiB printed as GiB, one decimal.
    Gib,
}

impl Unit {
    fn format(self, value: f64) -> (String, &'static str) {
        match self {
            Unit::Seconds => (format!("{:.2}", value / 1000.0), " s"),
            Unit::Millis => (format!("{value:.0}"), " ms"),
            Unit::Gib => (format!("{:.1}", value / 1024.0), " GiB"),
        }
    }
}

/// `lo–hi` of the formatted values, or one value when they all print the same.
fn range(values: &[f64], format: impl Fn(f64) -> (String, &'static str)) -> String {
    if values.is_empty() {
        return "-".to_owned();
    }
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let ((lo, unit), (hi, _)) = (format(lo), format(hi));
    if lo == hi {
        format!("{lo}{unit}")
    } else {
        format!("{lo}–{hi}{unit}")
    }
}

/// A step's median in one side of a report (`vlmpipe` or `transformers`).
fn median(side: &Value, key: &str) -> Option<f64> {
    side[key]["median"].as_f64().or_else(|| side[key].as_f64())
}

/// The markdown table (header and rows, newline-terminated) of `reports`.
pub(crate) fn markdown_table(reports: &[Value]) -> String {
    let tokens = reports
        .first()
        .and_then(|r| r["decode_steps"].as_u64())
        .map_or_else(|| "…".to_owned(), |steps| (steps + 1).to_string());
    let classify = format!("classify (preprocess … {tokens} tokens)");
    let rows: [(&str, &str, Unit); 6] = [
        ("vision tower + projector", "vision_ms", Unit::Seconds),
        (
            "prompt forward (all logits)",
            "prompt_forward_ms",
            Unit::Seconds,
        ),
        ("LM prefill, last position", "lm_prefill_ms", Unit::Seconds),
        ("decode, per token", "decode_ms_per_token", Unit::Millis),
        (&classify, "classify_ms", Unit::Seconds),
        ("peak memory", "peak_rss_mib", Unit::Gib),
    ];
    let mut out = format!("{TABLE_HEADER}\n");
    for (label, key, unit) in rows {
        let ours: Vec<f64> = reports
            .iter()
            .filter_map(|r| median(&r["vlmpipe"], key))
            .collect();
        let theirs: Vec<f64> = reports
            .iter()
            .filter_map(|r| median(&r["transformers"], key))
            .collect();
        let ratios: Vec<f64> = reports
            .iter()
            .filter_map(|r| Some(median(&r["vlmpipe"], key)? / median(&r["transformers"], key)?))
            .collect();
        out.push_str(&format!(
            "| {label} | {} | {} | {} |\n",
            range(&ours, |v| unit.format(v)),
            range(&theirs, |v| unit.format(v)),
            range(&ratios, |v| (format!("{v:.2}"), "")),
        ));
    }
    out
}

/// Prints the table of the reports at `paths`.
pub(crate) fn print_table(paths: &[PathBuf]) -> anyhow::Result<()> {
    let reports = paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the report `{}`", path.display()))?;
            serde_json::from_str(&text).with_context(|| {
                format!(
                    "`{}` is not a `bench model --json-out` report",
                    path.display()
                )
            })
        })
        .collect::<anyhow::Result<Vec<Value>>>()?;
    print!("{}", markdown_table(&reports));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(vision: f64, decode: f64, their_vision: f64, peak: f64) -> Value {
        json!({
            "decode_steps": 3,
            "vlmpipe": {
                "vision_ms": {"median": vision, "min": 1.0},
                "decode_ms_per_token": {"median": decode},
                "peak_rss_mib": peak,
            },
            "transformers": {
                "vision_ms": {"median": their_vision},
                "decode_ms_per_token": {"median": 93.0},
                "peak_rss_mib": 3379.2,
            },
        })
    }

    #[test]
    fn rows_hold_the_range_of_the_run_medians() {
        // Worked by hand: vision 920/1310 and 940/1410 ms, decode 45/93 and 48/93 ms.
        let table = markdown_table(&[
            report(920.0, 45.0, 1310.0, 2764.8),
            report(940.0, 48.0, 1410.0, 2764.8),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[..2].join("\n"), TABLE_HEADER);
        assert_eq!(
            lines[2],
            "| vision tower + projector | 0.92–0.94 s | 1.31–1.41 s | 0.67–0.70 |"
        );
        assert_eq!(lines[3], "| prompt forward (all logits) | - | - | - |");
        assert_eq!(
            lines[5],
            "| decode, per token | 45–48 ms | 93 ms | 0.48–0.52 |"
        );
        assert_eq!(lines[6], "| classify (preprocess … 4 tokens) | - | - | - |");
        assert_eq!(lines[7], "| peak memory | 2.7 GiB | 3.3 GiB | 0.82 |");
        assert_eq!(lines.len(), 8);
    }
}
