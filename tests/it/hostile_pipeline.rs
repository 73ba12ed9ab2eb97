//! Issue 14, "a pipeline file written by someone else": endless and oversized files are refused
//! quickly by kind (pipeline source, template, schema, image), never read to the end.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use vlmpipe::plan::{CheckResult, load_pipeline, load_pipeline_with};
use vlmpipe::read_policy::ReadPolicy;

/// Runs `f` on a thread and fails the test if it takes longer than `secs` (a regression reads
/// `/dev/zero` forever; the test must fail, not hang).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("did not finish within {secs} s"))
}

fn check(path: &Path) -> CheckResult {
    let path = path.to_path_buf();
    within(20, move || load_pipeline(&path, &[]))
}

fn messages(result: &CheckResult) -> Vec<String> {
    result
        .diagnostics
        .iter()
        .map(|d| d.message.clone())
        .collect()
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo");
    assert!(status.success());
}

const HEAD: &str = "labels animals = [\"cat\", \"dog\"]\n";

#[test]
fn regression_14_import_of_an_endless_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    mkfifo(&dir.path().join("pipe.vp"));
    let main = dir.path().join("main.vp");
    std::fs::write(&main, format!("import \"pipe.vp\"\n{HEAD}")).unwrap();
    let result = check(&main);
    assert!(result.plan.is_none());
    assert_eq!(
        messages(&result),
        [
            "cannot read imported file `pipe.vp`: it is not a regular file (a pipeline source must be one)"
        ]
    );

    // `/dev` is outside the pipeline's folder: refused by the read policy without consent
    // (`tests/it/read_policy.rs`), and by kind with it.
    std::fs::write(&main, format!("import \"/dev/zero\"\n{HEAD}")).unwrap();
    let result = check(&main);
    assert!(result.plan.is_none(), "{:?}", messages(&result));
    assert!(
        messages(&result)
            .iter()
            .any(|m| m.contains("`/dev/zero`") && m.contains("outside the pipeline's folder")),
        "{:?}",
        messages(&result)
    );
    let allowing_dev = main.clone();
    let result = within(20, move || {
        let reads = ReadPolicy::for_pipeline(&allowing_dev, &[PathBuf::from("/dev")]);
        load_pipeline_with(&allowing_dev, &[], &reads)
    });
    assert!(result.plan.is_none(), "{:?}", messages(&result));
    assert!(
        messages(&result)
            .iter()
            .any(|m| m.contains("`/dev/zero`") && m.contains("not a regular file")),
        "{:?}",
        messages(&result)
    );
}

#[test]
fn regression_14_an_oversized_pipeline_source_is_refused_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("main.vp");
    let big = std::fs::File::create(&main).unwrap();
    big.set_len(3 << 20).unwrap();
    let result = check(&main);
    let got = messages(&result);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("cannot read pipeline `")
            && got[0]
                .ends_with("main.vp`: it is larger than the 1 MiB limit for a pipeline source"),
        "{got:?}"
    );
}

#[test]
fn regression_14_endless_templates_and_schemas_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    mkfifo(&dir.path().join("user.j2"));
    mkfifo(&dir.path().join("answer.json"));
    let main = dir.path().join("main.vp");
    std::fs::write(
        &main,
        format!(
            "{HEAD}prompt ask {{ user = file(\"user.j2\") }}\n\
             grammar answer = json_schema(\"answer.json\")\n"
        ),
    )
    .unwrap();
    let result = check(&main);
    let got = messages(&result);
    assert!(
        got.contains(
            &"cannot read template `user.j2`: it is not a regular file (a template must be one)"
                .to_owned()
        ),
        "{got:?}"
    );
    assert!(
        got.contains(
            &"cannot read json schema `answer.json`: it is not a regular file (a json schema must be one)"
                .to_owned()
        ),
        "{got:?}"
    );

    // A regular file over the limit is refused without being read in full.
    std::fs::remove_file(dir.path().join("user.j2")).unwrap();
    let big = std::fs::File::create(dir.path().join("user.j2")).unwrap();
    big.set_len(2 << 20).unwrap();
    let result = check(&main);
    let got = messages(&result);
    assert!(
        got.contains(
            &"cannot read template `user.j2`: it is larger than the 1 MiB limit for a template"
                .to_owned()
        ),
        "{got:?}"
    );
}

#[test]
fn regression_14_endless_and_oversized_images_are_error_rows() {
    use vlmpipe::stages::data::{DatasetSpec, LabelSpec, SourceSpec, ingest};
    let dir = tempfile::tempdir().unwrap();
    mkfifo(&dir.path().join("pipe.jpg"));
    let big = std::fs::File::create(dir.path().join("big.jpg")).unwrap();
    big.set_len(65 << 20).unwrap();
    std::fs::write(
        dir.path().join("ok.jpg"),
        crate::data_support::rgb_jpeg(9, 9, 1),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("list.csv"),
        "file,label\npipe.jpg,cat\nbig.jpg,dog\nok.jpg,cat\n",
    )
    .unwrap();
    let mut spec = DatasetSpec::new(SourceSpec::Csv {
        path: dir.path().join("list.csv"),
    });
    spec.image_column = "file".to_owned();
    spec.label = LabelSpec::Names {
        column: "label".to_owned(),
    };
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let report = within(30, move || {
        ingest(&spec, &out, &indicatif::ProgressBar::hidden()).map_err(|e| e.to_string())
    })
    .unwrap();
    assert_eq!(report.rows_kept, 1);
    let mut reasons: Vec<&str> = report
        .error_examples
        .iter()
        .map(|(_, reason)| reason.as_str())
        .collect();
    reasons.sort_unstable();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].starts_with("cannot read `")
            && reasons[0].ends_with("big.jpg`: it is larger than the 64 MiB limit for an image"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].starts_with("cannot read `")
            && reasons[1].ends_with("pipe.jpg`: it is not a regular file (an image must be one)"),
        "{reasons:?}"
    );
}

fn render_user(template: &str) -> Result<String, String> {
    use vlmpipe::stages::prompt::{PromptTemplates, RowContext, render_prompt};
    let prompt = PromptTemplates {
        system: None,
        user: template.to_owned(),
    };
    within(20, move || {
        let row = RowContext {
            row_id: "r1".to_owned(),
            ..RowContext::default()
        };
        render_prompt(&prompt, &[], &row, &Default::default())
            .map(|r| r.user)
            .map_err(|e| e.to_string())
    })
}

#[test]
fn regression_14_an_endless_template_loop_is_stopped_naming_the_line() {
    let err = render_user(
        "Describe the image.\n\
         {% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "prompt template `user` for row `r1` stopped at line 2: it exceeded its work budget \
         (1000000 steps); a loop or filter runs too long for a prompt"
    );
}

#[test]
fn regression_14_template_output_is_bounded() {
    let err = render_user("ok\n\n{{ 'x' * 2000000 }}").unwrap_err();
    assert_eq!(
        err,
        "prompt template `user` for row `r1` was stopped: its output exceeds the 1 MiB limit for a prompt"
    );
    // Ordinary prompts, loops over labels included, still render.
    assert_eq!(
        render_user("{% for i in range(3) %}{{ i }}{% endfor %}").unwrap(),
        "012"
    );
}

/// Terminal control sequences a hostile pipeline could carry: clear screen, set the window
/// title, carriage return (overwrite the line), a C1 CSI.
const ESCAPES: &str = "\u{1b}[2J\u{1b}]0;owned\u{7}\r\u{9b}31m";

fn assert_no_control(text: &str) {
    assert!(
        !text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'),
        "raw control characters reach the terminal: {text:?}"
    );
}

#[test]
fn regression_14_diagnostics_escape_control_characters() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join(format!("{ESCAPES}main.vp"));
    std::fs::write(
        &main,
        format!("{HEAD}labels broken = [\"cat\" \"{ESCAPES}\"] // {ESCAPES}\n"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vlmpipe"))
        .arg("check")
        .arg(&main)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_no_control(&stderr);
    // The excerpt still shows the text, escaped visibly, with the caret under the error.
    assert!(
        stderr.contains("\\u{1b}[2J\\u{1b}]0;owned\\u{7}\\u{d}\\u{9b}31m"),
        "{stderr}"
    );
}

#[test]
fn regression_14_errors_and_the_run_summary_escape_control_characters() {
    let dir = tempfile::tempdir().unwrap();
    let path = format!("{}/{ESCAPES}tokenizer.json", dir.path().display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vlmpipe"))
        .args(["bench", "grammar", "--tokenizer", &path])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tokenizer.json"), "{stderr}");
    assert_no_control(&stderr);

    use vlmpipe::exec::{RunSummary, StageReport, StageStatus};
    let summary = RunSummary {
        stages: vec![StageReport {
            name: "ask".to_owned(),
            kind: "eval".to_owned(),
            status: StageStatus::Failed,
            fingerprint: String::new(),
            seconds: 0.0,
            outputs: Vec::new(),
            reason: Some(format!("prompt template failed: `{ESCAPES}`")),
            warnings: vec![format!("row `{ESCAPES}` rejected")],
            shards: None,
            elsewhere: None,
        }],
        seconds: 0.0,
        success: false,
        dry_run: false,
    };
    let table = summary.render_table();
    assert_no_control(&table);
    assert!(table.contains("`\\u{1b}[2J"), "{table}");
}

#[test]
fn regression_14_a_hub_revision_cannot_be_a_path() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("main.vp");
    let pipeline = |revision: &str| {
        format!(
            "{HEAD}model m = hf(\"org/model\", revision: \"{revision}\")\n\
             dataset d {{ source = hf(\"org/data\", revision: \"{revision}\") label = \"label\" labels = animals }}\n\
             prompt p {{ user = \"What is it?\" }}\n\
             eval e {{ model = m data = d prompt = p labels = animals output = one_of(animals) }}\n"
        )
    };
    std::fs::write(&main, pipeline("../../../../home/secret.txt")).unwrap();
    let result = check(&main);
    assert!(result.plan.is_none());
    let expected = "`../../../../home/secret.txt` is not a hub revision: it holds `..`";
    assert_eq!(messages(&result), [expected, expected]);

    for bad in ["/etc/passwd", "main/", "a//b", "refs/.hidden", "x\\u{1b}y"] {
        std::fs::write(&main, pipeline(bad)).unwrap();
        let result = check(&main);
        assert!(result.plan.is_none(), "{bad:?} passed");
    }
    for good in [
        "main",
        "feature/new-head",
        "v1.0",
        "0123456789abcdef0123456789abcdef01234567",
    ] {
        std::fs::write(&main, pipeline(good)).unwrap();
        let result = check(&main);
        assert!(result.plan.is_some(), "{good:?}: {:?}", messages(&result));
    }
}

/// Item 5's tables: a `csv(...)`, `jsonl(...)` or `parquet(...)` file is read only when it is a
/// regular file under its kind's limit (a FIFO used to block the dataset stage forever).
#[test]
fn regression_14_endless_and_oversized_table_files_are_refused() {
    use vlmpipe::stages::data::{DatasetSpec, LabelSpec, SourceSpec, ingest};
    let dir = tempfile::tempdir().unwrap();
    for name in ["pipe.csv", "pipe.jsonl", "pipe.parquet"] {
        mkfifo(&dir.path().join(name));
    }
    let big = std::fs::File::create(dir.path().join("big.csv")).unwrap();
    big.set_len((1 << 30) + 1).unwrap();
    let big = std::fs::File::create(dir.path().join("big.parquet")).unwrap();
    big.set_len((32 << 30) + 1).unwrap();
    let cases = [
        (
            SourceSpec::Csv {
                path: dir.path().join("pipe.csv"),
            },
            "it is not a regular file (a csv or jsonl table must be one)",
        ),
        (
            SourceSpec::Jsonl {
                path: dir.path().join("pipe.jsonl"),
            },
            "it is not a regular file (a csv or jsonl table must be one)",
        ),
        (
            SourceSpec::Parquet {
                files: vec![dir.path().join("pipe.parquet")],
            },
            "it is not a regular file (a parquet file must be one)",
        ),
        (
            SourceSpec::Csv {
                path: dir.path().join("big.csv"),
            },
            "it is larger than the 1024 MiB limit for a csv or jsonl table",
        ),
        (
            SourceSpec::Parquet {
                files: vec![dir.path().join("big.parquet")],
            },
            "it is larger than the 32768 MiB limit for a parquet file",
        ),
    ];
    for (source, expected) in cases {
        let mut spec = DatasetSpec::new(source);
        spec.label = LabelSpec::Names {
            column: "label".to_owned(),
        };
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let err = within(20, move || {
            ingest(&spec, &out, &indicatif::ProgressBar::hidden())
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .unwrap_err();
        assert!(err.ends_with(expected), "{err}");
    }
}
