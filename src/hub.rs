//! Hugging Face Hub access: the local Hub cache first, offline-aware, downloads with progress.
//!
//! Reads and writes the cache layout that Python's `huggingface_hub` uses, so files it downloaded
//! are reused (and vice versa):
//!
//! ```text
//! <hub cache>/models--<org>--<name>/refs/<revision>            commit hash of the revision
//! <hub cache>/models--<org>--<name>/snapshots/<commit>/<file>  (symlinks into blobs/)
//! <hub cache>/datasets--<org>--<name>/…                        same for dataset repos
//! ```
//!
//! The cache folder is, first match wins: `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`,
//! `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`, `~/.cache/huggingface/hub`.
//! `HF_HUB_OFFLINE=1` forbids the network; a missing file is then an error naming the variable.
//!
//! **API Boundary**: the dataset and model stages resolve `hf(...)` sources and models here (when
//! fingerprints are computed and when they run); model code receives plain local paths.

use std::path::{Path, PathBuf};

use walkdir::WalkDir;

/// Errors of Hub access.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Offline mode (or no cached copy and no network) and the file is not in the local cache.
    #[error(
        "`{file}` of {kind} repo `{repo}` (revision `{revision}`) is not in the local Hub cache `{cache}` and downloads are off (`HF_HUB_OFFLINE` is set)"
    )]
    OfflineMissing {
        kind: RepoKind,
        repo: String,
        revision: String,
        file: String,
        cache: PathBuf,
    },
    /// A dataset repo has no Parquet files for the requested split.
    #[error(
        "dataset `{repo}` has no Parquet files for split `{split}`{config_note}; found: {found}"
    )]
    NoSplitFiles {
        repo: String,
        split: String,
        config_note: String,
        found: String,
    },
    /// A model snapshot lacks a file the loader needs.
    #[error("model repo `{repo}` has no `{file}`")]
    MissingModelFile { repo: String, file: String },
    /// The Hub knows no such repo or revision, or hides it from this user (HTTP 401/404).
    #[error(
        "{kind} repo `{repo}` (revision `{revision}`) was not found on the Hub; check the id and the revision, and set `HF_TOKEN` for a private or gated repo"
    )]
    RepoNotFound {
        kind: RepoKind,
        repo: String,
        revision: String,
    },
    /// The Hub answered that a file does not exist at that revision (HTTP 404).
    #[error("{kind} repo `{repo}` has no file `{file}` at revision `{revision}`")]
    NotFound {
        kind: RepoKind,
        repo: String,
        revision: String,
        file: String,
    },
    /// The Hub could not be reached at all (no network, DNS, refused connection).
    #[error(
        "cannot reach the Hub for {kind} repo `{repo}`; without a network, `HF_HUB_OFFLINE=1` uses only the local Hub cache"
    )]
    Unreachable {
        kind: RepoKind,
        repo: String,
        #[source]
        source: Box<hf_hub::api::sync::ApiError>,
    },
    /// The download client failed (network, authentication, missing repo…).
    #[error("hub request for {kind} repo `{repo}` failed: {source}")]
    Api {
        kind: RepoKind,
        repo: String,
        #[source]
        source: Box<hf_hub::api::sync::ApiError>,
    },
    /// Reading the local cache failed.
    #[error("cannot read the Hub cache at `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether a repo holds a model or a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl std::fmt::Display for RepoKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        })
    }
}

/// Why `revision` cannot name a Hub revision, if it cannot.
///
/// A revision becomes a path under the Hub cache (`refs/<revision>`), and a pipeline file may
/// come from someone else: `../../../../home/secret.txt` must not be read as a ref. Branch names
/// with `/` (`feature/x`), tags and 40-hex commits pass; git's own ref rules refuse the rest
/// (`..`, an empty or dot-leading component, a leading or trailing `/`, control characters).
pub(crate) fn revision_problem(revision: &str) -> Option<&'static str> {
    if revision.is_empty() {
        return Some("it is empty");
    }
    if revision.len() > 255 {
        return Some("it is longer than 255 bytes");
    }
    if revision.chars().any(|c| c.is_control() || c == '\\') {
        return Some("it holds a control character or a backslash");
    }
    if revision.contains("..") {
        return Some("it holds `..`");
    }
    if revision.starts_with('/') || revision.ends_with('/') {
        return Some("it starts or ends with `/`");
    }
    if revision
        .split('/')
        .any(|part| part.is_empty() || part.starts_with('.'))
    {
        return Some("a `/`-separated part of it is empty or starts with `.`");
    }
    None
}

/// A repo at a revision (branch, tag or commit hash).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HubRepo {
    /// `org/name`.
    pub id: String,
    pub kind: RepoKind,
    /// Branch, tag or 40-hex commit; `main` by default.
    pub revision: String,
}

impl HubRepo {
    /// A model repo at `main`.
    pub fn model(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            kind: RepoKind::Model,
            revision: "main".to_owned(),
        }
    }

    /// A dataset repo at `main`.
    pub fn dataset(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            kind: RepoKind::Dataset,
            revision: "main".to_owned(),
        }
    }

    /// The same repo at `revision`.
    pub fn at(mut self, revision: &str) -> Self {
        self.revision = revision.to_owned();
        self
    }

    /// Folder name in the Hub cache: `models--org--name` / `datasets--org--name`.
    pub(crate) fn cache_folder(&self) -> String {
        let prefix = match self.kind {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        };
        format!("{prefix}--{}", self.id.replace('/', "--"))
    }

    fn api_repo(&self) -> hf_hub::Repo {
        let kind = match self.kind {
            RepoKind::Model => hf_hub::RepoType::Model,
            RepoKind::Dataset => hf_hub::RepoType::Dataset,
        };
        hf_hub::Repo::with_revision(self.id.clone(), kind, self.revision.clone())
    }
}

/// Where the Hub cache is and whether the network may be used.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// The Hub cache folder (the one holding `models--…`).
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE`: never touch the network.
    pub offline: bool,
    /// `HF_ENDPOINT`, when set (mirrors).
    pub endpoint: Option<String>,
    /// `HF_TOKEN`, when set.
    pub token: Option<String>,
    /// Show download progress bars.
    pub progress: bool,
}

impl HubConfig {
    /// Reads the configuration from the process environment.
    pub(crate) fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `get` (tests pass a map instead of mutating the process
    /// environment, which is racy across test threads).
    pub(crate) fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let non_empty = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let cache_dir = if let Some(dir) = non_empty("HF_HUB_CACHE") {
            PathBuf::from(dir)
        } else if let Some(dir) = non_empty("HUGGINGFACE_HUB_CACHE") {
            PathBuf::from(dir)
        } else if let Some(home) = non_empty("HF_HOME") {
            PathBuf::from(home).join("hub")
        } else if let Some(xdg) = non_empty("XDG_CACHE_HOME") {
            PathBuf::from(xdg).join("huggingface").join("hub")
        } else {
            let home = non_empty("HOME").unwrap_or_else(|| ".".to_owned());
            PathBuf::from(home)
                .join(".cache")
                .join("huggingface")
                .join("hub")
        };
        // huggingface_hub treats "1", "ON", "YES" and "TRUE" (any case) as true.
        let offline = non_empty("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_uppercase().as_str(),
                "1" | "ON" | "YES" | "TRUE"
            )
        });
        Self {
            cache_dir,
            offline,
            endpoint: non_empty("HF_ENDPOINT"),
            token: non_empty("HF_TOKEN"),
            progress: true,
        }
    }
}

/// The Parquet files of one split of a dataset repo, resolved to local paths.
#[derive(Clone, Debug)]
pub struct DatasetSplitFiles {
    /// The commit they were read from (part of the dataset fingerprint).
    pub commit: String,
    /// Local paths in shard order (sorted by repo path).
    pub files: Vec<PathBuf>,
    /// The matching paths inside the repo, same order.
    pub repo_paths: Vec<String>,
}

/// The branch where the Hub keeps a Parquet conversion of every dataset.
const CONVERTED_PARQUET_REVISION: &str = "refs/convert/parquet";

/// Retries of an interrupted download, each resuming where the last one stopped.
const DOWNLOAD_RETRIES: usize = 3;

/// The index of a sharded checkpoint; without it a model has one `model.safetensors`.
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
const SINGLE_WEIGHTS: &str = "model.safetensors";

/// Files a model loader reads besides the weights; the first three are required.
const MODEL_FILES: &[(&str, bool)] = &[
    ("config.json", true),
    ("tokenizer.json", true),
    ("tokenizer_config.json", true),
    ("preprocessor_config.json", false),
    ("processor_config.json", false),
    ("chat_template.jinja", false),
    ("generation_config.json", false),
    ("special_tokens_map.json", false),
];

/// Access to the Hub through its local cache.
#[derive(Clone, Debug)]
pub struct Hub {
    config: HubConfig,
}

impl Hub {
    pub fn new(config: HubConfig) -> Self {
        Self { config }
    }

    /// Configured from the process environment.
    pub fn from_env() -> Self {
        Self::new(HubConfig::from_env())
    }

    pub(crate) fn config(&self) -> &HubConfig {
        &self.config
    }

    /// The commit a revision points to in the local cache: the revision itself when it is a
    /// commit hash with a snapshot, otherwise the content of `refs/<revision>`.
    pub(crate) fn cached_commit(&self, repo: &HubRepo) -> Option<String> {
        // Checked again here, not only in the checker, because the revision becomes a path.
        if revision_problem(&repo.revision).is_some() {
            return None;
        }
        let base = self.config.cache_dir.join(repo.cache_folder());
        let is_hash =
            repo.revision.len() == 40 && repo.revision.bytes().all(|b| b.is_ascii_hexdigit());
        if is_hash && base.join("snapshots").join(&repo.revision).is_dir() {
            return Some(repo.revision.clone());
        }
        let commit = std::fs::read_to_string(base.join("refs").join(&repo.revision)).ok()?;
        let commit = commit.trim().to_owned();
        base.join("snapshots")
            .join(&commit)
            .is_dir()
            .then_some(commit)
    }

    /// The snapshot folder of the cached revision, if any.
    pub(crate) fn cached_snapshot(&self, repo: &HubRepo) -> Option<PathBuf> {
        let commit = self.cached_commit(repo)?;
        Some(
            self.config
                .cache_dir
                .join(repo.cache_folder())
                .join("snapshots")
                .join(commit),
        )
    }

    /// One file of a repo: from the cache, else downloaded (unless offline).
    pub fn file(&self, repo: &HubRepo, filename: &str) -> Result<PathBuf, HubError> {
        if let Some(snapshot) = self.cached_snapshot(repo) {
            let path = snapshot.join(filename);
            if path.is_file() {
                return Ok(path);
            }
        }
        self.download(repo, filename)
    }

    fn offline_missing(&self, repo: &HubRepo, file: &str) -> HubError {
        HubError::OfflineMissing {
            kind: repo.kind,
            repo: repo.id.clone(),
            revision: repo.revision.clone(),
            file: file.to_owned(),
            cache: self.config.cache_dir.clone(),
        }
    }

    fn api(&self, repo: &HubRepo) -> Result<hf_hub::api::sync::ApiRepo, HubError> {
        let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(
            self.config.cache_dir.clone(),
        ))
        .with_progress(self.config.progress)
        .with_retries(DOWNLOAD_RETRIES);
        if let Some(endpoint) = &self.config.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        if let Some(token) = &self.config.token {
            builder = builder.with_token(Some(token.clone()));
        }
        let api = builder.build().map_err(|e| self.api_error(repo, e))?;
        Ok(api.repo(repo.api_repo()))
    }

    fn api_error(&self, repo: &HubRepo, source: hf_hub::api::sync::ApiError) -> HubError {
        if is_transport_failure(&source) {
            return HubError::Unreachable {
                kind: repo.kind,
                repo: repo.id.clone(),
                source: Box::new(source),
            };
        }
        HubError::Api {
            kind: repo.kind,
            repo: repo.id.clone(),
            source: Box::new(source),
        }
    }

    fn download(&self, repo: &HubRepo, filename: &str) -> Result<PathBuf, HubError> {
        if self.config.offline {
            return Err(self.offline_missing(repo, filename));
        }
        self.api(repo)?.download(filename).map_err(|e| {
            if http_status(&e) == Some(404) {
                HubError::NotFound {
                    kind: repo.kind,
                    repo: repo.id.clone(),
                    revision: repo.revision.clone(),
                    file: filename.to_owned(),
                }
            } else {
                self.api_error(repo, e)
            }
        })
    }

    /// The commit `repo`'s revision names and the files it holds, asked of the Hub.
    fn list_remote(&self, repo: &HubRepo) -> Result<(String, Vec<String>), HubError> {
        let info = self.api(repo)?.info().map_err(|e| {
            if http_status(&e).is_some_and(|status| status == 401 || status == 404) {
                HubError::RepoNotFound {
                    kind: repo.kind,
                    repo: repo.id.clone(),
                    revision: repo.revision.clone(),
                }
            } else {
                self.api_error(repo, e)
            }
        })?;
        let files = info.siblings.into_iter().map(|s| s.rfilename).collect();
        Ok((info.sha, files))
    }

    /// Points `refs/<revision>` at `commit`, as `huggingface_hub` does after a download, so the
    /// next lookup of the revision (offline too) finds the snapshot. Files fetched by commit make
    /// the download client write `refs/<commit>`, which `huggingface_hub` never does: removed.
    fn record_ref(&self, repo: &HubRepo, commit: &str) -> Result<(), HubError> {
        let refs = self.config.cache_dir.join(repo.cache_folder()).join("refs");
        let io = |path: &Path, source| HubError::Io {
            path: path.to_path_buf(),
            source,
        };
        if repo.revision == commit {
            // Asked for by its hash: no ref to write.
            return Ok(());
        }
        let by_commit = refs.join(commit);
        if by_commit.is_file() {
            std::fs::remove_file(&by_commit).map_err(|e| io(&by_commit, e))?;
        }
        if revision_problem(&repo.revision).is_some() {
            // Never write outside `refs/`; the lookup refuses such a revision too.
            return Ok(());
        }
        let path = refs.join(&repo.revision);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        std::fs::write(&path, commit).map_err(|e| io(&path, e))
    }

    /// The commit to download `repo` at: the cached one (cache first, and the one the
    /// fingerprints saw), else what the Hub resolves the revision to.
    fn pinned_remote(&self, repo: &HubRepo) -> Result<(HubRepo, Option<Vec<String>>), HubError> {
        match self.cached_commit(repo) {
            Some(commit) => Ok((repo.clone().at(&commit), None)),
            None => {
                let (commit, files) = self.list_remote(repo)?;
                Ok((repo.clone().at(&commit), Some(files)))
            }
        }
    }

    /// The Parquet files of `split` (and `config`, when the repo has several) of a dataset repo.
    ///
    /// Uses the cached snapshot when it has files for the split; otherwise (not offline) lists
    /// the repo on the Hub and downloads the matching files into the cache. A repo at `main`
    /// whose files are not Parquet falls back to the Hub's Parquet conversion branch
    /// (`refs/convert/parquet`, config folder `default` unless one is given).
    pub fn dataset_split_files(
        &self,
        repo: &HubRepo,
        config: Option<&str>,
        split: &str,
    ) -> Result<DatasetSplitFiles, HubError> {
        let first = self.split_files_at(repo, config, split);
        let converted_fallback = repo.revision == "main"
            && matches!(
                first,
                Err(HubError::NoSplitFiles { .. }) | Err(HubError::OfflineMissing { .. })
            );
        if !converted_fallback {
            return first;
        }
        let converted = repo.clone().at(CONVERTED_PARQUET_REVISION);
        match self.split_files_at(&converted, Some(config.unwrap_or("default")), split) {
            Ok(files) => Ok(files),
            // The error about the repo's own files is the one a user can act on.
            Err(_) => first,
        }
    }

    fn split_files_at(
        &self,
        repo: &HubRepo,
        config: Option<&str>,
        split: &str,
    ) -> Result<DatasetSplitFiles, HubError> {
        if let Some(snapshot) = self.cached_snapshot(repo) {
            let listed = list_relative_files(&snapshot)?;
            let matched = select_split_files(&listed, config, split);
            if !matched.is_empty() {
                let commit = self.cached_commit(repo).unwrap_or_default();
                return Ok(DatasetSplitFiles {
                    commit,
                    files: matched.iter().map(|p| snapshot.join(p)).collect(),
                    repo_paths: matched,
                });
            }
            if self.config.offline {
                return Err(no_split_files(repo, config, split, &listed));
            }
        }
        if self.config.offline {
            return Err(self.offline_missing(repo, &format!("<parquet files of split `{split}`>")));
        }
        let (commit, listed) = self.list_remote(repo)?;
        let matched = select_split_files(&listed, config, split);
        if matched.is_empty() {
            return Err(no_split_files(repo, config, split, &listed));
        }
        // Pin the commit the listing came from so every shard is of the same revision.
        let pinned = repo.clone().at(&commit);
        let mut files = Vec::with_capacity(matched.len());
        for name in &matched {
            files.push(self.file(&pinned, name)?);
        }
        self.record_ref(repo, &commit)?;
        Ok(DatasetSplitFiles {
            commit,
            files,
            repo_paths: matched,
        })
    }

    /// A local folder with a model's config, tokenizer, processor files and weights (a single
    /// `model.safetensors` or the shards named in `model.safetensors.index.json`).
    ///
    /// A complete cached snapshot is used as it is. Otherwise (not offline) the missing files are
    /// downloaded, all of one commit: the cached one when the revision is cached, else the one
    /// the Hub resolves it to; optional files the repo does not have are skipped.
    pub fn model_dir(&self, repo: &HubRepo) -> Result<PathBuf, HubError> {
        if let Some(snapshot) = self.cached_snapshot(repo) {
            match first_missing_model_file(&snapshot)? {
                None => return Ok(snapshot),
                Some(file) if self.config.offline => {
                    return Err(self.offline_missing(repo, &file));
                }
                Some(_) => {}
            }
        } else if self.config.offline {
            return Err(self.offline_missing(repo, MODEL_FILES[0].0));
        }
        let (pinned, listed) = self.pinned_remote(repo)?;
        let has = |name: &str| listed.as_ref().is_none_or(|l| l.iter().any(|f| f == name));
        let missing = |file: &str| HubError::MissingModelFile {
            repo: repo.id.clone(),
            file: file.to_owned(),
        };
        let mut dir = None;
        for (name, required) in MODEL_FILES {
            if !has(name) {
                if *required {
                    return Err(missing(name));
                }
                continue;
            }
            match self.file(&pinned, name) {
                Ok(path) => dir = path.parent().map(Path::to_path_buf),
                Err(HubError::NotFound { .. }) if !required => {}
                Err(HubError::NotFound { .. }) => return Err(missing(name)),
                Err(e) => return Err(e),
            }
        }
        let index = if has(WEIGHTS_INDEX) {
            match self.file(&pinned, WEIGHTS_INDEX) {
                Ok(index) => Some(index),
                Err(HubError::NotFound { .. }) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        match index {
            Some(index) => {
                for shard in shard_names(&index)? {
                    self.file(&pinned, &shard)?;
                }
            }
            None if has(SINGLE_WEIGHTS) => match self.file(&pinned, SINGLE_WEIGHTS) {
                Ok(_) => {}
                Err(HubError::NotFound { .. }) => return Err(missing(SINGLE_WEIGHTS)),
                Err(e) => return Err(e),
            },
            None => return Err(missing(SINGLE_WEIGHTS)),
        }
        self.record_ref(repo, &pinned.revision)?;
        dir.ok_or_else(|| missing(MODEL_FILES[0].0))
    }

    /// Every file name of `repo` at its revision, as the Hub lists it (not offline).
    pub(crate) fn list_files(&self, repo: &HubRepo) -> Result<Vec<String>, HubError> {
        if self.config.offline {
            return Err(self.offline_missing(repo, "(the repo's file list)"));
        }
        Ok(self.list_remote(repo)?.1)
    }

    /// The folder holding `names` of `repo`, all of one commit: the cached snapshot when it has
    /// them, else downloaded (unless offline). For repos of many large files (GGUF quants) where
    /// only some are wanted.
    pub(crate) fn files_dir(&self, repo: &HubRepo, names: &[&str]) -> Result<PathBuf, HubError> {
        if let Some(snapshot) = self.cached_snapshot(repo) {
            match names.iter().find(|n| !snapshot.join(n).is_file()) {
                None => return Ok(snapshot),
                Some(file) if self.config.offline => {
                    return Err(self.offline_missing(repo, file));
                }
                Some(_) => {}
            }
        } else if self.config.offline {
            return Err(self.offline_missing(repo, names.first().copied().unwrap_or("")));
        }
        let (pinned, _) = self.pinned_remote(repo)?;
        let mut dir = None;
        for name in names {
            let path = self.file(&pinned, name).map_err(|e| match e {
                HubError::NotFound { .. } => HubError::MissingModelFile {
                    repo: repo.id.clone(),
                    file: (*name).to_owned(),
                },
                other => other,
            })?;
            dir = path.parent().map(Path::to_path_buf);
        }
        self.record_ref(repo, &pinned.revision)?;
        dir.ok_or_else(|| HubError::MissingModelFile {
            repo: repo.id.clone(),
            file: names.first().copied().unwrap_or("").to_owned(),
        })
    }

    /// A local folder with a PEFT adapter's `adapter_config.json` and `adapter_model.safetensors`,
    /// both of one commit: the cached snapshot when it has them, else downloaded (unless offline).
    pub(crate) fn adapter_dir(&self, repo: &HubRepo) -> Result<PathBuf, HubError> {
        self.files_dir(repo, ADAPTER_FILES)
    }
}

/// The files of a PEFT adapter repo.
const ADAPTER_FILES: &[&str] = &["adapter_config.json", "adapter_model.safetensors"];

/// The first file a model loader needs that `snapshot` lacks, if any.
fn first_missing_model_file(snapshot: &Path) -> Result<Option<String>, HubError> {
    if let Some((name, _)) = MODEL_FILES
        .iter()
        .find(|(name, required)| *required && !snapshot.join(name).is_file())
    {
        return Ok(Some((*name).to_owned()));
    }
    let index = snapshot.join(WEIGHTS_INDEX);
    if index.is_file() {
        return Ok(shard_names(&index)?
            .into_iter()
            .find(|shard| !snapshot.join(shard).is_file()));
    }
    Ok((!snapshot.join(SINGLE_WEIGHTS).is_file()).then(|| SINGLE_WEIGHTS.to_owned()))
}

/// Whether the request never got an answer (DNS, connection, TLS), as opposed to an error answer.
fn is_transport_failure(error: &hf_hub::api::sync::ApiError) -> bool {
    matches!(
        error,
        hf_hub::api::sync::ApiError::RequestError(e) if matches!(e.as_ref(), ureq::Error::Transport(_))
    )
}

/// The HTTP status of an error answer from the Hub; `None` for a network or local failure.
fn http_status(error: &hf_hub::api::sync::ApiError) -> Option<u16> {
    match error {
        hf_hub::api::sync::ApiError::RequestError(e) => match e.as_ref() {
            ureq::Error::Status(status, _) => Some(*status),
            ureq::Error::Transport(_) => None,
        },
        _ => None,
    }
}

fn no_split_files(
    repo: &HubRepo,
    config: Option<&str>,
    split: &str,
    listed: &[String],
) -> HubError {
    let parquet: Vec<&str> = listed
        .iter()
        .filter(|p| p.ends_with(".parquet"))
        .map(String::as_str)
        .take(8)
        .collect();
    HubError::NoSplitFiles {
        repo: repo.id.clone(),
        split: split.to_owned(),
        config_note: config
            .map(|c| format!(" of config `{c}`"))
            .unwrap_or_default(),
        found: if parquet.is_empty() {
            "no Parquet files".to_owned()
        } else {
            parquet.join(", ")
        },
    }
}

fn shard_names(index: &Path) -> Result<Vec<String>, HubError> {
    let text = std::fs::read_to_string(index).map_err(|source| HubError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| HubError::Io {
        path: index.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    let mut names: Vec<String> = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Every file under `root` as a `/`-separated relative path, sorted; follows the snapshot's
/// symlinks into `blobs/`.
pub(crate) fn list_relative_files(root: &Path) -> Result<Vec<String>, HubError> {
    let mut out = Vec::new();
    for item in WalkDir::new(root).follow_links(true) {
        let item = item.map_err(|e| HubError::Io {
            path: root.to_path_buf(),
            source: e.into(),
        })?;
        if !item.file_type().is_file() {
            continue;
        }
        if let Ok(rel) = item.path().strip_prefix(root) {
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push(parts.join("/"));
        }
    }
    out.sort();
    Ok(out)
}

/// The Parquet files of `split` among a repo's relative paths, in shard order.
///
/// Recognises the layouts the Hub uses: `data/train-00000-of-00002.parquet`, `train.parquet`,
/// `train/0000.parquet`, `<config>/train/0000.parquet` (the Parquet conversion branch),
/// `<config>/train-00000-of-00001.parquet`. With `config`, only files under that folder count
/// (or, for `default`, files outside any config folder); without, files under `data/`,
/// `default/` or at the top level are preferred over other config folders.
pub(crate) fn select_split_files(
    paths: &[String],
    config: Option<&str>,
    split: &str,
) -> Vec<String> {
    let matching: Vec<&String> = paths
        .iter()
        .filter(|p| p.ends_with(".parquet") && path_is_split(p, split))
        .collect();
    let first_dir = |p: &str| -> Option<String> {
        let mut parts = p.split('/');
        let first = parts.next()?;
        parts.next().map(|_| first.to_owned())
    };
    let generic = |p: &str| match first_dir(p) {
        None => true,
        Some(d) => d == "data" || d == "default" || d == split,
    };
    let mut chosen: Vec<String> = match config {
        Some(cfg) => matching
            .iter()
            .filter(|p| first_dir(p).as_deref() == Some(cfg) || (cfg == "default" && generic(p)))
            .map(|p| (*p).clone())
            .collect(),
        None => {
            let preferred: Vec<String> = matching
                .iter()
                .filter(|p| generic(p))
                .map(|p| (*p).clone())
                .collect();
            if preferred.is_empty() {
                matching.iter().map(|p| (*p).clone()).collect()
            } else {
                preferred
            }
        }
    };
    chosen.sort();
    chosen
}

fn path_is_split(path: &str, split: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    let Some((file, dirs)) = parts.split_last() else {
        return false;
    };
    if dirs.contains(&split) {
        return true;
    }
    let stem = file.trim_end_matches(".parquet");
    stem == split
        || stem.strip_prefix(split).is_some_and(|rest| {
            rest.starts_with('-') || rest.starts_with('_') || rest.starts_with('.')
        })
}

#[cfg(test)]
mod tests {

    #[test]
    fn revisions_name_refs_not_paths() {
        for good in [
            "main",
            "feature/x",
            "v1.0",
            "refs/pr/1",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            assert_eq!(revision_problem(good), None, "{good}");
        }
        for bad in [
            "", "..", "../x", "a/../b", "/abs", "x/", "a//b", ".git", "a\u{1b}b", "a\\b",
        ] {
            assert!(revision_problem(bad).is_some(), "{bad:?}");
        }
    }
    use super::*;

    fn paths(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn split_files_in_the_usual_layouts() {
        let repo = paths(&[
            "README.md",
            "data/test-00000-of-00001.parquet",
            "data/train-00001-of-00002.parquet",
            "data/train-00000-of-00002.parquet",
            "data/trainers.parquet",
        ]);
        assert_eq!(
            select_split_files(&repo, None, "train"),
            paths(&[
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet"
            ])
        );
        assert_eq!(
            select_split_files(&repo, None, "test"),
            paths(&["data/test-00000-of-00001.parquet"])
        );
        let converted = paths(&["default/train/0000.parquet", "default/train/0001.parquet"]);
        assert_eq!(select_split_files(&converted, None, "train"), converted);
        let configs = paths(&[
            "full/train-0.parquet",
            "mini/train-0.parquet",
            "mini/test.parquet",
        ]);
        assert_eq!(
            select_split_files(&configs, Some("mini"), "train"),
            paths(&["mini/train-0.parquet"])
        );
        assert_eq!(
            select_split_files(&configs, None, "validation"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn env_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let c = HubConfig::from_lookup(env(&[("HF_HOME", "/h"), ("HF_HUB_CACHE", "/c")]));
        assert_eq!(c.cache_dir, PathBuf::from("/c"));
        let c =
            HubConfig::from_lookup(env(&[("HF_HOME", "/h"), ("HUGGINGFACE_HUB_CACHE", "/old")]));
        assert_eq!(c.cache_dir, PathBuf::from("/old"));
        let c = HubConfig::from_lookup(env(&[("HF_HOME", "/h"), ("HF_HUB_OFFLINE", "yes")]));
        assert_eq!(c.cache_dir, PathBuf::from("/h/hub"));
        assert!(c.offline);
        let c = HubConfig::from_lookup(env(&[("HOME", "/u"), ("HF_HUB_OFFLINE", "0")]));
        assert_eq!(c.cache_dir, PathBuf::from("/u/.cache/huggingface/hub"));
        assert!(!c.offline);
    }
}
