//! [`SlurmSettings`] and the profile file that holds them, so the pipeline file names no cluster.
//!
//! A profile is TOML (`--profile FILE`, else `vlmpipe.toml` beside the pipeline file when there
//! is one):
//!
//! ```toml
//! executor = "slurm"
//! [slurm]
//! partition = "gpu"
//! gpus-per-task = 1
//! cpus-per-task = 8
//! max-parallel = 16
//! sbatch-args = ["--time=02:00:00", "--account=vision"]
//! ```
//!
//! Flags win over the profile, field by field (`--sbatch-arg`s are added after the profile's).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::error::SlurmError;
use crate::file_error::FileError;

/// Where the shards of a run are computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Executor {
    /// In this process.
    #[default]
    Local,
    /// As Slurm job arrays (`sbatch`), on the cluster this machine submits to.
    Slurm,
}

/// How shards go to Slurm.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SlurmSettings {
    /// `--partition` [default: the cluster's].
    pub partition: Option<String>,
    /// `--gpus-per-task` of every task.
    pub gpus_per_task: Option<u32>,
    /// `--cpus-per-task` of every task.
    pub cpus_per_task: Option<u32>,
    /// At most this many tasks of one array at once (`--array=…%K`).
    pub max_parallel: Option<u32>,
    /// More `sbatch` arguments, after vlmpipe's (so they override them).
    #[serde(default)]
    pub sbatch_args: Vec<String>,
    /// Resubmissions of a failed, preempted or node-failed task [default: 2].
    pub max_retries: Option<u32>,
    /// Seconds the cache probe job may take, queueing included [default: 120].
    pub probe_timeout: Option<f64>,
    /// Seconds between two looks at the queue [default: 1].
    pub poll_interval: Option<f64>,
}

impl SlurmSettings {
    pub fn max_retries(&self) -> u32 {
        self.max_retries.unwrap_or(2)
    }

    pub fn probe_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.probe_timeout.unwrap_or(120.0).max(1.0))
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_secs_f64(self.poll_interval.unwrap_or(1.0).clamp(0.05, 60.0))
    }

    /// `flags` over `self` (a profile's): each field the flags set wins; sbatch arguments add up.
    pub fn overlaid_with(self, flags: SlurmSettings) -> SlurmSettings {
        let mut sbatch_args = self.sbatch_args;
        sbatch_args.extend(flags.sbatch_args);
        SlurmSettings {
            partition: flags.partition.or(self.partition),
            gpus_per_task: flags.gpus_per_task.or(self.gpus_per_task),
            cpus_per_task: flags.cpus_per_task.or(self.cpus_per_task),
            max_parallel: flags.max_parallel.or(self.max_parallel),
            sbatch_args,
            max_retries: flags.max_retries.or(self.max_retries),
            probe_timeout: flags.probe_timeout.or(self.probe_timeout),
            poll_interval: flags.poll_interval.or(self.poll_interval),
        }
    }
}

/// A profile file: the executor and its settings.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub executor: Option<Executor>,
    #[serde(default)]
    pub slurm: SlurmSettings,
}

/// The name of the profile found beside a pipeline file.
pub(crate) const PROFILE_FILE: &str = "vlmpipe.toml";

impl Profile {
    /// Reads `path`; a TOML error names `path:line:column`.
    pub fn read(path: &Path) -> Result<Profile, SlurmError> {
        let text = std::fs::read_to_string(path).map_err(FileError::read(path))?;
        toml::from_str(&text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_column(&text, span.start))
                .unwrap_or((1, 1));
            SlurmError::Profile {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })
    }

    /// The profile to use: `explicit`, else `vlmpipe.toml` in the pipeline's folder, else none.
    pub fn find(
        explicit: Option<&Path>,
        pipeline: &Path,
    ) -> Result<Option<(PathBuf, Profile)>, SlurmError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let dir = pipeline
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let beside = dir.join(PROFILE_FILE);
                if !beside.is_file() {
                    return Ok(None);
                }
                beside
            }
        };
        Ok(Some((path.clone(), Profile::read(&path)?)))
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_reads_executor_and_slurm_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PROFILE_FILE);
        std::fs::write(
            &path,
            "executor = \"slurm\"\n[slurm]\npartition = \"gpu\"\ngpus-per-task = 1\nmax-parallel = 4\nsbatch-args = [\"--time=1:00:00\"]\n",
        )
        .unwrap();
        let (found, profile) = Profile::find(None, &dir.path().join("p.vp"))
            .unwrap()
            .unwrap();
        assert_eq!(found, path);
        assert_eq!(profile.executor, Some(Executor::Slurm));
        assert_eq!(profile.slurm.partition.as_deref(), Some("gpu"));
        assert_eq!(profile.slurm.gpus_per_task, Some(1));
        assert_eq!(profile.slurm.max_parallel, Some(4));
        assert_eq!(profile.slurm.sbatch_args, ["--time=1:00:00"]);
    }

    #[test]
    fn no_profile_beside_the_pipeline_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Profile::find(None, &dir.path().join("p.vp")).unwrap(), None);
    }

    #[test]
    fn a_bad_profile_field_is_an_error_at_its_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prof.toml");
        std::fs::write(&path, "[slurm]\npartition = \"gpu\"\n  gpu-per-task = 1\n").unwrap();
        let err = Profile::read(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}:3:3: ", path.display())),
            "{err}"
        );
        assert!(err.contains("gpu-per-task"), "{err}");
    }

    #[test]
    fn flags_win_over_the_profile_and_sbatch_arguments_add_up() {
        let profile = SlurmSettings {
            partition: Some("cpu".into()),
            cpus_per_task: Some(4),
            sbatch_args: vec!["--account=a".into()],
            ..SlurmSettings::default()
        };
        let flags = SlurmSettings {
            partition: Some("gpu".into()),
            sbatch_args: vec!["--time=5".into()],
            ..SlurmSettings::default()
        };
        let merged = profile.overlaid_with(flags);
        assert_eq!(merged.partition.as_deref(), Some("gpu"));
        assert_eq!(merged.cpus_per_task, Some(4));
        assert_eq!(merged.sbatch_args, ["--account=a", "--time=5"]);
    }
}
