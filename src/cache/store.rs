//! The cache store: lookups with verification, atomic commits, listing and garbage collection.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::manifest::{hash_file, mtime_ns};
use super::{
    CacheError, CacheLock, EntryLock, FileRecord, Fingerprint, MANIFEST_FILE, MANIFEST_VERSION,
    Manifest,
};
use crate::file_error::FileError;

/// Files up to this size are rehashed on every fast lookup; bigger ones only when their size or
/// modification time differs from the manifest. Keeps a no-change rerun independent of dataset
/// size (an images table of 10,000 photos is hundreds of MB; its row tables are a few hundred KB).
pub const SMALL_FILE_BYTES: u64 = 1 << 20;

/// How much a lookup checks before trusting an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Sizes always; blake3 of small files always and of big files whose mtime changed.
    Fast,
    /// blake3 of every file (what `vlmpipe cache verify` does).
    Full,
}

/// The result of a lookup.
#[derive(Debug)]
pub enum Lookup {
    /// A verified entry (boxed: the manifest is large next to a miss reason).
    Hit(Box<CacheEntry>),
    /// Nothing usable; the stage must run.
    Miss(MissReason),
}

/// Why a lookup missed (for `run --dry-run`'s "what would run and why").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MissReason {
    /// No entry under this fingerprint.
    Absent,
    /// An entry existed but failed verification; it was removed.
    Corrupt(String),
}

/// A committed, verified entry.
#[derive(Clone, Debug)]
pub struct CacheEntry {
    dir: PathBuf,
    manifest: Manifest,
}

impl CacheEntry {
    /// The entry folder.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of output file `name` inside the entry (whether or not the entry holds it).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The entry's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The entry's fingerprint.
    pub(crate) fn fingerprint(&self) -> &Fingerprint {
        &self.manifest.fingerprint
    }
}

/// One row of `vlmpipe cache ls`.
#[derive(Clone, Debug)]
pub struct EntryInfo {
    /// Folder name (the fingerprint when the entry is well-formed).
    pub fingerprint: String,
    /// Stage name, kind and size; `None` when the manifest is unreadable.
    pub manifest: Option<Manifest>,
    /// Time since creation.
    pub age: Duration,
}

impl EntryInfo {
    /// Total bytes of the entry's files (0 when the manifest is unreadable).
    pub fn bytes(&self) -> u64 {
        self.manifest.as_ref().map_or(0, Manifest::total_bytes)
    }
}

/// What `gc` removes.
#[derive(Clone, Debug)]
pub enum GcPolicy {
    /// Keep the given fingerprints and every entry reachable from them through manifest inputs;
    /// remove everything else.
    KeepReachable(Vec<Fingerprint>),
    /// Remove entries at least this old (whole seconds; zero removes every entry).
    OlderThan(Duration),
}

/// What `gc` did.
#[derive(Clone, Debug, Default)]
pub struct GcReport {
    /// Fingerprints (folder names) removed.
    pub removed: Vec<String>,
    /// Bytes freed by removed entries.
    pub freed_bytes: u64,
    /// Entries left.
    pub kept: usize,
}

/// The outcome of a full verification of one entry.
#[derive(Clone, Debug)]
pub struct VerifyOutcome {
    /// Folder name of the entry.
    pub fingerprint: String,
    /// `None` when every checksum matched; otherwise what is wrong.
    pub problem: Option<String>,
    /// The bad entry was removed (it is recomputed by the next run that needs it).
    pub removed: bool,
}

/// A cache rooted at a directory.
#[derive(Clone, Debug)]
pub struct CacheStore {
    root: PathBuf,
}

impl CacheStore {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, CacheError> {
        let root = root.into();
        for dir in [root.join("entries"), root.join("tmp")] {
            fs::create_dir_all(&dir).map_err(FileError::create(&dir))?;
        }
        let tag = root.join("CACHEDIR.TAG");
        if !tag.exists() {
            // https://bford.info/cachedir/ — backup tools skip folders carrying this signature.
            fs::write(
                &tag,
                "Signature: 8a477f597d28d172789f06886806bc55\n# vlmpipe stage cache\n",
            )
            .map_err(FileError::write(&tag))?;
        }
        Ok(Self { root })
    }

    /// The cache root.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the exclusive process lock (see [`CacheLock::acquire`]) and clears temp folders left
    /// by killed writers, which is safe because no other writer can be active now.
    pub fn lock(&self, wait: Duration) -> Result<CacheLock, CacheError> {
        self.lock_notify(wait, &mut |_| {})
    }

    /// [`CacheStore::lock`], saying while it waits who holds the lock (see
    /// [`CacheLock::acquire_notify`]).
    pub(crate) fn lock_notify(
        &self,
        wait: Duration,
        notify: &mut dyn FnMut(&str),
    ) -> Result<CacheLock, CacheError> {
        let lock = CacheLock::acquire_notify(&self.root, wait, notify)?;
        self.clear_tmp()?;
        Ok(lock)
    }

    /// The lock a run holds (see [`CacheLock::acquire_shared_notify`]): shared with other runs.
    /// Clears temp folders left by killed writers when no other holder is active, then shares.
    pub fn lock_shared_notify(
        &self,
        wait: Duration,
        notify: &mut dyn FnMut(&str),
    ) -> Result<CacheLock, CacheError> {
        let (mut lock, alone) = CacheLock::acquire_shared_notify(&self.root, wait, notify)?;
        if alone {
            self.clear_tmp()?;
        }
        lock.share()?;
        Ok(lock)
    }

    /// Takes the lock of entry `fp` (stage `stage`, for messages) before computing it, waiting up
    /// to `wait` for another run computing the same entry; the caller looks the entry up again
    /// once it holds the lock.
    pub fn lock_entry(
        &self,
        lock: &CacheLock,
        fp: &Fingerprint,
        stage: &str,
        wait: Duration,
        notify: &mut dyn FnMut(&str),
    ) -> Result<EntryLock, CacheError> {
        self.check_lock(lock)?;
        EntryLock::acquire_notify(&self.root, fp.as_str(), stage, wait, notify)
    }

    /// Whether an entry folder exists for `fp` (unverified; for planning which stages will run).
    pub(crate) fn has_entry(&self, fp: &Fingerprint) -> bool {
        self.entry_dir(fp).is_dir()
    }

    fn check_lock(&self, lock: &CacheLock) -> Result<(), CacheError> {
        if lock.root() == self.root {
            Ok(())
        } else {
            Err(CacheError::WrongLock {
                lock_root: lock.root().to_path_buf(),
                store_root: self.root.clone(),
            })
        }
    }

    fn entry_dir(&self, fp: &Fingerprint) -> PathBuf {
        self.root.join("entries").join(fp.as_str())
    }

    /// Looks `fp` up. A missing, partial or corrupt entry is a [`Lookup::Miss`]; a corrupt one is
    /// removed so the recomputed output can take its place.
    pub fn lookup(
        &self,
        lock: &CacheLock,
        fp: &Fingerprint,
        verify: Verify,
    ) -> Result<Lookup, CacheError> {
        self.check_lock(lock)?;
        let dir = self.entry_dir(fp);
        if !dir.is_dir() {
            return Ok(Lookup::Miss(MissReason::Absent));
        }
        match check_entry(&dir, Some(fp), verify) {
            Ok((manifest, refreshed)) => {
                if refreshed {
                    // The checksums still match files whose mtime moved (e.g. a copied cache):
                    // record the new mtimes so the next fast lookup skips the rehash.
                    write_manifest_atomically(&dir, &manifest)?;
                }
                Ok(Lookup::Hit(Box::new(CacheEntry { dir, manifest })))
            }
            Err(problem) => {
                self.remove_dir(&dir)?;
                Ok(Lookup::Miss(MissReason::Corrupt(problem)))
            }
        }
    }

    /// Starts writing the entry for `fp` of stage `stage` (kind `kind`) in a fresh temp folder.
    pub fn begin(
        &self,
        lock: &CacheLock,
        fp: &Fingerprint,
        stage: &str,
        kind: &str,
    ) -> Result<EntryWriter, CacheError> {
        self.check_lock(lock)?;
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            self.root
                .join("tmp")
                .join(format!("{}.{}.{nanos}", fp.short(), std::process::id()));
        fs::create_dir_all(&dir).map_err(FileError::create(&dir))?;
        Ok(EntryWriter {
            store: self.clone(),
            dir,
            fingerprint: fp.clone(),
            stage: stage.to_owned(),
            kind: kind.to_owned(),
            inputs: Vec::new(),
            committed: false,
        })
    }

    /// Every entry folder, oldest first (unreadable manifests included with `manifest: None`).
    pub fn list(&self) -> Result<Vec<EntryInfo>, CacheError> {
        let entries = self.root.join("entries");
        let mut out = Vec::new();
        for item in fs::read_dir(&entries).map_err(FileError::list(&entries))? {
            let item = item.map_err(FileError::list(&entries))?;
            if !item.path().is_dir() {
                continue;
            }
            let name = item.file_name().to_string_lossy().into_owned();
            let manifest = read_manifest(&item.path()).ok();
            let created = manifest.as_ref().map_or(0, |m| m.created_unix_s);
            let now = unix_now();
            out.push(EntryInfo {
                fingerprint: name,
                manifest,
                age: Duration::from_secs(now.saturating_sub(created)),
            });
        }
        out.sort_by(|a, b| b.age.cmp(&a.age).then(a.fingerprint.cmp(&b.fingerprint)));
        Ok(out)
    }

    /// Removes entries by `policy`, plus unreadable entries and stale temp folders.
    pub fn gc(&self, lock: &CacheLock, policy: &GcPolicy) -> Result<GcReport, CacheError> {
        self.check_lock(lock)?;
        self.clear_tmp()?;
        let infos = self.list()?;
        let keep: Option<BTreeSet<String>> = match policy {
            GcPolicy::KeepReachable(roots) => Some(reachable(&infos, roots)),
            GcPolicy::OlderThan(_) => None,
        };
        let mut report = GcReport::default();
        for info in infos {
            let remove = match (&info.manifest, policy) {
                (None, _) => true,
                (Some(_), GcPolicy::OlderThan(limit)) => info.age >= *limit,
                (Some(_), GcPolicy::KeepReachable(_)) => keep
                    .as_ref()
                    .is_some_and(|k| !k.contains(&info.fingerprint)),
            };
            if remove {
                self.remove_dir(&self.root.join("entries").join(&info.fingerprint))?;
                report.freed_bytes += info.bytes();
                report.removed.push(info.fingerprint);
            } else {
                report.kept += 1;
            }
        }
        Ok(report)
    }

    /// Fully rehashes every entry (`vlmpipe cache verify`) and removes the ones that fail, so a
    /// fast lookup, which rehashes big files only when their mtime moved, can never trust them.
    pub fn verify_all(&self, lock: &CacheLock) -> Result<Vec<VerifyOutcome>, CacheError> {
        self.check_lock(lock)?;
        let mut outcomes = Vec::new();
        for info in self.list()? {
            let dir = self.root.join("entries").join(&info.fingerprint);
            let problem = match Fingerprint::parse(&info.fingerprint) {
                Err(_) => Some("folder name is not a fingerprint".to_owned()),
                Ok(fp) => check_entry(&dir, Some(&fp), Verify::Full).err(),
            };
            let removed = problem.is_some();
            if removed {
                self.remove_dir(&dir)?;
            }
            outcomes.push(VerifyOutcome {
                fingerprint: info.fingerprint,
                problem,
                removed,
            });
        }
        Ok(outcomes)
    }

    /// Removes the entry `fp`; returns whether it existed (`run --force` of a sharded stage
    /// removes its shards; tests simulate a lost shard with it).
    pub(crate) fn remove(&self, lock: &CacheLock, fp: &Fingerprint) -> Result<bool, CacheError> {
        self.check_lock(lock)?;
        let dir = self.entry_dir(fp);
        if !dir.exists() {
            return Ok(false);
        }
        self.remove_dir(&dir)?;
        Ok(true)
    }

    /// Moves `dir` out of `entries/` in one rename (so it vanishes atomically), then deletes it.
    fn remove_dir(&self, dir: &Path) -> Result<(), CacheError> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let trash = self.root.join("tmp").join(format!(
            "trash.{name}.{}.{}",
            std::process::id(),
            unix_now_nanos()
        ));
        match fs::rename(dir, &trash) {
            Ok(()) => {}
            // Another run sharing the cache removed it first (a corrupt entry both looked up).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(FileError::write(dir)(e).into()),
        }
        fs::remove_dir_all(&trash).map_err(FileError::remove(&trash))?;
        Ok(())
    }

    fn clear_tmp(&self) -> Result<(), CacheError> {
        let tmp = self.root.join("tmp");
        fs::create_dir_all(&tmp).map_err(FileError::create(&tmp))?;
        for item in fs::read_dir(&tmp).map_err(FileError::list(&tmp))? {
            let path = item.map_err(FileError::list(&tmp))?.path();
            let result = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            result.map_err(FileError::remove(&path))?;
        }
        Ok(())
    }
}

/// Writes one entry into a temp folder; [`EntryWriter::commit`] renames it into place.
/// Dropped without a commit (an error in the stage), the temp folder is deleted.
#[derive(Debug)]
pub struct EntryWriter {
    store: CacheStore,
    dir: PathBuf,
    fingerprint: Fingerprint,
    stage: String,
    kind: String,
    inputs: Vec<Fingerprint>,
    committed: bool,
}

impl EntryWriter {
    /// The temp folder the stage writes its files into (sub-folders allowed).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of output file `name` (relative, `/`-separated, e.g. `rows.parquet` or
    /// `checkpoints/step-100/adapter.safetensors`) in the temp folder; creates its parent folders.
    pub fn path(&self, name: &str) -> Result<PathBuf, CacheError> {
        check_file_name(name)?;
        let path = self.dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(FileError::create(parent))?;
        }
        Ok(path)
    }

    /// Records the input fingerprints (for `gc` reachability).
    pub fn set_inputs(&mut self, inputs: Vec<Fingerprint>) {
        self.inputs = inputs;
    }

    /// Checksums the files, writes the manifest last, syncs, and renames the folder into
    /// `entries/<fingerprint>` (replacing a stale entry of that name).
    pub fn commit(mut self, metadata: Value) -> Result<CacheEntry, CacheError> {
        let mut files = Vec::new();
        for item in walkdir::WalkDir::new(&self.dir).min_depth(1) {
            let item = item.map_err(|e| FileError::list(&self.dir)(e.into()))?;
            if item.file_type().is_dir() {
                continue;
            }
            let path = item.path().to_path_buf();
            let name = path
                .strip_prefix(&self.dir)
                .map(|rel| {
                    rel.components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join("/")
                })
                .unwrap_or_default();
            // Symlinks and other non-files could point outside the entry.
            if !item.file_type().is_file() {
                return Err(CacheError::BadFileName { name });
            }
            check_file_name(&name)?;
            // Durable before the rename makes the entry visible.
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(FileError::write(&path))?;
            let meta = fs::metadata(&path).map_err(FileError::inspect(&path))?;
            let rows = if name.ends_with(".parquet") {
                Some(parquet_rows(&path)?)
            } else {
                None
            };
            files.push(FileRecord {
                blake3: hash_file(&path).map_err(FileError::read(&path))?,
                name,
                size: meta.len(),
                mtime_ns: mtime_ns(&meta),
                rows,
            });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            stage: self.stage.clone(),
            kind: self.kind.clone(),
            fingerprint: self.fingerprint.clone(),
            inputs: self.inputs.clone(),
            created_unix_s: unix_now(),
            files,
            metadata,
        };
        write_manifest(&self.dir, &manifest)?;
        let target = self.store.entry_dir(&self.fingerprint);
        if target.exists() {
            self.store.remove_dir(&target)?;
        }
        fs::rename(&self.dir, &target).map_err(FileError::write(&target))?;
        self.committed = true;
        if let Some(parent) = target.parent() {
            // Persist the rename itself; failure only weakens durability on power loss.
            let _ = File::open(parent).and_then(|d| d.sync_all());
        }
        Ok(CacheEntry {
            dir: target,
            manifest,
        })
    }
}

impl Drop for EntryWriter {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: a leftover temp folder is cleared by the next lock holder anyway.
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A relative `/`-separated path that stays inside the entry and is not the manifest.
fn check_file_name(name: &str) -> Result<(), CacheError> {
    let inside = !name.is_empty()
        && name != MANIFEST_FILE
        && !name.contains('\\')
        && name
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if inside {
        Ok(())
    } else {
        Err(CacheError::BadFileName {
            name: name.to_owned(),
        })
    }
}

fn parquet_rows(path: &Path) -> Result<u64, CacheError> {
    use parquet::file::reader::FileReader;
    let file = File::open(path).map_err(FileError::read(path))?;
    let reader = parquet::file::reader::SerializedFileReader::new(file).map_err(|source| {
        CacheError::BadParquet {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(u64::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0))
}

fn read_manifest(dir: &Path) -> Result<Manifest, String> {
    let text = fs::read_to_string(dir.join(MANIFEST_FILE))
        .map_err(|e| format!("manifest unreadable: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("manifest is not valid: {e}"))
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), CacheError> {
    let text = serde_json::to_string_pretty(manifest).map_err(|source| CacheError::Manifest {
        fingerprint: manifest.fingerprint.to_string(),
        source,
    })?;
    let path = dir.join(MANIFEST_FILE);
    let mut file = File::create(&path).map_err(FileError::create(&path))?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(FileError::write(&path))?;
    file.sync_all().map_err(FileError::write(&path))?;
    Ok(())
}

/// Replaces a committed entry's manifest through a temp file and a rename.
fn write_manifest_atomically(dir: &Path, manifest: &Manifest) -> Result<(), CacheError> {
    let tmp = dir.join(".manifest.json.tmp");
    let text = serde_json::to_string_pretty(manifest).map_err(|source| CacheError::Manifest {
        fingerprint: manifest.fingerprint.to_string(),
        source,
    })?;
    fs::write(&tmp, text).map_err(FileError::write(&tmp))?;
    let path = dir.join(MANIFEST_FILE);
    fs::rename(&tmp, &path).map_err(FileError::write(&path))?;
    Ok(())
}

/// Verifies an entry folder; returns its manifest and whether mtimes were refreshed, or what is
/// wrong with it.
fn check_entry(
    dir: &Path,
    expected: Option<&Fingerprint>,
    verify: Verify,
) -> Result<(Manifest, bool), String> {
    let mut manifest = read_manifest(dir)?;
    if manifest.version != MANIFEST_VERSION {
        return Err(format!(
            "manifest version {} is not the supported {MANIFEST_VERSION}",
            manifest.version
        ));
    }
    if let Some(fp) = expected
        && manifest.fingerprint != *fp
    {
        return Err(format!(
            "manifest names fingerprint `{}`, folder is `{fp}`",
            manifest.fingerprint
        ));
    }
    let mut refreshed = false;
    for record in &mut manifest.files {
        if check_file_name(&record.name).is_err() {
            return Err(format!(
                "manifest lists invalid file name `{}`",
                record.name
            ));
        }
        let path = dir.join(&record.name);
        let meta = fs::metadata(&path).map_err(|e| format!("`{}` missing: {e}", record.name))?;
        if meta.len() != record.size {
            return Err(format!(
                "`{}` has {} bytes, manifest says {} (truncated or changed)",
                record.name,
                meta.len(),
                record.size
            ));
        }
        let mtime = mtime_ns(&meta);
        let rehash = match verify {
            Verify::Full => true,
            Verify::Fast => record.size <= SMALL_FILE_BYTES || mtime != record.mtime_ns,
        };
        if rehash {
            let hash =
                hash_file(&path).map_err(|e| format!("`{}` unreadable: {e}", record.name))?;
            if hash != record.blake3 {
                return Err(format!("`{}` checksum mismatch", record.name));
            }
            if mtime != record.mtime_ns {
                record.mtime_ns = mtime;
                refreshed = true;
            }
        }
    }
    Ok((manifest, refreshed))
}

/// Folder names reachable from `roots` through manifest inputs.
fn reachable(infos: &[EntryInfo], roots: &[Fingerprint]) -> BTreeSet<String> {
    let inputs: HashMap<&str, &[Fingerprint]> = infos
        .iter()
        .filter_map(|i| {
            i.manifest
                .as_ref()
                .map(|m| (i.fingerprint.as_str(), m.inputs.as_slice()))
        })
        .collect();
    let mut seen = BTreeSet::new();
    let mut stack: Vec<String> = roots.iter().map(|f| f.to_string()).collect();
    while let Some(fp) = stack.pop() {
        if !seen.insert(fp.clone()) {
            continue;
        }
        if let Some(next) = inputs.get(fp.as_str()) {
            stack.extend(next.iter().map(|f| f.to_string()));
        }
    }
    seen
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn unix_now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
