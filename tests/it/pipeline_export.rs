//! The `export` declaration (issue 12 item 4): a model or a fine-tune written as llama.cpp's GGUF
//! pair by a cached stage, listed in the run summary and copied beside the evals; its types and
//! format checked at check time against the lists the export code knows.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use vlmpipe::plan::{CheckResult, NodeParams, check_source, render_diagnostics};
use vlmpipe::stages::eval::{EvalRecord, Metrics, MetricsOptions, NoImages, compute_metrics};
use vlmpipe::stages::report::{
    HtmlOptions, ReportInput, StageReport, changed_listing, changed_outcomes, embedded_data,
    headline_table, render_html,
};

use crate::support::{offline_vlmpipe, repo_root};

fn vlmpipe(dir: &Path, args: &[&str]) -> Output {
    let output = offline_vlmpipe(dir)
        .args(args)
        .output()
        .expect("spawn vlmpipe");
    assert!(
        output.status.success(),
        "vlmpipe {args:?}:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `vlmpipe run` with the cache and the evals in `dir`; the summary's stage `name`.
fn run(dir: &Path, pipeline: &Path, extra: &[&str], name: &str) -> (Value, String) {
    let summary = dir.join("summary.json");
    let (pipeline, cache, evals) = (
        pipeline.to_string_lossy().into_owned(),
        dir.join("cache").to_string_lossy().into_owned(),
        dir.join("evals").to_string_lossy().into_owned(),
    );
    let summary_arg = summary.to_string_lossy().into_owned();
    let args = [
        &["run", &pipeline, "--cache-dir", &cache][..],
        &["--evals-dir", &evals],
        &["--summary-json", &summary_arg],
        extra,
    ]
    .concat();
    let output = vlmpipe(dir, &args);
    let summary: Value =
        serde_json::from_slice(&std::fs::read(&summary).expect("summary")).expect("json");
    let stage = summary["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no stage `{name}` in {summary}"))
        .clone();
    (stage, String::from_utf8_lossy(&output.stdout).into_owned())
}

fn outputs(stage: &Value) -> Vec<PathBuf> {
    stage["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .map(|p| PathBuf::from(p.as_str().expect("path")))
        .collect()
}

const TINY_EXPORT: &str = r#"
pipeline ship { seed = 1 }
model tiny = init(preset: "tiny", seed: 1)
export phone { model = tiny  format = "gguf"  quant = "q8_0"  mmproj = "f16" }
"#;

/// The stage writes the same pair as `vlmpipe export --gguf` for the same model, lists it in the
/// summary (entry and copies), copies it beside the evals, and is cached on the next run, when a
/// deleted copy is restored.
#[test]
fn an_export_stage_writes_the_gguf_pair_into_its_entry_and_beside_the_evals() {
    let dir = tempfile::tempdir().expect("temp folder");
    let pipeline = dir.path().join("ship.vp");
    std::fs::write(&pipeline, TINY_EXPORT).expect("write pipeline");
    let (stage, stdout) = run(dir.path(), &pipeline, &["--quiet"], "phone");
    assert_eq!(stage["status"], "ran", "{stage}");
    assert_eq!(stage["kind"], "export", "{stage}");
    let files = outputs(&stage);
    let evals = dir.path().join("evals");
    let copies = [
        evals.join("phone/phone-Q8_0.gguf"),
        evals.join("phone/mmproj-phone-F16.gguf"),
    ];
    for copy in &copies {
        assert!(files.contains(copy), "{copy:?} not in {files:?}");
        let name = copy.file_name().unwrap();
        let entry = files
            .iter()
            .find(|f| f.file_name() == Some(name) && f != &copy)
            .unwrap_or_else(|| panic!("no entry file {name:?} in {files:?}"));
        assert_eq!(std::fs::read(copy).unwrap(), std::fs::read(entry).unwrap());
        assert!(
            stdout.contains(&copy.display().to_string()),
            "the run's table does not list {copy:?}:\n{stdout}"
        );
    }
    assert!(stdout.contains("\nexports:\n"), "{stdout}");

    // The same files as the command-line export of the same model stage.
    let cli = dir.path().join("cli");
    let p = |p: &Path| p.to_string_lossy().into_owned();
    vlmpipe(
        dir.path(),
        &[
            "export",
            &p(&pipeline),
            "tiny",
            "--gguf",
            &p(&cli),
            "--quant",
            "q8_0",
            "--mmproj-quant",
            "f16",
            "--name",
            "phone",
            "--cache-dir",
            &p(&dir.path().join("cache")),
            "--quiet",
        ],
    );
    for copy in &copies {
        let theirs = cli.join(copy.file_name().unwrap());
        assert!(
            std::fs::read(copy).unwrap() == std::fs::read(&theirs).unwrap(),
            "{copy:?} differs from `vlmpipe export --gguf`'s {theirs:?}"
        );
    }

    std::fs::remove_file(&copies[0]).unwrap();
    let (again, _) = run(dir.path(), &pipeline, &["--quiet"], "phone");
    assert_eq!(again["status"], "cached", "{again}");
    assert_eq!(again["fingerprint"], stage["fingerprint"]);
    assert_eq!(&std::fs::read(&copies[0]).unwrap()[..4], b"GGUF");
}

/// A model with a LoRA adapter is merged in f32 before export: the stage's files equal those
/// `vlmpipe export FILE STAGE --gguf` writes (which the gguf_export tests hold equal to the
/// export of the f32 `--merged` checkpoint), and differ from the base model's.
#[test]
fn an_export_of_a_model_with_an_adapter_merges_it_first() {
    let fixtures = repo_root().join("tests/fixtures/reference");
    let dir = tempfile::tempdir().expect("temp folder");
    let pipeline = dir.path().join("ship.vp");
    let base = fixtures.join("checkpoints/tiny-nothumb");
    std::fs::write(
        &pipeline,
        format!(
            "pipeline ship {{}}\n\
             model tuned = local(\"{base}\", adapter: \"{adapter}\")\n\
             model plain = local(\"{base}\")\n\
             export t {{ model = tuned  format = \"gguf\"  quant = \"f32\" }}\n\
             export b {{ model = plain  format = \"gguf\"  quant = \"f32\" }}\n",
            base = base.display(),
            adapter = fixtures.join("lora/adapter_trained").display(),
        ),
    )
    .expect("write pipeline");
    let allow = fixtures.to_string_lossy().into_owned();
    let extra = ["--quiet", "--allow-read", &allow];
    let (tuned, _) = run(dir.path(), &pipeline, &extra, "t");
    assert_eq!(tuned["status"], "ran", "{tuned}");
    let cli = dir.path().join("cli");
    let p = |p: &Path| p.to_string_lossy().into_owned();
    vlmpipe(
        dir.path(),
        &[
            &["export", &p(&pipeline), "tuned", "--gguf", &p(&cli)][..],
            &[
                "--quant",
                "f32",
                "--name",
                "t",
                "--allow-read",
                &allow,
                "--quiet",
            ],
            &["--cache-dir", &p(&dir.path().join("cache"))],
        ]
        .concat(),
    );
    let evals = dir.path().join("evals");
    for file in ["t-F32.gguf", "mmproj-t-F32.gguf"] {
        let staged = std::fs::read(evals.join("t").join(file)).unwrap();
        assert!(
            staged == std::fs::read(cli.join(file)).unwrap(),
            "{file}: the stage's export differs from `vlmpipe export --gguf`'s"
        );
    }
    // The adapter's update is in the text model's weights.
    let merged = std::fs::read(evals.join("t/t-F32.gguf")).unwrap();
    let plain = std::fs::read(evals.join("b/b-F32.gguf")).unwrap();
    assert_eq!(merged.len(), plain.len());
    assert!(merged != plain, "the merged export equals the base model's");
}

fn check(text: &str) -> CheckResult {
    check_source(Path::new("/tmp/export_check.vp"), text, &[])
}

/// `line:col message | hint` of every diagnostic.
fn diagnostics(result: &CheckResult) -> Vec<String> {
    result
        .diagnostics
        .iter()
        .map(|d| {
            let (line, col) = d
                .primary_span()
                .map(|s| result.sources.line_col(s))
                .unwrap_or_default();
            format!(
                "{line}:{col} {} | {}",
                d.message,
                d.hint.as_deref().unwrap_or("")
            )
        })
        .collect()
}

const HEAD: &str = "pipeline p { seed = 1 }\nmodel tiny = init(preset: \"tiny\", seed: 1)\n";

#[test]
fn export_types_and_format_are_checked_with_the_known_lists() {
    let known: Vec<String> = vlmpipe::gguf::KNOWN_QUANTS
        .iter()
        .map(|q| format!("`{}`", q.name().to_ascii_lowercase()))
        .collect();
    let result = check(&format!(
        "{HEAD}export phone {{ model = tiny  format = \"gguf\"  quant = \"q8\"  mmproj = \"f18\" }}\n"
    ));
    let found = diagnostics(&result);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].starts_with("3:55 expected a GGUF type (")
            && found[0].ends_with("for `quant`, found `q8` | did you mean `q8_0`?"),
        "{found:?}"
    );
    assert!(
        found[1].starts_with("3:70 expected a GGUF type (")
            && found[1].ends_with("for `mmproj`, found `f18` | did you mean `f16`?"),
        "{found:?}"
    );
    // The list is the export code's own, so a type added there is accepted here.
    for name in &known {
        assert!(
            found[0].contains(name.as_str()),
            "{name} missing: {found:?}"
        );
    }

    let result = check(&format!(
        "{HEAD}export phone {{ model = tiny  format = \"ggfu\"  quant = \"Q8_0\" }}\n"
    ));
    assert_eq!(
        diagnostics(&result),
        ["3:39 expected `gguf` for `format`, found `ggfu` | did you mean `gguf`?"]
    );

    let result = check(&format!(
        "{HEAD}export phone {{ model = tiny  quant = \"q8_0\" }}\n"
    ));
    let found = diagnostics(&result);
    assert!(
        found.len() == 1 && found[0].contains("`format`"),
        "a missing format is an error: {found:?}"
    );
}

#[test]
fn an_export_takes_a_model_or_a_fine_tune_and_an_eval_takes_an_export() {
    let wrong = check(&format!(
        "{HEAD}prompt ask {{ user = \"which?\" }}\n\
         export a {{ model = ask  format = \"gguf\"  quant = \"f16\" }}\n\
         export b {{ model = tiny  format = \"gguf\"  quant = \"f16\" }}\n\
         export c {{ model = b  format = \"gguf\"  quant = \"f16\" }}\n"
    ));
    assert_eq!(
        diagnostics(&wrong),
        [
            "4:20 expected a model (a `model` or a `finetune`) for `model`, found prompt `ask` | ",
            "6:20 expected a model (a `model` or a `finetune`) for `model`, found export `b` | ",
        ]
    );

    let result = check(&format!(
        "{HEAD}labels l = [\"a\", \"b\"]\n\
         dataset d {{ source = synthetic(kind: \"shapes\", n: 4, seed: 1) label = \"class\" }}\n\
         prompt ask {{ user = \"which? {{{{ labels }}}}\" }}\n\
         export phone {{ model = tiny  format = \"gguf\"  quant = \"Q8_0\" }}\n\
         eval e {{ model = phone  data = d  prompt = ask  labels = l }}\n"
    ));
    let rendered = render_diagnostics(&result, false);
    let plan = result.plan.unwrap_or_else(|| panic!("{rendered}"));
    let phone = plan.find("phone").expect("export node");
    let NodeParams::Export(export) = &phone.params else {
        panic!("`phone` is not an export: {:?}", phone.params)
    };
    // The mmproj takes the text model's type unless told, as `vlmpipe export --gguf` does.
    assert_eq!(
        (export.quant.as_str(), export.mmproj.as_str()),
        ("Q8_0", "Q8_0")
    );
    assert_eq!(phone.inputs, [plan.find("tiny").unwrap().id]);
    let eval = plan.find("e").expect("eval");
    assert!(eval.inputs.contains(&phone.id), "{:?}", eval.inputs);
}

fn record(row: &str, truth: &str, answer: Option<&str>, raw: &str, latency_ms: f64) -> EvalRecord {
    EvalRecord {
        row_id: row.into(),
        image_id: format!("{row}.jpg"),
        ground_truth: truth.into(),
        raw_output: raw.into(),
        parsed_label: answer.map(str::to_owned),
        valid: answer.is_some(),
        correct: answer == Some(truth),
        latency_ms,
        batch_size: 1,
        tokens_generated: 1,
        class_probs: None,
    }
}

/// The report page of a full-precision model and its shipped export on the same rows: accuracy,
/// invalid rate, latency and size on disk side by side, and every answer that changed (fixed,
/// broken, or another wrong answer) in the changed-outcomes gallery.
#[test]
fn the_report_shows_the_full_model_and_its_export_side_by_side() {
    let labels = vec!["cat".to_owned(), "dog".to_owned()];
    let stage = |name: &str, records: Vec<EvalRecord>, bytes: u64| {
        let mut metrics =
            compute_metrics(&records, &labels, &MetricsOptions::default()).expect("metrics");
        metrics.model_bytes = Some(bytes);
        StageReport {
            name: name.into(),
            labels: labels.clone(),
            records,
            metrics,
            curves: Vec::new(),
        }
    };
    let full = stage(
        "tuned_eval",
        vec![
            record("1", "cat", Some("cat"), "cat", 900.0),
            record("2", "dog", Some("cat"), "cat", 1100.0),
            record("3", "dog", Some("dog"), "dog", 1000.0),
            record("4", "cat", Some("dog"), "dog", 1000.0),
        ],
        1_800_000_000,
    );
    let shipped = stage(
        "phone_eval",
        vec![
            record("1", "cat", Some("cat"), "cat", 300.0),
            record("2", "dog", Some("dog"), "dog", 310.0),
            record("3", "dog", Some("cat"), "cat", 320.0),
            record("4", "cat", None, "a pug", 330.0),
        ],
        478_250_000,
    );
    let input = ReportInput {
        title: "ship".into(),
        stages: vec![full, shipped],
    };
    let html = render_html(&input, &NoImages, &HtmlOptions::default()).expect("html");
    let row = |metric: &str| -> String {
        let start = html
            .find(&format!("<tr><th>{metric}</th>"))
            .unwrap_or_else(|| panic!("no `{metric}` row"));
        let end = start + html[start..].find("</tr>").expect("row end");
        html[start..end].to_owned()
    };
    assert_eq!(
        row("accuracy"),
        "<tr><th>accuracy</th><td>50.0%</td><td>50.0%</td>"
    );
    assert_eq!(
        row("invalid rate"),
        "<tr><th>invalid rate</th><td class=\"best\">0.0%</td><td>25.0%</td>"
    );
    assert_eq!(
        row("latency p50 (ms)"),
        "<tr><th>latency p50 (ms)</th><td>1000.0</td><td class=\"best\">315.0</td>"
    );
    assert_eq!(
        row("model size (MB)"),
        "<tr><th>model size (MB)</th><td>1800.0</td><td class=\"best\">478.2</td>"
    );
    for link in [
        "All changed (3)",
        "Fixed (1)",
        "Broken (1)",
        "Other answer (1)",
    ] {
        assert!(html.contains(link), "no `{link}` in the comparison");
    }
    let data = embedded_data(&html).expect("embedded JSON");
    let kinds: Vec<(&str, &str, &str, &str)> = data["changes"][0]["rows"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap(),
                r[1].as_str().unwrap(),
                r[4].as_str().unwrap(),
                r[5].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("fixed", "2", "cat", "dog"),
            ("broken", "3", "dog", "cat"),
            ("changed", "4", "dog", "a pug"),
        ]
    );
    // The terminal's table and listing say the same.
    let metrics: Vec<(&str, &Metrics)> = input
        .stages
        .iter()
        .map(|s| (s.name.as_str(), &s.metrics))
        .collect();
    let table = headline_table(&metrics);
    assert_eq!(
        table,
        "\
stage       accuracy  invalid  macro F1  p50 ms  model MB  n
----------  --------  -------  --------  ------  --------  -
tuned_eval     50.0%     0.0%     0.500    1000    1800.0  4
phone_eval     50.0%    25.0%     0.583     315     478.2  4
"
    );
    let changes = changed_outcomes(&input.stages[0].records, &input.stages[1].records);
    let listing = changed_listing("tuned_eval", "phone_eval", &changes, 40);
    assert!(
        listing.starts_with(
            "tuned_eval → phone_eval: 3 answers changed (1 fixed, 1 broken, 1 other answer)\n"
        ) && listing.contains("other   4    cat    dog     a pug"),
        "{listing}"
    );
}

/// An eval takes an export as its model and loads the exported pair itself: the run evaluates
/// the model and its export on the same rows, records the size of what each loaded (the
/// checkpoint's safetensors, the two GGUF files), and the report and `vlmpipe report` put them
/// side by side.
#[test]
fn an_eval_of_an_export_loads_the_exported_files() {
    let dir = tempfile::tempdir().expect("temp folder");
    let pipeline = dir.path().join("ship.vp");
    std::fs::write(
        &pipeline,
        r#"
pipeline ship { seed = 1 }
labels shapes = ["red circle", "blue circle"]
dataset pics {
  source = synthetic(kind: "shapes", n: 8, seed: 2, size: 32, colors: "red,blue", shapes: "circle")
  label = "class"
  labels = shapes
}
prompt ask { user = "Which? {% for l in labels %}{{ l }} {% endfor %}" }
grammar one = one_of(shapes)
model tiny = init(preset: "tiny", seed: 1)
export phone { model = tiny  format = "gguf"  quant = "f32" }
eval full { model = tiny  data = pics  prompt = ask  labels = shapes  output = one }
eval shipped { model = phone  data = pics  prompt = ask  labels = shapes  output = one }
report side { compare = [full, shipped] }
"#,
    )
    .expect("write pipeline");
    let (stage, stdout) = run(dir.path(), &pipeline, &["--quiet"], "shipped");
    assert_eq!(stage["status"], "ran", "{stage}");
    let evals = dir.path().join("evals");
    let metrics = |name: &str| -> Value {
        let path = evals.join(name).join("metrics.json");
        serde_json::from_slice(&std::fs::read(&path).expect("metrics.json")).expect("json")
    };
    let (full, shipped) = (metrics("full"), metrics("shipped"));
    let size = |path: PathBuf| std::fs::metadata(&path).expect("file").len();
    let pair =
        size(evals.join("phone/phone-F32.gguf")) + size(evals.join("phone/mmproj-phone-F32.gguf"));
    assert_eq!(shipped["model_bytes"], pair, "{shipped}");
    let weights = full["model_bytes"].as_u64().expect("model_bytes");
    assert!(weights > 0 && weights < pair, "{weights} vs {pair}");
    // An F32 export computes what the f32 checkpoint computes: the same answers.
    assert_eq!(full["n"], 8);
    assert_eq!(shipped["accuracy"], full["accuracy"]);
    assert_eq!(shipped["confusion_matrix"], full["confusion_matrix"]);
    let report = std::fs::read_to_string(evals.join("side/report.html")).expect("report.html");
    assert!(
        report.contains("<tr><th>model size (MB)</th>"),
        "no size row"
    );
    assert!(stdout.contains("model MB"), "{stdout}");

    let p = |p: &Path| p.to_string_lossy().into_owned();
    let output = vlmpipe(
        dir.path(),
        &[
            "report",
            &p(&pipeline),
            "side",
            "--cache-dir",
            &p(&dir.path().join("cache")),
        ],
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("full → shipped: 0 answers changed (0 fixed, 0 broken, 0 other answer)"),
        "{text}"
    );
}

/// The issue's own example, `quant = "q4_k_m"`: the text file takes llama-quantize's Q4_K_M
/// mixture and, with no `mmproj` given, the mmproj is F16; vlmpipe's runtime loads the pair and
/// answers. An mmproj cannot be a k-quant mixture: refused at check time, at its position, with
/// the list of the types an mmproj takes.
#[test]
fn a_q4_k_m_export_pairs_with_an_f16_mmproj_and_runs() {
    let result = check(&format!(
        "{HEAD}export phone {{ model = tiny  format = \"gguf\"  quant = \"q4_k_m\"  mmproj = \"Q4_K_M\" }}\n"
    ));
    let found = diagnostics(&result);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with(
            "3:74 expected a GGUF type (`f32`, `f16`, `bf16` or `q8_0`) for `mmproj`, found \
             `Q4_K_M` | an mmproj takes no k-quant mixture"
        ),
        "{found:?}"
    );

    let dir = tempfile::tempdir().expect("temp folder");
    let pipeline = dir.path().join("ship.vp");
    std::fs::write(
        &pipeline,
        TINY_EXPORT.replace("quant = \"q8_0\"  mmproj = \"f16\"", "quant = \"q4_k_m\""),
    )
    .expect("write pipeline");
    let (stage, _) = run(dir.path(), &pipeline, &["--quiet"], "phone");
    assert_eq!(stage["status"], "ran", "{stage}");
    let copies = dir.path().join("evals/phone");
    let text = copies.join("phone-Q4_K_M.gguf");
    assert!(copies.join("mmproj-phone-F16.gguf").is_file());
    let file = vlmpipe::gguf::read::GgufIn::open(&text).expect("read the export");
    assert!(
        file.tensor_infos()
            .values()
            .any(|(t, _)| *t != candle_core::quantized::GgmlDType::F32),
        "no quantized tensor"
    );
    let runner = vlmpipe::runner::ModelRunner::load(&copies, &Default::default())
        .expect("vlmpipe loads the pair");
    let conversation = vlmpipe::model::chat::Conversation::image_question(None, "cat or dog?");
    let image = image::RgbImage::from_pixel(64, 48, image::Rgb([200, 120, 40]));
    let prompt = runner
        .prepare(&conversation, std::slice::from_ref(&image))
        .expect("prompt");
    let options = vlmpipe::runner::DecodeOptions {
        max_new_tokens: 2,
        sampling: Default::default(),
    };
    let answers = runner
        .generate(&[&prompt], &options, None)
        .expect("generate");
    assert_eq!(answers.len(), 1);
}
