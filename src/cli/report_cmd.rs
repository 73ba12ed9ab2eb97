//! `vlmpipe report FILE [STAGE]` and `vlmpipe show FILE STAGE --misclassified`: read the results
//! of stages that already ran (from the cache, without running anything).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::Outcome;
use super::args::{DeviceArg, ReportArgs, RunArgs, ShowArgs};
use super::check_cmd::load_and_report;
use super::run_cmd::execute;
use crate::exec::{RunSummary, StageStatus};
use crate::model::device::DeviceChoice;
use crate::plan::{NodeKind, NodeParams, Plan};
use crate::stages::eval::{
    EvalRecord, METRICS_FILE, Metrics, RECORDS_FILE, REPORT_FILE, read_metrics_json,
    read_records_parquet,
};
use crate::stages::report::{
    changed_listing, changed_outcomes, headline_table, misclassified_listing,
};

pub(crate) fn report(args: &ReportArgs) -> anyhow::Result<Outcome> {
    let Some(plan) = load_and_report(&args.file, &args.params) else {
        return Ok(Outcome::Problems);
    };
    let (evals, html_of) = match &args.stage {
        None => (all_of(&plan, NodeKind::Eval), None),
        Some(name) => {
            let id = plan.lookup_stage(name).map_err(anyhow::Error::msg)?;
            let node = plan
                .node(id)
                .context("the stage disappeared from the plan")?;
            match &node.params {
                NodeParams::Eval(_) => (vec![node.name.clone()], Some(node.name.clone())),
                NodeParams::Report(p) => (
                    p.compare.iter().map(|r| r.name.clone()).collect(),
                    Some(node.name.clone()),
                ),
                _ => bail!(
                    "`{}` is a {} stage; `report` shows `eval` and `report` stages",
                    node.name,
                    node.kind()
                ),
            }
        }
    };
    if evals.is_empty() {
        bail!("the pipeline has no `eval` stage");
    }
    // The pages: the named stage's, or every eval's and every comparison's.
    let html_stages: Vec<String> = match &html_of {
        Some(stage) => vec![stage.clone()],
        None => evals
            .iter()
            .cloned()
            .chain(all_of(&plan, NodeKind::Report))
            .collect(),
    };
    let mut wanted = evals.clone();
    wanted.extend(html_stages.iter().cloned());
    let summary = dry_run(&plan, &args.file, &args.cache, &args.params, &wanted)?;

    let mut rows: Vec<(String, Metrics)> = Vec::new();
    let mut missing = Vec::new();
    for name in &evals {
        match output(&summary, name, METRICS_FILE) {
            Some(path) => rows.push((name.clone(), read_metrics_json(&path)?)),
            None => missing.push(name.clone()),
        }
    }
    if !rows.is_empty() {
        let table: Vec<(&str, &Metrics)> = rows.iter().map(|(n, m)| (n.as_str(), m)).collect();
        print!("{}", headline_table(&table));
    }
    // A named report also lists the answers that changed from its baseline to each other eval.
    if let Some(NodeParams::Report(p)) = html_of
        .as_deref()
        .and_then(|n| plan.find(n))
        .map(|n| &n.params)
    {
        let records = |name: &str| -> anyhow::Result<Option<Vec<EvalRecord>>> {
            match output(&summary, name, RECORDS_FILE) {
                Some(path) => Ok(Some(read_records_parquet(&path)?.records)),
                None => Ok(None),
            }
        };
        if let Some((baseline, rest)) = p.compare.split_first()
            && let Some(before) = records(&baseline.name)?
        {
            for other in rest {
                if let Some(after) = records(&other.name)? {
                    let changes = changed_outcomes(&before, &after);
                    println!();
                    print!(
                        "{}",
                        changed_listing(&baseline.name, &other.name, &changes, 60)
                    );
                }
            }
        }
    }
    for name in &missing {
        eprintln!(
            "`{name}` has no results for the current pipeline yet: run `vlmpipe run {}`",
            args.file.display()
        );
    }
    for name in &html_stages {
        if let Some(path) = export_or_entry(&summary, name, REPORT_FILE) {
            println!("report: {}", path.display());
        }
    }
    Ok(if missing.is_empty() {
        Outcome::Success
    } else {
        Outcome::Problems
    })
}

pub(crate) fn show(args: &ShowArgs) -> anyhow::Result<Outcome> {
    let Some(plan) = load_and_report(&args.file, &args.params) else {
        return Ok(Outcome::Problems);
    };
    let id = plan.lookup_stage(&args.stage).map_err(anyhow::Error::msg)?;
    let node = plan
        .node(id)
        .context("the stage disappeared from the plan")?;
    if node.kind() != NodeKind::Eval {
        bail!(
            "`{}` is a {} stage; `show` lists the samples of an `eval` stage",
            node.name,
            node.kind()
        );
    }
    let summary = dry_run(
        &plan,
        &args.file,
        &args.cache,
        &args.params,
        std::slice::from_ref(&node.name),
    )?;
    let Some(path) = output(&summary, &node.name, RECORDS_FILE) else {
        eprintln!(
            "`{}` has no results for the current pipeline yet: run `vlmpipe run {}`",
            node.name,
            args.file.display()
        );
        return Ok(Outcome::Problems);
    };
    let records = read_records_parquet(&path)?.records;
    if args.misclassified {
        print!("{}", misclassified_listing(&records, args.max_answer_chars));
    } else {
        for r in &records {
            println!(
                "{}\t{}\t{}\t{}",
                r.row_id,
                r.ground_truth,
                r.parsed_label.as_deref().unwrap_or("<invalid>"),
                if r.correct { "correct" } else { "wrong" }
            );
        }
    }
    Ok(Outcome::Success)
}

fn all_of(plan: &Plan, kind: NodeKind) -> Vec<String> {
    plan.nodes
        .iter()
        .filter(|n| n.kind() == kind)
        .map(|n| n.name.clone())
        .collect()
}

/// Looks the stages up without running anything: cached ones list their files.
fn dry_run(
    plan: &Plan,
    file: &Path,
    cache: &super::args::CacheDirArg,
    params: &super::args::ParamOverrides,
    only: &[String],
) -> anyhow::Result<RunSummary> {
    let args = RunArgs {
        file: file.to_path_buf(),
        params: params.clone(),
        cache: cache.clone(),
        force: Vec::new(),
        only: only.to_vec(),
        dry_run: true,
        summary_json: None,
        quiet: true,
        evals_dir: None,
        lock_wait: 10.0,
        shards: None,
        jobs: None,
        // A dry run loads no model.
        device: DeviceArg {
            device: DeviceChoice::Cpu,
        },
        cluster: Default::default(),
    };
    execute(plan, &args)
}

/// The cache-entry file `name` of a stage that is cached.
fn output(summary: &RunSummary, stage: &str, name: &str) -> Option<PathBuf> {
    let report = summary.stage(stage)?;
    if report.status != StageStatus::Cached {
        return None;
    }
    report
        .outputs
        .iter()
        .find(|p| p.file_name().is_some_and(|f| f == name))
        .cloned()
}

/// Like [`output`], preferring the copy exported under `evals/` (the path a person opens), which
/// the dry run lists only when it equals the entry.
fn export_or_entry(summary: &RunSummary, stage: &str, name: &str) -> Option<PathBuf> {
    let report = summary.stage(stage)?;
    if report.status != StageStatus::Cached {
        return None;
    }
    report
        .outputs
        .iter()
        .rev()
        .find(|p| p.file_name().is_some_and(|f| f == name) && p.exists())
        .cloned()
}
