//! `vlmpipe cache ls|gc|verify`.

use std::path::PathBuf;
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

pub(crate) fn run(command: CacheCommand) -> anyhow::Result<Outcome> {
    match command {
        CacheCommand::Ls { cache } => {
            let store = open(&cache)?;
            let entries = store.list()?;
            if entries.is_empty() {
                println!("the cache `{}` is empty", store.root().display());
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
            println!("{} entries, {}", entries.len(), human_bytes(total));
            Ok(Outcome::Success)
        }
        CacheCommand::Gc {
            cache,
            older_than_days,
        } => {
            let store = open(&cache)?;
            let lock = store.lock(Duration::from_secs(10))?;
            let limit = Duration::from_secs_f64(older_than_days.max(0.0) * 86_400.0);
            let report = store.gc(&lock, &GcPolicy::OlderThan(limit))?;
            println!(
                "removed {} entries ({}), kept {}",
                report.removed.len(),
                human_bytes(report.freed_bytes),
                report.kept
            );
            Ok(Outcome::Success)
        }
        CacheCommand::Verify { cache } => {
            let store = open(&cache)?;
            let outcomes = store.verify_all()?;
            let bad: Vec<_> = outcomes.iter().filter(|o| o.problem.is_some()).collect();
            for outcome in &bad {
                println!(
                    "{}: {}",
                    outcome.fingerprint,
                    outcome.problem.as_deref().unwrap_or_default()
                );
            }
            println!("{} entries checked, {} bad", outcomes.len(), bad.len());
            Ok(if bad.is_empty() {
                Outcome::Success
            } else {
                Outcome::Problems
            })
        }
    }
}

fn open(arg: &CacheDirArg) -> anyhow::Result<CacheStore> {
    let root = cache_root(arg, None);
    CacheStore::open(&root).with_context(|| format!("cannot open the cache `{}`", root.display()))
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
