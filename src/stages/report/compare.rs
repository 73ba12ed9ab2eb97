//! Comparing eval stages: metrics side by side and the samples whose outcome changed.

use std::collections::HashMap;

use serde::Serialize;

use crate::stages::eval::{EvalRecord, Metrics};

/// How a sample's outcome changed from one stage to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// Wrong (or invalid) before, correct after.
    Fixed,
    /// Correct before, wrong (or invalid) after.
    Broken,
    /// Wrong (or invalid) before and after, with another answer: what a quantized export does to
    /// an answer shows here even where it costs no accuracy.
    Changed,
}

/// One sample whose answer differs between two stages.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutcomeChange {
    /// Fixed or broken.
    pub kind: ChangeKind,
    /// The shared row id.
    pub row_id: String,
    /// Image of the row (from the later stage's record).
    pub image_id: String,
    /// The true label.
    pub ground_truth: String,
    /// What the earlier stage answered (parsed label, else raw output).
    pub before: String,
    /// What the later stage answered.
    pub after: String,
}

/// Samples present in both stages (matched by `row_id`) whose answer changed, in the order of
/// `after`: correctness changed (fixed, broken), or another wrong answer (changed). Rows
/// evaluated by only one stage are not comparable and are skipped.
pub fn changed_outcomes(before: &[EvalRecord], after: &[EvalRecord]) -> Vec<OutcomeChange> {
    let earlier: HashMap<&str, &EvalRecord> =
        before.iter().map(|r| (r.row_id.as_str(), r)).collect();
    after
        .iter()
        .filter_map(|now| {
            let then = earlier.get(now.row_id.as_str())?;
            let kind = match (then.correct, now.correct) {
                (false, true) => ChangeKind::Fixed,
                (true, false) => ChangeKind::Broken,
                (false, false) if shown_answer(then) != shown_answer(now) => ChangeKind::Changed,
                _ => return None,
            };
            Some(OutcomeChange {
                kind,
                row_id: now.row_id.clone(),
                image_id: now.image_id.clone(),
                ground_truth: now.ground_truth.clone(),
                before: shown_answer(then).to_string(),
                after: shown_answer(now).to_string(),
            })
        })
        .collect()
}

/// The answer as a person should see it: the parsed label when valid, else the raw output.
pub fn shown_answer(record: &EvalRecord) -> &str {
    match (&record.parsed_label, record.valid) {
        (Some(label), true) => label,
        _ => &record.raw_output,
    }
}

/// One row of the side-by-side table: a metric name and its value per stage (`None` when a stage
/// lacks it, e.g. log loss without label scoring).
#[derive(Clone, Debug, PartialEq)]
pub struct ComparisonRow {
    /// Display name.
    pub metric: String,
    /// Formatted values, one per stage.
    pub values: Vec<Option<String>>,
    /// Index of the best stage when a best one is meaningful and unique.
    pub best: Option<usize>,
}

/// Which way is better for a metric.
#[derive(Clone, Copy)]
enum Better {
    Higher,
    Lower,
    Neither,
}

/// The side-by-side rows for `stages` (in the given order).
pub fn comparison_rows(stages: &[&Metrics]) -> Vec<ComparisonRow> {
    type Getter = fn(&Metrics) -> Option<f64>;
    let specs: [(&'static str, Getter, Better, bool); 12] = [
        ("accuracy", |m| Some(m.accuracy), Better::Higher, true),
        (
            "invalid rate",
            |m| Some(m.invalid_rate),
            Better::Lower,
            true,
        ),
        ("macro F1", |m| Some(m.macro_avg.f1), Better::Higher, false),
        (
            "weighted F1",
            |m| Some(m.weighted_avg.f1),
            Better::Higher,
            false,
        ),
        (
            "recall of",
            |m| m.recall_of.as_ref().map(|r| r.recall),
            Better::Higher,
            true,
        ),
        ("log loss", |m| m.log_loss, Better::Lower, false),
        ("ROC AUC", |m| m.roc_auc, Better::Higher, false),
        (
            "ECE",
            |m| m.calibration.as_ref().map(|c| c.ece),
            Better::Lower,
            false,
        ),
        (
            "latency p50 (ms)",
            |m| Some(m.latency_ms_p50),
            Better::Lower,
            false,
        ),
        ("samples/s", |m| m.samples_per_s, Better::Higher, false),
        (
            "model size (MB)",
            |m| m.model_bytes.map(|b| b as f64 / 1e6),
            Better::Lower,
            false,
        ),
        ("n", |m| Some(m.n as f64), Better::Neither, false),
    ];
    specs
        .iter()
        .filter_map(|&(metric, get, better, percent)| {
            let raw: Vec<Option<f64>> = stages.iter().map(|m| get(m)).collect();
            if raw.iter().all(Option::is_none) {
                return None;
            }
            let values = raw
                .iter()
                .map(|v| {
                    v.map(|v| match (percent, metric) {
                        (true, _) => format_percent(v),
                        (false, "n") => format!("{v:.0}"),
                        (false, m)
                            if m.starts_with("latency")
                                || m == "samples/s"
                                || m.starts_with("model size") =>
                        {
                            format!("{v:.1}")
                        }
                        _ => format!("{v:.3}"),
                    })
                })
                .collect();
            // Name the chosen class (all stages of a report share the option in practice).
            let metric = match stages.iter().find_map(|m| m.recall_of.as_ref()) {
                Some(r) if metric == "recall of" => format!("recall of {}", r.label),
                _ => metric.to_string(),
            };
            Some(ComparisonRow {
                metric,
                values,
                best: best_index(&raw, better),
            })
        })
        .collect()
}

/// `0.9712` → `97.1%`.
pub fn format_percent(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

fn best_index(values: &[Option<f64>], better: Better) -> Option<usize> {
    if values.len() < 2 {
        return None;
    }
    let present: Vec<(usize, f64)> = values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| (i, v)))
        .collect();
    let pick = match better {
        Better::Higher => present.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1)),
        Better::Lower => present.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)),
        Better::Neither => None,
    }?;
    // A tie has no winner worth highlighting.
    let ties = present.iter().filter(|(_, v)| *v == pick.1).count();
    (ties == 1).then_some(pick.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(row: &str, correct: bool, answer: &str) -> EvalRecord {
        EvalRecord {
            row_id: row.into(),
            image_id: format!("{row}.jpg"),
            ground_truth: "cat".into(),
            raw_output: answer.into(),
            parsed_label: (answer != "pug").then(|| answer.to_string()),
            valid: answer != "pug",
            correct,
            latency_ms: 1.0,
            batch_size: 1,
            tokens_generated: 1,
            class_probs: None,
        }
    }

    #[test]
    fn fixed_and_broken_are_matched_by_row_id() {
        let before = [
            rec("a", false, "dog"),
            rec("b", true, "cat"),
            rec("c", true, "cat"),
            rec("d", false, "dog"),
            rec("e", false, "dog"),
            rec("only-before", false, "dog"),
        ];
        let after = [
            rec("c", true, "cat"),
            rec("b", false, "pug"),
            rec("d", false, "pug"),
            rec("e", false, "dog"),
            rec("a", true, "cat"),
            rec("only-after", true, "cat"),
        ];
        let changes = changed_outcomes(&before, &after);
        let summary: Vec<(ChangeKind, &str, &str, &str)> = changes
            .iter()
            .map(|c| {
                (
                    c.kind,
                    c.row_id.as_str(),
                    c.before.as_str(),
                    c.after.as_str(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (ChangeKind::Broken, "b", "cat", "pug"),
                (ChangeKind::Changed, "d", "dog", "pug"),
                (ChangeKind::Fixed, "a", "dog", "cat"),
            ]
        );
    }

    #[test]
    fn side_by_side_rows_name_the_chosen_class_and_skip_absent_metrics() {
        use crate::stages::eval::{MetricsOptions, compute_metrics};
        let labels = vec!["cat".to_string(), "dog".to_string()];
        let options = MetricsOptions {
            recall_of: Some("cat".to_string()),
            ..MetricsOptions::default()
        };
        let a = compute_metrics(&[rec("a", true, "cat")], &labels, &options).expect("metrics");
        let b = compute_metrics(&[rec("a", false, "pug")], &labels, &options).expect("metrics");
        let rows = comparison_rows(&[&a, &b]);
        let names: Vec<&str> = rows.iter().map(|r| r.metric.as_str()).collect();
        assert_eq!(
            names,
            [
                "accuracy",
                "invalid rate",
                "macro F1",
                "weighted F1",
                "recall of cat",
                "latency p50 (ms)",
                "samples/s",
                "n"
            ]
        );
        assert_eq!(rows[0].values, [Some("100.0%".into()), Some("0.0%".into())]);
        assert_eq!(rows[0].best, Some(0));
        assert_eq!(rows[1].best, Some(0), "lower invalid rate wins");
    }

    /// A full-precision model beside its shipped export: the size of what each eval loaded, in
    /// MB, the smaller one best.
    #[test]
    fn side_by_side_rows_show_the_model_size_on_disk() {
        use crate::stages::eval::{MetricsOptions, compute_metrics};
        let labels = vec!["cat".to_string(), "dog".to_string()];
        let options = MetricsOptions::default();
        let mut full = compute_metrics(&[rec("a", true, "cat")], &labels, &options).unwrap();
        let mut shipped = full.clone();
        full.model_bytes = Some(1_800_000_000);
        shipped.model_bytes = Some(478_250_000);
        let rows = comparison_rows(&[&full, &shipped]);
        let size = rows
            .iter()
            .find(|r| r.metric == "model size (MB)")
            .expect("a size row");
        assert_eq!(size.values, [Some("1800.0".into()), Some("478.2".into())]);
        assert_eq!(size.best, Some(1));
    }

    #[test]
    fn best_value_is_unique_and_respects_direction() {
        assert_eq!(best_index(&[Some(0.5), Some(0.9)], Better::Higher), Some(1));
        assert_eq!(best_index(&[Some(0.5), Some(0.9)], Better::Lower), Some(0));
        assert_eq!(best_index(&[Some(0.5), Some(0.5)], Better::Higher), None);
        assert_eq!(best_index(&[None, Some(0.5)], Better::Higher), Some(1));
        assert_eq!(best_index(&[Some(1.0)], Better::Higher), None);
    }
}
