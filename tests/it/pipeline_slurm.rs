//! Issue 16 item 4: `vlmpipe run --executor slurm` end to end on the one-node cluster
//! (`tests/slurm/cluster.sh start`; skips, saying so, without one): the sharded evals equal the
//! local run's; a running task `scancel`led midway fails its shard alone and a rerun recomputes only it; a
//! driver killed with SIGKILL leaves its finished shards for the rerun; two pipelines at once on
//! one cache; no Slurm on PATH is a clear error before any work.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::pipeline_shards::{
    Project, csv, metrics, read_summary, records, shard_list, stage, text,
};
use crate::slurm::cluster;

/// A profile beside the pipelines: Slurm, polled often (the tiny model's shards take a second).
const PROFILE: &str = "executor = \"slurm\"\n[slurm]\npoll-interval = 0.2\nprobe-timeout = 60.0\n";

fn slurm_project() -> Project {
    let project = Project::new();
    std::fs::write(project.path("proj/vlmpipe.toml"), PROFILE).expect("profile");
    project
}

/// The Slurm id (`JOB_TASK`) of task `task` of the array named `name` submitted from `dir` (the
/// project's folder, the driver's working directory), once it is running. Tests run in parallel
/// and name their arrays alike (`vlmpipe:eval:guessed`): without the folder, one test could
/// cancel another's task.
fn running_task(name: &str, task: usize, dir: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = Command::new("squeue")
            .args(["--noheader", "--array", "--name", name, "--format=%i %T %Z"])
            .output()
            .expect("squeue");
        let listing = String::from_utf8_lossy(&out.stdout);
        let running = listing.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            let (id, state, workdir) = (fields.next()?, fields.next()?, fields.next()?);
            let index = id.rsplit_once('_')?.1;
            (state == "RUNNING" && index == task.to_string() && Path::new(workdir) == dir)
                .then(|| id.to_owned())
        });
        if let Some(id) = running {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "task {task} of `{name}` from {} never ran: {listing}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_slurm_sharded_run_equals_the_local_run() {
    if cluster().is_none() {
        return;
    }
    let project = slurm_project();
    let (output, local) = project.run("proj/shards.vp", "local", &["--executor", "local"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let (output, slurm) = project.run("proj/shards.vp", "slurm", &["--shards", "4"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    for name in ["guessed", "scored"] {
        let (a, b) = (stage(&local, name), stage(&slurm, name));
        assert_eq!(b["status"], "ran", "{b}");
        assert_eq!(shard_list(b, "computed"), [0, 1, 2, 3], "{b}");
        assert_eq!(a["fingerprint"], b["fingerprint"]);
        assert_eq!(records(b), records(a), "{name}: records differ");
        assert_eq!(metrics(b), metrics(a), "{name}: metrics differ");
        assert_eq!(csv(b), csv(a), "{name}: CSV differs");
    }
}

#[test]
fn a_task_scancelled_midway_is_the_only_shard_a_rerun_computes() {
    if cluster().is_none() {
        return;
    }
    let project = slurm_project();
    // One task at a time: task 1 is cancelled while it runs (a pending task cancelled before it
    // ever ran leaves no trace in Slurm without accounting, and is resubmitted as lost).
    let args = ["--shards", "4", "--max-parallel", "1", "--only", "guessed"];
    // The race is Slurm's: a short task can write its entry between `squeue` showing it running
    // and `scancel` reaching it. Then the run succeeds; try again, forcing the stage.
    let mut first = None;
    for attempt in 0..3 {
        let mut cmd = project.command(&[
            "run",
            "proj/shards.vp",
            "--cache-dir",
            "cache",
            "--quiet",
            "--summary-json",
        ]);
        cmd.arg(project.path("first.json")).args(args);
        if attempt > 0 {
            cmd.args(["--force", "guessed"]);
        }
        let driver = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let task = running_task("vlmpipe:eval:guessed", 1, &project.path(""));
        let status = Command::new("scancel")
            .arg(&task)
            .status()
            .expect("scancel");
        assert!(status.success());
        let out = driver.wait_with_output().expect("driver");
        if !out.status.success() {
            first = Some(out);
            break;
        }
        eprintln!("attempt {attempt}: task {task} finished before its scancel; again");
    }
    let first = first.expect("the cancelled shard must fail the stage (3 attempts)");
    let summary = read_summary(&project.path("first.json"), &first);
    let failed = stage(&summary, "guessed");
    assert_eq!(failed["status"], "failed", "{failed}");
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("cancel"),
        "the reason names the cancel: {failed}"
    );

    let (output, second) = project.run("proj/shards.vp", "cache", &args);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let eval = stage(&second, "guessed");
    assert_eq!(shard_list(eval, "computed"), [1], "{eval}");
    assert_eq!(shard_list(eval, "cached"), [0, 2, 3], "{eval}");
}

#[test]
fn a_killed_driver_leaves_its_finished_shards_to_the_rerun() {
    if cluster().is_none() {
        return;
    }
    let project = slurm_project();
    let args = ["--shards", "4", "--max-parallel", "1", "--only", "guessed"];
    let mut cmd = project.command(&["run", "proj/shards.vp", "--cache-dir", "cache", "--quiet"]);
    cmd.args(args);
    let mut driver = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // Wait for the first shard entry, then SIGKILL the driver (no destructors, no scancel).
    let entries = project.path("cache/entries");
    let deadline = Instant::now() + Duration::from_secs(120);
    let shard_entries = || {
        std::fs::read_dir(&entries)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().join("manifest.json").exists())
                    .filter(|e| {
                        std::fs::read_to_string(e.path().join("manifest.json"))
                            .is_ok_and(|m| m.contains("guessed [shard "))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    while shard_entries() == 0 {
        assert!(Instant::now() < deadline, "no shard finished in time");
        std::thread::sleep(Duration::from_millis(100));
    }
    driver.kill().expect("kill -9");
    driver.wait().expect("reap");
    let finished = shard_entries();

    let (output, rerun) = project.run("proj/shards.vp", "cache", &args);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let eval = stage(&rerun, "guessed");
    let cached = shard_list(eval, "cached");
    let computed = shard_list(eval, "computed");
    assert!(
        cached.len() >= finished,
        "finished shards were recomputed: {eval}"
    );
    let mut all: Vec<u64> = cached.iter().chain(&computed).copied().collect();
    all.sort_unstable();
    assert_eq!(all, [0, 1, 2, 3], "{eval}");
    // And the result is the local one.
    let (_, local) = project.run("proj/shards.vp", "local", &["--executor", "local"]);
    assert_eq!(records(eval), records(stage(&local, "guessed")));
}

#[test]
fn two_pipelines_at_once_on_one_cache_both_finish_on_slurm() {
    if cluster().is_none() {
        return;
    }
    let project = slurm_project();
    let spawn = |file: &str, summary: &str| {
        let mut cmd = project.command(&["run", file, "--cache-dir", "cache", "--quiet"]);
        cmd.args(["--shards", "2", "--summary-json"])
            .arg(project.path(summary));
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let a = spawn("proj/shards.vp", "a.json");
    let b = spawn("proj/other.vp", "b.json");
    for (child, summary, name) in [(a, "a.json", "guessed"), (b, "b.json", "quick")] {
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let summary = read_summary(&project.path(summary), &out);
        assert_eq!(stage(&summary, name)["status"], "ran");
    }
}

#[test]
fn no_slurm_on_path_is_an_error_before_any_work() {
    let project = slurm_project();
    let empty = project.path("no-bin");
    std::fs::create_dir_all(&empty).expect("dir");
    let output = project
        .command(&[
            "run",
            "proj/shards.vp",
            "--cache-dir",
            "cache",
            "--shards",
            "2",
        ])
        .env("PATH", &empty)
        .output()
        .expect("spawn");
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("sbatch"), "{stderr}");
    assert!(
        !project.path("cache/entries").exists()
            || std::fs::read_dir(project.path("cache/entries"))
                .unwrap()
                .next()
                .is_none(),
        "work started: {stderr}"
    );
}

/// Whether the cluster's nodes have GPUs (`tests/slurm/cluster.sh` gives its node two stand-ins).
fn cluster_has_gpus() -> bool {
    Command::new("sinfo")
        .args(["--noheader", "--format=%G"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("gpu"))
}

/// The BLAKE3 of each output file of a stage's cache entry whose name ends with one of `ends`
/// (the model files: training logs and reports hold timings), by file name.
fn entry_files(stage: &serde_json::Value, ends: &[&str]) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = stage["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .filter_map(|p| p.as_str())
        .filter(|p| p.contains("/entries/") && ends.iter().any(|e| p.ends_with(e)))
        .map(|p| {
            let path = Path::new(p);
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(path).expect("entry file");
            (name, blake3::hash(&bytes).to_hex().to_string())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn the_quickstart_on_slurm_equals_the_local_run_with_its_fine_tune_one_gpu_job() {
    if cluster().is_none() {
        return;
    }
    let gpus = cluster_has_gpus();
    if !gpus {
        eprintln!("note: the cluster has no GPUs; the fine-tune's job asks for none");
    }
    let project = slurm_project();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart.vp");
    std::fs::copy(example, project.path("proj/quickstart.vp")).expect("copy the quickstart");
    let (output, local) = project.run("proj/quickstart.vp", "local", &["--executor", "local"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let mut args = vec!["--shards", "4"];
    if gpus {
        args.extend(["--gpus-per-task", "1"]);
    }
    let (output, slurm) = project.run("proj/quickstart.vp", "slurm", &args);
    assert!(output.status.success(), "{}", text(&output.stderr));

    for name in ["baseline", "constrained", "tuned_eval", "tuned_q8_eval"] {
        let (a, b) = (stage(&local, name), stage(&slurm, name));
        assert_eq!(b["status"], "ran", "{b}");
        assert_eq!(b["shards"]["launcher"], "slurm", "{b}");
        assert_eq!(shard_list(b, "computed"), [0, 1, 2, 3], "{b}");
        assert_eq!(a["fingerprint"], b["fingerprint"]);
        assert_eq!(records(b), records(a), "{name}: records differ");
        assert_eq!(metrics(b), metrics(a), "{name}: metrics differ");
    }
    // The fine-tune and the export load a model: each went out whole, as one job, and wrote
    // exactly what the local run wrote.
    for (name, ends) in [
        ("tuned", &[".safetensors", "adapter_config.json"][..]),
        ("tuned_q8", &[".gguf"][..]),
    ] {
        let (a, b) = (stage(&local, name), stage(&slurm, name));
        assert_eq!(b["status"], "ran", "{b}");
        assert_eq!(b["elsewhere"]["launcher"], "slurm", "{b}");
        assert_eq!(a["fingerprint"], b["fingerprint"]);
        let files = entry_files(a, ends);
        assert!(files.len() >= 2, "{name}: {files:?}");
        assert_eq!(entry_files(b, ends), files, "{name}: files differ");
        assert!(a.get("elsewhere").is_none(), "{a}");
    }
    // `--shards` covers the dataset too: its image checks went out as an array.
    let pictures = stage(&slurm, "pictures");
    assert_eq!(pictures["shards"]["launcher"], "slurm", "{pictures}");
    assert_eq!(
        stage(&local, "pictures")["fingerprint"],
        pictures["fingerprint"]
    );
    // Small stages ran in the driver.
    for name in ["parts", "ask", "shapes", "tiny"] {
        assert!(stage(&slurm, name).get("elsewhere").is_none());
        assert!(stage(&slurm, name).get("shards").is_none());
    }
    let tuned = stage(&slurm, "tuned");
    let jobs = tuned["elsewhere"]["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 1, "{tuned}");
    let job = jobs[0].as_str().expect("job id");
    let log = project.path(&format!("slurm/slurm/logs/{job}_0.out"));
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        said.contains("`tuned`: computed"),
        "{}: {said}",
        log.display()
    );
    if gpus {
        // Slurm gave the job its GPU: the worker names it.
        assert!(said.contains("GPUs 0"), "{}: {said}", log.display());
        let shown = Command::new("scontrol")
            .args(["show", "job", "-o", &format!("{job}_0")])
            .output()
            .expect("scontrol");
        let shown = text(&shown.stdout);
        assert!(shown.contains("gres:gpu:1"), "{shown}");
    }
}

/// The `latest` checkpoint step of any fine-tune's work folder in `cache`.
fn latest_checkpoint(cache: &Path) -> Option<usize> {
    std::fs::read_dir(cache.join("work"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("checkpoints/latest")).ok())
        .filter_map(|name| name.trim().strip_prefix("step-")?.parse().ok())
        .max()
}

/// The manifest metadata of a stage's entry in `cache`.
fn entry_metadata(cache: &Path, stage: &serde_json::Value) -> serde_json::Value {
    let fp = stage["fingerprint"].as_str().expect("fingerprint");
    let manifest = cache.join("entries").join(fp).join("manifest.json");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    let manifest: serde_json::Value = serde_json::from_str(&text).expect("manifest JSON");
    manifest["metadata"]["stage"].clone()
}

#[test]
fn a_fine_tune_job_killed_midway_is_resubmitted_and_resumes_from_its_checkpoint() {
    if cluster().is_none() {
        return;
    }
    let project = slurm_project();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart.vp");
    let quickstart = std::fs::read_to_string(example).expect("quickstart");
    // A checkpoint every 4 steps (an execution setting: the fingerprint stays the quickstart's).
    let pipeline = quickstart.replacen("  seed = 11\n", "  seed = 11\n  checkpoint_every = 4\n", 1);
    assert!(pipeline.contains("checkpoint_every = 4"));
    std::fs::write(project.path("proj/tune.vp"), pipeline).expect("pipeline");
    let summary = project.path("slurm.summary.json");
    let driver = project
        .command(&[
            "run",
            "proj/tune.vp",
            "--cache-dir",
            "slurm",
            "--only",
            "tuned",
            "--quiet",
            "--summary-json",
        ])
        .arg(&summary)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the driver");
    // The worker dies (as a preempted or OOM-killed task's process does) once it checkpointed.
    let pipeline = project.path("proj/tune.vp");
    let pattern = format!("worker {} --stage tuned", pipeline.display());
    let deadline = Instant::now() + Duration::from_secs(300);
    let killed_at = loop {
        assert!(
            Instant::now() < deadline,
            "no checkpoint of `tuned` in time"
        );
        if let Some(step) = latest_checkpoint(&project.path("slurm")).filter(|&s| s >= 4) {
            let status = Command::new("pkill")
                .args(["-KILL", "-f", &pattern])
                .status()
                .expect("pkill");
            assert!(status.success(), "no worker matched `{pattern}`");
            break step;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = driver.wait_with_output().expect("wait for the driver");
    let said = text(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("resubmitted"), "{said}");
    let slurm = read_summary(&summary, &out);
    let tuned = stage(&slurm, "tuned");
    assert_eq!(tuned["status"], "ran", "{tuned}");
    assert_eq!(tuned["elsewhere"]["jobs"].as_array().map(Vec::len), Some(2));
    let resumed = entry_metadata(&project.path("slurm"), tuned)["resumed_from"].as_u64();
    assert!(
        resumed.is_some_and(|s| s as usize >= killed_at),
        "resumed from {resumed:?}, killed after step {killed_at}"
    );
    // A resumed fine-tune ends bit-identical to an uninterrupted one.
    let (output, local) = project.run(
        "proj/tune.vp",
        "local",
        &["--executor", "local", "--only", "tuned"],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let ends = [".safetensors", "adapter_config.json"];
    assert_eq!(
        entry_files(tuned, &ends),
        entry_files(stage(&local, "tuned"), &ends)
    );
}
