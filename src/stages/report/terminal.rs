//! Plain-text renderings for the terminal: `vlmpipe report`'s headline table, the answers that
//! changed between two compared evals, and `vlmpipe show STAGE --misclassified`'s listing.
//!
//! No colours: output is often piped or pasted into issues. Text from data is made control-free.

use std::fmt::Write;

use super::compare::{ChangeKind, OutcomeChange, format_percent, shown_answer};
use super::escape::terminal_safe;
use crate::stages::eval::{EvalRecord, Metrics};

/// The headline table: one row per stage with accuracy, invalid rate, macro F1, per-sample
/// latency (p50), the size of the model files it loaded (`-` when unknown) and n.
pub fn headline_table(stages: &[(&str, &Metrics)]) -> String {
    let header = [
        "stage", "accuracy", "invalid", "macro F1", "p50 ms", "model MB", "n",
    ];
    let rows: Vec<[String; 7]> = stages
        .iter()
        .map(|(name, m)| {
            [
                terminal_safe(name),
                format_percent(m.accuracy),
                format_percent(m.invalid_rate),
                format!("{:.3}", m.macro_avg.f1),
                format!("{:.0}", m.latency_ms_p50),
                m.model_bytes
                    .map_or_else(|| "-".to_owned(), |b| format!("{:.1}", b as f64 / 1e6)),
                m.n.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            let pad = w - cell.chars().count();
            // The stage name reads left-aligned; numbers align on the right.
            if i == 0 {
                let _ = write!(out, "{cell}{}", " ".repeat(pad));
            } else {
                let _ = write!(out, "  {}{cell}", " ".repeat(pad));
            }
        }
        out.push('\n');
    };
    line(&mut out, &header.map(str::to_string));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(&mut out, &rule);
    for row in &rows {
        line(&mut out, row);
    }
    out
}

/// The answers that changed from stage `from` to stage `to` (see
/// [`super::compare::changed_outcomes`]): a count line, then one line per sample with its row id,
/// truth, and both answers (cut at `max_answer_chars`).
pub fn changed_listing(
    from: &str,
    to: &str,
    changes: &[OutcomeChange],
    max_answer_chars: usize,
) -> String {
    let count = |kind| changes.iter().filter(|c| c.kind == kind).count();
    let mut out = format!(
        "{} → {}: {} answers changed ({} fixed, {} broken, {} other answer)\n",
        terminal_safe(from),
        terminal_safe(to),
        changes.len(),
        count(ChangeKind::Fixed),
        count(ChangeKind::Broken),
        count(ChangeKind::Changed),
    );
    if changes.is_empty() {
        return out;
    }
    let rows: Vec<[String; 5]> = changes
        .iter()
        .map(|c| {
            let kind = match c.kind {
                ChangeKind::Fixed => "fixed",
                ChangeKind::Broken => "broken",
                ChangeKind::Changed => "other",
            };
            [
                kind.to_owned(),
                terminal_safe(&c.row_id),
                terminal_safe(&c.ground_truth),
                truncate(&terminal_safe(&c.before), max_answer_chars),
                truncate(&terminal_safe(&c.after), max_answer_chars),
            ]
        })
        .collect();
    let header = ["", "row", "truth", "before", "now"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let _ = write!(line, "{cell}{}", " ".repeat(w - cell.chars().count()));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Lists the samples answered wrongly (invalid answers included), one per line:
/// row id, ground truth, then the prediction or, for invalid answers, the raw output in quotes.
/// Raw outputs longer than `max_answer_chars` are cut with an ellipsis.
pub fn misclassified_listing(records: &[EvalRecord], max_answer_chars: usize) -> String {
    let wrong: Vec<&EvalRecord> = records.iter().filter(|r| !r.correct).collect();
    if wrong.is_empty() {
        return format!("no misclassified samples (of {})\n", records.len());
    }
    let rows: Vec<[String; 3]> = wrong
        .iter()
        .map(|r| {
            let answer = terminal_safe(shown_answer(r));
            let answer = truncate(&answer, max_answer_chars);
            let shown = if r.valid {
                answer
            } else {
                format!("invalid: \"{answer}\"")
            };
            [
                terminal_safe(&r.row_id),
                terminal_safe(&r.ground_truth),
                shown,
            ]
        })
        .collect();
    let header = ["row", "truth", "prediction"];
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row).take(2) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = format!(
        "{} misclassified of {} ({} invalid)\n",
        wrong.len(),
        records.len(),
        wrong.iter().filter(|r| !r.valid).count()
    );
    let mut line = |cells: [&str; 3]| {
        let _ = writeln!(
            out,
            "{:w0$}  {:w1$}  {}",
            cells[0],
            cells[1],
            cells[2],
            w0 = widths[0],
            w1 = widths[1]
        );
    };
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2]]);
    }
    out
}

fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_string()
    } else {
        let cut: String = text.chars().take(max_chars.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::eval::{MetricsOptions, compute_metrics};

    fn rec(row: &str, truth: &str, raw: &str, parsed: Option<&str>) -> EvalRecord {
        EvalRecord {
            row_id: row.into(),
            image_id: row.into(),
            ground_truth: truth.into(),
            raw_output: raw.into(),
            parsed_label: parsed.map(str::to_string),
            valid: parsed.is_some(),
            correct: parsed == Some(truth),
            latency_ms: 1.0,
            batch_size: 1,
            tokens_generated: 1,
            class_probs: None,
        }
    }

    #[test]
    fn headline_table_aligns_columns() {
        let labels = vec!["cat".to_string(), "dog".to_string()];
        let records = [
            rec("1", "cat", "cat", Some("cat")),
            rec("2", "dog", "pug", None),
            rec("3", "dog", "dog", Some("dog")),
            rec("4", "cat", "dog", Some("dog")),
        ];
        let m = compute_metrics(&records, &labels, &MetricsOptions::default()).expect("metrics");
        let mut shipped = m.clone();
        shipped.model_bytes = Some(478_250_000);
        let table = headline_table(&[("base", &m), ("finetuned-long-name", &shipped)]);
        let expected = "\
stage                accuracy  invalid  macro F1  p50 ms  model MB  n
-------------------  --------  -------  --------  ------  --------  -
base                    50.0%    25.0%     0.583       1         -  4
finetuned-long-name     50.0%    25.0%     0.583       1     478.2  4
";
        assert_eq!(table, expected);
    }

    #[test]
    fn changed_answers_are_listed_with_both_answers() {
        let before = [
            rec("1", "cat", "cat", Some("cat")),
            rec("2", "dog", "cat", Some("cat")),
            rec("3", "dog", "cat", Some("cat")),
            rec("4", "cat", "cat", Some("cat")),
        ];
        let after = [
            rec("1", "cat", "dog", Some("dog")),
            rec("2", "dog", "dog", Some("dog")),
            rec("3", "dog", "a pug", None),
            rec("4", "cat", "cat", Some("cat")),
        ];
        let changes = super::super::compare::changed_outcomes(&before, &after);
        let expected = "\
tuned → phone: 3 answers changed (1 fixed, 1 broken, 1 other answer)
        row  truth  before  now
broken  1    cat    cat     dog
fixed   2    dog    cat     dog
other   3    dog    cat     a pug
";
        assert_eq!(changed_listing("tuned", "phone", &changes, 20), expected);
        assert_eq!(
            changed_listing("a", "b", &[], 20),
            "a → b: 0 answers changed (0 fixed, 0 broken, 0 other answer)\n"
        );
    }

    #[test]
    fn listing_shows_wrong_and_invalid_answers_on_one_line_each() {
        let records = [
            rec("1", "cat", "cat", Some("cat")),
            rec("22", "dog", "a pug\nmaybe \u{1b}[31m", None),
            rec("3", "cat", "dog", Some("dog")),
        ];
        let listing = misclassified_listing(&records, 12);
        let expected = "\
2 misclassified of 3 (1 invalid)
row  truth  prediction
22   dog    invalid: \"a pug\\nmayb…\"
3    cat    dog
";
        assert_eq!(listing, expected);
        assert_eq!(
            misclassified_listing(&records[..1], 10),
            "no misclassified samples (of 1)\n"
        );
    }
}
