//! Export files: copies of entry files outside the cache (`evals/<pipeline>/<stage>/…`), kept
//! equal to the entry of the stage a run resolved, whether it ran or came from the cache.
//!
//! The cache entry knows nothing of them (no path of the project goes into it): the stage
//! declares them ([`super::Stage::exports`]) and the executor syncs them after every stage.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::stage::Export;
use crate::cache::CacheEntry;
use crate::cache::hash_file;
use crate::file_error::FileError;

/// Why an export could not be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExportError {
    /// The entry lacks the declared file (an entry written by older code, or a stage bug).
    #[error("the cache entry has no file `{file}` to export to `{target}`")]
    NotInEntry { file: String, target: PathBuf },
    /// Copying failed (permissions, disk full, …).
    #[error(transparent)]
    File(#[from] FileError),
}

/// Whether an export already equals the entry's file (size and blake3 from the manifest).
pub(crate) fn is_current(entry: &CacheEntry, export: &Export) -> bool {
    let Some(record) = entry.manifest().file(&export.file) else {
        return false;
    };
    fs::metadata(&export.target).is_ok_and(|m| m.is_file() && m.len() == record.size)
        && hash_file(&export.target).is_ok_and(|hash| hash == record.blake3)
}

/// Makes `export.target` equal the entry's file: left alone when it already is, else replaced
/// through a temp file and a rename (a reader never sees half a file). Returns the target.
pub(crate) fn sync(entry: &CacheEntry, export: &Export) -> Result<PathBuf, ExportError> {
    if entry.manifest().file(&export.file).is_none() {
        return Err(ExportError::NotInEntry {
            file: export.file.clone(),
            target: export.target.clone(),
        });
    }
    if is_current(entry, export) {
        return Ok(export.target.clone());
    }
    let io = |source| ExportError::File(FileError::write(&export.target)(source));
    let dir = match export.target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io)?;
    let name = export
        .target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = copy_synced(&entry.path(&export.file), &tmp)
        .and_then(|()| fs::rename(&tmp, &export.target));
    if result.is_err() {
        // Best effort: a leftover temp file is ours and only costs space.
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io)?;
    Ok(export.target.clone())
}

fn copy_synced(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut source = File::open(from)?;
    let mut target = File::create(to)?;
    std::io::copy(&mut source, &mut target)?;
    target.flush()?;
    target.sync_all()
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::cache::CacheStore;

    fn entry(dir: &Path, text: &str) -> CacheEntry {
        let store = CacheStore::open(dir.join("cache")).unwrap();
        let lock = store.lock(std::time::Duration::ZERO).unwrap();
        let fp = crate::cache::fingerprint("t", &Value::String(text.into()), &[], 1);
        let writer = store.begin(&lock, &fp, "s", "t").unwrap();
        fs::write(writer.dir().join("page.html"), text).unwrap();
        writer.commit(Value::Null).unwrap()
    }

    #[test]
    fn an_export_follows_the_entry_and_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let a = entry(dir.path(), "run A");
        let b = entry(dir.path(), "run B, longer");
        let export = Export {
            file: "page.html".into(),
            target: dir.path().join("evals/s/page.html"),
        };
        sync(&a, &export).unwrap();
        assert_eq!(fs::read_to_string(&export.target).unwrap(), "run A");
        sync(&b, &export).unwrap();
        assert_eq!(fs::read_to_string(&export.target).unwrap(), "run B, longer");
        // Same size, other bytes: still replaced (the check is a checksum, not a size).
        fs::write(&export.target, "run X, longer").unwrap();
        assert!(!is_current(&b, &export));
        sync(&b, &export).unwrap();
        assert_eq!(fs::read_to_string(&export.target).unwrap(), "run B, longer");
        fs::remove_file(&export.target).unwrap();
        sync(&b, &export).unwrap();
        assert!(is_current(&b, &export));
        // No temp file is left beside it.
        let names: Vec<_> = fs::read_dir(dir.path().join("evals/s")).unwrap().collect();
        assert_eq!(names.len(), 1);
        let missing = Export {
            file: "other.html".into(),
            target: dir.path().join("evals/s/other.html"),
        };
        assert!(matches!(
            sync(&b, &missing),
            Err(ExportError::NotInEntry { .. })
        ));
    }
}
