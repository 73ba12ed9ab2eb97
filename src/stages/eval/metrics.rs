//! Classification metrics of an eval stage, serialised as `metrics.json`.
//!
//! Conventions (each one a choice a reader of the numbers needs to know):
//! - Invalid answers (not parsed into the label set) count as wrong: they are in the accuracy
//!   denominator and lower the recall of their true class, and the confusion matrix has a last
//!   `invalid` column for them. They are nobody's prediction, so they do not change any precision.
//! - A class never predicted has undefined precision; it is reported as 0 with
//!   `precision_undefined: true`, like scikit-learn's `zero_division=0`. Likewise a class absent
//!   from the ground truth has recall 0 with `recall_undefined: true`.
//! - `macro_avg` averages over the classes present in the ground truth or the valid predictions
//!   (scikit-learn's default when no `labels=` is given), so a 49-class label set evaluated on 50
//!   samples is not dragged down by classes that never appear. `weighted_avg` weights by support.
//! - Empty input is an error ([`EvalError::Empty`]): every rate would be 0/0.
//! - Latency percentiles interpolate linearly between order statistics (NumPy's default).
//! - Probability metrics use the rows that carry `class_probs`, each normalised to sum to 1
//!   (`n_scored` says how many). Ties in probability break by label order, so top-1 agrees with the
//!   arg-max that calibration uses.

use serde::{Deserialize, Serialize};

use super::{EvalError, EvalRecord};

/// Name of the confusion matrix's extra column for answers outside the label set.
pub const INVALID_COLUMN: &str = "invalid";

/// Probabilities are clipped to this before taking logs (scikit-learn's historical epsilon), so a
/// confidently wrong sample costs about 34.5 nats instead of infinity.
const LOG_LOSS_EPS: f64 = 1e-15;

/// Choices that shape the metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsOptions {
    /// The class whose recall is reported on its own (e.g. the rare class of imbalanced data); it
    /// is also the positive class of the binary ROC AUC. Without it, AUC uses the second label.
    pub recall_of: Option<String>,
    /// Number of equal-width confidence bins of the calibration table.
    pub calibration_bins: usize,
    /// The `k`s of top-k accuracy; those not below the number of classes are skipped (trivially 1).
    pub top_k: Vec<usize>,
    /// Wall time of the whole evaluation; `samples_per_s` uses it when given, otherwise the sum of
    /// per-sample latencies (sequential throughput).
    pub wall_time_s: Option<f64>,
}

impl Default for MetricsOptions {
    fn default() -> Self {
        Self {
            recall_of: None,
            calibration_bins: 10,
            top_k: vec![1, 2, 3, 5],
            wall_time_s: None,
        }
    }
}

/// Everything `metrics.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Correct answers over all samples (invalid ones count as wrong).
    pub accuracy: f64,
    /// Answers outside the label set over all samples.
    pub invalid_rate: f64,
    /// One entry per label, in label-set order.
    pub per_class: Vec<ClassMetrics>,
    /// Rows: ground truth; columns: predicted label, then `invalid`.
    pub confusion_matrix: ConfusionMatrix,
    /// Unweighted mean over the classes present (see the module doc).
    pub macro_avg: Averages,
    /// Support-weighted mean over all classes.
    pub weighted_avg: Averages,
    /// Number of samples.
    pub n: usize,
    /// Samples whose answer parsed into the label set.
    pub n_valid: usize,
    /// Samples answered correctly.
    pub n_correct: usize,
    /// Median per-sample latency.
    pub latency_ms_p50: f64,
    /// 95th-percentile per-sample latency.
    pub latency_ms_p95: f64,
    /// Throughput; `None` when no time was measured.
    pub samples_per_s: Option<f64>,
    /// Mean generated tokens per sample.
    pub tokens_generated_mean: f64,
    /// Recall of the chosen class, when one was chosen.
    pub recall_of: Option<ClassRecall>,
    /// Rows with class probabilities (0 without label scoring; the fields below are then `None`).
    pub n_scored: usize,
    /// Mean negative log-likelihood of the true class, in nats.
    pub log_loss: Option<f64>,
    /// Area under the ROC curve; two classes only, and both must occur in the ground truth.
    pub roc_auc: Option<f64>,
    /// Reliability of the arg-max confidence.
    pub calibration: Option<Calibration>,
    /// Share of samples whose true class is among the `k` most probable.
    pub top_k: Option<Vec<TopK>>,
    /// Where the model ran (`cpu`, `cuda:0`), set by the eval stage: latencies mean little
    /// without it. Absent from files written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Bytes on disk of the model files the eval loaded (checkpoint weights and adapter, or a
    /// GGUF pair), set by the eval stage, so a report can put a shipped artifact's size beside
    /// its accuracy. Absent from files written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_bytes: Option<u64>,
}

/// Precision, recall and F1 of one class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// The class.
    pub label: String,
    /// Correct predictions of this class over all (valid) predictions of it.
    pub precision: f64,
    /// Correct predictions of this class over its support.
    pub recall: f64,
    /// Harmonic mean of precision and recall (0 when both are 0).
    pub f1: f64,
    /// Samples whose ground truth is this class.
    pub support: usize,
    /// Samples predicted as this class.
    pub predicted: usize,
    /// The class was never predicted, so `precision` is 0 by convention.
    pub precision_undefined: bool,
    /// The class never occurs in the ground truth, so `recall` is 0 by convention.
    pub recall_undefined: bool,
}

/// An average of per-class numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Averages {
    /// Mean precision.
    pub precision: f64,
    /// Mean recall.
    pub recall: f64,
    /// Mean F1.
    pub f1: f64,
}

/// Counts of (ground truth, prediction) pairs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    /// Row names: the label set.
    pub labels: Vec<String>,
    /// Column names: the label set, then [`INVALID_COLUMN`].
    pub columns: Vec<String>,
    /// `counts[truth][predicted]`, with the last column counting invalid answers.
    pub counts: Vec<Vec<usize>>,
}

/// The recall of the class chosen in [`MetricsOptions::recall_of`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassRecall {
    /// The class.
    pub label: String,
    /// Its recall (0 when it has no support).
    pub recall: f64,
    /// Its support.
    pub support: usize,
}

/// The calibration table and its expected calibration error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Equal-width bins over [0, 1], all of them, empty ones included.
    pub bins: Vec<CalibrationBin>,
    /// Expected calibration error: count-weighted mean of |accuracy − mean confidence|.
    pub ece: f64,
}

/// One calibration bin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationBin {
    /// Lower edge (inclusive).
    pub lower: f64,
    /// Upper edge (exclusive, except 1.0 for the last bin).
    pub upper: f64,
    /// Samples whose arg-max confidence falls in the bin.
    pub count: usize,
    /// Mean arg-max confidence of those samples (`None` when empty).
    pub mean_confidence: Option<f64>,
    /// Share of them whose arg-max class is the truth (`None` when empty).
    pub accuracy: Option<f64>,
}

/// Top-k accuracy for one `k`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopK {
    /// How many of the most probable classes count.
    pub k: usize,
    /// Share of scored samples whose truth is among them.
    pub accuracy: f64,
}

/// Computes the metrics of `records` over the label set `labels`.
///
/// Records are checked first: the ground truth must be a label, a valid record's parsed label must
/// be a label, `correct` must equal `valid && parsed_label == ground_truth`, and probabilities must
/// have one finite non-negative value per label with a positive sum.
pub fn compute_metrics(
    records: &[EvalRecord],
    labels: &[String],
    options: &MetricsOptions,
) -> Result<Metrics, EvalError> {
    check_labels(labels)?;
    if records.is_empty() {
        return Err(EvalError::Empty);
    }
    let index_of = |label: &str| labels.iter().position(|l| l == label);
    let n_labels = labels.len();
    let invalid_col = n_labels;
    let mut counts = vec![vec![0usize; n_labels + 1]; n_labels];
    // Outcomes as (truth index, predicted column) pairs, after validation.
    let mut outcomes = Vec::with_capacity(records.len());
    for record in records {
        let truth =
            index_of(&record.ground_truth).ok_or_else(|| EvalError::UnknownGroundTruth {
                row_id: record.row_id.clone(),
                label: record.ground_truth.clone(),
                labels: labels.join(", "),
            })?;
        let column = if record.valid {
            record
                .parsed_label
                .as_deref()
                .and_then(index_of)
                .ok_or_else(|| EvalError::InvalidParsedLabel {
                    row_id: record.row_id.clone(),
                    parsed: record.parsed_label.clone(),
                })?
        } else {
            invalid_col
        };
        if record.correct != (column == truth) {
            return Err(EvalError::InconsistentCorrect {
                row_id: record.row_id.clone(),
                correct: record.correct,
            });
        }
        counts[truth][column] += 1;
        outcomes.push((truth, column));
    }

    let n = records.len();
    let n_valid = outcomes.iter().filter(|(_, c)| *c != invalid_col).count();
    let n_correct = outcomes.iter().filter(|(t, c)| t == c).count();
    let per_class = per_class_metrics(labels, &counts);
    let (macro_avg, weighted_avg) = averages(&per_class, n);

    let recall_of = match &options.recall_of {
        Some(label) => {
            let class = per_class
                .iter()
                .find(|c| &c.label == label)
                .ok_or_else(|| EvalError::UnknownRecallClass {
                    label: label.clone(),
                    labels: labels.join(", "),
                })?;
            Some(ClassRecall {
                label: label.clone(),
                recall: class.recall,
                support: class.support,
            })
        }
        None => None,
    };

    let mut latencies: Vec<f64> = records.iter().map(|r| r.latency_ms).collect();
    latencies.sort_by(f64::total_cmp);
    let total_latency_s: f64 = latencies.iter().sum::<f64>() / 1000.0;
    let elapsed_s = options.wall_time_s.unwrap_or(total_latency_s);
    let samples_per_s = (elapsed_s > 0.0 && elapsed_s.is_finite()).then(|| n as f64 / elapsed_s);
    let tokens_generated_mean = records
        .iter()
        .map(|r| f64::from(r.tokens_generated))
        .sum::<f64>()
        / n as f64;

    let positive = match &options.recall_of {
        Some(label) => index_of(label),
        None => (n_labels == 2).then_some(1),
    };
    let scored = scored_rows(records, labels, &outcomes)?;
    let probability = probability_metrics(&scored, n_labels, positive, options);

    Ok(Metrics {
        accuracy: n_correct as f64 / n as f64,
        invalid_rate: (n - n_valid) as f64 / n as f64,
        per_class,
        confusion_matrix: ConfusionMatrix {
            labels: labels.to_vec(),
            columns: labels
                .iter()
                .cloned()
                .chain([INVALID_COLUMN.to_string()])
                .collect(),
            counts,
        },
        macro_avg,
        weighted_avg,
        n,
        n_valid,
        n_correct,
        latency_ms_p50: percentile(&latencies, 0.50),
        latency_ms_p95: percentile(&latencies, 0.95),
        samples_per_s,
        tokens_generated_mean,
        recall_of,
        n_scored: scored.len(),
        log_loss: probability.as_ref().map(|p| p.log_loss),
        roc_auc: probability.as_ref().and_then(|p| p.roc_auc),
        calibration: probability.as_ref().map(|p| p.calibration.clone()),
        top_k: probability.map(|p| p.top_k),
        device: None,
        model_bytes: None,
    })
}

fn check_labels(labels: &[String]) -> Result<(), EvalError> {
    if labels.is_empty() {
        return Err(EvalError::LabelSet {
            reason: "it is empty".to_string(),
        });
    }
    for (i, label) in labels.iter().enumerate() {
        if labels[..i].contains(label) {
            return Err(EvalError::LabelSet {
                reason: format!("`{label}` appears twice"),
            });
        }
    }
    Ok(())
}

fn per_class_metrics(labels: &[String], counts: &[Vec<usize>]) -> Vec<ClassMetrics> {
    labels
        .iter()
        .enumerate()
        .map(|(c, label)| {
            let tp = counts[c][c];
            let support: usize = counts[c].iter().sum();
            let predicted: usize = counts.iter().map(|row| row[c]).sum();
            let precision = ratio(tp, predicted);
            let recall = ratio(tp, support);
            ClassMetrics {
                label: label.clone(),
                precision,
                recall,
                f1: f1(precision, recall),
                support,
                predicted,
                precision_undefined: predicted == 0,
                recall_undefined: support == 0,
            }
        })
        .collect()
}

fn averages(per_class: &[ClassMetrics], n: usize) -> (Averages, Averages) {
    let present: Vec<&ClassMetrics> = per_class
        .iter()
        .filter(|c| c.support > 0 || c.predicted > 0)
        .collect();
    let mean = |get: fn(&ClassMetrics) -> f64| {
        if present.is_empty() {
            0.0
        } else {
            present.iter().map(|c| get(c)).sum::<f64>() / present.len() as f64
        }
    };
    let weighted = |get: fn(&ClassMetrics) -> f64| {
        per_class
            .iter()
            .map(|c| get(c) * c.support as f64)
            .sum::<f64>()
            / n as f64
    };
    (
        Averages {
            precision: mean(|c| c.precision),
            recall: mean(|c| c.recall),
            f1: mean(|c| c.f1),
        },
        Averages {
            precision: weighted(|c| c.precision),
            recall: weighted(|c| c.recall),
            f1: weighted(|c| c.f1),
        },
    )
}

fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

fn f1(precision: f64, recall: f64) -> f64 {
    if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    }
}

/// Linear interpolation between order statistics of an ascending slice (NumPy's default).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        len => {
            let pos = q * (len - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = pos.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        }
    }
}

/// A row with label-scoring probabilities, normalised.
struct ScoredRow {
    truth: usize,
    probs: Vec<f64>,
}

fn scored_rows(
    records: &[EvalRecord],
    labels: &[String],
    outcomes: &[(usize, usize)],
) -> Result<Vec<ScoredRow>, EvalError> {
    let mut rows = Vec::new();
    for (record, &(truth, _)) in records.iter().zip(outcomes) {
        let Some(probs) = &record.class_probs else {
            continue;
        };
        let bad = |reason: String| EvalError::BadProbabilities {
            row_id: record.row_id.clone(),
            reason,
        };
        if probs.len() != labels.len() {
            return Err(bad(format!(
                "have {} values for {} labels",
                probs.len(),
                labels.len()
            )));
        }
        if let Some(v) = probs.iter().find(|v| !v.is_finite() || **v < 0.0) {
            return Err(bad(format!("contain {v}, not a probability")));
        }
        let sum: f64 = probs.iter().map(|&v| f64::from(v)).sum();
        if sum <= 0.0 {
            return Err(bad("sum to 0".to_string()));
        }
        rows.push(ScoredRow {
            truth,
            probs: probs.iter().map(|&v| f64::from(v) / sum).collect(),
        });
    }
    Ok(rows)
}

struct ProbabilityMetrics {
    log_loss: f64,
    roc_auc: Option<f64>,
    calibration: Calibration,
    top_k: Vec<TopK>,
}

fn probability_metrics(
    rows: &[ScoredRow],
    n_labels: usize,
    positive: Option<usize>,
    options: &MetricsOptions,
) -> Option<ProbabilityMetrics> {
    if rows.is_empty() {
        return None;
    }
    let n = rows.len() as f64;
    let log_loss = rows
        .iter()
        .map(|r| -r.probs[r.truth].clamp(LOG_LOSS_EPS, 1.0).ln())
        .sum::<f64>()
        / n;
    // Rank of the truth in a stable descending sort: strictly larger values, plus equal values
    // of earlier labels.
    let ranks: Vec<usize> = rows
        .iter()
        .map(|r| {
            let p = r.probs[r.truth];
            r.probs
                .iter()
                .enumerate()
                .filter(|&(j, &q)| q > p || (q == p && j < r.truth))
                .count()
        })
        .collect();
    let mut ks: Vec<usize> = options
        .top_k
        .iter()
        .copied()
        .filter(|&k| k == 1 || (k > 1 && k < n_labels))
        .collect();
    ks.sort_unstable();
    ks.dedup();
    let top_k = ks
        .into_iter()
        .map(|k| TopK {
            k,
            accuracy: ranks.iter().filter(|&&rank| rank < k).count() as f64 / n,
        })
        .collect();
    let roc_auc = match positive {
        Some(pos) if n_labels == 2 => roc_auc(rows, pos),
        _ => None,
    };
    Some(ProbabilityMetrics {
        log_loss,
        roc_auc,
        calibration: calibration(rows, &ranks, options.calibration_bins.max(1)),
        top_k,
    })
}

/// Mann–Whitney form of the AUC with average ranks for ties.
fn roc_auc(rows: &[ScoredRow], positive: usize) -> Option<f64> {
    let mut scored: Vec<(f64, bool)> = rows
        .iter()
        .map(|r| (r.probs[positive], r.truth == positive))
        .collect();
    let n_pos = scored.iter().filter(|(_, p)| *p).count();
    let n_neg = scored.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < scored.len() {
        let mut j = i;
        while j + 1 < scored.len() && scored[j + 1].0 == scored[i].0 {
            j += 1;
        }
        // Ranks are 1-based; tied scores i..=j share their mean rank.
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += mean_rank * scored[i..=j].iter().filter(|(_, p)| *p).count() as f64;
        i = j + 1;
    }
    let (n_pos, n_neg) = (n_pos as f64, n_neg as f64);
    Some((rank_sum_pos - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg))
}

fn calibration(rows: &[ScoredRow], ranks: &[usize], n_bins: usize) -> Calibration {
    let mut count = vec![0usize; n_bins];
    let mut conf_sum = vec![0.0f64; n_bins];
    let mut hits = vec![0usize; n_bins];
    for (row, &rank) in rows.iter().zip(ranks) {
        let confidence = row.probs.iter().copied().fold(0.0, f64::max);
        let bin = ((confidence * n_bins as f64) as usize).min(n_bins - 1);
        count[bin] += 1;
        conf_sum[bin] += confidence;
        hits[bin] += usize::from(rank == 0);
    }
    let n = rows.len() as f64;
    let mut ece = 0.0;
    let bins = (0..n_bins)
        .map(|b| {
            let (mean_confidence, accuracy) = if count[b] == 0 {
                (None, None)
            } else {
                let conf = conf_sum[b] / count[b] as f64;
                let acc = hits[b] as f64 / count[b] as f64;
                ece += count[b] as f64 / n * (acc - conf).abs();
                (Some(conf), Some(acc))
            };
            CalibrationBin {
                lower: b as f64 / n_bins as f64,
                upper: (b + 1) as f64 / n_bins as f64,
                count: count[b],
                mean_confidence,
                accuracy,
            }
        })
        .collect();
    Calibration { bins, ece }
}
