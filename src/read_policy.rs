//! Where a pipeline may read: its own folder tree, the Hub cache, and what the user allowed.
//!
//! A pipeline file may come from someone else. Without a rule it could name `/etc/shadow` as a
//! template (putting the file into the prompt, the cache and the run history), a private photo
//! in a CSV row (embedding it in `predictions.csv` and `report.html`, the files people share),
//! or walk `folder("/home")`. So every path a pipeline names — imports, `file(...)` templates,
//! schema files, table files, `folder(...)` roots and every entry walked under them, image paths
//! inside tables, `local(...)` model folders and `adapter:` folders — is resolved here first:
//! symlinks and `..` are resolved (for a path that does not exist yet, its deepest existing
//! ancestor), and the result must lie under the root pipeline file's folder, the Hub cache, or
//! a path the user named with `--allow-read`. [`crate::read_limits`] then bounds the read itself.
//!
//! The consent is the user's, given per command; it never enters a fingerprint (a stage's
//! output depends on what was read, which the data stages' stamps already cover).

use std::fmt;
use std::path::{Component, Path, PathBuf};

/// The folders a pipeline may read under; cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadPolicy {
    /// The root pipeline file's folder, resolved.
    tree: PathBuf,
    /// Hub cache folders (`HF_HUB_CACHE`, `$HF_HOME/hub`, …), resolved.
    hub: Vec<PathBuf>,
    /// Paths the user allowed (`--allow-read`), resolved.
    allowed: Vec<PathBuf>,
}

/// A path the policy refuses: what was named, what it resolves to, and the folder it left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ReadRefusal {
    pub path: PathBuf,
    pub resolved: PathBuf,
    pub tree: PathBuf,
}

impl fmt::Display for ReadRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot read `{}`: it {}; {}",
            self.path.display(),
            self.reason(),
            self.hint()
        )
    }
}

impl std::error::Error for ReadRefusal {}

impl ReadRefusal {
    /// Why it is refused, as a phrase after the path: where it resolves to, and the folder.
    pub(crate) fn reason(&self) -> String {
        format!(
            "resolves to `{}`, outside the pipeline's folder `{}` and the Hub cache",
            self.resolved.display(),
            self.tree.display()
        )
    }

    /// What the user can do: the flag that allows this read.
    pub(crate) fn hint(&self) -> String {
        format!(
            "a pipeline reads only inside its own folder unless you allow more: pass \
             `--allow-read {}`",
            self.resolved.display()
        )
    }
}

impl ReadPolicy {
    /// The policy for the pipeline file `file`: its folder, the environment's Hub cache, and
    /// `allow_read` (relative paths from the current directory).
    pub fn for_pipeline(file: &Path, allow_read: &[PathBuf]) -> Self {
        let dir = match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let hub = crate::hub::HubConfig::from_env().cache_dir;
        Self {
            tree: resolve(dir),
            hub: vec![resolve(&hub)],
            allowed: allow_read.iter().map(|p| resolve(p)).collect(),
        }
    }

    /// A policy that allows `tree` only (no Hub cache): a dataset read without a pipeline.
    pub(crate) fn within(tree: &Path) -> Self {
        Self {
            tree: resolve(tree),
            hub: Vec::new(),
            allowed: Vec::new(),
        }
    }

    /// The same policy, also allowing `path`.
    #[must_use]
    pub(crate) fn allowing(mut self, path: &Path) -> Self {
        self.allowed.push(resolve(path));
        self
    }

    /// `path` resolved, when the pipeline may read it.
    pub(crate) fn check(&self, path: &Path) -> Result<PathBuf, ReadRefusal> {
        let resolved = resolve(path);
        let inside = std::iter::once(&self.tree)
            .chain(&self.hub)
            .chain(&self.allowed)
            .any(|root| resolved.starts_with(root));
        if inside {
            Ok(resolved)
        } else {
            Err(ReadRefusal {
                path: path.to_path_buf(),
                resolved,
                tree: self.tree.clone(),
            })
        }
    }
}

/// Symlinks followed at most while resolving one path (Linux's own limit is 40).
const MAX_LINKS: usize = 40;

/// `path` made absolute with every symlink and `..` resolved. A path that does not exist (yet)
/// is its deepest existing ancestor, resolved, with the rest applied lexically; a dangling
/// symlink on the way is followed to where it points, so creating its target later cannot
/// move a checked path outside.
pub(crate) fn resolve(path: &Path) -> PathBuf {
    resolve_with(path, MAX_LINKS)
}

fn resolve_with(path: &Path, links_left: usize) -> PathBuf {
    if let Ok(canonical) = std::fs::canonicalize(path) {
        return canonical;
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let parts: Vec<Component<'_>> = absolute.components().collect();
    // The longest prefix that exists; the root always does.
    let (mut out, rest) = (0..parts.len())
        .rev()
        .find_map(|i| {
            let prefix: PathBuf = parts[..i].iter().collect();
            std::fs::canonicalize(&prefix)
                .ok()
                .map(|c| (c, &parts[i..]))
        })
        .unwrap_or_else(|| (PathBuf::from("/"), &parts[..]));
    for part in rest {
        match part {
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => {
                let next = out.join(name);
                let link = std::fs::symlink_metadata(&next)
                    .is_ok_and(|m| m.file_type().is_symlink())
                    .then(|| std::fs::read_link(&next).ok())
                    .flatten();
                out = match link {
                    Some(target) if links_left > 0 => {
                        resolve_with(&out.join(target), links_left - 1)
                    }
                    _ => next,
                };
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_outside_and_allowed() {
        let root = tempfile::tempdir().unwrap();
        let project = root.path().join("project");
        let private = root.path().join("private");
        std::fs::create_dir_all(project.join("photos")).unwrap();
        std::fs::create_dir_all(&private).unwrap();
        std::fs::write(private.join("secret.txt"), "s").unwrap();
        let policy = ReadPolicy::within(&project);
        assert!(policy.check(&project.join("photos/a.png")).is_ok());
        assert!(policy.check(&project.join("not/yet/there.png")).is_ok());
        let err = policy
            .check(&project.join("photos/../../private/secret.txt"))
            .unwrap_err();
        assert_eq!(err.resolved, resolve(&private.join("secret.txt")));
        assert!(err.to_string().contains("--allow-read"), "{err}");
        // `..` after a part that does not exist is still resolved.
        assert!(policy.check(&project.join("gone/../../private")).is_err());
        assert!(
            policy
                .allowing(&private)
                .check(&private.join("secret.txt"))
                .is_ok()
        );
    }

    #[test]
    fn symlinks_are_followed_even_dangling_ones() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().unwrap();
        let project = root.path().join("project");
        let private = root.path().join("private");
        std::fs::create_dir_all(&project).unwrap();
        std::fs::create_dir_all(&private).unwrap();
        symlink(&private, project.join("out")).unwrap();
        symlink(private.join("later.png"), project.join("later.png")).unwrap();
        symlink(project.join("in.png"), project.join("link.png")).unwrap();
        let policy = ReadPolicy::within(&project);
        assert!(policy.check(&project.join("out/x.png")).is_err());
        assert!(policy.check(&project.join("later.png")).is_err());
        assert!(policy.check(&project.join("link.png")).is_ok());
    }
}
