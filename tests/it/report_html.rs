//! The HTML report: self-containment and escaping checked on the text, then the rendered page
//! checked in headless Chromium (numbers, images, the misclassified and cell filters), with
//! screenshots saved under the target folder, including one of the real cats-vs-dogs photos.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use image::{ImageFormat, RgbImage};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::support::assert_json_close;
use vlmpipe::stages::eval::{
    EvalRecord, MapImageSource, MetricsOptions, NoImages, compute_metrics,
};
use vlmpipe::stages::report::{
    HtmlOptions, ReportInput, Series, StageReport, embedded_data, render_html, write_html,
};

const HOSTILE: &str = "</script><img src=x onerror=alert(1)> & \"quotes\"";

fn labels() -> Vec<String> {
    vec!["cat".to_string(), "dog".to_string()]
}

/// Records with seeded fake answers: `p_correct` right, about 10% invalid, the rest wrong.
fn fake_records(
    ids: &[(String, String)],
    seed: u64,
    p_correct: f64,
    probs: bool,
) -> Vec<EvalRecord> {
    let mut rng = StdRng::seed_from_u64(seed);
    ids.iter()
        .enumerate()
        .map(|(i, (image_id, truth))| {
            let roll: f64 = rng.random();
            let other = if truth == "cat" { "dog" } else { "cat" };
            let (raw, parsed) = if roll < p_correct {
                (truth.clone(), Some(truth.clone()))
            } else if roll < p_correct + 0.1 {
                let raw = if i % 2 == 0 { "pug" } else { HOSTILE };
                (raw.to_string(), None)
            } else {
                (other.to_string(), Some(other.to_string()))
            };
            let valid = parsed.is_some();
            let correct = parsed.as_deref() == Some(truth.as_str());
            let p_dog: f32 = rng.random_range(0.05..0.95);
            EvalRecord {
                row_id: format!("{i:04}"),
                image_id: image_id.clone(),
                ground_truth: truth.clone(),
                raw_output: raw,
                parsed_label: parsed,
                valid,
                correct,
                latency_ms: rng.random_range(80.0..240.0),
                batch_size: 1,
                tokens_generated: rng.random_range(1..6),
                class_probs: probs.then(|| vec![1.0 - p_dog, p_dog]),
            }
        })
        .collect()
}

fn stage(name: &str, records: Vec<EvalRecord>, curves: Vec<Series>) -> StageReport {
    let options = MetricsOptions {
        recall_of: Some("dog".to_string()),
        ..MetricsOptions::default()
    };
    let metrics = compute_metrics(&records, &labels(), &options).expect("metrics");
    StageReport {
        name: name.to_string(),
        labels: labels(),
        records,
        metrics,
        curves,
    }
}

fn loss_curves() -> Vec<Series> {
    let train: Vec<(u64, f32)> = (0..=60)
        .map(|s| (s * 10, 0.05 + 1.6 * (-(s as f32) / 12.0).exp()))
        .collect();
    let eval: Vec<(u64, f32)> = (0..=6)
        .map(|s| (s * 100, 0.12 + 1.5 * (-(s as f32) * 10.0 / 14.0).exp()))
        .collect();
    vec![
        Series::from_steps("train loss", &train),
        Series::from_steps("eval loss", &eval),
    ]
}

/// Synthetic photos so the browser test needs no shared data: a coloured block per sample.
fn synthetic_source(n: usize) -> (MapImageSource, Vec<(String, String)>) {
    let mut source = MapImageSource::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let truth = if i % 2 == 0 { "cat" } else { "dog" };
        let img = RgbImage::from_fn(320, 240, |x, y| {
            image::Rgb([
                (x / 2) as u8,
                (y + i as u32 * 9) as u8,
                if truth == "cat" { 200 } else { 40 },
            ])
        });
        let mut png = Vec::new();
        img.write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .expect("png");
        let id = format!("synthetic/{i}.png");
        source.insert(id.clone(), png);
        ids.push((id, truth.to_string()));
    }
    (source, ids)
}

fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("report_html");
    std::fs::create_dir_all(&dir).expect("create output dir");
    dir
}

#[test]
fn report_is_self_contained_and_escapes_data() {
    let (source, ids) = synthetic_source(12);
    let mut hostile = fake_records(&ids, 1, 0.5, false);
    hostile[0].raw_output = HOSTILE.to_string();
    hostile[0].parsed_label = None;
    hostile[0].valid = false;
    hostile[0].correct = false;
    let input = ReportInput {
        title: "t <i>itle</i>".into(),
        stages: vec![
            stage("base <b>", hostile, vec![]),
            stage("tuned", fake_records(&ids, 2, 0.8, true), loss_curves()),
        ],
    };
    let html = render_html(&input, &source, &HtmlOptions::default()).expect("render");
    // No external requests: the only URL is the SVG namespace, which is an identifier.
    let without_ns = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    for needle in ["http://", "https://", "src=\"//", "<link", "@import"] {
        assert!(!without_ns.contains(needle), "found `{needle}`");
    }
    assert!(html.contains("t &lt;i&gt;itle&lt;/i&gt;"));
    assert!(html.contains("base &lt;b&gt;"));
    assert!(
        !html.contains(HOSTILE),
        "raw model output must not reach the HTML unescaped"
    );
    assert_eq!(
        html.matches("</script>").count(),
        2,
        "only our own script tags close"
    );
    let data = embedded_data(&html).expect("embedded JSON");
    assert_eq!(data["stages"].as_array().map(Vec::len), Some(2));
    assert_eq!(data["images"].as_object().map(|m| m.len()), Some(12));
    let rows = data["stages"][0]["rows"].as_array().expect("rows");
    assert!(
        rows.iter().any(|r| r[4] == HOSTILE),
        "hostile text survives as data"
    );
    assert!(html.contains("<polyline"), "loss curves drawn");
    assert!(html.contains("Changed outcomes"));
}

#[test]
fn ten_thousand_samples_render_quickly_and_compactly() {
    let ids: Vec<(String, String)> = (0..10_000)
        .map(|i| {
            (
                format!("img{i}"),
                if i % 3 == 0 { "cat" } else { "dog" }.to_string(),
            )
        })
        .collect();
    let input = ReportInput {
        title: "big".into(),
        stages: vec![stage("base", fake_records(&ids, 3, 0.7, true), vec![])],
    };
    let start = Instant::now();
    let html = render_html(&input, &NoImages, &HtmlOptions::default()).expect("render");
    let elapsed = start.elapsed();
    eprintln!("10k-sample report: {} KB in {elapsed:?}", html.len() / 1024);
    assert!(elapsed.as_secs_f64() < 10.0, "took {elapsed:?}");
    // Samples are data for the pager, not eagerly emitted elements.
    assert!(!html.contains("<figure"));
    assert!(html.len() < 2_000_000, "{} bytes", html.len());
    if let Some(chromium) = chromium() {
        let path = out_dir().join("big.html");
        std::fs::write(&path, &html).expect("write");
        let dom = dump_dom(&chromium, &path, "stage=0&filter=all&page=3");
        assert_eq!(dom.matches("<figure class=\"sample").count(), 48);
        assert!(dom.contains("showing 97–144 of 10000"), "status line");
    }
}

#[test]
fn thumbnail_limit_keeps_misclassified_images_first() {
    let (source, ids) = synthetic_source(20);
    let base = stage("base", fake_records(&ids, 9, 0.5, false), vec![]);
    let wrong: Vec<String> = base
        .records
        .iter()
        .filter(|r| !r.correct)
        .map(|r| r.image_id.clone())
        .collect();
    assert!(wrong.len() > 3, "fixture needs several mistakes");
    let input = ReportInput {
        title: "limited".into(),
        stages: vec![base],
    };
    let options = HtmlOptions {
        max_thumbnails: 3,
        ..HtmlOptions::default()
    };
    let html = render_html(&input, &source, &options).expect("render");
    let data = embedded_data(&html).expect("data");
    let images = data["images"].as_object().expect("images");
    let embedded: Vec<&String> = images.keys().collect();
    assert_eq!(embedded.len(), 3);
    assert!(embedded.iter().all(|id| wrong.contains(id)), "{embedded:?}");
    assert_eq!(data["embeddedLimit"], 3);
}

#[test]
fn chromium_shows_numbers_images_and_filters() {
    let Some(chromium) = chromium() else {
        return;
    };
    let (source, ids) = synthetic_source(30);
    let records = fake_records(&ids, 7, 0.6, false);
    let base = stage("base", records, vec![]);
    let m = base.metrics.clone();
    let wrong = m.n - m.n_correct;
    let invalid = m.n - m.n_valid;
    assert!(
        wrong > 0 && invalid > 0,
        "fixture needs both kinds of error"
    );
    let input = ReportInput {
        title: "synthetic".into(),
        stages: vec![base],
    };
    let path = out_dir().join("synthetic.html");
    write_html(&path, &input, &source, &HtmlOptions::default()).expect("write report");

    let dom = dump_dom(&chromium, &path, "");
    let accuracy = format!("{:.1}%", m.accuracy * 100.0);
    assert!(dom.contains(&accuracy), "accuracy {accuracy} shown");
    assert!(dom.contains(&format!("{} of {} correct", m.n_correct, m.n)));
    assert_eq!(
        dom.matches("<figure class=\"sample").count(),
        30,
        "all cards on page 1"
    );
    assert_eq!(
        dom.matches("src=\"data:image/jpeg;base64,").count(),
        30,
        "thumbnails"
    );

    let dom = dump_dom(&chromium, &path, "stage=0&filter=misclassified");
    assert!(dom.contains(&format!(
        "data-filter=\"misclassified\" data-total=\"{wrong}\""
    )));
    let cards = dom.matches("<figure class=\"sample").count();
    assert_eq!(cards, wrong);
    let bad = dom.matches("<figure class=\"sample wrong").count()
        + dom.matches("<figure class=\"sample invalid").count();
    assert_eq!(bad, wrong, "only misclassified cards");
    assert!(dom.contains("pug"), "raw output of invalid answers shown");

    let dom = dump_dom(&chromium, &path, "stage=0&filter=invalid");
    assert_eq!(
        dom.matches("<figure class=\"sample invalid").count(),
        invalid
    );

    // Clicking the cell (truth cat, predicted dog) navigates to this hash.
    let cat_as_dog = m.confusion_matrix.counts[0][1];
    assert!(
        dom.contains("href=\"#stage=0&amp;filter=cell:0:1\""),
        "cell link"
    );
    let dom = dump_dom(&chromium, &path, "stage=0&filter=cell:0:1");
    assert_eq!(
        dom.matches("<figure class=\"sample wrong").count(),
        cat_as_dog
    );
    assert!(dom.contains("truth cat → predicted dog"));

    let shot = screenshot(&chromium, &path, "", "synthetic.png");
    eprintln!("screenshot: {}", shot.display());
}

#[test]
fn many_classes_render_a_compact_matrix() {
    const ACTIONS: [&str; 15] = [
        "calling",
        "clapping",
        "cycling",
        "dancing",
        "drinking",
        "eating",
        "fighting",
        "hugging",
        "laughing",
        "listening_to_music",
        "running",
        "sitting",
        "sleeping",
        "texting",
        "using_laptop",
    ];
    let labels: Vec<String> = ACTIONS.iter().map(|s| s.to_string()).collect();
    let mut rng = StdRng::seed_from_u64(11);
    let records: Vec<EvalRecord> = (0..300)
        .map(|i| {
            let truth = labels[i % labels.len()].clone();
            let answer = if rng.random_bool(0.6) {
                truth.clone()
            } else if rng.random_bool(0.9) {
                labels[rng.random_range(0..labels.len())].clone()
            } else {
                "a person".to_string()
            };
            let valid = labels.contains(&answer);
            EvalRecord {
                row_id: i.to_string(),
                image_id: format!("img{i}"),
                correct: answer == truth,
                ground_truth: truth,
                parsed_label: valid.then(|| answer.clone()),
                raw_output: answer,
                valid,
                latency_ms: 100.0,
                batch_size: 1,
                tokens_generated: 3,
                class_probs: None,
            }
        })
        .collect();
    let metrics = compute_metrics(&records, &labels, &MetricsOptions::default()).expect("metrics");
    let input = ReportInput {
        title: "human actions".into(),
        stages: vec![StageReport {
            name: "eval_1_6b".into(),
            labels,
            records,
            metrics,
            curves: vec![],
        }],
    };
    let path = out_dir().join("actions.html");
    write_html(&path, &input, &NoImages, &HtmlOptions::default()).expect("write");
    let html = std::fs::read_to_string(&path).expect("read");
    assert!(html.contains("<table class=\"cm many\">"));
    // 15 rows of 16 cells (15 labels and the invalid column).
    let body = html
        .split("<table class=\"cm many\">")
        .nth(1)
        .expect("matrix");
    let body = body.split("</table>").next().expect("end");
    assert_eq!(body.matches("<td").count(), 15 * 16);
    if let Some(chromium) = chromium() {
        let shot = screenshot(&chromium, &path, "", "actions.png");
        eprintln!("screenshot: {}", shot.display());
    }
}

#[test]
fn report_of_real_cats_and_dogs_photos() {
    let Some(dir) = crate::support::shared_path("data/cats_vs_dogs") else {
        return;
    };
    let mut source = MapImageSource::new();
    let mut ids = Vec::new();
    // The first 20 photos of each class, interleaved so both classes show on the first page.
    for i in 1..=20 {
        for class in ["cat", "dog"] {
            let file = dir.join(class).join(format!("{i:04}.jpg"));
            let bytes = std::fs::read(&file).expect("read photo");
            let id = format!("{class}/{i:04}.jpg");
            source.insert(id.clone(), bytes);
            ids.push((id, class.to_string()));
        }
    }
    let input = ReportInput {
        title: "cats_vs_dogs".into(),
        stages: vec![
            stage("eval_base", fake_records(&ids, 23, 0.7, true), vec![]),
            stage(
                "eval_finetuned",
                fake_records(&ids, 42, 0.9, true),
                loss_curves(),
            ),
        ],
    };
    let path = out_dir().join("cats_vs_dogs.html");
    write_html(&path, &input, &source, &HtmlOptions::default()).expect("write report");
    eprintln!("report: {}", path.display());
    let Some(chromium) = chromium() else {
        return;
    };
    let dom = dump_dom(&chromium, &path, "");
    // Both stage galleries show all 40 photos; the changed-outcome gallery adds its own.
    assert!(dom.matches("src=\"data:image/jpeg;base64,").count() >= 40 * 2);
    let shot = screenshot(&chromium, &path, "", "cats_vs_dogs.png");
    eprintln!("screenshot: {}", shot.display());
    let shot = screenshot(&chromium, &path, "", "cats_vs_dogs_full.png");
    eprintln!("screenshot: {}", shot.display());
}

/// Debian's `chromium` (or `VLMPIPE_CHROMIUM`), or `None` with a skip message.
fn chromium() -> Option<PathBuf> {
    let candidates = std::env::var_os("VLMPIPE_CHROMIUM")
        .map(PathBuf::from)
        .into_iter()
        .chain(["chromium", "chromium-browser"].map(PathBuf::from));
    for candidate in candidates {
        let ok = Command::new(&candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(candidate);
        }
    }
    eprintln!("skipping browser checks: chromium not installed (apt-get install -y chromium)");
    None
}

fn browser(chromium: &Path, profile: &Path) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg("90").arg(chromium).args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
    ]);
    cmd.arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

fn url(path: &Path, hash: &str) -> String {
    let mut url = format!("file://{}", path.display());
    if !hash.is_empty() {
        url.push('#');
        url.push_str(hash);
    }
    url
}

fn dump_dom(chromium: &Path, path: &Path, hash: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let output = browser(chromium, profile.path())
        .arg("--dump-dom")
        .arg(url(path, hash))
        .output()
        .expect("run chromium");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn screenshot(chromium: &Path, path: &Path, hash: &str, name: &str) -> PathBuf {
    let profile = tempfile::tempdir().expect("profile dir");
    let shot = out_dir().join(name);
    let output = browser(chromium, profile.path())
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!(
            "--window-size=1280,{}",
            if name.ends_with("_full.png") {
                6000
            } else {
                2000
            }
        ))
        .arg(url(path, hash))
        .output()
        .expect("run chromium");
    assert!(
        output.status.success() && shot.is_file(),
        "screenshot failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    shot
}

#[test]
fn a_stage_loads_from_its_eval_outputs() {
    use vlmpipe::stages::eval::write_eval_outputs;
    let (source, ids) = synthetic_source(4);
    let written = stage("base", fake_records(&ids, 5, 0.5, true), vec![]);
    let dir = tempfile::tempdir().expect("tempdir");
    write_eval_outputs(
        dir.path(),
        &written.labels,
        &written.records,
        &written.metrics,
        &source,
    )
    .expect("outputs");
    let loaded = StageReport::load("base", dir.path()).expect("load");
    assert_eq!(loaded.labels, written.labels);
    assert_eq!(loaded.records, written.records);
    assert_json_close(&loaded.metrics, &written.metrics);
    let missing = StageReport::load("none", &dir.path().join("absent"));
    assert!(missing.is_err());
}

/// Issue 14: a report decodes thumbnails through the capped decoder. A decompression bomb
/// (10000 x 9000 zero pixels in 270 KB: over the pixel cap, under the `image` crate's own 512 MB
/// limit, so the old thumbnailer decoded all 270 MB of it) is an error placeholder saying why.
#[test]
fn regression_issue14_a_bomb_in_a_report_is_an_error_placeholder_not_a_decode() {
    let bomb = crate::data_support::hostile::png_zeros(10_000, 9_000);
    let mut source = MapImageSource::new();
    source.insert("bomb", bomb);
    source.insert("ok", {
        let mut out = Vec::new();
        RgbImage::new(40, 30)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    });
    let ids = vec![
        ("bomb".to_string(), "cat".to_string()),
        ("ok".to_string(), "dog".to_string()),
    ];
    let input = ReportInput {
        title: "bombs".into(),
        stages: vec![stage("base", fake_records(&ids, 3, 0.5, false), vec![])],
    };
    let started = Instant::now();
    let html = render_html(&input, &source, &HtmlOptions::default()).expect("render");
    let data = embedded_data(&html).expect("data");
    let images = data["images"].as_object().expect("images");
    assert!(images.contains_key("ok"));
    assert!(!images.contains_key("bomb"), "the bomb was decoded");
    let reason = data["imageErrors"]["bomb"].as_str().expect("a reason");
    assert!(
        reason.contains("10000x9000 is 90000000 pixels, more than the limit of 89478485"),
        "{reason}"
    );
    // Refused from the header: no time spent inflating 270 MB.
    assert!(started.elapsed().as_secs_f64() < 5.0);
}
