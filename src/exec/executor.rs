//! Running a graph: fingerprints in dependency order, cache lookups, stage runs, the summary.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::history::{History, StageIdentity};
use super::{Progress, RunSummary, Stage, StageContext, StageReport, StageStatus};
use crate::cache::{CacheEntry, CacheError, CacheStore, Fingerprint, Lookup, MissReason, Verify};

/// One node of the graph the executor runs.
pub struct ExecNode {
    /// Unique stage name (anonymous data expressions get generated names).
    pub name: String,
    /// Indices of input nodes; every index is smaller than this node's own index.
    pub inputs: Vec<usize>,
    /// The configured stage.
    pub stage: Box<dyn Stage>,
}

/// A graph of stages in topological order (inputs before the stages that read them).
pub struct ExecGraph {
    /// Pipeline name: keys the run history used to explain reruns.
    pub pipeline: String,
    /// The nodes, topologically ordered.
    pub nodes: Vec<ExecNode>,
}

/// Options of `vlmpipe run`.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stages to recompute even when cached.
    pub force: Vec<String>,
    /// When non-empty, run only these stages and their inputs.
    pub only: Vec<String>,
    /// Say what would run and why, run nothing.
    pub dry_run: bool,
    /// How long to wait for another run holding the cache lock.
    pub lock_wait: Duration,
    /// No progress bars.
    pub quiet: bool,
}

/// Errors that stop a run before any stage runs (a failing stage is not one of these).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// `--force`/`--only` named a stage the pipeline does not have.
    #[error("unknown stage `{name}` in `--{flag}`{hint}")]
    UnknownStage {
        flag: &'static str,
        name: String,
        hint: String,
    },
    /// A node lists an input that does not come before it (a bug in plan lowering).
    #[error("stage `{stage}` reads input #{input}, which is not an earlier stage")]
    BadGraph { stage: String, input: usize },
    /// The cache could not be opened, locked or written.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Runs `graph` against `store`.
pub fn run(
    graph: &ExecGraph,
    store: &CacheStore,
    options: &RunOptions,
) -> Result<RunSummary, ExecError> {
    let started = Instant::now();
    validate(graph, options)?;
    let selected = selection(graph, &options.only);
    let progress = Progress::new(options.quiet);
    let lock = store.lock(options.lock_wait)?;
    let mut history = History::load(store.root(), &graph.pipeline);

    let mut reports: Vec<StageReport> = Vec::with_capacity(graph.nodes.len());
    // Per node: its fingerprint once known, and its entry once available.
    let mut fingerprints: Vec<Option<Fingerprint>> = vec![None; graph.nodes.len()];
    let mut entries: Vec<Option<CacheEntry>> = vec![None; graph.nodes.len()];

    for (index, node) in graph.nodes.iter().enumerate() {
        let stage_started = Instant::now();
        let mut report = StageReport {
            name: node.name.clone(),
            kind: node.stage.kind().to_owned(),
            status: StageStatus::Skipped,
            fingerprint: String::new(),
            seconds: 0.0,
            outputs: Vec::new(),
            reason: None,
            warnings: Vec::new(),
        };

        // Before its identity: a stage `--only` leaves out may not even look at its inputs (a
        // Hub model not yet cached would be downloaded just to be fingerprinted).
        if !selected[index] {
            report.reason = Some("not selected by `--only`".to_owned());
            reports.push(report);
            continue;
        }

        let identity = match identity_of(graph, node, &fingerprints) {
            Ok(identity) => identity,
            Err(reason) => {
                report.status = if reason.starts_with("input") {
                    StageStatus::Skipped
                } else {
                    StageStatus::Failed
                };
                report.reason = Some(reason);
                report.seconds = stage_started.elapsed().as_secs_f64();
                reports.push(report);
                continue;
            }
        };
        let fp = Fingerprint::parse(&identity.fingerprint).map_err(|_| ExecError::BadGraph {
            stage: node.name.clone(),
            input: index,
        })?;
        report.fingerprint = identity.fingerprint.clone();
        fingerprints[index] = Some(fp.clone());

        let forced = options.force.iter().any(|f| f == &node.name);
        let lookup = if forced {
            Lookup::Miss(MissReason::Absent)
        } else {
            store.lookup(&lock, &fp, Verify::Fast)?
        };
        match lookup {
            Lookup::Hit(entry) => {
                report.status = StageStatus::Cached;
                fill_outputs(&mut report, &entry);
                history.record(&node.name, identity);
                entries[index] = Some(*entry);
            }
            Lookup::Miss(miss) => {
                let why = if forced {
                    "forced".to_owned()
                } else {
                    match miss {
                        MissReason::Absent => history.explain(&node.name, &identity),
                        MissReason::Corrupt(problem) => format!("cache entry corrupt ({problem})"),
                    }
                };
                if options.dry_run {
                    report.status = StageStatus::WouldRun;
                    report.reason = Some(why);
                } else {
                    let missing = node.inputs.iter().find(|&&i| entries[i].is_none());
                    match missing {
                        Some(&i) => {
                            report.reason =
                                Some(format!("input `{}` did not complete", graph.nodes[i].name));
                        }
                        None => {
                            let inputs: Vec<CacheEntry> = node
                                .inputs
                                .iter()
                                .filter_map(|&i| entries[i].clone())
                                .collect();
                            if forced {
                                // `--force` starts over: a fine-tune does not resume from its
                                // checkpoints (best effort; the folder is vlmpipe's own).
                                let _ = std::fs::remove_dir_all(
                                    store.root().join("work").join(fp.as_str()),
                                );
                            }
                            progress.println(&format!("running `{}` ({why})", node.name));
                            match run_stage(store, &lock, node, &fp, &inputs, &progress)? {
                                Ok(entry) => {
                                    report.status = StageStatus::Ran;
                                    report.reason = Some(why);
                                    fill_outputs(&mut report, &entry);
                                    history.record(&node.name, identity);
                                    entries[index] = Some(entry);
                                }
                                Err(message) => {
                                    report.status = StageStatus::Failed;
                                    report.reason = Some(message);
                                }
                            }
                        }
                    }
                }
            }
        }
        report.seconds = stage_started.elapsed().as_secs_f64();
        reports.push(report);
    }

    // In a dry run a stage downstream of one that would run also has no entry (its fingerprint
    // is new), so it is reported as would-run by the lookup above; nothing more to do.
    if !options.dry_run {
        history.save(store.root(), &graph.pipeline);
    }
    let success = !reports.iter().any(|r| r.status == StageStatus::Failed);
    Ok(RunSummary {
        stages: reports,
        seconds: started.elapsed().as_secs_f64(),
        success,
        dry_run: options.dry_run,
    })
}

/// Runs one stage into a fresh entry. The outer error is a cache failure (stops the run); the
/// inner one is the stage's own failure (marks it failed, the run goes on).
fn run_stage(
    store: &CacheStore,
    lock: &crate::cache::CacheLock,
    node: &ExecNode,
    fp: &Fingerprint,
    inputs: &[CacheEntry],
    progress: &Progress,
) -> Result<Result<CacheEntry, String>, ExecError> {
    let mut writer = store.begin(lock, fp, &node.name, node.stage.kind())?;
    writer.set_inputs(inputs.iter().map(|e| e.fingerprint().clone()).collect());
    let out_dir = writer.dir().to_path_buf();
    let work_dir = store.root().join("work").join(fp.as_str());
    let mut ctx = StageContext {
        name: &node.name,
        inputs,
        out_dir: &out_dir,
        progress,
        work_dir: &work_dir,
    };
    let outcome = match node.stage.run(&mut ctx) {
        Ok(outcome) => outcome,
        // Dropping the writer deletes the temp folder: a failed stage leaves no entry.
        Err(error) => return Ok(Err(error_chain(error.as_ref()))),
    };
    let metadata = json!({
        "stage": outcome.metadata,
        "warnings": outcome.warnings,
        "exports": outcome.exports,
    });
    let entry = writer.commit(metadata)?;
    // The scratch state is only for resuming; a committed entry supersedes it.
    if work_dir.exists() {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    Ok(Ok(entry))
}

/// The identity (and fingerprint) of a node, or why it cannot be computed.
fn identity_of(
    graph: &ExecGraph,
    node: &ExecNode,
    fingerprints: &[Option<Fingerprint>],
) -> Result<StageIdentity, String> {
    let mut input_fps = Vec::with_capacity(node.inputs.len());
    let mut inputs = BTreeMap::new();
    for &i in &node.inputs {
        match fingerprints.get(i).and_then(Option::as_ref) {
            Some(fp) => {
                input_fps.push(fp.clone());
                inputs.insert(graph.nodes[i].name.clone(), fp.as_str().to_owned());
            }
            None => return Err(format!("input `{}` is not available", graph.nodes[i].name)),
        }
    }
    let external = node
        .stage
        .external_state()
        .map_err(|e| format!("cannot read its inputs: {}", error_chain(e.as_ref())))?;
    let params = node.stage.params();
    // External state is hashed as part of the parameters so one canonical text covers both.
    let hashed = json!({ "params": params, "external": external });
    let fp = crate::cache::fingerprint(
        node.stage.kind(),
        &hashed,
        &input_fps,
        node.stage.code_version(),
    );
    Ok(StageIdentity {
        fingerprint: fp.as_str().to_owned(),
        kind: node.stage.kind().to_owned(),
        code_version: node.stage.code_version(),
        params,
        external,
        inputs,
    })
}

fn fill_outputs(report: &mut StageReport, entry: &CacheEntry) {
    report.outputs = entry
        .manifest()
        .files
        .iter()
        .map(|f| entry.path(&f.name))
        .collect();
    let metadata = &entry.manifest().metadata;
    if let Some(exports) = metadata.get("exports").and_then(Value::as_array) {
        report
            .outputs
            .extend(exports.iter().filter_map(Value::as_str).map(Into::into));
    }
    if let Some(warnings) = metadata.get("warnings").and_then(Value::as_array) {
        report.warnings = warnings
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect();
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

fn validate(graph: &ExecGraph, options: &RunOptions) -> Result<(), ExecError> {
    for (index, node) in graph.nodes.iter().enumerate() {
        if let Some(&bad) = node.inputs.iter().find(|&&i| i >= index) {
            return Err(ExecError::BadGraph {
                stage: node.name.clone(),
                input: bad,
            });
        }
    }
    let names: Vec<&str> = graph.nodes.iter().map(|n| n.name.as_str()).collect();
    for (flag, list) in [("force", &options.force), ("only", &options.only)] {
        for name in list {
            if !names.contains(&name.as_str()) {
                let hint = names
                    .iter()
                    .map(|n| (strsim::jaro_winkler(n, name), *n))
                    .filter(|(score, _)| *score > 0.8)
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, n)| format!(" (did you mean `{n}`?)"))
                    .unwrap_or_default();
                return Err(ExecError::UnknownStage {
                    flag,
                    name: name.clone(),
                    hint,
                });
            }
        }
    }
    Ok(())
}

/// Which nodes run: all, or the `--only` stages and everything they read (transitively).
fn selection(graph: &ExecGraph, only: &[String]) -> Vec<bool> {
    if only.is_empty() {
        return vec![true; graph.nodes.len()];
    }
    let mut selected = vec![false; graph.nodes.len()];
    let mut stack: Vec<usize> = graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| only.contains(&n.name))
        .map(|(i, _)| i)
        .collect();
    let mut seen = BTreeSet::new();
    while let Some(i) = stack.pop() {
        if seen.insert(i) {
            selected[i] = true;
            stack.extend(graph.nodes[i].inputs.iter().copied());
        }
    }
    selected
}
