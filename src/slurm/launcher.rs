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
        self.stage_command(stage, Some(count), cache)
    }

    /// `vlmpipe worker FILE --stage S --cache-dir DIR …`: the whole stage.
    pub fn whole(&self, stage: &str, cache: &Path) -> Vec<ArgPart> {
        self.stage_command(stage, None, cache)
    }

    fn stage_command(&self, stage: &str, shards: Option<usize>, cache: &Path) -> Vec<ArgPart> {
        let lit = |s: &str| ArgPart::Lit(s.to_string());
        let mut words = vec![
            lit(&self.exe.display().to_string()),
            lit("worker"),
            lit(&self.file.display().to_string()),
            lit("--stage"),
            lit(stage),
        ];
        if let Some(count) = shards {
            words.extend([
                lit("--shard"),
                ArgPart::TaskIndex,
                lit("--of"),
                lit(&count.to_string()),
            ]);
        }
        words.extend([lit("--cache-dir"), lit(&cache.display().to_string())]);
        words.extend(self.args.iter().map(|a| lit(a)));
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

impl SlurmLauncher {
    /// Submits `indices` of `command` as one array named after the stage, follows it until each
    /// task's work `is_done` or failed for good (telling `report`), and returns how it ended.
    /// A failed task forgets the remembered probe; on cancellation, the tasks without their work
    /// are reported failed. `label(index)` names a task in messages.
    #[allow(clippy::too_many_arguments)]
    fn follow(
        &self,
        kind: &str,
        stage: &str,
        command: &[ArgPart],
        indices: &[usize],
        cache_root: &Path,
        is_done: &dyn Fn(usize) -> bool,
        label: &dyn Fn(usize) -> String,
        report: &mut dyn FnMut(usize, ShardState),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<String>, String> {
        let log_dir = cache_root.join("slurm").join("logs");
        let name = format!("vlmpipe:{kind}:{stage}");
        let array = ArrayJob {
            name: &name,
            command,
            indices,
            log_dir: &log_dir,
        };
        // The work's cache entry is the judge (and the executor looks it up afterwards): it is
        // seen the moment the worker renames it into place, not when Slurm reaped the task.
        let outcome = run_array(
            &self.commands,
            &self.settings,
            &array,
            Some(is_done),
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
                        "{}: resubmitted (attempt {attempt} of {of}): {reason}",
                        label(index)
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
            forget_probe(cache_root);
        }
        if outcome.cancelled {
            let jobs = outcome.jobs.join(", ");
            for &index in indices {
                if !outcome.done.contains(&index) {
                    report(
                        index,
                        ShardState::Failed(format!("cancelled (scancel of job {jobs})")),
                    );
                }
            }
        }
        Ok(outcome.jobs)
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
        self.follow(
            job.kind,
            job.stage,
            &command,
            &job.pending,
            job.cache_root,
            &|index| job.is_done(index),
            &|index| format!("`{}` shard {index}/{}", job.stage, job.count),
            report,
            cancelled,
        )?;
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
        // One job: an array of the single task 0, so it is followed, resubmitted and cancelled
        // exactly as a shard is (and a preempted fine-tune resumes from its checkpoints, which
        // live in the cache's work folder).
        self.follow(
            job.kind,
            job.stage,
            &command,
            &[0],
            job.cache_root,
            &|_| job.is_done(),
            &|_| format!("`{}`", job.stage),
            &mut |_, state| report(state),
            cancelled,
        )
    }
}
