//! The locks of a cache: the cache lock (runs share it, `gc` and `verify` take it alone) and one
//! lock per entry being computed.
//!
//! Both are advisory `flock`-style locks (fs4): `<root>/lock` and `<root>/locks/<fingerprint>`.
//! The operating system releases them when the holder exits or is killed, so a crashed run never
//! wedges the cache. A holder writes its pid, start time and command line beside the lock
//! (`lock.owner`, `locks/<fingerprint>.owner`, JSON) so a waiting run can say at once, and again
//! while it waits, who it waits for. Runs of different pipelines on one cache therefore proceed
//! together; two runs that need the same entry compute it once ([`EntryLock`]): the second waits
//! for the entry and then finds it in the cache.

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

/// Who holds a lock, from its owner note, as a sentence fragment (older holders wrote plain text).
fn holder(owner: &Path) -> String {
    match std::fs::read_to_string(owner) {
        Ok(text) => match serde_json::from_str::<LockOwner>(&text) {
            Ok(owner) => owner.describe(),
            Err(_) if !text.trim().is_empty() => text.trim().to_owned(),
            Err(_) => "a holder that has not said who it is yet".to_owned(),
        },
        Err(_) => "holder unknown".to_owned(),
    }
}

/// A hold on a cache: exclusive ([`CacheLock::acquire`]) or shared by runs
/// ([`CacheLock::acquire_shared_notify`]). Released on drop.
#[derive(Debug)]
pub struct CacheLock {
    root: PathBuf,
    // Kept open: closing the file releases the lock.
    _file: File,
    mode: Mode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Shared,
    Exclusive,
}

/// The hold a run has on one entry while it computes it: whoever needs the same entry waits, then
/// finds it in the cache. Released on drop (or when the holder dies).
#[derive(Debug)]
pub struct EntryLock {
    owner: PathBuf,
    _file: File,
}

impl EntryLock {
    /// Takes the lock of entry `fingerprint` (named `stage` in messages) under `root`, waiting up
    /// to `wait` for the run computing it, and telling `notify` who that is while it waits.
    pub fn acquire_notify(
        root: &Path,
        fingerprint: &str,
        stage: &str,
        wait: Duration,
        notify: &mut dyn FnMut(&str),
    ) -> Result<Self, CacheError> {
        let dir = root.join("locks");
        std::fs::create_dir_all(&dir).map_err(FileError::create(&dir))?;
        let path = dir.join(fingerprint);
        let owner = dir.join(format!("{fingerprint}.owner"));
        let file = open_lock_file(&path)?;
        let short: String = fingerprint.chars().take(12).collect();
        let waiting = Waiting {
            subject: format!("`{stage}` (entry {short})"),
            doing: "another run is computing it",
            got: format!("`{stage}` is free"),
        };
        wait_for(
            &file,
            &path,
            &owner,
            wait,
            notify,
            Mode::Exclusive,
            &waiting,
        )
        .map_err(|failure| match failure {
            WaitFailure::TimedOut { holder, waited_ms } => CacheError::EntryLocked {
                stage: stage.to_owned(),
                holder,
                waited_ms,
            },
            WaitFailure::Error(error) => error,
        })?;
        write_owner(&owner);
        Ok(Self { owner, _file: file })
    }
}

impl Drop for EntryLock {
    fn drop(&mut self) {
        // Best effort, before the lock goes: a stale note only names a finished holder.
        let _ = std::fs::remove_file(&self.owner);
    }
}

/// What a waiting holder says: "waiting for {subject}: {doing}, {who}", then "{got} after …".
struct Waiting {
    subject: String,
    doing: &'static str,
    got: String,
}

enum WaitFailure {
    TimedOut { holder: String, waited_ms: u128 },
    Error(CacheError),
}

fn open_lock_file(path: &Path) -> Result<File, CacheError> {
    Ok(OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(FileError::create(path))?)
}

/// Best effort: the owner note only improves the message another waiter prints.
fn write_owner(path: &Path) {
    if let (Ok(mut f), Ok(text)) = (
        File::create(path),
        serde_json::to_string(&LockOwner::current()),
    ) {
        let _ = writeln!(f, "{text}");
    }
}

/// Polls `file`'s lock in `mode` until it is taken or `wait` runs out, telling `notify` at once
/// who holds it (read from `owner`), again every 30 s or when the holder changes, and when it got
/// the lock after waiting.
fn wait_for(
    file: &File,
    path: &Path,
    owner: &Path,
    wait: Duration,
    notify: &mut dyn FnMut(&str),
    mode: Mode,
    waiting: &Waiting,
) -> Result<(), WaitFailure> {
    let start = Instant::now();
    // The holder last reported and when.
    let mut told: Option<(String, Instant)> = None;
    loop {
        // Called through the trait: std's inherent `File::try_lock` has another error type.
        let attempt = match mode {
            Mode::Exclusive => fs4::FileExt::try_lock(file),
            Mode::Shared => fs4::FileExt::try_lock_shared(file),
        };
        match attempt {
            Ok(()) => {
                if told.is_some() {
                    notify(&format!(
                        "{} after waiting {:.0} s",
                        waiting.got,
                        start.elapsed().as_secs_f64()
                    ));
                }
                return Ok(());
            }
            Err(fs4::TryLockError::WouldBlock) => {
                let who = holder(owner);
                if start.elapsed() >= wait {
                    return Err(WaitFailure::TimedOut {
                        holder: who,
                        waited_ms: start.elapsed().as_millis(),
                    });
                }
                let holder_pid = |text: &str| text.split(" (").next().map(str::to_owned);
                match &told {
                    None => notify(&format!(
                        "waiting for {}: {}, {who}; giving up after {} s",
                        waiting.subject,
                        waiting.doing,
                        wait.as_secs()
                    )),
                    Some((before, at))
                        if holder_pid(before) != holder_pid(&who)
                            || at.elapsed() >= REMIND_EVERY =>
                    {
                        notify(&format!(
                            "still waiting for {} ({:.0} s so far): {who}",
                            waiting.subject,
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
                return Err(WaitFailure::Error(FileError::lock(path)(source).into()));
            }
        }
    }
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
        Self::acquire_mode(root, wait, notify, Mode::Exclusive)
    }

    /// The lock a run holds: shared with other runs, exclusive of `gc` and `verify` (waits for
    /// them like [`CacheLock::acquire_notify`]). Returns whether this holder is alone, having
    /// briefly held the lock exclusively, so it may clear what killed writers left in `tmp/`.
    pub fn acquire_shared_notify(
        root: &Path,
        wait: Duration,
        notify: &mut dyn FnMut(&str),
    ) -> Result<(Self, bool), CacheError> {
        std::fs::create_dir_all(root).map_err(FileError::create(root))?;
        let path = root.join("lock");
        let file = open_lock_file(&path)?;
        // Alone: hold it exclusively long enough to clear `tmp/`, then downgrade (flock converts
        // the lock in place, so no gc can slip in between).
        if fs4::FileExt::try_lock(&file).is_ok() {
            write_owner(&root.join("lock.owner"));
            return Ok((
                Self {
                    root: root.to_path_buf(),
                    _file: file,
                    mode: Mode::Exclusive,
                },
                true,
            ));
        }
        drop(file);
        Ok((Self::acquire_mode(root, wait, notify, Mode::Shared)?, false))
    }

    /// Turns an exclusive hold into a shared one (a run, once it cleared `tmp/`).
    pub fn share(&mut self) -> Result<(), CacheError> {
        if self.mode == Mode::Exclusive {
            fs4::FileExt::lock_shared(&self._file)
                .map_err(FileError::lock(&self.root.join("lock")))?;
            self.mode = Mode::Shared;
        }
        Ok(())
    }

    /// Whether this hold excludes every other holder.
    pub fn is_exclusive(&self) -> bool {
        self.mode == Mode::Exclusive
    }

    fn acquire_mode(
        root: &Path,
        wait: Duration,
        notify: &mut dyn FnMut(&str),
        mode: Mode,
    ) -> Result<Self, CacheError> {
        std::fs::create_dir_all(root).map_err(FileError::create(root))?;
        let path = root.join("lock");
        let file = open_lock_file(&path)?;
        let waiting = Waiting {
            subject: format!("the cache `{}`", root.display()),
            doing: "another run holds it",
            got: "got the cache lock".to_owned(),
        };
        wait_for(
            &file,
            &path,
            &root.join("lock.owner"),
            wait,
            notify,
            mode,
            &waiting,
        )
        .map_err(|failure| match failure {
            WaitFailure::TimedOut { holder, waited_ms } => CacheError::Locked {
                root: root.to_path_buf(),
                holder,
                waited_ms,
            },
            WaitFailure::Error(error) => error,
        })?;
        write_owner(&root.join("lock.owner"));
        Ok(Self {
            root: root.to_path_buf(),
            _file: file,
            mode,
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

    #[test]
    fn runs_share_the_cache_and_gc_waits_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let (first, alone) =
            CacheLock::acquire_shared_notify(dir.path(), Duration::ZERO, &mut |_| {}).unwrap();
        assert!(alone);
        let mut first = first;
        first.share().unwrap();
        let (second, alone) =
            CacheLock::acquire_shared_notify(dir.path(), Duration::ZERO, &mut |_| {}).unwrap();
        assert!(!alone && !second.is_exclusive());
        // `gc` needs the cache alone.
        let error = CacheLock::acquire(dir.path(), Duration::from_millis(100)).unwrap_err();
        assert!(matches!(error, CacheError::Locked { .. }), "{error}");
        drop((first, second));
        CacheLock::acquire(dir.path(), Duration::ZERO).unwrap();
    }

    #[test]
    fn a_run_waiting_for_an_entry_names_the_run_computing_it() {
        let dir = tempfile::tempdir().unwrap();
        let held =
            EntryLock::acquire_notify(dir.path(), "ab12", "eval", Duration::ZERO, &mut |_| {})
                .unwrap();
        let error = EntryLock::acquire_notify(
            dir.path(),
            "ab12",
            "eval",
            Duration::from_millis(100),
            &mut |_| {},
        )
        .unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with("`eval` is being computed by another run"),
            "{text}"
        );
        assert!(
            text.contains(&format!("pid {} (`", std::process::id())),
            "{text}"
        );
        // Another entry is not held.
        EntryLock::acquire_notify(dir.path(), "cd34", "other", Duration::ZERO, &mut |_| {})
            .unwrap();
        let root = dir.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let mut messages = Vec::new();
            let lock = EntryLock::acquire_notify(
                &root,
                "ab12",
                "eval",
                Duration::from_secs(20),
                &mut |m| messages.push(m.to_owned()),
            );
            (lock.is_ok(), messages)
        });
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
        let (got, messages) = waiter.join().unwrap();
        assert!(got);
        assert!(
            messages[0].starts_with("waiting for `eval` (entry ab12): another run is computing it"),
            "{messages:?}"
        );
        assert!(
            messages
                .last()
                .unwrap()
                .starts_with("`eval` is free after waiting")
        );
    }
}
