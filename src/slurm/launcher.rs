//! [`SlurmLauncher`]: the executor's shard seam ([`ShardLauncher`]) on Slurm.

use std::path::{Path, PathBuf};

use super::array::{ArgPart, ArrayJob, TaskEvent, run_array};
use super::commands::SlurmCommands;
use super::error::SlurmError;
use super::preflight::{check_partition, forget_probe, probe_cache};
use super::settings::SlurmSettings;
use crate::exec::{ShardJob, ShardLauncher, ShardState, WholeJob};

/// How a task runs `vlmpipe worker`: this binary, the pipeline file and the driver's flags that
/// change fingerprints or what may be read (`--set`, `--allow-read`) or where the model runs.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    /// The `vlmpipe` binary (on the shared filesystem, as the cache).
    pub exe: PathBuf,
    /// The pipeline file, absolute.
    pub file: PathBuf,
    /// Flags passed on to every worker after the shard's own (`--set k=v`, `--device cuda`…).
    pub args: Vec<String>,
}

impl WorkerCommand {
    /// `vlmpipe worker FILE --stage S --shard $SLURM_ARRAY_TASK_ID --of N --cache-dir DIR …`
    pub fn shard(&self, stage: &str, count: usize, cache: &Path) -> Vec<ArgPart> {
        let lit = |s: &str| ArgPart::Lit(s.to_string());
        let mut words = vec![
            lit(&self.exe.display().to_string()),
            lit("worker"),
            lit(&self.file.display().to_string()),
            lit("--stage"),
            lit(stage),
            lit("--shard"),
            ArgPart::TaskIndex,
            lit("--of"),
            lit(&count.to_string()),
            lit("--cache-dir"),
            lit(&cache.display().to_string()),
        ];
        words.extend(self.args.iter().map(|a| lit(a)));
        words
    }

    /// `vlmpipe worker FILE --stage S --cache-dir DIR …`: the whole stage.
    pub fn whole(&self, stage: &str, cache: &Path) -> Vec<ArgPart> {
        let mut words: Vec<ArgPart> = [
            &self.exe.display().to_string(),
            "worker",
            &self.file.display().to_string(),
            "--stage",
            stage,
            "--cache-dir",
            &cache.display().to_string(),
        ]
        .iter()
        .map(|s| ArgPart::Lit((*s).to_string()))
        .collect();
        words.extend(self.args.iter().map(|a| ArgPart::Lit(a.clone())));
        words
    }

    /// `vlmpipe worker --probe PATH`
    pub fn probe(&self, path: &Path) -> Vec<ArgPart> {
        vec![
            ArgPart::Lit(self.exe.display().to_string()),
            ArgPart::Lit("worker".into()),
            ArgPart::Lit("--probe".into()),
            ArgPart::Lit(path.display().to_string()),
        ]
    }
}

/// Sends a stage's pending shards to Slurm as one job array of `vlmpipe worker` tasks.
pub struct SlurmLauncher {
    commands: SlurmCommands,
    settings: SlurmSettings,
    worker: WorkerCommand,
}

impl SlurmLauncher {
    /// Checks what would fail only after the long work started: Slurm's commands on PATH, the
    /// partition, and that a worker sees `cache` (a probe job); then returns the launcher.
    pub fn connect(
        settings: SlurmSettings,
        worker: WorkerCommand,
        cache: &Path,
    ) -> Result<SlurmLauncher, SlurmError> {
        let commands = SlurmCommands::find()?;
        if let Some(partition) = &settings.partition {
            check_partition(&commands, partition)?;
        }
        probe_cache(&commands, &settings, cache, &|path| worker.probe(path))?;
        Ok(SlurmLauncher {
            commands,
            settings,
            worker,
        })
    }
}

impl ShardLauncher for SlurmLauncher {
    fn name(&self) -> &str {
        "slurm"
    }

    fn launch(
        &self,
        job: &ShardJob<'_>,
        report: &mut dyn FnMut(usize, ShardState),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), String> {
        let command = self.worker.shard(job.stage, job.count, job.cache_root);
        let log_dir = job.cache_root.join("slurm").join("logs");
        let name = format!("vlmpipe:{}:{}", job.kind, job.stage);
        let array = ArrayJob {
            name: &name,
            command: &command,
            indices: &job.pending,
            log_dir: &log_dir,
        };
        // The shard's entry is the judge (and the executor looks every shard up afterwards): it
        // is seen the moment the worker renames it into place, not when Slurm reaped the task.
        let outcome = run_array(
            &self.commands,
            &self.settings,
            &array,
            Some(&|index| job.is_done(index)),
            &mut |index, event| match event {
                TaskEvent::Pending(_) => report(index, ShardState::Pending),
                TaskEvent::Running => report(index, ShardState::Running),
                TaskEvent::Done => report(index, ShardState::Done),
                TaskEvent::Retrying {
                    reason,
                    attempt,
                    of,
                } => {
                    eprintln!(
                        "`{}` shard {index}/{}: resubmitted (attempt {attempt} of {of}): {reason}",
                        job.stage, job.count
                    );
                    report(index, ShardState::Pending);
                }
                TaskEvent::Failed(reason) => report(index, ShardState::Failed(reason.clone())),
            },
            cancelled,
        )
        .map_err(|e| e.to_string())?;
        if !outcome.failed.is_empty() {
            // Perhaps the workers no longer see the cache: the next run probes again.
            forget_probe(job.cache_root);
        }
        if outcome.cancelled {
            let jobs = outcome.jobs.join(", ");
            for &index in &job.pending {
                if !outcome.done.contains(&index) {
                    report(
                        index,
                        ShardState::Failed(format!("cancelled (scancel of job {jobs})")),
                    );
                }
            }
        }
        Ok(())
    }

    fn runs_whole_stages(&self) -> bool {
        true
    }

    fn launch_whole(
        &self,
        job: &WholeJob<'_>,
        report: &mut dyn FnMut(ShardState),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<String>, String> {
        let command = self.worker.whole(job.stage, job.cache_root);
        let log_dir = job.cache_root.join("slurm").join("logs");
        let name = format!("vlmpipe:{}:{}", job.kind, job.stage);
        // One job: an array of the single task 0, so it is followed, resubmitted and cancelled
        // exactly as a shard is (and a preempted fine-tune resumes from its checkpoints, which
        // live in the cache's work folder).
        let array = ArrayJob {
            name: &name,
            command: &command,
            indices: &[0],
            log_dir: &log_dir,
        };
        let outcome = run_array(
            &self.commands,
            &self.settings,
            &array,
            Some(&|_| job.is_done()),
            &mut |_, event| match event {
                TaskEvent::Pending(_) => report(ShardState::Pending),
                TaskEvent::Running => report(ShardState::Running),
                TaskEvent::Done => report(ShardState::Done),
                TaskEvent::Retrying {
                    reason,
                    attempt,
                    of,
                } => {
                    eprintln!(
                        "`{}`: resubmitted (attempt {attempt} of {of}): {reason}",
                        job.stage
                    );
                    report(ShardState::Pending);
                }
                TaskEvent::Failed(reason) => report(ShardState::Failed(reason.clone())),
            },
            cancelled,
        )
        .map_err(|e| e.to_string())?;
        if !outcome.failed.is_empty() {
            forget_probe(job.cache_root);
        }
        if outcome.cancelled && outcome.done.is_empty() {
            let jobs = outcome.jobs.join(", ");
            report(ShardState::Failed(format!(
                "cancelled (scancel of job {jobs})"
            )));
        }
        Ok(outcome.jobs)
    }
}
