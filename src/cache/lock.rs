//! The process lock of a cache: one exclusive holder (a run, `gc`) at a time.
//!
//! Uses an advisory `flock`-style lock (fs4) on `<root>/lock`; the operating system releases it
//! when the holder exits or is killed, so a crashed run never wedges the cache. The holder writes
//! its pid and start time to `<root>/lock.owner` so a waiting run can say who it waits for.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::CacheError;

/// Poll interval while waiting for another holder to finish.
const POLL: Duration = Duration::from_millis(50);

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
        std::fs::create_dir_all(root).map_err(CacheError::io(root))?;
        let path = root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(CacheError::io(&path))?;
        let start = Instant::now();
        loop {
            // Called through the trait: std's inherent `File::try_lock` has another error type.
            match fs4::FileExt::try_lock(&file) {
                Ok(()) => break,
                Err(fs4::TryLockError::WouldBlock) => {
                    if start.elapsed() >= wait {
                        let holder = std::fs::read_to_string(root.join("lock.owner"))
                            .map(|s| s.trim().to_owned())
                            .unwrap_or_else(|_| "holder unknown".to_owned());
                        return Err(CacheError::Locked {
                            root: root.to_path_buf(),
                            holder,
                            waited_ms: start.elapsed().as_millis(),
                        });
                    }
                    std::thread::sleep(POLL);
                }
                Err(fs4::TryLockError::Error(source)) => {
                    return Err(CacheError::Io { path, source });
                }
            }
        }
        let since = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // Best effort: the owner note only improves the message another waiter prints.
        let owner = root.join("lock.owner");
        if let Ok(mut f) = File::create(&owner) {
            let _ = writeln!(f, "pid {} since unix time {since}", std::process::id());
        }
        Ok(Self {
            root: root.to_path_buf(),
            _file: file,
        })
    }

    /// The cache root this lock holds.
    pub fn root(&self) -> &Path {
        &self.root
    }
}
