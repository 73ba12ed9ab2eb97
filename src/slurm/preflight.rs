//! Checks before the long work: the partition exists, and the workers see the cache.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::array::{ArgPart, ArrayJob, TaskEvent, run_array};
use super::commands::SlurmCommands;
use super::error::SlurmError;
use super::settings::SlurmSettings;
use crate::file_error::FileError;

/// `partition` is one `sinfo` knows, else [`SlurmError::NoPartition`] listing those it knows.
pub fn check_partition(commands: &SlurmCommands, partition: &str) -> Result<(), SlurmError> {
    let names = |out: String| -> Vec<String> {
        out.lines()
            .map(|l| l.trim().trim_end_matches('*').to_string())
            .filter(|l| !l.is_empty())
            .collect()
    };
    let found = names(commands.sinfo([
        "--noheader".to_string(),
        format!("--partition={partition}"),
        "--format=%P".to_string(),
    ])?);
    if found.iter().any(|p| p == partition) {
        return Ok(());
    }
    let mut known = names(commands.sinfo(["--noheader", "--format=%P"])?);
    known.dedup();
    Err(SlurmError::NoPartition {
        partition: partition.to_string(),
        known: if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        },
    })
}

/// How long a passed probe is trusted for the same cache, cluster and settings: runs minutes
/// apart skip the probe job (0.65 s of a 4-shard quickstart eval's 3.7 s on the one-node cluster,
/// more where the queue is busy). A task that fails forgets it ([`forget_probe`]), so a cache the
/// workers stopped seeing is probed again on the next run.
const PROBE_TRUSTED: Duration = Duration::from_secs(3600);

/// Where a passed probe is remembered: `cache/slurm/probe-passed`, holding the key of what was
/// probed and when (Unix seconds), one line each.
fn probe_memo(cache: &Path) -> PathBuf {
    cache.join("slurm").join("probe-passed")
}

/// What a probe's verdict depends on besides the cache: the cluster (`SLURM_CONF`, the `sbatch`
/// binary), where tasks go (partition, `sbatch` arguments) and the machine submitting.
fn probe_key(commands: &SlurmCommands, settings: &SlurmSettings) -> String {
    let host = crate::exec::host_name();
    let conf = std::env::var("SLURM_CONF").unwrap_or_default();
    let text = format!(
        "{conf}\n{}\n{:?}\n{:?}\n{}",
        commands.sbatch_path().display(),
        settings.partition,
        settings.sbatch_args,
        host
    );
    blake3::hash(text.as_bytes()).to_hex()[..32].to_string()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether a probe with `key` passed for `cache` less than [`PROBE_TRUSTED`] ago.
fn probe_remembered(cache: &Path, key: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(probe_memo(cache)) else {
        return false;
    };
    let mut lines = text.lines();
    let (Some(seen_key), Some(when)) = (lines.next(), lines.next()) else {
        return false;
    };
    let Ok(when) = when.trim().parse::<u64>() else {
        return false;
    };
    let now = now_secs();
    seen_key == key && when <= now && now - when < PROBE_TRUSTED.as_secs()
}

/// Forgets a passed probe of `cache` (a task failed: the next run probes again).
pub fn forget_probe(cache: &Path) {
    let _ = std::fs::remove_file(probe_memo(cache));
}

/// Checks that the workers see `cache` with [`run_probe_job`], unless a probe of the same cache,
/// cluster and settings passed within the last hour (remembered in `cache/slurm/probe-passed`).
pub fn probe_cache(
    commands: &SlurmCommands,
    settings: &SlurmSettings,
    cache: &Path,
    probe_command: &dyn Fn(&Path) -> Vec<ArgPart>,
) -> Result<(), SlurmError> {
    let key = probe_key(commands, settings);
    if probe_remembered(cache, &key) {
        return Ok(());
    }
    run_probe_job(commands, settings, cache, probe_command)?;
    // Best effort: without the memo the next run only probes again.
    let memo = probe_memo(cache);
    if let Some(dir) = memo.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        let _ = std::fs::write(&memo, format!("{key}\n{}\n", now_secs()));
    }
    Ok(())
}

/// Writes a probe file into `cache/probes/`, runs one task of `probe_command(probe file)` on the
/// cluster (the partition and `sbatch` arguments of `settings`, no GPUs), and passes when the
/// task wrote `PROBE.seen` starting with the probe's text: the workers see the cache. Bounded by
/// `settings.probe_timeout()`; the probe files are removed either way.
pub fn run_probe_job(
    commands: &SlurmCommands,
    settings: &SlurmSettings,
    cache: &Path,
    probe_command: &dyn Fn(&Path) -> Vec<ArgPart>,
) -> Result<(), SlurmError> {
    let dir = cache.join("probes");
    std::fs::create_dir_all(&dir).map_err(FileError::create(&dir))?;
    let token = blake3::hash(
        format!("{}:{:?}", std::process::id(), std::time::SystemTime::now()).as_bytes(),
    )
    .to_hex()[..16]
        .to_string();
    let probe = dir.join(&token);
    let seen = dir.join(format!("{token}.seen"));
    std::fs::write(&probe, &token).map_err(FileError::write(&probe))?;
    let result = run_probe(
        commands,
        settings,
        cache,
        &probe,
        &seen,
        &token,
        probe_command,
    );
    let _ = std::fs::remove_file(&probe);
    let _ = std::fs::remove_file(&seen);
    result
}

fn run_probe(
    commands: &SlurmCommands,
    settings: &SlurmSettings,
    cache: &Path,
    probe: &Path,
    seen: &Path,
    token: &str,
    probe_command: &dyn Fn(&Path) -> Vec<ArgPart>,
) -> Result<(), SlurmError> {
    // Where the real tasks go, but one try and no GPUs: the probe only reads a file.
    let probe_settings = SlurmSettings {
        gpus_per_task: None,
        cpus_per_task: None,
        max_parallel: None,
        max_retries: Some(0),
        ..settings.clone()
    };
    let command = probe_command(probe);
    let log_dir = cache.join("slurm").join("probe-logs");
    let job = ArrayJob {
        name: "vlmpipe:probe",
        command: &command,
        indices: &[0],
        log_dir: &log_dir,
    };
    let saw_token = |_: usize| {
        std::fs::read_to_string(seen)
            .is_ok_and(|text| text.lines().next().map(str::trim) == Some(token))
    };
    let start = Instant::now();
    let timeout = settings.probe_timeout();
    let mut last = "not yet in the queue".to_string();
    let outcome = run_array(
        commands,
        &probe_settings,
        &job,
        Some(&saw_token),
        &mut |_, event| {
            last = match event {
                TaskEvent::Pending(reason) => format!("PENDING ({reason})"),
                TaskEvent::Running => "RUNNING".into(),
                other => format!("{other:?}"),
            }
        },
        &|| start.elapsed() > timeout,
    )?;
    let job_id = outcome.jobs.first().cloned().unwrap_or_default();
    if outcome.cancelled {
        return Err(SlurmError::ProbeTimeout {
            job: job_id,
            seconds: timeout.as_secs(),
            state: last,
        });
    }
    match outcome.failed.into_iter().next() {
        None => Ok(()),
        Some((_, reason)) => Err(SlurmError::CacheInvisible {
            cache: cache.to_path_buf(),
            job: job_id,
            state: reason
                .split_whitespace()
                .nth(4)
                .unwrap_or("FAILED")
                .trim_end_matches([',', ':'])
                .to_string(),
            detail: format!(" ({reason})"),
        }),
    }
}
