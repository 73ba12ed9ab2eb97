//! `vlmpipe watch`: run, then rerun whenever the pipeline or a file it reads is saved.
//!
//! The parent folders of the watched files are watched (editors often save by writing a new file
//! and renaming it over the old one, which a watch on the file itself would lose) and events are
//! filtered to the watched paths as they arrive; data folders are watched recursively.
//! Events are debounced: a rerun starts once no relevant event arrived for [`DEBOUNCE`], so a
//! burst of saves is one rerun. A save during a run cancels it: the executor skips the stages
//! not yet started (a running stage finishes; its entry is kept), and the next run starts once
//! the saves stop. The cache decides what actually reruns; a pipeline that no longer checks
//! prints its errors and the watcher keeps waiting. Ctrl-C ends the process; the executor only
//! publishes complete entries (temp folder and rename), so an interrupted stage leaves nothing
//! that a later run would trust.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use notify::{RecursiveMode, Watcher};

use super::Outcome;
use super::args::RunArgs;
use super::check_cmd::print_diagnostics;
use super::run_cmd;
use crate::plan;

/// Quiet time after the last change before rerunning (editors write a file in several steps).
const DEBOUNCE: Duration = Duration::from_millis(300);

/// What the watcher thread delivers: a relevant path that changed, or the watcher's error.
type Change = Result<PathBuf, notify::Error>;

pub(crate) fn watch(args: &RunArgs) -> anyhow::Result<Outcome> {
    let (tx, rx) = mpsc::channel::<Change>();
    let paths = Arc::new(Mutex::new(WatchedPaths::default()));
    // Set on every relevant event; the executor polls it between stages.
    let pending = Arc::new(AtomicBool::new(false));
    let mut watcher = {
        let paths = Arc::clone(&paths);
        let pending = Arc::clone(&pending);
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Filtered here, not in the loop: the loop is busy while a run is in progress, and
            // only a relevant event may cancel it.
            let change = match event {
                Ok(event) => match relevant(&event, &paths) {
                    Some(path) => Ok(path),
                    None => return,
                },
                Err(error) => Err(error),
            };
            if change.is_ok() {
                pending.store(true, Ordering::SeqCst);
            }
            // The receiver lives as long as the loop below; a send error means we are exiting.
            let _ = tx.send(change);
        })
        .context("cannot start the file watcher")?
    };
    let mut watched = WatchSet::default();
    // Watch the pipeline file before the first run, so a save during it is not missed.
    watched.update(&mut watcher, &paths, &args.file, &[])?;
    loop {
        pending.store(false, Ordering::SeqCst);
        let files = run_once(args, &pending);
        watched.update(&mut watcher, &paths, &args.file, &files)?;
        if pending.load(Ordering::SeqCst) {
            eprintln!("\na newer change arrived during the run; waiting for the saves to stop");
        } else {
            eprintln!(
                "watching {} file{} for changes (Ctrl-C to stop)",
                watched.files,
                if watched.files == 1 { "" } else { "s" }
            );
        }
        let changed = wait_for_change(&rx)?;
        eprintln!("\n{} changed, rerunning", changed.display());
    }
}

/// Checks and runs the pipeline once; returns the files it reads (just the pipeline file when it
/// does not check, so a fix is noticed).
fn run_once(args: &RunArgs, cancel: &Arc<AtomicBool>) -> Vec<PathBuf> {
    let result = plan::load_pipeline_with(
        &args.file,
        &args.params.set,
        &args.params.read_policy(&args.file),
    );
    print_diagnostics(&result);
    let Some(plan) = result.plan else {
        // Imports that failed to parse are still files to watch: keep every file loaded.
        return result
            .sources
            .files()
            .map(|(_, f)| f.path.clone())
            .chain(std::iter::once(args.file.clone()))
            .collect();
    };
    let result = run_cmd::execute_cancellable(&plan, args, Some(Arc::clone(cancel)))
        .and_then(|summary| run_cmd::report(&summary, args));
    match result {
        Ok(_) => {}
        // A run error (cache locked, unreadable source) is reported; the watcher goes on.
        Err(error) => crate::cli::print_error(&error),
    }
    let mut files = plan.files.clone();
    files.push(args.file.clone());
    files
}

/// The paths whose changes count: files, and data folders (changes anywhere below count).
#[derive(Default)]
struct WatchedPaths {
    files: BTreeSet<PathBuf>,
    trees: BTreeSet<PathBuf>,
}

impl WatchedPaths {
    fn matches(&self, path: &Path) -> bool {
        let path = absolute(path);
        self.files.contains(&path) || self.trees.iter().any(|t| path.starts_with(t))
    }
}

/// The first watched path `event` touched, unless it only read files.
fn relevant(event: &notify::Event, paths: &Mutex<WatchedPaths>) -> Option<PathBuf> {
    if matches!(event.kind, notify::EventKind::Access(_)) {
        return None;
    }
    // A poisoned lock only means a panic elsewhere; the sets themselves are still whole.
    let paths = paths
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    event.paths.iter().find(|p| paths.matches(p)).cloned()
}

/// The folders registered with the watcher, and how many files are watched.
#[derive(Default)]
struct WatchSet {
    files: usize,
    registered: BTreeSet<(PathBuf, bool)>,
}

impl WatchSet {
    /// Watches `pipeline` and `files` (replacing the previous set) and publishes them to the
    /// event filter.
    fn update(
        &mut self,
        watcher: &mut notify::RecommendedWatcher,
        shared: &Mutex<WatchedPaths>,
        pipeline: &Path,
        files: &[PathBuf],
    ) -> anyhow::Result<()> {
        let mut paths = WatchedPaths::default();
        let mut wanted: BTreeSet<(PathBuf, bool)> = BTreeSet::new();
        for file in files.iter().chain(std::iter::once(&pipeline.to_path_buf())) {
            let path = absolute(file);
            if path.is_dir() {
                wanted.insert((path.clone(), true));
                paths.trees.insert(path);
            } else {
                if let Some(parent) = path.parent().filter(|p| p.is_dir()) {
                    wanted.insert((parent.to_path_buf(), false));
                }
                paths.files.insert(path);
            }
        }
        for (dir, _) in self.registered.difference(&wanted) {
            // The folder may be gone already; nothing to undo then.
            let _ = watcher.unwatch(dir);
        }
        for (dir, recursive) in wanted.difference(&self.registered) {
            let mode = if *recursive {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            watcher
                .watch(dir, mode)
                .with_context(|| format!("cannot watch `{}`", dir.display()))?;
        }
        self.registered = wanted;
        self.files = paths.files.len();
        *shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = paths;
        Ok(())
    }
}

/// Blocks until a watched path changed and then stayed quiet for [`DEBOUNCE`]; returns it.
fn wait_for_change(rx: &mpsc::Receiver<Change>) -> anyhow::Result<PathBuf> {
    let first = loop {
        match rx.recv().context("the file watcher stopped")? {
            Ok(path) => break path,
            Err(error) => eprintln!("watch error: {error}"),
        }
    };
    let mut deadline = Instant::now() + DEBOUNCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(_)) => deadline = Instant::now() + DEBOUNCE,
            Ok(Err(error)) => eprintln!("watch error: {error}"),
            Err(mpsc::RecvTimeoutError::Timeout) => return Ok(first),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("the file watcher stopped")
            }
        }
    }
}

/// `path` made absolute and cleaned of `.` parts, without resolving symlinks of missing files.
fn absolute(path: &Path) -> PathBuf {
    if let Ok(real) = std::fs::canonicalize(path) {
        return real;
    }
    // A file that does not exist (yet): canonicalise its folder, keep the name.
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            std::fs::canonicalize(parent)
                .map(|p| p.join(name))
                .unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    }
}
