//! Issue 14, item 4: a pipeline file written by someone else reads nothing outside its own
//! folder (and the Hub cache) without the user's consent, `--allow-read PATH`.
//!
//! Every case lays out a temp project beside a temp "private" folder (standing in for `/etc`
//! or a home folder) and checks, with the real binary, that each way a pipeline names a path
//! is refused by default, naming the declaration's file:line:column, where the path resolves
//! to and the flag; that the private text never reaches the output; and that the flag allows it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;

use crate::data_support::{read_text_table, rgb_jpeg};
use vlmpipe::stages::data::{DatasetSpec, ERRORS_FILE, LabelSpec, ROWS_FILE, SourceSpec};
use vlmpipe::stages::data::{ingest, read_rows};

const BIN: &str = env!("CARGO_BIN_EXE_vlmpipe");

/// The first line of every private text file: it must never be echoed without consent.
const SECRET: &str = "root:x:0:0:SECRET-LINE";

/// A project folder and, beside it, a private folder the project's pipeline must not read.
struct Layout {
    _root: tempfile::TempDir,
    project: PathBuf,
    private: PathBuf,
}

impl Layout {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let project = root.path().join("project");
        let private = root.path().join("private");
        for dir in [
            project.join("photos/cat"),
            project.join("photos/dog"),
            private.join("photos/cat"),
            private.join("model"),
            private.join("adapter"),
        ] {
            std::fs::create_dir_all(dir).unwrap();
        }
        for name in ["passwd", "shadow.txt", "schema.json"] {
            std::fs::write(private.join(name), format!("{SECRET}\nmore\n")).unwrap();
        }
        std::fs::write(
            private.join("shared.vp"),
            "labels more = [\"cat\", \"dog\"]\n",
        )
        .unwrap();
        std::fs::write(private.join("photos/cat/p.jpg"), rgb_jpeg(8, 8, 7)).unwrap();
        std::fs::write(private.join("secret.jpg"), rgb_jpeg(12, 12, 200)).unwrap();
        std::fs::write(private.join("list.csv"), "image,label\nsecret.jpg,cat\n").unwrap();
        std::fs::write(project.join("photos/cat/a.jpg"), rgb_jpeg(8, 8, 30)).unwrap();
        std::fs::write(project.join("photos/dog/b.jpg"), rgb_jpeg(8, 8, 90)).unwrap();
        let private = std::fs::canonicalize(&private).unwrap();
        let project = std::fs::canonicalize(&project).unwrap();
        Self {
            _root: root,
            project,
            private,
        }
    }

    /// Runs `vlmpipe ARGS` in the project folder.
    fn vlmpipe(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .current_dir(&self.project)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", self.project.join("hf"))
            .env("NO_COLOR", "1")
            .env_remove("VLMPIPE_CACHE")
            .output()
            .unwrap()
    }

    /// `vlmpipe check main.vp` on `text` (with `allow` as `--allow-read`): (success, all output).
    fn check(&self, text: &str, allow: &[&str]) -> (bool, String) {
        std::fs::write(self.project.join("main.vp"), text).unwrap();
        let mut args = vec!["check", "main.vp"];
        for path in allow {
            args.extend(["--allow-read", path]);
        }
        let out = self.vlmpipe(&args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

const HEAD: &str = "labels animals = [\"cat\", \"dog\"]\nprompt ask { user = \"Cat or dog?\" }\n";

#[test]
fn regression_14_every_path_a_pipeline_names_is_refused_outside_its_folder() {
    let l = Layout::new();
    let p = l.private.display().to_string();
    std::os::unix::fs::symlink(l.private.join("shadow.txt"), l.project.join("linked.j2")).unwrap();
    // (declaration on line 3, column of its path, where the path resolves to)
    let cases: Vec<(String, usize, PathBuf)> = vec![
        (format!("import \"{p}/passwd\""), 8, l.private.join("passwd")),
        ("import \"../private/passwd\"".to_owned(), 8, l.private.join("passwd")),
        (
            format!("prompt other {{ user = file(\"{p}/shadow.txt\") }}"),
            28,
            l.private.join("shadow.txt"),
        ),
        (
            "prompt other { user = file(\"linked.j2\") }".to_owned(),
            28,
            l.private.join("shadow.txt"),
        ),
        (
            format!("grammar g = json_schema(\"{p}/schema.json\")"),
            25,
            l.private.join("schema.json"),
        ),
        (
            format!("dataset d {{ source = folder(\"{p}/photos\")  labels = animals }}"),
            29,
            l.private.join("photos"),
        ),
        (
            "dataset d { source = csv(\"../private/list.csv\")  label = \"label\"  labels = animals }"
                .to_owned(),
            26,
            l.private.join("list.csv"),
        ),
        (
            format!("model m = local(\"{p}/model\")"),
            17,
            l.private.join("model"),
        ),
        (
            format!("model m = hf(\"LiquidAI/LFM2-VL-450M\", adapter: \"{p}/adapter\")"),
            48,
            l.private.join("adapter"),
        ),
    ];
    for (decl, column, resolved) in cases {
        let text = format!("{HEAD}{decl}\n");
        let (ok, out) = l.check(&text, &[]);
        assert!(!ok, "{decl}: accepted\n{out}");
        assert!(
            out.contains(&format!("main.vp:3:{column}")),
            "{decl}: no position\n{out}"
        );
        assert!(
            out.contains(&format!("resolves to `{}`", resolved.display())),
            "{decl}: no resolved path\n{out}"
        );
        assert!(
            out.contains(&format!("--allow-read {}", resolved.display())),
            "{decl}: no flag\n{out}"
        );
        assert!(!out.contains("SECRET"), "{decl}: echoed the file\n{out}");
        // With consent the same declaration is no longer refused (it may still be wrong).
        let (_, out) = l.check(&text, &["../private"]);
        assert!(
            !out.contains("outside the pipeline's folder"),
            "{decl}: refused with --allow-read\n{out}"
        );
    }
}

#[test]
fn regression_14_allow_read_lets_a_pipeline_import_from_a_shared_folder() {
    let l = Layout::new();
    let text = "import \"../private/shared.vp\"\n\
                dataset d { source = folder(\"photos\")  labels = more }\n";
    let (ok, out) = l.check(text, &[]);
    assert!(!ok && out.contains("--allow-read"), "{out}");
    let (ok, out) = l.check(text, &["../private"]);
    assert!(ok, "{out}");
    // A file of the folder, or a folder above it, is consent too.
    let (ok, out) = l.check(text, &["../private/shared.vp"]);
    assert!(ok, "{out}");
    let (ok, out) = l.check(text, &[l.private.parent().unwrap().to_str().unwrap()]);
    assert!(ok, "{out}");
}

fn error_rows(out: &Path) -> Vec<(String, String)> {
    read_text_table(&out.join(ERRORS_FILE))
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect()
}

/// The ids of the rows with an image (a refused one stays in the table, without an image).
fn kept_ids(out: &Path) -> Vec<String> {
    read_rows(&out.join(ROWS_FILE))
        .unwrap()
        .rows
        .into_iter()
        .filter(|r| r.image_error.is_none())
        .map(|r| r.row_id)
        .collect()
}

#[test]
fn regression_14_table_rows_naming_files_outside_are_error_rows() {
    let l = Layout::new();
    let p = l.private.display();
    std::fs::write(
        l.project.join("list.csv"),
        format!(
            "image,label\nphotos/cat/a.jpg,cat\n{p}/secret.jpg,dog\n../private/secret.jpg,cat\n"
        ),
    )
    .unwrap();
    let mut spec = DatasetSpec::new(SourceSpec::Csv {
        path: l.project.join("list.csv"),
    });
    spec.label = LabelSpec::Names {
        column: "label".to_owned(),
    };
    let out = l.project.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let report = ingest(&spec, &out, &indicatif::ProgressBar::hidden()).unwrap();
    assert_eq!(kept_ids(&out), ["list:0"]);
    let errors = error_rows(&out);
    assert_eq!(report.errors, 2, "{errors:?}");
    let secret = l.private.join("secret.jpg");
    for (_, reason) in &errors {
        assert!(
            reason.contains(&format!("resolves to `{}`", secret.display()))
                && reason.contains(&format!("--allow-read {}", secret.display())),
            "{reason}"
        );
    }
}

#[test]
fn regression_14_links_under_a_folder_source_stay_inside_it() {
    use std::os::unix::fs::symlink;
    let l = Layout::new();
    let photos = l.project.join("photos");
    symlink(l.private.join("secret.jpg"), photos.join("dog/out.jpg")).unwrap();
    symlink(l.private.join("photos"), photos.join("dog/outdir")).unwrap();
    symlink(l.private.join("photos/cat"), photos.join("bird")).unwrap();
    // Beside the class folders a file is ignored, linked or not.
    symlink(l.private.join("secret.jpg"), photos.join("top.jpg")).unwrap();
    // Links that stay inside the tree still work.
    symlink("../cat/a.jpg", photos.join("dog/inside.jpg")).unwrap();
    std::fs::create_dir_all(photos.join("fish")).unwrap();
    symlink("../cat", photos.join("fish/school")).unwrap();
    let spec = DatasetSpec::new(SourceSpec::Folder {
        dir: photos.clone(),
    });
    let stamp = spec.source_stamp().unwrap();
    let out = l.project.join("out");
    std::fs::create_dir_all(&out).unwrap();
    ingest(&spec, &out, &indicatif::ProgressBar::hidden()).unwrap();
    assert_eq!(
        kept_ids(&out),
        [
            "cat/a.jpg",
            "dog/b.jpg",
            "dog/inside.jpg",
            "fish/school/a.jpg"
        ]
    );
    let errors = error_rows(&out);
    let ids: Vec<&str> = errors.iter().map(|e| e.0.as_str()).collect();
    // A linked folder outside is one error row; nothing under it is listed.
    assert_eq!(ids, ["bird", "dog/out.jpg", "dog/outdir"], "{errors:?}");
    for (_, reason) in &errors {
        assert!(reason.contains("--allow-read"), "{reason}");
    }
    assert!(!errors.iter().any(|e| e.0.contains("p.jpg")), "{errors:?}");
    // The stamp (the dataset's fingerprint) looked at none of them either, and is stable.
    assert_eq!(stamp, spec.source_stamp().unwrap());
}

/// End to end: a CSV naming a private picture, run by `vlmpipe run`. The eval succeeds, the
/// refused row is an error row, and the picture is in neither `predictions.csv` nor
/// `report.html`; with `--allow-read` it is read, so consent is not stale-cached either way.
#[test]
fn regression_14_an_eval_over_a_refused_image_succeeds_without_it() {
    let l = Layout::new();
    std::fs::write(
        l.project.join("list.csv"),
        "image,label\nphotos/cat/a.jpg,cat\nphotos/dog/b.jpg,dog\n../private/secret.jpg,cat\n",
    )
    .unwrap();
    std::fs::write(
        l.project.join("main.vp"),
        format!(
            "pipeline leak {{ seed = 1 }}\n{HEAD}\
             dataset d {{ source = csv(\"list.csv\")  label = \"label\"  labels = animals }}\n\
             model tiny = init(preset: \"tiny\", seed: 1)\n\
             eval look {{ model = tiny  data = d  prompt = ask  labels = animals  max_new_tokens = 2 }}\n"
        ),
    )
    .unwrap();
    let secret = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(l.private.join("secret.jpg")).unwrap());
    let evals = l.project.join("evals/leak/look");
    let read = |name: &str| std::fs::read_to_string(evals.join(name)).unwrap();

    let out = l.vlmpipe(&["run", "main.vp"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("--allow-read"),
        "the refusal is reported: {text}"
    );
    assert!(
        read("predictions.csv").contains(
            &base64::engine::general_purpose::STANDARD
                .encode(std::fs::read(l.project.join("photos/cat/a.jpg")).unwrap())
        )
    );
    assert!(!read("predictions.csv").contains(&secret));
    assert!(!read("report.html").contains(&secret));

    let out = l.vlmpipe(&["run", "main.vp", "--quiet", "--allow-read", "../private"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(read("predictions.csv").contains(&secret));

    // Other words for the same consent reuse every stage: the consent is not a fingerprint.
    let secret_file = l.private.join("secret.jpg").display().to_string();
    let out = l.vlmpipe(&[
        "run",
        "main.vp",
        "--quiet",
        "--allow-read",
        &secret_file,
        "--allow-read",
        "photos",
        "--summary-json",
        "summary.json",
    ]);
    assert!(out.status.success());
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(l.project.join("summary.json")).unwrap()).unwrap();
    let statuses: Vec<&str> = summary["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert!(
        !statuses.is_empty() && statuses.iter().all(|s| *s == "cached"),
        "{summary:#}"
    );
}
