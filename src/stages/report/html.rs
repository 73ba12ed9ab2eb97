//! The self-contained HTML report.
//!
//! Headline numbers, tables and charts are rendered here in Rust (escaped). Samples go into one
//! embedded JSON document that `report.js` pages through, so 10,000 samples cost one JSON parse
//! and one page of `<img>` elements, not 10,000. The gallery's state lives in the URL hash
//! (`#stage=0&filter=misclassified&page=2`, `#compare=1&filter=fixed`), so a confusion-matrix
//! cell is a plain link and any view can be bookmarked or opened directly (the browser tests do).

use std::collections::HashSet;
use std::fmt::Write;

use serde::Serialize;
use serde_json::Value;

use super::compare::{ChangeKind, changed_outcomes, comparison_rows, format_percent};
use super::escape::{html_escape, script_safe_json};
use super::svg::LineChart;
use super::thumbnail::thumbnails;
use super::{ReportError, ReportInput, StageReport};
use crate::stages::eval::{ImageSource, Metrics};

const CSS: &str = include_str!("report.css");
const JS: &str = include_str!("report.js");

/// Presentation choices.
#[derive(Clone, Debug, PartialEq)]
pub struct HtmlOptions {
    /// Longest side of gallery thumbnails, in pixels.
    pub thumbnail_px: u32,
    /// Gallery cards per page.
    pub page_size: usize,
    /// At most this many distinct images are embedded, misclassified samples first, so a
    /// 10,000-sample report stays a file a browser opens quickly (real photos cost about 8 KB
    /// each at 160 px); the rest show a placeholder that says why.
    pub max_thumbnails: usize,
    /// Stages meant to be compared that have no results in this run (name, why), named at the
    /// top so a partial comparison never reads as the whole one.
    pub missing: Vec<(String, String)>,
    /// Thumbnails refuse images whose header declares more pixels than this (the dataset's
    /// `max_image_pixels`); they show an error placeholder instead.
    pub max_image_pixels: u64,
}

impl Default for HtmlOptions {
    fn default() -> Self {
        Self {
            thumbnail_px: 160,
            page_size: 48,
            max_thumbnails: 3000,
            missing: Vec::new(),
            max_image_pixels: crate::model::processor::DEFAULT_MAX_IMAGE_PIXELS,
        }
    }
}

/// The data `report.js` reads. Rows are arrays, not objects, to keep 10,000 samples compact.
#[derive(Serialize)]
struct PageData<'a> {
    #[serde(rename = "pageSize")]
    page_size: usize,
    images: std::collections::HashMap<String, String>,
    /// Why an image is not shown (over the pixel cap, undecodable), by image id.
    #[serde(rename = "imageErrors")]
    image_errors: std::collections::HashMap<String, String>,
    /// Set when `max_thumbnails` cut the embedded images (the placeholder then says so).
    #[serde(rename = "embeddedLimit")]
    embedded_limit: Option<usize>,
    /// Per stage: labels and rows `[row_id, image_id, truth index, predicted index (labels.len()
    /// for invalid), raw output]`.
    stages: Vec<StageData<'a>>,
    /// Per compared stage (index ≥ 1): rows `[kind, row_id, image_id, truth, before, after]`.
    changes: Vec<ChangeData>,
}

#[derive(Serialize)]
struct StageData<'a> {
    name: &'a str,
    labels: &'a [String],
    rows: Vec<(&'a str, &'a str, usize, usize, &'a str)>,
}

#[derive(Serialize)]
struct ChangeData {
    from: usize,
    to: usize,
    rows: Vec<(ChangeKind, String, String, String, String, String)>,
}

/// Renders the whole report as one HTML string.
pub fn render_html(
    input: &ReportInput,
    images: &dyn ImageSource,
    options: &HtmlOptions,
) -> Result<String, ReportError> {
    if input.stages.is_empty() {
        return Err(ReportError::NoStages);
    }
    for stage in &input.stages {
        if stage.labels != stage.metrics.confusion_matrix.labels {
            return Err(ReportError::LabelMismatch {
                stage: stage.name.clone(),
            });
        }
    }
    let data = page_data(input, images, options);
    let json = script_safe_json(&serde_json::to_string(&data)?);

    let mut body = String::new();
    let title = html_escape(&input.title);
    let n_stages = input.stages.len();
    let _ = write!(
        body,
        r#"<header class="top"><h1>{title}</h1><p class="sub">vlmpipe evaluation report · {n_stages} stage{s}</p>"#,
        s = if n_stages == 1 { "" } else { "s" }
    );
    if n_stages > 1 {
        body.push_str(r##"<nav><a href="#compare">comparison</a>"##);
        for (i, stage) in input.stages.iter().enumerate() {
            let _ = write!(
                body,
                r##"<a href="#s{i}">{}</a>"##,
                html_escape(&stage.name)
            );
        }
        body.push_str("</nav>");
    }
    body.push_str("</header><main>");
    if !options.missing.is_empty() {
        body.push_str(r#"<section class="missing"><h2>Not in this report</h2><ul>"#);
        for (name, reason) in &options.missing {
            let _ = write!(
                body,
                "<li><code>{}</code>: {}</li>",
                html_escape(name),
                html_escape(reason)
            );
        }
        body.push_str("</ul></section>");
    }
    if n_stages > 1 {
        comparison_section(&mut body, input, &data.changes);
    }
    for (i, stage) in input.stages.iter().enumerate() {
        stage_section(&mut body, i, stage);
    }
    body.push_str("</main>");

    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title}</title><style>{CSS}</style></head><body>{body}\
<script type=\"application/json\" id=\"report-data\">{json}</script><script>{JS}</script></body></html>\n"
    ))
}

fn page_data<'a>(
    input: &'a ReportInput,
    images: &dyn ImageSource,
    options: &HtmlOptions,
) -> PageData<'a> {
    // Misclassified samples of any stage first (they are what a reader inspects), then the rest
    // in record order, each image once.
    let mut seen = HashSet::new();
    let all = input.stages.iter().flat_map(|s| s.records.iter());
    let ids: Vec<&str> = all
        .clone()
        .filter(|r| !r.correct)
        .chain(all)
        .map(|r| r.image_id.as_str())
        // An error row has no image to show.
        .filter(|id| !id.is_empty() && seen.insert(*id))
        .collect();
    let total_images = ids.len();
    let embedded = &ids[..total_images.min(options.max_thumbnails)];
    let stages = input
        .stages
        .iter()
        .map(|stage| {
            let index = |label: &str| stage.labels.iter().position(|l| l == label);
            let invalid = stage.labels.len();
            StageData {
                name: &stage.name,
                labels: &stage.labels,
                rows: stage
                    .records
                    .iter()
                    .map(|r| {
                        // Metrics already validated these; an unknown truth shows as invalid.
                        let truth = index(&r.ground_truth).unwrap_or(invalid);
                        let predicted = match (&r.parsed_label, r.valid) {
                            (Some(label), true) => index(label).unwrap_or(invalid),
                            _ => invalid,
                        };
                        (
                            r.row_id.as_str(),
                            r.image_id.as_str(),
                            truth,
                            predicted,
                            r.raw_output.as_str(),
                        )
                    })
                    .collect(),
            }
        })
        .collect();
    let changes = input
        .stages
        .iter()
        .enumerate()
        .skip(1)
        .map(|(to, stage)| ChangeData {
            from: 0,
            to,
            rows: changed_outcomes(&input.stages[0].records, &stage.records)
                .into_iter()
                .map(|c| {
                    (
                        c.kind,
                        c.row_id,
                        c.image_id,
                        c.ground_truth,
                        c.before,
                        c.after,
                    )
                })
                .collect(),
        })
        .collect();
    let thumbs = thumbnails(
        embedded,
        images,
        options.thumbnail_px,
        options.max_image_pixels,
    );
    PageData {
        page_size: options.page_size.max(1),
        images: thumbs.urls,
        image_errors: thumbs.errors,
        embedded_limit: (embedded.len() < total_images).then_some(embedded.len()),
        stages,
        changes,
    }
}

fn comparison_section(out: &mut String, input: &ReportInput, changes: &[ChangeData]) {
    out.push_str(r#"<section id="compare" class="panel"><h2>Comparison</h2><div class="scroll"><table class="num compare"><thead><tr><th>metric</th>"#);
    for stage in &input.stages {
        let _ = write!(out, "<th>{}</th>", html_escape(&stage.name));
    }
    out.push_str("</tr></thead><tbody>");
    let metrics: Vec<&Metrics> = input.stages.iter().map(|s| &s.metrics).collect();
    for row in comparison_rows(&metrics) {
        let _ = write!(out, "<tr><th>{}</th>", html_escape(&row.metric));
        for (i, value) in row.values.iter().enumerate() {
            let class = if row.best == Some(i) {
                r#" class="best""#
            } else {
                ""
            };
            let _ = write!(
                out,
                "<td{class}>{}</td>",
                value
                    .as_deref()
                    .map(html_escape)
                    .unwrap_or_else(|| "—".into())
            );
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table></div>");
    for change in changes {
        let count = |kind| change.rows.iter().filter(|r| r.0 == kind).count();
        let (fixed, broken, other) = (
            count(ChangeKind::Fixed),
            count(ChangeKind::Broken),
            count(ChangeKind::Changed),
        );
        let from = html_escape(&input.stages[change.from].name);
        let to = html_escape(&input.stages[change.to].name);
        let c = change.to;
        let _ = write!(
            out,
            r##"<h3>Changed outcomes: {from} → {to}</h3><p class="hint">Samples evaluated by both stages whose answer changed: <b class="good">{fixed} fixed</b> (wrong before, right now), <b class="bad">{broken} broken</b> (right before, wrong now), <b>{other} other answer</b> (wrong both times, differently).</p><div class="gallery" id="c{c}" data-kind="compare" data-index="{c}"><div class="toolbar"><span class="filters"><a data-filter="all" href="#compare={c}&amp;filter=all">All changed ({})</a><a data-filter="fixed" href="#compare={c}&amp;filter=fixed">Fixed ({fixed})</a><a data-filter="broken" href="#compare={c}&amp;filter=broken">Broken ({broken})</a><a data-filter="changed" href="#compare={c}&amp;filter=changed">Other answer ({other})</a></span><span class="status"></span><span class="pager"></span></div><div class="grid"></div></div>"##,
            fixed + broken + other
        );
    }
    out.push_str("</section>");
}

fn stage_section(out: &mut String, i: usize, stage: &StageReport) {
    let m = &stage.metrics;
    let _ = write!(
        out,
        r#"<section class="stage" id="s{i}"><h2>{}</h2><div class="cards">"#,
        html_escape(&stage.name)
    );
    let invalid = m.n - m.n_valid;
    card(
        out,
        "accuracy",
        "Accuracy",
        &format_percent(m.accuracy),
        &format!("{} of {} correct", m.n_correct, m.n),
    );
    card(
        out,
        "invalid",
        "Invalid answers",
        &format_percent(m.invalid_rate),
        &format!("{invalid} not in the label set · counted as wrong"),
    );
    card(
        out,
        "macro-f1",
        "Macro F1",
        &format!("{:.3}", m.macro_avg.f1),
        &format!("weighted {:.3}", m.weighted_avg.f1),
    );
    if let Some(r) = &m.recall_of {
        card(
            out,
            "recall-of",
            &format!("Recall of {}", html_escape(&r.label)),
            &format_percent(r.recall),
            &format!("support {}", r.support),
        );
    }
    card(
        out,
        "latency",
        "Latency p50 / p95",
        &format!("{:.0} / {:.0} ms", m.latency_ms_p50, m.latency_ms_p95),
        &format!(
            "{}{}",
            match m.samples_per_s {
                Some(s) => format!(
                    "{s:.2} samples/s · {:.1} tokens/sample",
                    m.tokens_generated_mean
                ),
                None => format!("{:.1} tokens/sample", m.tokens_generated_mean),
            },
            // Which device ran it, so a GPU run's latencies are not read as a CPU's.
            m.device
                .as_deref()
                .map(|d| format!(" · on {d}"))
                .unwrap_or_default()
        ),
    );
    if let Some(loss) = m.log_loss {
        let auc = m
            .roc_auc
            .map(|a| format!(" · ROC AUC {a:.3}"))
            .unwrap_or_default();
        card(
            out,
            "log-loss",
            "Log loss",
            &format!("{loss:.3}"),
            &format!("{} scored{auc}", m.n_scored),
        );
    }
    out.push_str("</div><div class=\"row\">");
    confusion_panel(out, i, stage);
    per_class_panel(out, m);
    out.push_str("</div>");
    if !stage.curves.is_empty() || m.calibration.is_some() {
        out.push_str("<div class=\"row\">");
        if !stage.curves.is_empty() {
            let chart = LineChart {
                title: format!("{} loss", stage.name),
                x_label: "step".into(),
                y_label: "loss".into(),
                series: stage.curves.clone(),
            };
            let _ = write!(
                out,
                r#"<div class="panel curves"><h3>Training and evaluation loss</h3>{}</div>"#,
                chart.to_svg()
            );
        }
        calibration_panel(out, m);
        out.push_str("</div>");
    }
    let wrong = m.n - m.n_correct;
    let _ = write!(
        out,
        r##"<div class="panel gallery" id="g{i}" data-kind="stage" data-index="{i}"><h3>Samples</h3><div class="toolbar"><span class="filters"><a data-filter="all" href="#stage={i}&amp;filter=all">All ({n})</a><a data-filter="correct" href="#stage={i}&amp;filter=correct">Correct ({correct})</a><a data-filter="misclassified" href="#stage={i}&amp;filter=misclassified">Misclassified ({wrong})</a><a data-filter="invalid" href="#stage={i}&amp;filter=invalid">Invalid ({invalid})</a></span><span class="status"></span><span class="pager"></span></div><p class="legend"><span class="sw ok"></span>correct <span class="sw wrong"></span>wrong label <span class="sw invalid"></span>invalid answer (misclassified includes invalid)</p><div class="grid"></div><noscript><p>The sample gallery needs JavaScript; everything above works without it.</p></noscript></div></section>"##,
        n = m.n,
        correct = m.n_correct,
    );
}

fn card(out: &mut String, key: &str, title: &str, value: &str, detail: &str) {
    // `title` is either static or already escaped by the caller; value and detail are ours.
    let _ = write!(
        out,
        r#"<div class="card" data-metric="{key}"><div class="k">{title}</div><div class="v">{}</div><div class="d">{}</div></div>"#,
        html_escape(value),
        html_escape(detail)
    );
}

fn confusion_panel(out: &mut String, i: usize, stage: &StageReport) {
    let cm = &stage.metrics.confusion_matrix;
    let many = cm.columns.len() > 8;
    let _ = write!(
        out,
        r#"<div class="panel{}"><h3>Confusion matrix</h3><p class="hint">Rows: ground truth · columns: prediction · click a count to show those samples.</p><div class="scroll"><table class="cm{}"><thead><tr><th class="corner">truth \ predicted</th>"#,
        if many { " wide" } else { "" },
        if many { " many" } else { "" }
    );
    for (c, column) in cm.columns.iter().enumerate() {
        let class = if c == cm.labels.len() {
            r#" class="inv""#
        } else {
            ""
        };
        let _ = write!(out, "<th{class}><span>{}</span></th>", html_escape(column));
    }
    out.push_str("</tr></thead><tbody>");
    for (t, (label, row)) in cm.labels.iter().zip(&cm.counts).enumerate() {
        let total: usize = row.iter().sum();
        let _ = write!(out, "<tr><th>{}</th>", html_escape(label));
        for (p, &count) in row.iter().enumerate() {
            let share = if total == 0 {
                0.0
            } else {
                count as f64 / total as f64
            };
            let tone = if p == t {
                "good"
            } else if p == cm.labels.len() {
                "inv"
            } else {
                "bad"
            };
            if count == 0 {
                out.push_str(r#"<td class="zero"><span>0</span></td>"#);
            } else {
                let _ = write!(
                    out,
                    r##"<td class="{tone}" style="--a:{:.2}"><a href="#stage={i}&amp;filter=cell:{t}:{p}" title="{} of {} ({})">{count}</a></td>"##,
                    0.12 + 0.6 * share,
                    count,
                    total,
                    format_percent(share)
                );
            }
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table></div></div>");
}

fn per_class_panel(out: &mut String, m: &Metrics) {
    out.push_str(r#"<div class="panel"><h3>Per class</h3><div class="scroll"><table class="num"><thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th><th>predicted</th></tr></thead><tbody>"#);
    let mut footnote = false;
    for c in &m.per_class {
        let mark = |undefined: bool, footnote: &mut bool| {
            if undefined {
                *footnote = true;
                r#"<sup title="undefined (0/0), counted as 0">†</sup>"#
            } else {
                ""
            }
        };
        let p_mark = mark(c.precision_undefined, &mut footnote);
        let r_mark = mark(c.recall_undefined, &mut footnote);
        let _ = write!(
            out,
            "<tr><th>{}</th><td>{:.3}{p_mark}</td><td>{:.3}{r_mark}</td><td>{:.3}</td><td>{}</td><td>{}</td></tr>",
            html_escape(&c.label),
            c.precision,
            c.recall,
            c.f1,
            c.support,
            c.predicted
        );
    }
    let _ = write!(
        out,
        "</tbody><tfoot><tr><th>macro avg</th><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td><td></td></tr><tr><th>weighted avg</th><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td><td></td></tr></tfoot></table></div>",
        m.macro_avg.precision,
        m.macro_avg.recall,
        m.macro_avg.f1,
        m.n,
        m.weighted_avg.precision,
        m.weighted_avg.recall,
        m.weighted_avg.f1,
        m.n
    );
    if footnote {
        out.push_str(r#"<p class="hint">† undefined: the class was never predicted (precision) or never occurs (recall); counted as 0, like scikit-learn's <code>zero_division=0</code>.</p>"#);
    }
    out.push_str(r#"<p class="hint">Invalid answers lower recall but no precision; the macro average covers the classes that occur.</p></div>"#);
}

fn calibration_panel(out: &mut String, m: &Metrics) {
    let Some(cal) = &m.calibration else {
        return;
    };
    let _ = write!(
        out,
        r#"<div class="panel"><h3>Calibration</h3><p class="hint">Confidence of the most probable class vs how often it is right. ECE {:.3}.</p><table class="num"><thead><tr><th>confidence</th><th>n</th><th>mean conf.</th><th>accuracy</th></tr></thead><tbody>"#,
        cal.ece
    );
    for bin in cal.bins.iter().filter(|b| b.count > 0) {
        let _ = write!(
            out,
            "<tr><th>{:.1}–{:.1}</th><td>{}</td><td>{:.3}</td><td>{:.3}</td></tr>",
            bin.lower,
            bin.upper,
            bin.count,
            bin.mean_confidence.unwrap_or_default(),
            bin.accuracy.unwrap_or_default()
        );
    }
    if let Some(top_k) = &m.top_k {
        let text: Vec<String> = top_k
            .iter()
            .map(|t| format!("top-{} {}", t.k, format_percent(t.accuracy)))
            .collect();
        let _ = write!(
            out,
            r#"</tbody></table><p class="hint">Accuracy of the label-scoring probabilities: {}</p></div>"#,
            text.join(" · ")
        );
    } else {
        out.push_str("</tbody></table></div>");
    }
}

/// Reads the embedded JSON back out of a rendered report (for tests and tools).
pub fn embedded_data(html: &str) -> Option<Value> {
    let start_tag = r#"<script type="application/json" id="report-data">"#;
    let start = html.find(start_tag)? + start_tag.len();
    let end = start + html[start..].find("</script>")?;
    serde_json::from_str(&html[start..end]).ok()
}
