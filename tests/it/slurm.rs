//! The Slurm engine against a real cluster (`tests/slurm/cluster.sh start`, then
//! `eval "$(tests/slurm/cluster.sh env)"`; `.ci/run` does both). Each test skips, saying so,
//! when no cluster answers. The array engine is exercised with plain shell tasks here, so what
//! is checked is Slurm's side: submission, following, resubmission, cancellation, the probe.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vlmpipe::slurm::{
    ArgPart, ArrayJob, SlurmCommands, SlurmError, SlurmSettings, TaskEvent, check_partition,
    forget_probe, probe_cache, run_array,
};

/// The cluster's commands when one answers; else prints why the test skips.
pub fn cluster() -> Option<SlurmCommands> {
    static UP: OnceLock<Result<(), String>> = OnceLock::new();
    let up = UP.get_or_init(|| {
        let out = Command::new("sinfo")
            .args(["--noheader", "--format=%T"])
            .output()
            .map_err(|e| format!("`sinfo` could not run ({e})"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success()
            && text
                .lines()
                .any(|l| l.starts_with("idle") || l.starts_with("mix") || l.starts_with("alloc"))
        {
            Ok(())
        } else {
            Err(format!(
                "no Slurm cluster answers ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    });
    match up {
        Ok(()) => Some(SlurmCommands::find().unwrap()),
        Err(why) => {
            eprintln!(
                "skipping: {why}; start one with `tests/slurm/cluster.sh start` and `eval \"$(tests/slurm/cluster.sh env)\"`"
            );
            None
        }
    }
}

/// Quick polling for short test tasks.
pub fn fast_settings() -> SlurmSettings {
    SlurmSettings {
        poll_interval: Some(0.2),
        ..SlurmSettings::default()
    }
}

fn sh(script: &str, dir: &Path) -> Vec<ArgPart> {
    vec![
        ArgPart::Lit("/bin/sh".into()),
        ArgPart::Lit("-c".into()),
        ArgPart::Lit(script.into()),
        ArgPart::Lit(dir.display().to_string()),
        ArgPart::TaskIndex,
    ]
}

fn done_file(dir: &Path) -> impl Fn(usize) -> bool + '_ {
    move |i| dir.join(format!("done-{i}")).exists()
}

fn in_queue(job: &str) -> bool {
    let out = Command::new("squeue")
        .args([
            "--noheader",
            "--array",
            &format!("--jobs={job}"),
            "--format=%i",
        ])
        .output()
        .unwrap();
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

#[test]
fn every_task_of_an_array_runs_once_and_is_reported_done() {
    let Some(cmds) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let command = sh("echo $1 >> \"$0/runs\"; touch \"$0/done-$1\"", dir.path());
    let job = ArrayJob {
        name: "vlmpipe-test:all",
        command: &command,
        indices: &[0, 1, 3, 4],
        log_dir: &dir.path().join("logs"),
    };
    let settings = SlurmSettings {
        max_parallel: Some(2),
        ..fast_settings()
    };
    let mut events = Vec::new();
    let outcome = run_array(
        &cmds,
        &settings,
        &job,
        Some(&done_file(dir.path())),
        &mut |i, e| events.push((i, e.clone())),
        &|| false,
    )
    .unwrap();
    assert_eq!(outcome.done, [0, 1, 3, 4]);
    assert!(outcome.failed.is_empty() && !outcome.cancelled);
    assert_eq!(outcome.jobs.len(), 1, "one array, no resubmission");
    let mut runs: Vec<String> = std::fs::read_to_string(dir.path().join("runs"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    runs.sort();
    assert_eq!(
        runs,
        ["0", "1", "3", "4"],
        "each task ran once, index 2 not at all"
    );
    for i in [0, 1, 3, 4] {
        assert_eq!(
            events
                .iter()
                .filter(|(j, e)| *j == i && *e == TaskEvent::Done)
                .count(),
            1
        );
    }
}

#[test]
fn a_failed_task_is_resubmitted_with_its_reason_then_done() {
    let Some(cmds) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Task 1 fails on its first try, as a crashed or preempted worker would.
    let command = sh(
        "if [ \"$1\" = 1 ] && [ ! -e \"$0/tried\" ]; then touch \"$0/tried\"; echo 'error: worker lost its node' >&2; exit 3; fi; touch \"$0/done-$1\"",
        dir.path(),
    );
    let job = ArrayJob {
        name: "vlmpipe-test:retry",
        command: &command,
        indices: &[0, 1, 2],
        log_dir: &dir.path().join("logs"),
    };
    let mut retries = Vec::new();
    let outcome = run_array(
        &cmds,
        &fast_settings(),
        &job,
        Some(&done_file(dir.path())),
        &mut |i, e| {
            if let TaskEvent::Retrying {
                reason,
                attempt,
                of,
            } = e
            {
                retries.push((i, reason.clone(), *attempt, *of));
            }
        },
        &|| false,
    )
    .unwrap();
    assert_eq!(outcome.done, [0, 1, 2]);
    assert_eq!(outcome.jobs.len(), 2, "task 1 went out again, alone");
    assert_eq!(retries.len(), 1, "{retries:?}");
    let (index, reason, attempt, of) = &retries[0];
    assert_eq!((*index, *attempt, *of), (1, 2, 3));
    assert!(
        reason.contains("FAILED")
            && reason.contains("exit 3")
            && reason.contains("error: worker lost its node"),
        "{reason}"
    );
}

#[test]
fn a_task_that_always_fails_gives_up_after_the_retries_saying_why() {
    let Some(cmds) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let command = sh(
        "echo \"error: shard $1 has no inputs\" >&2; exit 1",
        dir.path(),
    );
    let job = ArrayJob {
        name: "vlmpipe-test:fail",
        command: &command,
        indices: &[2],
        log_dir: &dir.path().join("logs"),
    };
    let settings = SlurmSettings {
        max_retries: Some(1),
        ..fast_settings()
    };
    let outcome = run_array(
        &cmds,
        &settings,
        &job,
        Some(&done_file(dir.path())),
        &mut |_, _| {},
        &|| false,
    )
    .unwrap();
    assert!(outcome.done.is_empty());
    assert_eq!(outcome.jobs.len(), 2, "the first try and one retry");
    let (index, reason) = &outcome.failed[0];
    assert_eq!(*index, 2);
    assert!(
        reason.contains("FAILED") && reason.contains("error: shard 2 has no inputs"),
        "{reason}"
    );
}

#[test]
fn a_task_scancelled_by_someone_fails_without_resubmission_and_the_rest_finish() {
    let Some(cmds) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Long enough to be seen running even when a busy controller answers `squeue` slowly (a
    // 2 s task was missed once beside the whole suite).
    let command = sh("sleep 5; touch \"$0/done-$1\"", dir.path());
    let job = ArrayJob {
        name: "vlmpipe-test:scancel",
        command: &command,
        indices: &[0, 1, 2],
        log_dir: &dir.path().join("logs"),
    };
    let mut job_id = None::<String>;
    let mut cancelled_one = false;
    let outcome = run_array(
        &cmds,
        &fast_settings(),
        &job,
        Some(&done_file(dir.path())),
        &mut |i, e| {
            if i == 1 && *e == TaskEvent::Running && !cancelled_one {
                // The job id is the only one in the queue named for this test.
                let out = Command::new("squeue")
                    .args(["--noheader", "--name=vlmpipe-test:scancel", "--format=%A"])
                    .output()
                    .unwrap();
                let id = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .next()
                    .unwrap()
                    .trim()
                    .to_string();
                assert!(
                    Command::new("scancel")
                        .arg(format!("{id}_1"))
                        .status()
                        .unwrap()
                        .success()
                );
                job_id = Some(id);
                cancelled_one = true;
            }
        },
        &|| false,
    )
    .unwrap();
    assert!(cancelled_one, "task 1 was seen running");
    assert_eq!(outcome.done, [0, 2]);
    assert_eq!(outcome.jobs.len(), 1, "nothing resubmitted");
    let (index, reason) = &outcome.failed[0];
    assert_eq!(*index, 1);
    assert!(
        reason.contains("CANCELLED") && reason.contains("not resubmitted"),
        "{reason}"
    );
    assert!(!dir.path().join("done-1").exists());
    assert_eq!(job_id.as_deref(), outcome.jobs.first().map(String::as_str));
}

#[test]
fn cancelling_the_driver_scancels_every_task_it_submitted() {
    let Some(cmds) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let command = sh("sleep 120; touch \"$0/done-$1\"", dir.path());
    let job = ArrayJob {
        name: "vlmpipe-test:cancel",
        command: &command,
        indices: &[0, 1, 2, 3],
        log_dir: &dir.path().join("logs"),
    };
    let running = std::cell::Cell::new(false);
    let start = Instant::now();
    let outcome = run_array(
        &cmds,
        &fast_settings(),
        &job,
        Some(&done_file(dir.path())),
        &mut |_, e| {
            if *e == TaskEvent::Running {
                running.set(true);
            }
        },
        &|| running.get(),
    )
    .unwrap();
    assert!(outcome.cancelled);
    assert!(outcome.done.is_empty());
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "cancelled, not waited out"
    );
    assert!(!in_queue(&outcome.jobs[0]), "every task left the queue");
}

#[test]
fn an_unknown_partition_is_an_error_listing_the_known_ones() {
    let Some(cmds) = cluster() else { return };
    check_partition(&cmds, "debug").unwrap();
    let err = check_partition(&cmds, "gpu-h100").unwrap_err();
    assert!(matches!(err, SlurmError::NoPartition { .. }));
    let text = err.to_string();
    assert!(
        text.contains("`gpu-h100` does not exist")
            && text.contains("debug")
            && text.contains("--partition"),
        "{text}"
    );
}

/// What `vlmpipe worker --probe PATH` does, as a shell line: copy the probe to `PATH.seen`.
fn shell_probe(path: &Path) -> Vec<ArgPart> {
    [
        "/bin/sh",
        "-c",
        "cat \"$0\" > \"$0.seen\"",
        &path.display().to_string(),
    ]
    .map(|w| ArgPart::Lit(w.to_string()))
    .to_vec()
}

#[test]
fn the_probe_passes_on_a_cache_the_workers_see_and_leaves_no_probe_file() {
    let Some(cmds) = cluster() else { return };
    let cache = tempfile::tempdir().unwrap();
    probe_cache(&cmds, &fast_settings(), cache.path(), &shell_probe).unwrap();
    let left: Vec<PathBuf> = std::fs::read_dir(cache.path().join("probes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A probe command that copies the probe, as `shell_probe`, and adds a line to `runs` each time.
fn counting_probe(runs: &Path) -> impl Fn(&Path) -> Vec<ArgPart> + '_ {
    move |path| {
        [
            "/bin/sh",
            "-c",
            "echo ran >> \"$1\"; cat \"$0\" > \"$0.seen\"",
            &path.display().to_string(),
            &runs.display().to_string(),
        ]
        .map(|w| ArgPart::Lit(w.to_string()))
        .to_vec()
    }
}

#[test]
fn a_passed_probe_is_remembered_until_a_task_fails_or_the_settings_change() {
    let Some(cmds) = cluster() else { return };
    let cache = tempfile::tempdir().unwrap();
    let runs = cache.path().join("probe-runs");
    let probe = counting_probe(&runs);
    let count = || {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .count()
    };
    probe_cache(&cmds, &fast_settings(), cache.path(), &probe).unwrap();
    assert_eq!(count(), 1);
    // The same cache and settings minutes later: no probe job.
    let start = Instant::now();
    probe_cache(&cmds, &fast_settings(), cache.path(), &probe).unwrap();
    assert_eq!(count(), 1, "the remembered probe ran again");
    assert!(start.elapsed() < Duration::from_millis(200));
    // Other sbatch arguments may send tasks elsewhere: probed again.
    let other = SlurmSettings {
        sbatch_args: vec!["--time=10".into()],
        ..fast_settings()
    };
    probe_cache(&cmds, &other, cache.path(), &probe).unwrap();
    assert_eq!(count(), 2);
    // A failed task forgets it (what the launcher does): probed again.
    forget_probe(cache.path());
    probe_cache(&cmds, &other, cache.path(), &probe).unwrap();
    assert_eq!(count(), 3);
    // A memo from more than an hour ago is not trusted.
    let memo = cache.path().join("slurm/probe-passed");
    let text = std::fs::read_to_string(&memo).unwrap();
    let key = text.lines().next().unwrap();
    let old = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3601;
    std::fs::write(&memo, format!("{key}\n{old}\n")).unwrap();
    probe_cache(&cmds, &other, cache.path(), &probe).unwrap();
    assert_eq!(count(), 4);
}

/// `tests/slurm/cluster.sh` mounts an empty tmpfs over this folder for the node only.
pub fn driver_only_dir() -> Option<PathBuf> {
    let conf = std::env::var_os("SLURM_CONF")?;
    let dir = Path::new(&conf).parent()?.join("driver-only");
    dir.is_dir().then_some(dir)
}

#[test]
fn the_probe_fails_on_a_cache_the_workers_cannot_see_naming_the_fix() {
    let Some(cmds) = cluster() else { return };
    let Some(hidden) = driver_only_dir() else {
        eprintln!(
            "skipping: the cluster has no driver-only folder (not started by tests/slurm/cluster.sh)"
        );
        return;
    };
    let cache = tempfile::tempdir_in(hidden).unwrap();
    let start = Instant::now();
    let err = probe_cache(&cmds, &fast_settings(), cache.path(), &shell_probe).unwrap_err();
    assert!(matches!(err, SlurmError::CacheInvisible { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("not visible to the Slurm workers")
            && text.contains("shared filesystem")
            && text.contains("--cache-dir"),
        "{text}"
    );
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_probe_that_cannot_run_in_time_is_a_timeout_naming_its_state() {
    let Some(cmds) = cluster() else { return };
    let cache = tempfile::tempdir().unwrap();
    // Held, so it stays pending past the timeout.
    let settings = SlurmSettings {
        probe_timeout: Some(1.0),
        sbatch_args: vec!["--hold".into()],
        ..fast_settings()
    };
    let err = probe_cache(&cmds, &settings, cache.path(), &shell_probe).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SlurmError::ProbeTimeout { .. }), "{text}");
    assert!(
        text.contains("PENDING") && text.contains("probe-timeout"),
        "{text}"
    );
}

/// A second one-node cluster of this test's own (`cluster.sh` with its own folder and ports),
/// stopped when dropped.
struct OwnCluster {
    dir: tempfile::TempDir,
    ports: (u16, u16),
}

impl OwnCluster {
    /// `None` (saying why) where Slurm's daemons are not installed.
    fn start() -> Option<OwnCluster> {
        let installed = ["slurmctld", "slurmd", "munged"].iter().all(|daemon| {
            Command::new("sh")
                .args(["-c", &format!("command -v {daemon}")])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !installed {
            eprintln!("skipping: slurmctld, slurmd or munged is not installed");
            return None;
        }
        // Two free ports (taken, read, let go) so this cluster does not meet the shared one.
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (a, b) = (free(), free());
        let cluster = OwnCluster {
            dir: tempfile::tempdir().unwrap(),
            ports: (a, b),
        };
        cluster.script("start");
        Some(cluster)
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }

    fn script(&self, action: &str) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slurm/cluster.sh");
        let out = Command::new("bash")
            .arg(script)
            .arg(action)
            .env("VLMPIPE_SLURM_DIR", self.dir.path())
            .env("VLMPIPE_SLURMCTLD_PORT", self.ports.0.to_string())
            .env("VLMPIPE_SLURMD_PORT", self.ports.1.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster.sh {action}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A Slurm command against this cluster; its stdout.
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> String {
        use std::io::Write;
        let mut child = Command::new(program)
            .args(args)
            .env("SLURM_CONF", self.conf())
            .current_dir(self.dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(pipe);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `squeue` job ids (one per array task) in `state`.
    fn ids(&self, state: &str) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .run(
                "squeue",
                &["--noheader", "--array", "--states", state, "--format=%A"],
                None,
            )
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        ids.sort_unstable();
        ids
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slurm/cluster.sh");
        let _ = Command::new("bash")
            .arg(script)
            .arg("stop")
            .env("VLMPIPE_SLURM_DIR", self.dir.path())
            .env("VLMPIPE_SLURMCTLD_PORT", self.ports.0.to_string())
            .env("VLMPIPE_SLURMD_PORT", self.ports.1.to_string())
            .output();
    }
}

/// The flakiness right after `cluster.sh stop; cluster.sh start`: a job still running at the stop
/// outlived it, and when it ended it told the new controller (which numbers jobs from 1 again)
/// that its job id was complete, ending the new job of that id (COMPLETED while still running,
/// or "cancelled by interactive user" while pending). `stop` now ends every job first.
#[test]
fn jobs_running_at_a_cluster_stop_do_not_end_the_next_clusters_jobs() {
    let Some(cluster) = OwnCluster::start() else {
        return;
    };
    cluster.run(
        "sbatch",
        &["--parsable", "--array=0-1", "--output=/dev/null"],
        Some("#!/bin/sh\nsleep 12\n"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let old = loop {
        let running = cluster.ids("RUNNING");
        if running.len() == 2 {
            break running;
        }
        assert!(Instant::now() < deadline, "the tasks never ran");
        std::thread::sleep(Duration::from_millis(100));
    };
    let old_started = Instant::now();
    cluster.script("stop");
    cluster.script("start");
    // New jobs until the ids of the jobs that ran before are handed out again; the first ones
    // (those ids) run at once.
    let mut new = Vec::new();
    while new.last().is_none_or(|id| id < old.iter().max().unwrap()) {
        let id = cluster.run(
            "sbatch",
            &["--parsable", "--output=/dev/null"],
            Some("#!/bin/sh\nsleep 60\n"),
        );
        new.push(id.trim().parse::<u64>().unwrap());
    }
    // Past the end of the old tasks' `sleep 12`, had they been left running (and past their
    // report's retries).
    std::thread::sleep(Duration::from_secs(16).saturating_sub(old_started.elapsed()));
    let running = cluster.ids("RUNNING");
    for id in &old {
        assert!(
            running.contains(id),
            "job {id} of the new cluster ended early (running: {running:?}; new jobs {new:?})"
        );
    }
}

/// Issue 16's overhead target: the driver learns a task is done from its work (a file check every
/// 50 ms), not from Slurm reaping the task and the next `squeue` no longer listing it.
#[test]
fn a_task_is_done_when_its_work_is_there_while_slurm_still_lists_it() {
    let Some(cmds) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    // The work lands at once; the task lingers long after (as a worker's exit and Slurm's
    // epilog would, stretched).
    let command = sh("touch \"$0/done-$1\"; sleep 30", dir.path());
    let job = ArrayJob {
        name: "vlmpipe-test:early",
        command: &command,
        indices: &[0, 1],
        log_dir: &dir.path().join("logs"),
    };
    let start = Instant::now();
    let mut events = Vec::new();
    let outcome = run_array(
        &cmds,
        &fast_settings(),
        &job,
        Some(&done_file(dir.path())),
        &mut |i, e| events.push((i, e.clone())),
        &|| false,
    )
    .unwrap();
    let took = start.elapsed();
    // Free the node for the other tests.
    let _ = Command::new("scancel").args(&outcome.jobs).status();
    assert_eq!(outcome.done, [0, 1]);
    assert!(
        took < Duration::from_secs(20),
        "waited for the tasks to end ({took:?})"
    );
    for i in [0, 1] {
        let done = events
            .iter()
            .filter(|(j, e)| *j == i && *e == TaskEvent::Done)
            .count();
        assert_eq!(done, 1, "{events:?}");
    }
}
