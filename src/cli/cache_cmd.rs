//! `vlmpipe cache ls|gc|verify`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::Outcome;
use super::args::{CacheCommand, CacheDirArg};
use crate::cache::{CacheStore, GcPolicy};

/// The cache directory: the flag (or `VLMPIPE_CACHE`), else `.vlmpipe/` beside `pipeline`, else
/// `.vlmpipe/` in the current directory.
pub(crate) fn cache_root(arg: &CacheDirArg, pipeline: Option<&std::path::Path>) -> PathBuf {
    if let Some(dir) = &arg.cache_dir {
        return dir.clone();
    }
    match pipeline.and_then(|p| p.parent()) {
        Some(parent) if !parent.as_os_str().is_empty() => parent.join(".vlmpipe"),
        _ => PathBuf::from(".vlmpipe"),
    }
}

/// The cache a command names, opened; `None` (after saying so and naming the caches found below)
/// when it has no entries folder. No command but `run` creates a cache.
fn existing(cache: &CacheDirArg, file: Option<&Path>) -> anyhow::Result<Option<CacheStore>> {
    let root = cache_root(cache, file);
    if !root.join("entries").is_dir() {
        print_empty(&root, cache, file);
        return Ok(None);
    }
    open(&root).map(Some)
}

/// How long `gc` and `verify` wait for a run holding the cache.
const LOCK_WAIT: Duration = Duration::from_secs(10);

pub(crate) fn run(command: CacheCommand) -> anyhow::Result<Outcome> {
    match command {
        CacheCommand::Ls { file, cache } => {
            let Some(store) = existing(&cache, file.as_deref())? else {
                return Ok(Outcome::Success);
            };
            let entries = store.list()?;
            if entries.is_empty() {
                print_empty(store.root(), &cache, file.as_deref());
                return Ok(Outcome::Success);
            }
            let mut total = 0;
            for entry in &entries {
                total += entry.bytes();
                let (stage, kind) = entry.manifest.as_ref().map_or(("<unreadable>", ""), |m| {
                    (m.stage.as_str(), m.kind.as_str())
                });
                println!(
                    "{:<16}  {:<24}  {:<9}  {:>10}  {}",
                    &entry.fingerprint[..entry.fingerprint.len().min(16)],
                    stage,
                    kind,
                    human_bytes(entry.bytes()),
                    human_age(entry.age)
                );
            }
            println!(
                "{} entries, {} in `{}`",
                entries.len(),
                human_bytes(total),
                store.root().display()
            );
            Ok(Outcome::Success)
        }
        CacheCommand::Gc {
            file,
            cache,
            older_than_days,
        } => {
            let Some(store) = existing(&cache, file.as_deref())? else {
                return Ok(Outcome::Success);
            };
            let lock = store.lock_notify(LOCK_WAIT, &mut |m| eprintln!("{m}"))?;
            let limit = Duration::from_secs_f64(older_than_days.max(0.0) * 86_400.0);
            let report = store.gc(&lock, &GcPolicy::OlderThan(limit))?;
            println!(
                "removed {} entries ({}), kept {} in `{}`",
                report.removed.len(),
                human_bytes(report.freed_bytes),
                report.kept,
                store.root().display()
            );
            Ok(Outcome::Success)
        }
        CacheCommand::Verify { file, cache } => {
            let Some(store) = existing(&cache, file.as_deref())? else {
                return Ok(Outcome::Success);
            };
            // Removing bad entries must not race a run that is reading them.
            let lock = store.lock_notify(LOCK_WAIT, &mut |m| eprintln!("{m}"))?;
            let outcomes = store.verify_all(&lock)?;
            let bad: Vec<_> = outcomes.iter().filter(|o| o.problem.is_some()).collect();
            for outcome in &bad {
                println!(
                    "{}: {}{}",
                    outcome.fingerprint,
                    outcome.problem.as_deref().unwrap_or_default(),
                    if outcome.removed {
                        "; removed, the next run recomputes it"
                    } else {
                        ""
                    }
                );
            }
            println!(
                "{} entries checked, {} bad in `{}`",
                outcomes.len(),
                bad.len(),
                store.root().display()
            );
            Ok(if bad.is_empty() {
                Outcome::Success
            } else {
                Outcome::Problems
            })
        }
    }
}

/// Says the cache looked at is empty and, when it was only the default guess (no file, no
/// `--cache-dir`), where caches were found below the current folder.
fn print_empty(root: &Path, cache: &CacheDirArg, file: Option<&Path>) {
    println!("the cache `{}` is empty", root.display());
    if cache.cache_dir.is_some() || file.is_some() {
        return;
    }
    let found = find_caches(Path::new("."), 3);
    if found.is_empty() {
        return;
    }
    println!("caches found below the current folder:");
    for (dir, count) in &found {
        println!("  {}  ({count} entries)", dir.display());
    }
    println!(
        "a cache sits beside its pipeline: `vlmpipe cache ls PIPELINE.vp` or `--cache-dir DIR`"
    );
}

/// `.vlmpipe` folders (with an `entries/` folder) up to `depth` levels below `dir`, with their
/// entry counts; build and VCS folders are not searched.
fn find_caches(dir: &Path, depth: usize) -> Vec<(PathBuf, usize)> {
    let mut found = Vec::new();
    let walker = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .max_depth(depth)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            let name = e.file_name().to_string_lossy();
            e.file_type().is_dir() && !matches!(name.as_ref(), "target" | ".git" | "node_modules")
        });
    for item in walker.flatten() {
        if item.file_name() == ".vlmpipe" {
            let entries = item.path().join("entries");
            if let Ok(read) = std::fs::read_dir(&entries) {
                let count = read.flatten().filter(|e| e.path().is_dir()).count();
                let path = item.path().strip_prefix(".").unwrap_or(item.path());
                found.push((path.to_path_buf(), count));
            }
        }
    }
    found
}

fn open(root: &Path) -> anyhow::Result<CacheStore> {
    CacheStore::open(root).with_context(|| format!("cannot open the cache `{}`", root.display()))
}

pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn human_age(age: Duration) -> String {
    let secs = age.as_secs();
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_age(Duration::from_secs(5)), "5s ago");
        assert_eq!(human_age(Duration::from_secs(7200)), "2h ago");
    }

    #[test]
    fn cache_dir_defaults_beside_the_pipeline() {
        let none = CacheDirArg { cache_dir: None };
        assert_eq!(
            cache_root(&none, Some(std::path::Path::new("pipelines/a.vp"))),
            PathBuf::from("pipelines/.vlmpipe")
        );
        assert_eq!(
            cache_root(&none, Some(std::path::Path::new("a.vp"))),
            PathBuf::from(".vlmpipe")
        );
        let set = CacheDirArg {
            cache_dir: Some(PathBuf::from("/tmp/c")),
        };
        assert_eq!(cache_root(&set, None), PathBuf::from("/tmp/c"));
    }
}
