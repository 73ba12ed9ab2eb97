//! Model references: a Hub id (with an optional revision) or a local directory, resolved to a
//! local checkpoint directory in the Hub layout.
//!
//! Spellings accepted by [`ModelRef::parse`]:
//!
//! ```text
//! ./models/my-finetune           an existing directory (or anything starting with `.`, `/`, `~`)
//! LiquidAI/LFM2-VL-450M          a Hub model repo at `main`
//! LiquidAI/LFM2-VL-450M@v1.0     the same repo at a branch, tag or commit
//! hf("LiquidAI/LFM2-VL-450M")    the pipeline file's spelling, also with `, revision = "…"`
//! ```
//!
//! Hub ids go through [`crate::hub::Hub`]: the local Hub cache first (files Python downloaded are
//! reused), `HF_HUB_OFFLINE` honoured, downloads with progress otherwise. A local directory is
//! used as it is; only the files the loader needs are checked, so the error names the missing one
//! instead of failing later inside the loader.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::hub::{Hub, HubError, HubRepo};

/// A PEFT adapter folder's files (PEFT's `CONFIG_NAME` and `SAFETENSORS_WEIGHTS_NAME`); here, below
/// `train`, because recognising an adapter folder is part of resolving one.
pub(crate) const ADAPTER_CONFIG: &str = "adapter_config.json";
pub(crate) const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Why a model reference could not be turned into a checkpoint directory.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// A GGUF folder or file that is not a usable pair.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::read::GgufReadError),
    /// The text is neither an existing directory nor an `org/name` Hub id.
    #[error(
        "`{text}` is not a model directory or a Hub id (expected `org/name`, `org/name@revision` or a path)"
    )]
    Syntax { text: String },
    /// A path was given but nothing is there.
    #[error("model directory `{path}` does not exist")]
    NoSuchDir { path: PathBuf },
    /// A path was given but it is a file.
    #[error("`{path}` is a file; expected a model directory in the Hub layout")]
    NotADir { path: PathBuf },
    /// A local directory lacks a file every checkpoint needs.
    #[error("model directory `{dir}` has no `{file}`")]
    MissingFile { dir: PathBuf, file: &'static str },
    /// A PEFT adapter folder was given where a model was expected.
    #[error(
        "`{dir}` is a PEFT adapter, not a model: give its base model as the model and this folder as the adapter (`--adapter`, or `adapter:` in a pipeline), or merge it into a standalone model first (`vlmpipe export --merged`, or PEFT's `merge_and_unload`)"
    )]
    AdapterNotModel { dir: PathBuf },
    /// An adapter folder lacks a PEFT file.
    #[error(
        "adapter directory `{dir}` has no `{file}` (a PEFT LoRA adapter folder holds `adapter_config.json` and `adapter_model.safetensors`){hint}"
    )]
    NotAnAdapter {
        dir: PathBuf,
        file: &'static str,
        hint: &'static str,
    },
    /// A local directory has neither a single weight file nor a shard index.
    #[error(
        "model directory `{dir}` has no weights (expected `model.safetensors` or `model.safetensors.index.json`)"
    )]
    NoWeights { dir: PathBuf },
    /// The Hub (or its local cache) could not provide the files.
    #[error("cannot get model `{id}` from the Hugging Face Hub")]
    Hub {
        id: String,
        /// Boxed: `HubError` is large and this error travels through every resolve call.
        #[source]
        source: Box<HubError>,
    },
}

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A directory in the Hub layout, used as is.
    Local(PathBuf),
    /// A Hub model repo at a revision.
    Hub {
        id: String,
        revision: Option<String>,
    },
}

/// Files every checkpoint directory must hold (weights are checked separately: single or sharded).
const REQUIRED_FILES: &[&str] = &["config.json", "tokenizer.json", "tokenizer_config.json"];

impl ModelRef {
    /// Parses a reference as the user typed it (see the module docs for the spellings).
    pub fn parse(text: &str) -> Result<Self, ResolveError> {
        let trimmed = text.trim();
        if let Some(inner) = strip_hf_call(trimmed) {
            return parse_hf_call(inner).ok_or_else(|| ResolveError::Syntax {
                text: text.to_owned(),
            });
        }
        let path = Path::new(trimmed);
        // An existing path always wins, so a local folder named like `org/name` is not fetched.
        let looks_like_path = trimmed.starts_with(['.', '/', '~']) || path.exists();
        if looks_like_path {
            return Ok(ModelRef::Local(expand_home(trimmed)));
        }
        let (id, revision) = match trimmed.split_once('@') {
            Some((id, rev)) => (id, Some(rev)),
            None => (trimmed, None),
        };
        if !is_hub_id(id)
            || revision.is_some_and(|r| r.is_empty() || r.contains(char::is_whitespace))
        {
            return Err(ResolveError::Syntax {
                text: text.to_owned(),
            });
        }
        Ok(ModelRef::Hub {
            id: id.to_owned(),
            revision: revision.map(str::to_owned),
        })
    }

    /// The checkpoint directory: the local path after checking its files, or the Hub snapshot
    /// (cached or downloaded through `hub`).
    pub fn resolve(&self, hub: &Hub) -> Result<PathBuf, ResolveError> {
        match self {
            ModelRef::Local(path) => check_model_dir(path),
            ModelRef::Hub { id, revision } => {
                let mut repo = HubRepo::model(id);
                if let Some(rev) = revision {
                    repo = repo.at(rev);
                }
                hub.model_dir(&repo).map_err(|source| ResolveError::Hub {
                    id: id.clone(),
                    source: Box::new(source),
                })
            }
        }
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelRef::Local(path) => write!(f, "{}", path.display()),
            ModelRef::Hub { id, revision: None } => f.write_str(id),
            ModelRef::Hub {
                id,
                revision: Some(rev),
            } => write!(f, "{id}@{rev}"),
        }
    }
}

impl std::str::FromStr for ModelRef {
    type Err = ResolveError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// Parses and resolves in one step, with the environment's Hub settings.
pub(crate) fn resolve_model_dir(text: &str) -> Result<PathBuf, ResolveError> {
    ModelRef::parse(text)?.resolve(&Hub::from_env())
}

/// Parses and resolves a PEFT adapter reference (`--adapter`): a folder, or a Hub repo
/// `org/name[@revision]` holding `adapter_config.json` and `adapter_model.safetensors`.
pub(crate) fn resolve_adapter_dir(text: &str) -> Result<PathBuf, ResolveError> {
    match ModelRef::parse(text)? {
        ModelRef::Local(path) => check_adapter_dir(&path),
        ModelRef::Hub { id, revision } => {
            let mut repo = HubRepo::model(&id);
            if let Some(rev) = &revision {
                repo = repo.at(rev);
            }
            Hub::from_env()
                .adapter_dir(&repo)
                .map_err(|source| ResolveError::Hub {
                    id,
                    source: Box::new(source),
                })
        }
    }
}

/// A path that exists and is a folder, or the error saying which of the two it is not.
fn expect_dir(path: &Path) -> Result<(), ResolveError> {
    if !path.exists() {
        return Err(ResolveError::NoSuchDir {
            path: path.to_path_buf(),
        });
    }
    if !path.is_dir() {
        return Err(ResolveError::NotADir {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Checks that a local folder holds a PEFT adapter.
pub(crate) fn check_adapter_dir(path: &Path) -> Result<PathBuf, ResolveError> {
    expect_dir(path)?;
    for file in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
        if !path.join(file).is_file() {
            let hint = if path.join("config.json").is_file() {
                "; this folder is a model: give it as the model, not as the adapter"
            } else {
                ""
            };
            return Err(ResolveError::NotAnAdapter {
                dir: path.to_path_buf(),
                file,
                hint,
            });
        }
    }
    Ok(path.to_path_buf())
}

/// Checks that a local folder holds a model (the files the loader needs), naming what is missing;
/// an adapter folder given as a model gets the fix in the message.
pub(crate) fn check_model_dir(path: &Path) -> Result<PathBuf, ResolveError> {
    // A GGUF pair: a folder of `.gguf` files without `config.json`, or the text file itself.
    if super::gguf::detect(path)?.is_some() {
        return Ok(path.to_path_buf());
    }
    expect_dir(path)?;
    if !path.join("config.json").is_file() && path.join(ADAPTER_CONFIG).is_file() {
        return Err(ResolveError::AdapterNotModel {
            dir: path.to_path_buf(),
        });
    }
    if let Some(file) = REQUIRED_FILES.iter().find(|f| !path.join(f).is_file()) {
        return Err(ResolveError::MissingFile {
            dir: path.to_path_buf(),
            file,
        });
    }
    let has_weights = path.join("model.safetensors").is_file()
        || path.join("model.safetensors.index.json").is_file();
    if !has_weights {
        return Err(ResolveError::NoWeights {
            dir: path.to_path_buf(),
        });
    }
    Ok(path.to_path_buf())
}

/// `org/name` with Hub-legal characters in each half.
pub(crate) fn is_hub_id(id: &str) -> bool {
    let legal = |part: &str| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !part.starts_with(['-', '.'])
    };
    match id.split_once('/') {
        Some((org, name)) => legal(org) && legal(name),
        None => false,
    }
}

/// The inside of `hf( … )`, if `text` is that call.
fn strip_hf_call(text: &str) -> Option<&str> {
    text.strip_prefix("hf(")?.strip_suffix(')')
}

/// `"org/name"` or `"org/name", revision = "rev"` (the pipeline DSL's spelling).
fn parse_hf_call(inner: &str) -> Option<ModelRef> {
    let mut parts = inner.splitn(2, ',');
    let id = unquote(parts.next()?.trim())?;
    let revision = match parts.next() {
        None => None,
        Some(rest) => {
            let (key, value) = rest.split_once('=')?;
            if key.trim() != "revision" {
                return None;
            }
            Some(unquote(value.trim())?.to_owned())
        }
    };
    is_hub_id(id).then(|| ModelRef::Hub {
        id: id.to_owned(),
        revision,
    })
}

fn unquote(text: &str) -> Option<&str> {
    text.strip_prefix('"')?.strip_suffix('"')
}

fn expand_home(text: &str) -> PathBuf {
    match (text.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::HubConfig;

    fn hub(id: &str, revision: Option<&str>) -> ModelRef {
        ModelRef::Hub {
            id: id.into(),
            revision: revision.map(Into::into),
        }
    }

    #[test]
    fn parses_hub_ids_revisions_and_the_dsl_call() {
        let cases = [
            ("LiquidAI/LFM2-VL-450M", hub("LiquidAI/LFM2-VL-450M", None)),
            (
                "LiquidAI/LFM2-VL-450M@v1.0",
                hub("LiquidAI/LFM2-VL-450M", Some("v1.0")),
            ),
            (
                r#"hf("LiquidAI/LFM2-VL-1.6B")"#,
                hub("LiquidAI/LFM2-VL-1.6B", None),
            ),
            (r#"hf("a/b", revision = "abc")"#, hub("a/b", Some("abc"))),
            ("./ckpt", ModelRef::Local(PathBuf::from("./ckpt"))),
            ("/abs/ckpt", ModelRef::Local(PathBuf::from("/abs/ckpt"))),
        ];
        for (text, expected) in cases {
            assert_eq!(ModelRef::parse(text).ok(), Some(expected), "{text}");
        }
    }

    #[test]
    fn rejects_malformed_references() {
        for text in [
            "justaname",
            "a/b/c",
            "a/",
            "/",
            "org/name@",
            r#"hf(a/b)"#,
            r#"hf("a/b", rev = "x")"#,
        ] {
            // "/" is a path; the rest are syntax errors.
            let parsed = ModelRef::parse(text);
            if text == "/" {
                assert!(matches!(parsed, Ok(ModelRef::Local(_))));
            } else {
                assert!(
                    matches!(parsed, Err(ResolveError::Syntax { .. })),
                    "{text}: {parsed:?}"
                );
            }
        }
    }

    #[test]
    fn an_existing_directory_wins_over_a_hub_id() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let nested = dir.path().join("org").join("name");
        std::fs::create_dir_all(&nested)?;
        let text = nested.to_string_lossy().into_owned();
        assert_eq!(ModelRef::parse(&text)?, ModelRef::Local(nested));
        Ok(())
    }

    #[test]
    fn local_directories_are_checked_file_by_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let hub = Hub::new(HubConfig::from_lookup(|_| None));
        let local = ModelRef::Local(dir.path().to_path_buf());
        let err = local.resolve(&hub).err();
        assert!(
            matches!(
                err,
                Some(ResolveError::MissingFile {
                    file: "config.json",
                    ..
                })
            ),
            "{err:?}"
        );
        for f in REQUIRED_FILES {
            std::fs::write(dir.path().join(f), "{}")?;
        }
        let err = local.resolve(&hub).err();
        assert!(
            matches!(err, Some(ResolveError::NoWeights { .. })),
            "{err:?}"
        );
        std::fs::write(dir.path().join("model.safetensors"), b"")?;
        assert_eq!(local.resolve(&hub)?, dir.path());

        let missing = ModelRef::Local(dir.path().join("nope"));
        let err = missing.resolve(&hub).err();
        assert!(
            matches!(err, Some(ResolveError::NoSuchDir { .. })),
            "{err:?}"
        );
        let file = ModelRef::Local(dir.path().join("config.json"));
        let err = file.resolve(&hub).err();
        assert!(matches!(err, Some(ResolveError::NotADir { .. })), "{err:?}");
        Ok(())
    }

    #[test]
    fn offline_and_not_cached_names_the_repo_and_the_variable()
    -> Result<(), Box<dyn std::error::Error>> {
        let cache = tempfile::tempdir()?;
        let cache_path = cache.path().to_string_lossy().into_owned();
        let hub = Hub::new(HubConfig::from_lookup(|name| match name {
            "HF_HUB_CACHE" => Some(cache_path.clone()),
            "HF_HUB_OFFLINE" => Some("1".into()),
            _ => None,
        }));
        let err = ModelRef::parse("LiquidAI/LFM2-VL-450M")?
            .resolve(&hub)
            .err()
            .ok_or("resolving an uncached repo offline should fail")?;
        let chain = format!(
            "{err}: {}",
            std::error::Error::source(&err).map_or(String::new(), |s| s.to_string())
        );
        assert!(chain.contains("LiquidAI/LFM2-VL-450M"), "{chain}");
        assert!(chain.contains("HF_HUB_OFFLINE"), "{chain}");
        Ok(())
    }

    #[test]
    fn offline_uses_a_cached_snapshot() -> Result<(), Box<dyn std::error::Error>> {
        let cache = tempfile::tempdir()?;
        let repo = cache.path().join("models--org--name");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snapshot = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snapshot)?;
        std::fs::create_dir_all(repo.join("refs"))?;
        std::fs::write(repo.join("refs").join("main"), commit)?;
        for f in REQUIRED_FILES.iter().chain(&["model.safetensors"]) {
            std::fs::write(snapshot.join(f), "{}")?;
        }
        let cache_path = cache.path().to_string_lossy().into_owned();
        let hub = Hub::new(HubConfig::from_lookup(|name| match name {
            "HF_HUB_CACHE" => Some(cache_path.clone()),
            "HF_HUB_OFFLINE" => Some("1".into()),
            _ => None,
        }));
        assert_eq!(ModelRef::parse("org/name")?.resolve(&hub)?, snapshot);
        Ok(())
    }
}
