//! The `dataset` stage: a [`DatasetSpec`] (built by lowering) → [`ingest`] into the entry.
//!
//! The entry holds exactly what `ingest` writes (`rows.parquet`, `images.parquet`,
//! `errors.parquet`, `filtered.parquet`). The fingerprint covers the canonical parameters plus
//! the source's current state: a stat of every local file ([`DatasetSpec::source_stamp`]), or
//! the Hub commit a `hf(...)` source resolves to, so an edited folder or a moved `main` reruns
//! the stage while a no-change rerun reads nothing but file metadata.
//!
//! With `shards = N` on the declaration (or `run --shards N`) the executor computes it as N
//! shards, each checking a contiguous run of the source's rows (`super::shard`), and merges them
//! into the entry an unsharded ingest writes, under the same fingerprint.

use serde_json::{Value, json};

use super::{
    DATA_CODE_VERSION, DatasetSpec, IngestReport, ShardIngest, ShardPart, SourceSpec, ingest,
    ingest_shard, merge_shards,
};
use crate::cache::CacheEntry;
use crate::exec::{ShardIndex, Sharded, Stage, StageContext, StageError, StageOutcome};
use crate::hub::{Hub, HubRepo};

/// Rejected rows named in a warning before it says "and N more".
const WARNING_EXAMPLES: usize = 5;

/// A `hf(...)` source, resolved to local Parquet files when the stage needs them.
#[derive(Clone, Debug)]
pub struct HfSource {
    pub hub: Hub,
    pub repo: HubRepo,
    pub split: String,
    pub config: Option<String>,
}

/// What a `dataset` stage ingests.
#[derive(Clone, Debug)]
pub struct DatasetConfig {
    /// The node's canonical parameters.
    pub params: Value,
    /// The spec to ingest; for a Hub source its `source` is replaced by the resolved files.
    pub spec: DatasetSpec,
    /// The Hub source, when the dataset comes from the Hub.
    pub hf: Option<HfSource>,
    /// `shards = N` on the declaration. Not in [`Stage::params`]: an execution setting, the
    /// merged entry equals an unsharded ingest's.
    pub shards: Option<usize>,
}

/// The configured dataset stage.
pub struct DatasetStage {
    params: Value,
    spec: DatasetSpec,
    hf: Option<HfSource>,
    shards: Option<usize>,
}

impl DatasetStage {
    pub(crate) fn from_config(config: DatasetConfig) -> Self {
        Self {
            params: config.params,
            spec: config.spec,
            hf: config.hf,
            shards: config.shards,
        }
    }

    /// The spec with a Hub source resolved to its Parquet files (and the commit they came from).
    fn resolved(&self) -> Result<(DatasetSpec, Option<String>), StageError> {
        let Some(hf) = &self.hf else {
            return Ok((self.spec.clone(), None));
        };
        let files = hf
            .hub
            .dataset_split_files(&hf.repo, hf.config.as_deref(), &hf.split)?;
        let mut spec = self.spec.clone();
        spec.source = SourceSpec::Parquet { files: files.files };
        Ok((spec, Some(files.commit)))
    }
}

impl Stage for DatasetStage {
    fn kind(&self) -> &'static str {
        "dataset"
    }

    fn code_version(&self) -> u32 {
        DATA_CODE_VERSION
    }

    fn params(&self) -> Value {
        self.params.clone()
    }

    fn external_state(&self) -> Result<Value, StageError> {
        match &self.hf {
            // The commit pins the content; the local paths of the cached files do not matter.
            Some(hf) => {
                let files =
                    hf.hub
                        .dataset_split_files(&hf.repo, hf.config.as_deref(), &hf.split)?;
                Ok(json!({ "commit": files.commit, "files": files.repo_paths }))
            }
            None => Ok(self.spec.source_stamp()?),
        }
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        let (spec, commit) = self.resolved()?;
        let bar = ctx.progress.bar(0, ctx.name);
        let report = ingest(&spec, ctx.out_dir, &bar)?;
        bar.finish_and_clear();
        let warnings = ingest_warnings(&report);
        let mut metadata = serde_json::to_value(&report)?;
        if let (Some(commit), Some(map)) = (commit, metadata.as_object_mut()) {
            map.insert("hub_commit".to_owned(), Value::String(commit));
        }
        Ok(StageOutcome { metadata, warnings })
    }

    fn sharded(&self) -> Option<&dyn Sharded> {
        Some(self)
    }

    fn shards(&self) -> Option<usize> {
        self.shards
    }
}

/// A shard checks the images of a contiguous run of the source's rows (see
/// `super::shard`); its metadata is its [`ShardIngest`] (plus the Hub commit it read), from
/// which the merge writes the unsharded entry.
impl Sharded for DatasetStage {
    fn run_shard(
        &self,
        ctx: &mut StageContext<'_>,
        shard: ShardIndex,
    ) -> Result<StageOutcome, StageError> {
        let (spec, commit) = self.resolved()?;
        let bar = ctx
            .progress
            .bar(0, &format!("{} [shard {shard}]", ctx.name));
        let report = ingest_shard(&spec, &|rows| shard.range(rows, 1), ctx.out_dir, &bar)?;
        bar.finish_and_clear();
        let mut metadata = serde_json::to_value(&report)?;
        if let (Some(commit), Some(map)) = (commit, metadata.as_object_mut()) {
            map.insert("hub_commit".to_owned(), Value::String(commit));
        }
        Ok(StageOutcome {
            metadata,
            warnings: Vec::new(),
        })
    }

    fn merge(
        &self,
        ctx: &mut StageContext<'_>,
        shards: &[CacheEntry],
    ) -> Result<StageOutcome, StageError> {
        let mut parts = Vec::with_capacity(shards.len());
        for shard in shards {
            let metadata = &shard.manifest().metadata["stage"];
            let report: ShardIngest = serde_json::from_value(metadata.clone())?;
            parts.push(ShardPart {
                dir: shard.dir().to_path_buf(),
                report,
            });
        }
        // The merge reads no source: the shards hold everything, so a Hub source stays unresolved.
        let report = merge_shards(&self.spec, &parts, ctx.out_dir)?;
        let warnings = ingest_warnings(&report);
        let mut metadata = serde_json::to_value(&report)?;
        let commit = shards
            .first()
            .and_then(|s| s.manifest().metadata["stage"]["hub_commit"].as_str());
        if let (Some(commit), Some(map)) = (commit, metadata.as_object_mut()) {
            map.insert("hub_commit".to_owned(), Value::String(commit.to_owned()));
        }
        Ok(StageOutcome { metadata, warnings })
    }
}

/// What a person should hear about an ingest: rejected images, skipped files and drop ids that
/// matched nothing.
pub fn ingest_warnings(report: &IngestReport) -> Vec<String> {
    let mut warnings = Vec::new();
    if report.errors > 0 {
        let examples: Vec<String> = report
            .error_examples
            .iter()
            .take(WARNING_EXAMPLES)
            .map(|(row, reason)| format!("`{row}` ({reason})"))
            .collect();
        let more = report.errors.saturating_sub(examples.len());
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        warnings.push(format!(
            "{} image{} could not be read and {} recorded in errors.parquet (an eval counts each as a wrong answer): {}{tail}",
            report.errors,
            if report.errors == 1 { "" } else { "s" },
            if report.errors == 1 { "is" } else { "are" },
            examples.join(", ")
        ));
    }
    if report.skipped_non_images > 0 {
        let n = report.skipped_non_images;
        let examples: Vec<String> = report
            .skipped_examples
            .iter()
            .take(WARNING_EXAMPLES)
            .map(|id| format!("`{id}`"))
            .collect();
        let more = n.saturating_sub(examples.len());
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        warnings.push(format!(
            "{n} {} skipped: {}{tail}",
            if n == 1 {
                "file that is not an image was"
            } else {
                "files that are not images were"
            },
            examples.join(", ")
        ));
    }
    if !report.unknown_drop_ids.is_empty() {
        warnings.push(format!(
            "`drop` lists ids that match no row: {}",
            report
                .unknown_drop_ids
                .iter()
                .map(|id| format!("`{id}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{ExecGraph, ExecNode, RunOptions, ShardJob, ShardLauncher, ShardState};
    use crate::stages::data::{Shape, SyntheticSpec};
    use std::sync::{Arc, Mutex};

    /// What a launcher is handed: the stage's kind and name, the shard count, the pending shards.
    type Handed = (String, String, usize, Vec<usize>);

    /// A cluster launcher's view of the seam: what it is handed, computed as a worker would.
    #[derive(Default)]
    struct Recording {
        jobs: Mutex<Vec<Handed>>,
    }

    impl ShardLauncher for Recording {
        fn name(&self) -> &str {
            "recording"
        }

        fn launch(
            &self,
            job: &ShardJob<'_>,
            report: &mut dyn FnMut(usize, ShardState),
            _cancelled: &dyn Fn() -> bool,
        ) -> Result<(), String> {
            self.jobs.lock().unwrap().push((
                job.kind.to_owned(),
                job.stage.to_owned(),
                job.count,
                job.pending.clone(),
            ));
            for &index in &job.pending {
                match job.compute_here(index) {
                    Ok(()) => report(index, ShardState::Done),
                    Err(reason) => report(index, ShardState::Failed(reason)),
                }
            }
            Ok(())
        }
    }

    #[test]
    fn dataset_shards_go_through_the_launcher_seam() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::cache::CacheStore::open(dir.path()).unwrap();
        let spec = DatasetSpec::new(SourceSpec::Synthetic(SyntheticSpec {
            n: 9,
            width: 16,
            height: 16,
            shapes: vec![Shape::Circle],
            ..SyntheticSpec::default()
        }));
        let stage = DatasetStage::from_config(DatasetConfig {
            params: json!({ "n": 9 }),
            spec,
            hf: None,
            shards: Some(3),
        });
        let graph = ExecGraph {
            pipeline: "seam".to_owned(),
            nodes: vec![ExecNode {
                name: "pictures".to_owned(),
                inputs: vec![],
                stage: Box::new(stage),
            }],
        };
        let launcher = Arc::new(Recording::default());
        let options = RunOptions {
            quiet: true,
            launcher: Some(launcher.clone()),
            ..RunOptions::default()
        };
        let summary = crate::exec::run(&graph, &store, &options).unwrap();
        assert!(summary.success);
        let counts = summary.stages[0].shards.as_ref().expect("sharded");
        assert_eq!(counts.launcher, "recording");
        assert_eq!(counts.computed, [0, 1, 2]);
        // What a Slurm launcher names its array by and submits (`vlmpipe:dataset:pictures`).
        assert_eq!(
            *launcher.jobs.lock().unwrap(),
            [(
                "dataset".to_owned(),
                "pictures".to_owned(),
                3,
                vec![0, 1, 2]
            )]
        );
    }

    #[test]
    fn warnings_name_rejected_rows() {
        let report = IngestReport {
            errors: 7,
            error_examples: (0..7)
                .map(|i| (format!("r{i}"), "truncated".to_owned()))
                .collect(),
            unknown_drop_ids: vec!["x:1".to_owned()],
            skipped_non_images: 1,
            skipped_examples: vec!["README.txt".to_owned()],
            ..IngestReport::default()
        };
        let warnings = ingest_warnings(&report);
        assert_eq!(warnings.len(), 3);
        assert!(
            warnings[0].starts_with("7 images could not be read"),
            "{}",
            warnings[0]
        );
        assert!(warnings[0].contains("`r0` (truncated)"));
        assert!(warnings[0].ends_with("and 2 more"), "{}", warnings[0]);
        assert_eq!(
            warnings[1],
            "1 file that is not an image was skipped: `README.txt`"
        );
        assert!(warnings[2].contains("`x:1`"));
    }
}
