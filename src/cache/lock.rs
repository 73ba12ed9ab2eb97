//! The process lock of a cache: one exclusive holder (a run, `gc`) at a time.
//!
//! Uses an advisory `flock`-style lock (fs4) on `<root>/lock`; the operating system releases it
//! when the holder exits or is killed, so a crashed run never wedges the cache. The holder writes
//! its pid, start time and command line to `<root>/lock.owner` (JSON) so a waiting run can say at
//! once, and again while it waits, who it waits for.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::CacheError;
use crate::file_error::FileError;

/// Poll interval while waiting for another holder to finish.
const POLL: Duration = Duration::from_millis(50);

/// How often a waiting run repeats that it still waits (a new holder is said at once).
const REMIND_EVERY: Duration = Duration::from_secs(30);

/// What the holder of a lock writes to `lock.owner`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct LockOwner {
    /// The holder's process id.
    pub pid: u32,
    /// When it took the lock (seconds since the Unix epoch).
    pub since_unix_s: u64,
    /// Its command line (`vlmpipe run pipelines/pets.vp …`), shortened.
    pub command: String,
}

impl LockOwner {
    fn current() -> Self {
        let mut command = std::env::args().collect::<Vec<_>>().join(" ");
        if command.chars().count() > 200 {
            command = command.chars().take(199).collect::<String>() + "…";
        }
        Self {
            pid: std::process::id(),
            since_unix_s: unix_now(),
            command,
        }
    }

    /// `pid 123 (`vlmpipe run a.vp`), holding it for 35 s`.
    pub(super) fn describe(&self) -> String {
        format!(
            "pid {} (`{}`), holding it for {} s",
            self.pid,
            self.command,
            unix_now().saturating_sub(self.since_unix_s)
        )
    }
}

/// Who holds the lock of `root`, as a sentence fragment (older holders wrote plain text).
fn holder(root: &Path) -> String {
    match std::fs::read_to_string(root.join("lock.owner")) {
        Ok(text) => match serde_json::from_str::<LockOwner>(&text) {
            Ok(owner) => owner.describe(),
            Err(_) if !text.trim().is_empty() => text.trim().to_owned(),
            Err(_) => "a holder that has not said who it is yet".to_owned(),
        },
        Err(_) => "holder unknown".to_owned(),
    }
}

/// An exclusive hold on a cache. Released on drop.
#[derive(Debug)]
pub struct CacheLock {
    root: PathBuf,
    // Kept open: closing the file releases the lock.
    _file: File,
}

impl CacheLock {
    /// Takes the exclusive lock of the cache at `root`, waiting up to `wait` for another holder.
    ///
    /// Fails with [`CacheError::Locked`] naming the holder when the wait runs out; `wait` of zero
    /// tries once.
    pub fn acquire(root: &Path, wait: Duration) -> Result<Self, CacheError> {
        Self::acquire_notify(root, wait, &mut |_| {})
    }

    /// Like [`CacheLock::acquire`], telling `notify` at once when it has to wait (for whom, and
    /// for how long at most), again every 30 s or when the holder changes, and when it got the
    /// lock after waiting.
    pub(crate) fn acquire_notify(
        root: &Path,
        wait: Duration,
        notify: &mut dyn FnMut(&str),
    ) -> Result<Self, CacheError> {
        std::fs::create_dir_all(root).map_err(FileError::create(root))?;
        let path = root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(FileError::create(&path))?;
        let start = Instant::now();
        // The holder last reported and when.
        let mut told: Option<(String, Instant)> = None;
        loop {
            // Called through the trait: std's inherent `File::try_lock` has another error type.
            match fs4::FileExt::try_lock(&file) {
                Ok(()) => {
                    if told.is_some() {
                        notify(&format!(
                            "got the cache lock after waiting {:.0} s",
                            start.elapsed().as_secs_f64()
                        ));
                    }
                    break;
                }
                Err(fs4::TryLockError::WouldBlock) => {
                    let who = holder(root);
                    if start.elapsed() >= wait {
                        return Err(CacheError::Locked {
                            root: root.to_path_buf(),
                            holder: who,
                            waited_ms: start.elapsed().as_millis(),
                        });
                    }
                    let holder_pid = |text: &str| text.split(" (").next().map(str::to_owned);
                    match &told {
                        None => notify(&format!(
                            "waiting for the cache `{}`: another run holds it, {who}; \
                             giving up after {} s",
                            root.display(),
                            wait.as_secs()
                        )),
                        Some((before, at))
                            if holder_pid(before) != holder_pid(&who)
                                || at.elapsed() >= REMIND_EVERY =>
                        {
                            notify(&format!(
                                "still waiting for the cache ({:.0} s so far): {who}",
                                start.elapsed().as_secs_f64()
                            ));
                        }
                        Some(_) => {
                            std::thread::sleep(POLL);
                            continue;
                        }
                    }
                    told = Some((who, Instant::now()));
                    std::thread::sleep(POLL);
                }
                Err(fs4::TryLockError::Error(source)) => {
                    return Err(FileError::lock(&path)(source).into());
                }
            }
        }
        // Best effort: the owner note only improves the message another waiter prints.
        let owner = root.join("lock.owner");
        if let (Ok(mut f), Ok(text)) = (
            File::create(&owner),
            serde_json::to_string(&LockOwner::current()),
        ) {
            let _ = writeln!(f, "{text}");
        }
        Ok(Self {
            root: root.to_path_buf(),
            _file: file,
        })
    }

    /// The cache root this lock holds.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_run_says_at_once_who_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let held = CacheLock::acquire(dir.path(), Duration::ZERO).unwrap();
        let root = dir.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let mut messages = Vec::new();
            let lock = CacheLock::acquire_notify(&root, Duration::from_secs(20), &mut |m| {
                messages.push(m.to_owned());
            });
            (lock.is_ok(), messages)
        });
        // The waiter speaks long before the holder lets go.
        std::thread::sleep(Duration::from_millis(400));
        drop(held);
        let (got, messages) = waiter.join().unwrap();
        assert!(got);
        let first = &messages[0];
        assert!(first.starts_with("waiting for the cache"), "{messages:?}");
        assert!(
            first.contains(&format!("pid {}", std::process::id())),
            "{first}"
        );
        assert!(first.contains("giving up after 20 s"), "{first}");
        assert!(messages.last().unwrap().starts_with("got the cache lock"));
    }

    #[test]
    fn running_out_of_patience_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _held = CacheLock::acquire(dir.path(), Duration::ZERO).unwrap();
        let error = CacheLock::acquire(dir.path(), Duration::from_millis(100)).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains(&format!("pid {} (`", std::process::id())),
            "{text}"
        );
    }
}
