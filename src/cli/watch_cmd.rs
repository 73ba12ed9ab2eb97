//! `vlmpipe watch`: run, then rerun whenever the pipeline or a file it reads is saved.
//!
//! The parent folders of the watched files are watched (editors often save by writing a new file
//! and renaming it over the old one, which a watch on the file itself would lose) and events are
//! filtered to the watched paths; data folders are watched recursively. Events are debounced:
//! a rerun starts once no relevant event arrived for [`DEBOUNCE`]. The cache decides what
//! actually reruns; a pipeline that no longer checks prints its errors and the watcher keeps
//! waiting. Ctrl-C ends the process; the executor only publishes complete entries (temp folder
//! and rename), so an interrupted stage leaves nothing that a later run would trust.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
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

pub(crate) fn watch(args: &RunArgs) -> anyhow::Result<Outcome> {
    let (tx, rx) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event| {
        // The receiver lives as long as the loop below; a send error means we are exiting.
        let _ = tx.send(event);
    })
    .context("cannot start the file watcher")?;
    let mut watched = WatchSet::default();
    loop {
        let files = run_once(args);
        watched.update(&mut watcher, &args.file, &files)?;
        eprintln!(
            "watching {} file{} for changes (Ctrl-C to stop)",
            watched.files.len(),
            if watched.files.len() == 1 { "" } else { "s" }
        );
        let changed = wait_for_change(&rx, &watched)?;
        eprintln!("\n{} changed, rerunning", changed.display());
    }
}

/// Checks and runs the pipeline once; returns the files it reads (just the pipeline file when it
/// does not check, so a fix is noticed).
fn run_once(args: &RunArgs) -> Vec<PathBuf> {
    let result = plan::load_pipeline(&args.file, &args.params.set);
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
    match run_cmd::execute(&plan, args).and_then(|summary| run_cmd::report(&summary, args)) {
        Ok(_) => {}
        // A run error (cache locked, unreadable source) is reported; the watcher goes on.
        Err(error) => crate::cli::print_error(&error),
    }
    let mut files = plan.files.clone();
    files.push(args.file.clone());
    files
}

/// The watched files and the folders registered with the watcher.
#[derive(Default)]
struct WatchSet {
    files: BTreeSet<PathBuf>,
    /// Watched data folders (changes anywhere below count).
    trees: BTreeSet<PathBuf>,
    registered: BTreeSet<(PathBuf, bool)>,
}

impl WatchSet {
    fn update(
        &mut self,
        watcher: &mut notify::RecommendedWatcher,
        pipeline: &Path,
        files: &[PathBuf],
    ) -> anyhow::Result<()> {
        self.files.clear();
        self.trees.clear();
        let mut wanted: BTreeSet<(PathBuf, bool)> = BTreeSet::new();
        for file in files.iter().chain(std::iter::once(&pipeline.to_path_buf())) {
            let path = absolute(file);
            if path.is_dir() {
                wanted.insert((path.clone(), true));
                self.trees.insert(path);
            } else {
                if let Some(parent) = path.parent().filter(|p| p.is_dir()) {
                    wanted.insert((parent.to_path_buf(), false));
                }
                self.files.insert(path);
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
        Ok(())
    }

    fn matches(&self, path: &Path) -> bool {
        let path = absolute(path);
        self.files.contains(&path) || self.trees.iter().any(|t| path.starts_with(t))
    }
}

/// Blocks until a watched path changed and then stayed quiet for [`DEBOUNCE`]; returns it.
fn wait_for_change(
    rx: &mpsc::Receiver<notify::Result<notify::Event>>,
    watched: &WatchSet,
) -> anyhow::Result<PathBuf> {
    let relevant = |event: &notify::Event| -> Option<PathBuf> {
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return None;
        }
        event.paths.iter().find(|p| watched.matches(p)).cloned()
    };
    let first = loop {
        match rx.recv().context("the file watcher stopped")? {
            Ok(event) => {
                if let Some(path) = relevant(&event) {
                    break path;
                }
            }
            Err(error) => eprintln!("watch error: {error}"),
        }
    };
    let mut deadline = Instant::now() + DEBOUNCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(event)) => {
                if relevant(&event).is_some() {
                    deadline = Instant::now() + DEBOUNCE;
                }
            }
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
