//! Metrics against hand-computed cases (numbers worked out by hand in the comments).

use vlmpipe::stages::eval::{
    EvalError, EvalRecord, Metrics, MetricsOptions, TopK, compute_metrics,
};

/// A record; `answer` is the model's text, valid when it is one of `labels`.
fn rec(i: usize, truth: &str, answer: &str, labels: &[String], latency_ms: f64) -> EvalRecord {
    let valid = labels.iter().any(|l| l == answer);
    EvalRecord {
        row_id: format!("r{i}"),
        image_id: format!("i{i}"),
        ground_truth: truth.to_string(),
        raw_output: answer.to_string(),
        parsed_label: valid.then(|| answer.to_string()),
        valid,
        correct: valid && answer == truth,
        latency_ms,
        batch_size: 1,
        tokens_generated: 2,
        class_probs: None,
    }
}

fn labels(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-9, "{a} != {b}");
}

fn metrics(pairs: &[(&str, &str)], labels: &[String], options: &MetricsOptions) -> Metrics {
    let records: Vec<EvalRecord> = pairs
        .iter()
        .enumerate()
        .map(|(i, (t, a))| rec(i, t, a, labels, 10.0 * (i + 1) as f64))
        .collect();
    compute_metrics(&records, labels, options).expect("metrics")
}

#[test]
fn three_classes_with_an_invalid_answer_and_a_class_never_predicted() {
    let labels = labels(&["cat", "dog", "bird"]);
    let options = MetricsOptions {
        recall_of: Some("bird".to_string()),
        ..MetricsOptions::default()
    };
    let m = metrics(
        &[
            ("cat", "cat"),
            ("cat", "cat"),
            ("cat", "dog"),
            ("cat", "pug"),
            ("dog", "dog"),
            ("dog", "dog"),
            ("dog", "cat"),
            ("bird", "cat"),
        ],
        &labels,
        &options,
    );
    assert_eq!((m.n, m.n_valid, m.n_correct), (8, 7, 4));
    close(m.accuracy, 0.5);
    close(m.invalid_rate, 0.125);
    assert_eq!(
        m.confusion_matrix.counts,
        vec![vec![2, 1, 0, 1], vec![1, 2, 0, 0], vec![1, 0, 0, 0]]
    );
    assert_eq!(
        m.confusion_matrix.columns,
        ["cat", "dog", "bird", "invalid"]
    );
    // cat: 2 of 4 predictions right, 2 of 4 found (the invalid answer counts as a miss).
    let cat = &m.per_class[0];
    close(cat.precision, 0.5);
    close(cat.recall, 0.5);
    close(cat.f1, 0.5);
    assert_eq!((cat.support, cat.predicted), (4, 4));
    let dog = &m.per_class[1];
    close(dog.precision, 2.0 / 3.0);
    close(dog.recall, 2.0 / 3.0);
    close(dog.f1, 2.0 / 3.0);
    // bird is never predicted: precision 0 by convention, flagged.
    let bird = &m.per_class[2];
    assert!(bird.precision_undefined && !bird.recall_undefined);
    close(bird.precision, 0.0);
    close(bird.recall, 0.0);
    close(bird.f1, 0.0);
    close(m.macro_avg.precision, (0.5 + 2.0 / 3.0) / 3.0);
    close(m.macro_avg.recall, (0.5 + 2.0 / 3.0) / 3.0);
    close(m.macro_avg.f1, (0.5 + 2.0 / 3.0) / 3.0);
    // weighted: (0.5·4 + 2/3·3 + 0·1) / 8 = 0.5
    close(m.weighted_avg.precision, 0.5);
    close(m.weighted_avg.recall, 0.5);
    close(m.weighted_avg.f1, 0.5);
    let recall = m.recall_of.as_ref().expect("recall_of");
    assert_eq!((recall.label.as_str(), recall.support), ("bird", 1));
    close(recall.recall, 0.0);
    // latencies 10..=80: p50 at position 3.5 → 45; p95 at 6.65 → 76.5; 8 samples in 0.36 s.
    close(m.latency_ms_p50, 45.0);
    close(m.latency_ms_p95, 76.5);
    close(m.samples_per_s.expect("throughput"), 8.0 / 0.36);
    close(m.tokens_generated_mean, 2.0);
    assert_eq!(m.n_scored, 0);
    assert!(m.log_loss.is_none() && m.roc_auc.is_none() && m.calibration.is_none());
}

#[test]
fn all_invalid_answers() {
    let labels = labels(&["cat", "dog"]);
    let m = metrics(
        &[("cat", "pug"), ("dog", ""), ("dog", "a dog")],
        &labels,
        &MetricsOptions::default(),
    );
    close(m.accuracy, 0.0);
    close(m.invalid_rate, 1.0);
    assert_eq!(m.n_valid, 0);
    assert_eq!(
        m.confusion_matrix.counts,
        vec![vec![0, 0, 1], vec![0, 0, 2]]
    );
    for class in &m.per_class {
        assert!(class.precision_undefined, "{}", class.label);
        close(class.precision, 0.0);
        close(class.recall, 0.0);
    }
    close(m.macro_avg.f1, 0.0);
    close(m.weighted_avg.recall, 0.0);
}

#[test]
fn a_single_class() {
    let labels = labels(&["cat"]);
    let m = metrics(
        &[("cat", "cat"), ("cat", "dog")],
        &labels,
        &MetricsOptions::default(),
    );
    close(m.accuracy, 0.5);
    close(m.invalid_rate, 0.5);
    // one prediction, right: precision 1; one of two found: recall 0.5; F1 = 2·1·0.5/1.5.
    close(m.per_class[0].precision, 1.0);
    close(m.per_class[0].recall, 0.5);
    close(m.per_class[0].f1, 2.0 / 3.0);
    close(m.macro_avg.f1, 2.0 / 3.0);
    assert_eq!(m.confusion_matrix.counts, vec![vec![1, 1]]);
    // Latencies 10 and 20 ms: sequential throughput 2 / 0.03 s; a measured wall time wins.
    close(m.samples_per_s.expect("throughput"), 2.0 / 0.03);
    let records: Vec<EvalRecord> = [("cat", "cat"), ("cat", "dog")]
        .iter()
        .enumerate()
        .map(|(i, (t, a))| rec(i, t, a, &labels, 10.0))
        .collect();
    let timed = MetricsOptions {
        wall_time_s: Some(4.0),
        ..MetricsOptions::default()
    };
    let m = compute_metrics(&records, &labels, &timed).expect("metrics");
    close(m.samples_per_s.expect("throughput"), 0.5);
}

#[test]
fn a_label_absent_from_the_data_does_not_drag_the_macro_average() {
    let labels = labels(&["cat", "dog", "bird"]);
    let m = metrics(
        &[("cat", "cat"), ("dog", "dog")],
        &labels,
        &MetricsOptions::default(),
    );
    assert!(m.per_class[2].precision_undefined && m.per_class[2].recall_undefined);
    close(m.macro_avg.f1, 1.0);
    close(m.weighted_avg.f1, 1.0);
}

#[test]
fn empty_input_is_an_error() {
    let err = compute_metrics(&[], &labels(&["cat"]), &MetricsOptions::default())
        .expect_err("empty input");
    assert!(matches!(err, EvalError::Empty));
}

#[test]
fn binary_probabilities_give_log_loss_auc_calibration_and_top_k() {
    let labels = labels(&["cat", "dog"]);
    let probs = [
        ("cat", [0.75, 0.25]),
        ("cat", [0.375, 0.625]),
        ("dog", [0.25, 0.75]),
        ("dog", [0.5, 0.5]),
    ];
    let records: Vec<EvalRecord> = probs
        .iter()
        .enumerate()
        .map(|(i, (truth, p))| EvalRecord {
            class_probs: Some(p.to_vec()),
            ..rec(i, truth, truth, &labels, 5.0)
        })
        .collect();
    let m = compute_metrics(&records, &labels, &MetricsOptions::default()).expect("metrics");
    assert_eq!(m.n_scored, 4);
    // −(ln .75 + ln .375 + ln .75 + ln .5) / 4
    let expected = -(0.75f64.ln() + 0.375f64.ln() + 0.75f64.ln() + 0.5f64.ln()) / 4.0;
    close(m.log_loss.expect("log loss"), expected);
    // p(dog) of dogs {0.75, 0.5} vs cats {0.25, 0.625}: 3 of 4 pairs ordered right.
    close(m.roc_auc.expect("auc"), 0.75);
    // arg-max (ties → first label): right, wrong, right, wrong. k=2 is trivial with 2 classes.
    assert_eq!(
        m.top_k,
        Some(vec![TopK {
            k: 1,
            accuracy: 0.5
        }])
    );
    let cal = m.calibration.expect("calibration");
    assert_eq!(cal.bins.len(), 10);
    let counts: Vec<usize> = cal.bins.iter().map(|b| b.count).collect();
    assert_eq!(counts, [0, 0, 0, 0, 0, 1, 1, 2, 0, 0]);
    assert_eq!(cal.bins[7].accuracy, Some(1.0));
    assert_eq!(cal.bins[7].mean_confidence, Some(0.75));
    assert_eq!(cal.bins[6].accuracy, Some(0.0));
    assert_eq!(cal.bins[0].mean_confidence, None);
    // ECE = 2/4·|1−.75| + 1/4·|0−.625| + 1/4·|0−.5|
    close(cal.ece, 0.40625);
}

#[test]
fn auc_positive_class_follows_recall_of_and_needs_both_classes() {
    let labels = labels(&["cat", "dog"]);
    let make = |truths: &[&str], p_cat: &[f32]| -> Vec<EvalRecord> {
        truths
            .iter()
            .zip(p_cat)
            .enumerate()
            .map(|(i, (t, p))| EvalRecord {
                class_probs: Some(vec![*p, 1.0 - p]),
                ..rec(i, t, t, &labels, 1.0)
            })
            .collect()
    };
    let records = make(&["cat", "dog", "dog"], &[0.5, 0.75, 0.25]);
    let options = MetricsOptions {
        recall_of: Some("cat".to_string()),
        ..MetricsOptions::default()
    };
    // p(cat) of the cat 0.5 beats one of the two dogs.
    let m = compute_metrics(&records, &labels, &options).expect("metrics");
    close(m.roc_auc.expect("auc"), 0.5);
    let only_cats = make(&["cat", "cat"], &[0.5, 0.75]);
    let m = compute_metrics(&only_cats, &labels, &options).expect("metrics");
    assert_eq!(m.roc_auc, None);
    assert!(m.log_loss.is_some());
}

#[test]
fn multiclass_top_k_breaks_ties_by_label_order() {
    let labels = labels(&["a", "b", "c", "d"]);
    let records = vec![
        EvalRecord {
            class_probs: Some(vec![0.1, 0.2, 0.3, 0.4]),
            ..rec(0, "a", "a", &labels, 1.0)
        },
        EvalRecord {
            class_probs: Some(vec![0.25; 4]),
            ..rec(1, "b", "b", &labels, 1.0)
        },
    ];
    let m = compute_metrics(&records, &labels, &MetricsOptions::default()).expect("metrics");
    // ranks: a is 4th (3), b is 2nd behind the tied a (1); k=5 is skipped with 4 classes.
    let top_k: Vec<(usize, f64)> = m
        .top_k
        .expect("top-k")
        .iter()
        .map(|t| (t.k, t.accuracy))
        .collect();
    assert_eq!(top_k, [(1, 0.0), (2, 0.5), (3, 0.5)]);
    assert_eq!(m.roc_auc, None);
}

#[test]
fn records_that_contradict_themselves_are_errors() {
    let labels = labels(&["cat", "dog"]);
    let good = rec(0, "cat", "cat", &labels, 1.0);
    let check = |record: EvalRecord, options: &MetricsOptions| {
        compute_metrics(&[record], &labels, options).expect_err("must fail")
    };
    let defaults = MetricsOptions::default();
    let err = check(
        EvalRecord {
            ground_truth: "fox".into(),
            correct: false,
            ..good.clone()
        },
        &defaults,
    );
    assert!(matches!(err, EvalError::UnknownGroundTruth { .. }), "{err}");
    let err = check(
        EvalRecord {
            correct: false,
            ..good.clone()
        },
        &defaults,
    );
    assert!(
        matches!(err, EvalError::InconsistentCorrect { .. }),
        "{err}"
    );
    let err = check(
        EvalRecord {
            parsed_label: Some("fox".into()),
            ..good.clone()
        },
        &defaults,
    );
    assert!(matches!(err, EvalError::InvalidParsedLabel { .. }), "{err}");
    let err = check(
        EvalRecord {
            class_probs: Some(vec![1.0]),
            ..good.clone()
        },
        &defaults,
    );
    assert!(matches!(err, EvalError::BadProbabilities { .. }), "{err}");
    let err = check(
        EvalRecord {
            class_probs: Some(vec![f32::NAN, 1.0]),
            ..good.clone()
        },
        &defaults,
    );
    assert!(matches!(err, EvalError::BadProbabilities { .. }), "{err}");
    let unknown = MetricsOptions {
        recall_of: Some("fox".into()),
        ..MetricsOptions::default()
    };
    let err = check(good.clone(), &unknown);
    assert!(matches!(err, EvalError::UnknownRecallClass { .. }), "{err}");
    let err = compute_metrics(&[good], &labels_dup(), &defaults).expect_err("duplicate labels");
    assert!(matches!(err, EvalError::LabelSet { .. }), "{err}");
}

fn labels_dup() -> Vec<String> {
    labels(&["cat", "cat"])
}

#[test]
fn metrics_json_has_the_documented_top_level_keys_and_round_trips() {
    let labels = labels(&["cat", "dog"]);
    let m = metrics(
        &[("cat", "cat"), ("dog", "cat")],
        &labels,
        &MetricsOptions::default(),
    );
    let json = serde_json::to_value(&m).expect("serialise");
    for key in [
        "accuracy",
        "invalid_rate",
        "per_class",
        "confusion_matrix",
        "macro_avg",
        "weighted_avg",
        "n",
        "n_valid",
        "latency_ms_p50",
        "latency_ms_p95",
        "samples_per_s",
        "recall_of",
        "log_loss",
        "roc_auc",
        "calibration",
        "top_k",
    ] {
        assert!(json.get(key).is_some(), "missing key `{key}`");
    }
    assert_eq!(json["per_class"][1]["precision_undefined"], true);
    let back: Metrics = serde_json::from_value(json).expect("deserialise");
    assert_eq!(back, m);
}
