//! The `model` stage: resolves `hf(...)`, `local(...)` or `init(...)` (with an optional
//! `adapter:`) to a `model.json` that names the checkpoint without naming this machine.
//!
//! The entry holds `model.json` = `{"base": FolderRef, "adapter": "adapter" | null, "dtype"}`.
//! Nothing in it depends on where the project or the Hub cache lives, so a moved or copied project
//! keeps its cache: a Hub model is named by repo and commit and found in the Hub cache at use
//! time, a local folder by its path relative to the root pipeline file's folder, an `init` model
//! is saved inside the entry, and an adapter is copied into the entry. Every consumer opens a model
//! the same way, through [`ModelResolver::open`] and then `model::checkpoint`.
//!
//! Fingerprints: `hf` models (and Hub adapters) mix in the cached commit of their revision (a moved
//! `main` reruns), `local` ones a stat of every file of the folder, `init` ones only their
//! parameters.

use std::path::{Component, Path, PathBuf};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cache::CacheEntry;
use crate::dtype::Dtype;
use crate::exec::{Stage, StageContext, StageError, StageOutcome};
use crate::file_error::FileError;
use crate::hub::{Hub, HubError, HubRepo};
use crate::model::load::random_checkpoint;
use crate::read_policy::ReadPolicy;
use crate::train::peft::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, PeftAdapter};

/// The file of a model entry.
pub const MODEL_FILE: &str = "model.json";
/// Folder inside the entry where an `init` model is saved.
const INIT_DIR: &str = "checkpoint";
/// Folder inside the entry where a model's `adapter:` is copied.
const ADAPTER_DIR: &str = "adapter";

// 3: `model.json` names folders independently of the project's location; `adapter:`.
// 4: `init` checkpoints come from the one random initialiser (`model::load::random_checkpoint`,
//    PCG-64 streams): other weights for the same seed, and every vision layer of the config.
const MODEL_CODE_VERSION: u32 = 4;

/// Where a checkpoint folder is, in terms that survive moving or copying the project.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum FolderRef {
    /// A Hub model at the commit it resolved to, looked up in the Hub cache (or downloaded) at
    /// use time.
    Hub { repo: String, commit: String },
    /// A folder relative to the root pipeline file's folder (absolute only when the pipeline
    /// names an absolute path).
    Pipeline { path: PathBuf },
    /// A folder inside the cache entry that holds `model.json`.
    Entry { path: PathBuf },
}

impl FolderRef {
    /// The Hub id of a Hub model (what PEFT's `base_model_name_or_path` names).
    pub(crate) fn hub_id(&self) -> Option<&str> {
        match self {
            FolderRef::Hub { repo, .. } => Some(repo),
            _ => None,
        }
    }

    /// A short description for metadata and messages (`hf:org/name@commit`, `local:models/x`).
    pub(crate) fn describe(&self) -> String {
        match self {
            FolderRef::Hub { repo, commit } => format!("hf:{repo}@{commit}"),
            FolderRef::Pipeline { path } => format!("local:{}", path.display()),
            FolderRef::Entry { path } => format!("entry:{}", path.display()),
        }
    }
}

/// Where a model's files are on this machine, now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelLocation {
    /// A Hub-layout checkpoint folder (config, weights, tokenizer, chat template, processor).
    pub checkpoint_dir: PathBuf,
    /// A LoRA adapter folder to apply on top (fine-tunes, models with `adapter:`).
    pub adapter_dir: Option<PathBuf>,
    /// The dtype the pipeline asks to compute in; `None` (entries of older versions) means f32.
    pub dtype: Option<Dtype>,
    /// How the entry names the checkpoint (what a fine-tune of it records).
    pub base: FolderRef,
    /// A `gguf(...)` model: the pair of files in `checkpoint_dir` (load it with
    /// `ModelRunner::load_gguf`; it takes no adapter and cannot be fine-tuned).
    pub gguf: Option<crate::gguf::read::GgufPair>,
}

/// `model.json` as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelFile {
    pub base: FolderRef,
    /// The adapter folder inside the entry.
    pub adapter: Option<PathBuf>,
    /// The dtype the pipeline asks to compute in (`"f32"`, `"f16"`, `"bf16"`).
    #[serde(default)]
    pub dtype: Option<Dtype>,
    /// A `gguf(...)` model's pair, by file name in the base folder; absent for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gguf: Option<GgufFiles>,
}

/// The two files of a GGUF model, named inside its folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GgufFiles {
    pub text: String,
    pub mmproj: String,
}

/// Errors of model entries and `init` presets.
#[derive(Debug, thiserror::Error)]
pub enum ModelNodeError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(
        "`{path}` is not a model entry file of this vlmpipe version (rerun the stage with `--force`)"
    )]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the model folder `{path}` does not exist (the pipeline names it relative to its own folder `{base}`)"
    )]
    MissingFolder { path: PathBuf, base: PathBuf },
    #[error("cannot get model `{repo}` at commit {commit} from the Hugging Face Hub")]
    Hub {
        repo: String,
        commit: String,
        #[source]
        source: Box<HubError>,
    },
    #[error("unknown model preset `{0}` (known: tiny)")]
    UnknownPreset(String),
    #[error("invalid built-in config of preset `{preset}`: {message}")]
    Config { preset: String, message: String },
}

/// What model entries' references are resolved against: the Hub cache and the folder of the
/// root pipeline file, both of this run.
#[derive(Clone, Debug)]
pub struct ModelResolver {
    hub: Hub,
    pipeline_dir: PathBuf,
}

impl ModelResolver {
    pub(crate) fn new(hub: Hub, pipeline_dir: PathBuf) -> Self {
        Self { hub, pipeline_dir }
    }

    /// The resolver for the pipeline file `file`, with the environment's Hub settings.
    pub(crate) fn for_pipeline_file(file: &Path) -> Self {
        let dir = match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Self::new(Hub::from_env(), dir)
    }

    /// Reads a model entry (written by the model stage or by a fine-tune) and finds its folders.
    pub(crate) fn open(&self, entry: &CacheEntry) -> Result<ModelLocation, ModelNodeError> {
        let path = entry.path(MODEL_FILE);
        let text = std::fs::read_to_string(&path).map_err(FileError::read(&path))?;
        let file: ModelFile =
            serde_json::from_str(&text).map_err(|source| ModelNodeError::Json { path, source })?;
        let checkpoint_dir = match (&file.gguf, &file.base) {
            // A GGUF repo is fetched file by file: it has no config.json and many quants.
            (Some(gguf), FolderRef::Hub { repo, commit }) => self
                .hub
                .files_dir(
                    &HubRepo::model(repo).at(commit),
                    &[&gguf.text, &gguf.mmproj],
                )
                .map_err(|source| ModelNodeError::Hub {
                    repo: repo.clone(),
                    commit: commit.clone(),
                    source: Box::new(source),
                })?,
            _ => self.folder(&file.base, entry.dir())?,
        };
        let gguf = file.gguf.map(|g| crate::gguf::read::GgufPair {
            text: checkpoint_dir.join(g.text),
            mmproj: checkpoint_dir.join(g.mmproj),
        });
        Ok(ModelLocation {
            checkpoint_dir,
            adapter_dir: file.adapter.map(|a| entry.dir().join(a)),
            dtype: file.dtype,
            base: file.base,
            gguf,
        })
    }

    /// The folder `reference` names, on this machine.
    pub(crate) fn folder(
        &self,
        reference: &FolderRef,
        entry_dir: &Path,
    ) -> Result<PathBuf, ModelNodeError> {
        match reference {
            FolderRef::Hub { repo, commit } => self
                .hub
                .model_dir(&HubRepo::model(repo).at(commit))
                .map_err(|source| ModelNodeError::Hub {
                    repo: repo.clone(),
                    commit: commit.clone(),
                    source: Box::new(source),
                }),
            FolderRef::Pipeline { path } => {
                let dir = self.pipeline_dir.join(path);
                if dir.is_dir() {
                    Ok(dir)
                } else {
                    Err(ModelNodeError::MissingFolder {
                        path: dir,
                        base: self.pipeline_dir.clone(),
                    })
                }
            }
            FolderRef::Entry { path } => Ok(entry_dir.join(path)),
        }
    }
}

/// `path` relative to `base` when it lies under it, lexically (`.` components ignored);
/// otherwise `None`.
pub fn relative_to(path: &Path, base: &Path) -> Option<PathBuf> {
    let clean = |p: &Path| -> PathBuf {
        p.components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect()
    };
    clean(path)
        .strip_prefix(clean(base))
        .ok()
        .map(Path::to_path_buf)
}

/// Where a `model` stage's checkpoint comes from.
#[derive(Clone, Debug)]
pub enum ModelOrigin {
    /// A Hub repo at a revision.
    Hf { hub: Hub, repo: HubRepo },
    /// A local folder (`dir` on this machine; `stored` as the entry names it, see [`FolderRef`]).
    Local { dir: PathBuf, stored: PathBuf },
    /// Seeded random weights of a built-in size.
    Init { preset: Preset, seed: u64 },
    /// A GGUF pair from a Hub repo (`hub`) or a local folder (`local`), picked by quant names.
    Gguf {
        place: GgufPlace,
        quant: Option<String>,
        mmproj: Option<String>,
    },
}

/// Where a `gguf(...)` model's files are.
#[derive(Clone, Debug)]
pub enum GgufPlace {
    Hub { hub: Hub, repo: HubRepo },
    Local { dir: PathBuf, stored: PathBuf },
}

/// The folder and the two file names of a Hub GGUF pair: the cached snapshot's when it holds
/// the quant asked for (or when offline), else from the repo's listing, downloading only the
/// two files.
fn hub_gguf_pair(
    hub: &Hub,
    repo: &HubRepo,
    quant: Option<&str>,
    mmproj: Option<&str>,
) -> Result<crate::gguf::read::GgufPair, StageError> {
    use crate::gguf::read::{GgufPair, choose_pair, find_pair};
    if let Some(snapshot) = hub.cached_snapshot(repo)
        && (quant.is_some() || hub.config().offline)
        && let Ok(pair) = find_pair(&snapshot, quant, mmproj)
    {
        return Ok(pair);
    }
    let names = hub.list_files(repo)?;
    let place = PathBuf::from(format!("hf:{}@{}", repo.id, repo.revision));
    let (text, mm) = choose_pair(&place, &names, quant, mmproj)?;
    let dir = hub.files_dir(repo, &[&text, &mm])?;
    Ok(GgufPair {
        text: dir.join(text),
        mmproj: dir.join(mm),
    })
}

/// The file name of `path` (a pair's file inside its folder).
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Where a `model` stage's `adapter:` comes from.
#[derive(Clone, Debug)]
pub enum AdapterOrigin {
    Hf { hub: Hub, repo: HubRepo },
    Local { dir: PathBuf, stored: PathBuf },
}

/// What a `model` stage names.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// The node's canonical parameters.
    pub params: Value,
    pub origin: ModelOrigin,
    pub adapter: Option<AdapterOrigin>,
    pub dtype: Dtype,
    /// Where local folders may lead (their files may be links): the plan's read policy.
    pub reads: ReadPolicy,
}

/// The configured model stage.
pub struct ModelStage {
    params: Value,
    source: ModelOrigin,
    adapter: Option<AdapterOrigin>,
    dtype: Dtype,
    reads: ReadPolicy,
}

impl ModelStage {
    pub(crate) fn from_config(config: ModelConfig) -> Self {
        Self {
            params: config.params,
            source: config.origin,
            adapter: config.adapter,
            dtype: config.dtype,
            reads: config.reads,
        }
    }

    /// Copies the adapter's two PEFT files into the entry after checking that vlmpipe can read
    /// them (an unsupported adapter fails here, naming the folder, not in every eval).
    fn copy_adapter(&self, ctx: &StageContext<'_>) -> Result<Option<Value>, StageError> {
        let Some(adapter) = &self.adapter else {
            return Ok(None);
        };
        let (dir, described) = match adapter {
            AdapterOrigin::Hf { hub, repo } => {
                let dir = hub.adapter_dir(repo)?;
                (dir, json!({ "source": "hf", "repo": repo.id }))
            }
            AdapterOrigin::Local { dir, stored } => {
                (dir.clone(), json!({ "source": "local", "path": stored }))
            }
        };
        let loaded = PeftAdapter::load(&dir, &Device::Cpu)?;
        let out = ctx.out_path(ADAPTER_DIR);
        std::fs::create_dir_all(&out).map_err(FileError::create(&out))?;
        for name in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
            let target = out.join(name);
            std::fs::copy(dir.join(name), &target).map_err(FileError::copy_to(&target))?;
        }
        let mut described = described;
        described["lora_modules"] = json!(loaded.lora.len());
        described["base_model_name_or_path"] = json!(loaded.base_model);
        Ok(Some(described))
    }
}

impl Stage for ModelStage {
    fn kind(&self) -> &'static str {
        "model"
    }

    fn code_version(&self) -> u32 {
        MODEL_CODE_VERSION
    }

    fn params(&self) -> Value {
        self.params.clone()
    }

    fn external_state(&self) -> Result<Value, StageError> {
        let model = match &self.source {
            ModelOrigin::Hf { hub, repo } => json!({ "commit": model_commit(hub, repo)? }),
            ModelOrigin::Local { dir, .. } => json!({ "files": stat_dir(dir, &self.reads)? }),
            ModelOrigin::Init { .. } => Value::Null,
            ModelOrigin::Gguf {
                place: GgufPlace::Hub { hub, repo },
                quant,
                mmproj,
            } => {
                let commit = match hub.cached_commit(repo) {
                    Some(commit) => commit,
                    None => {
                        hub_gguf_pair(hub, repo, quant.as_deref(), mmproj.as_deref())?;
                        hub.cached_commit(repo).unwrap_or_default()
                    }
                };
                json!({ "commit": commit })
            }
            ModelOrigin::Gguf {
                place: GgufPlace::Local { dir, .. },
                ..
            } => json!({ "files": stat_dir(dir, &self.reads)? }),
        };
        let Some(adapter) = &self.adapter else {
            // Without an adapter the state is what it was before `adapter:` existed.
            return Ok(model);
        };
        let adapter = match adapter {
            AdapterOrigin::Hf { hub, repo } => {
                let commit = match hub.cached_commit(repo) {
                    Some(commit) => commit,
                    None => {
                        hub.adapter_dir(repo)?;
                        hub.cached_commit(repo).unwrap_or_default()
                    }
                };
                json!({ "commit": commit })
            }
            AdapterOrigin::Local { dir, .. } => json!({ "files": stat_dir(dir, &self.reads)? }),
        };
        Ok(json!({ "model": model, "adapter": adapter }))
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        let (base, mut metadata) = match &self.source {
            ModelOrigin::Hf { hub, repo } => {
                hub.model_dir(repo)?;
                let commit = model_commit(hub, repo)?;
                (
                    FolderRef::Hub {
                        repo: repo.id.clone(),
                        commit,
                    },
                    json!({ "source": "hf", "repo": repo.id }),
                )
            }
            ModelOrigin::Local { dir, stored } => {
                // Fail here, naming the folder, rather than in every stage that loads it.
                crate::model::resolve::check_model_dir(dir)?;
                crate::model::checkpoint::Checkpoint::open(dir)?;
                (
                    FolderRef::Pipeline {
                        path: stored.clone(),
                    },
                    json!({ "source": "local", "path": stored }),
                )
            }
            ModelOrigin::Gguf {
                place,
                quant,
                mmproj,
            } => {
                let (quant, mmproj) = (quant.as_deref(), mmproj.as_deref());
                let (pair, base, mut metadata) = match place {
                    GgufPlace::Hub { hub, repo } => {
                        let pair = hub_gguf_pair(hub, repo, quant, mmproj)?;
                        let commit = hub.cached_commit(repo).unwrap_or_default();
                        (
                            pair,
                            FolderRef::Hub {
                                repo: repo.id.clone(),
                                commit,
                            },
                            json!({ "source": "gguf", "repo": repo.id }),
                        )
                    }
                    GgufPlace::Local { dir, stored } => (
                        crate::gguf::read::find_pair(dir, quant, mmproj)?,
                        FolderRef::Pipeline {
                            path: stored.clone(),
                        },
                        json!({ "source": "gguf", "path": stored }),
                    ),
                };
                // Headers only: a bad or mismatched pair fails here, naming the file.
                crate::model::load::gguf::open_pair(&pair)?;
                let files = GgufFiles {
                    text: file_name(&pair.text),
                    mmproj: file_name(&pair.mmproj),
                };
                metadata["text"] = json!(files.text);
                metadata["mmproj"] = json!(files.mmproj);
                let file = ModelFile {
                    base,
                    adapter: None,
                    dtype: Some(self.dtype),
                    gguf: Some(files),
                };
                let path = ctx.out_path(MODEL_FILE);
                std::fs::write(&path, serde_json::to_string_pretty(&file)?)
                    .map_err(FileError::write(&path))?;
                return Ok(StageOutcome {
                    metadata,
                    ..StageOutcome::default()
                });
            }
            ModelOrigin::Init { preset, seed } => {
                let dir = ctx.out_path(INIT_DIR);
                let tensors = preset.save(&dir, *seed)?;
                (
                    FolderRef::Entry {
                        path: PathBuf::from(INIT_DIR),
                    },
                    json!({ "source": "init", "preset": preset.name(), "tensors": tensors }),
                )
            }
        };
        let adapter = self.copy_adapter(ctx)?;
        let has_adapter = adapter.is_some();
        if let Some(adapter) = adapter {
            metadata["adapter"] = adapter;
        }
        let file = ModelFile {
            base,
            adapter: has_adapter.then(|| PathBuf::from(ADAPTER_DIR)),
            dtype: Some(self.dtype),
            gguf: None,
        };
        let path = ctx.out_path(MODEL_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&file)?)
            .map_err(FileError::write(&path))?;
        Ok(StageOutcome {
            metadata,
            ..StageOutcome::default()
        })
    }
}

/// The commit a Hub model's revision is at: the cached one, else fetched now so the fingerprint
/// names a real commit.
fn model_commit(hub: &Hub, repo: &HubRepo) -> Result<String, StageError> {
    if let Some(commit) = hub.cached_commit(repo) {
        return Ok(commit);
    }
    hub.model_dir(repo)?;
    Ok(hub.cached_commit(repo).unwrap_or_default())
}

/// Name, size and mtime of every file under `dir`, sorted: a cheap identity of a local model.
/// Computed before anything runs, so a folder (or a file in it, by a link) that `reads` does
/// not allow is refused here, naming the flag that allows it.
fn stat_dir(dir: &Path, reads: &ReadPolicy) -> Result<Vec<Value>, StageError> {
    let mut files = Vec::new();
    reads.check(dir)?;
    for item in walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
    {
        let item = item.map_err(|e| {
            let path = e.path().unwrap_or(dir).to_path_buf();
            FileError {
                action: crate::file_error::FileAction::List,
                path,
                source: e.into(),
            }
        })?;
        if item.path_is_symlink() {
            reads.check(item.path())?;
        }
        if !item.file_type().is_file() {
            continue;
        }
        let meta = item
            .metadata()
            .map_err(|e| FileError::inspect(item.path())(e.into()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let rel = item.path().strip_prefix(dir).unwrap_or(item.path());
        files.push(json!([
            rel.to_string_lossy(),
            meta.len(),
            mtime.to_string()
        ]));
    }
    Ok(files)
}

/// Built-in model sizes for `init(preset: …)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The shapes of the `tiny-thumb` reference checkpoint (64-wide, 6 text and 2 vision layers,
    /// a 1,024-token synthetic tokenizer): fast enough for tests and the offline quickstart.
    Tiny,
}

/// The `tiny` preset's files, generated by `tests/reference` (synthetic tokenizer; ours).
const TINY_FILES: &[(&str, &str)] = &[
    (
        "config.json",
        include_str!("../../../tests/fixtures/reference/checkpoints/tiny-thumb/config.json"),
    ),
    (
        "tokenizer.json",
        include_str!("../../../tests/fixtures/reference/checkpoints/tiny-thumb/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_str!(
            "../../../tests/fixtures/reference/checkpoints/tiny-thumb/tokenizer_config.json"
        ),
    ),
    (
        "special_tokens_map.json",
        include_str!(
            "../../../tests/fixtures/reference/checkpoints/tiny-thumb/special_tokens_map.json"
        ),
    ),
    (
        "chat_template.jinja",
        include_str!(
            "../../../tests/fixtures/reference/checkpoints/tiny-thumb/chat_template.jinja"
        ),
    ),
    (
        "processor_config.json",
        include_str!(
            "../../../tests/fixtures/reference/checkpoints/tiny-thumb/processor_config.json"
        ),
    ),
    (
        "preprocessor_config.json",
        include_str!(
            "../../../tests/fixtures/reference/checkpoints/tiny-thumb/preprocessor_config.json"
        ),
    ),
    (
        "generation_config.json",
        include_str!(
            "../../../tests/fixtures/reference/checkpoints/tiny-thumb/generation_config.json"
        ),
    ),
];

impl Preset {
    pub fn parse(name: &str) -> Result<Self, ModelNodeError> {
        match name {
            "tiny" => Ok(Preset::Tiny),
            other => Err(ModelNodeError::UnknownPreset(other.to_owned())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
        }
    }

    fn files(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Preset::Tiny => TINY_FILES,
        }
    }

    /// Writes a Hub-layout checkpoint with seeded random weights into `dir`; returns the
    /// number of tensors saved.
    pub(crate) fn save(self, dir: &Path, seed: u64) -> Result<usize, StageError> {
        std::fs::create_dir_all(dir).map_err(FileError::create(dir))?;
        for (name, text) in self.files() {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(FileError::write(&path))?;
        }
        let (_, config_text) = self.files()[0];
        let specs = random_checkpoint::specs_from_json(config_text).map_err(|e| {
            ModelNodeError::Config {
                preset: self.name().to_owned(),
                message: e.to_string(),
            }
        })?;
        let weights = dir.join("model.safetensors");
        random_checkpoint::write_random_weights(&specs, &weights, DType::F32, seed)?;
        Ok(specs.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::{LoadOptions, load};

    #[test]
    fn entries_name_folders_relative_to_the_pipeline_or_by_hub_commit() {
        let rel = |p: &str, b: &str| relative_to(Path::new(p), Path::new(b));
        assert_eq!(rel("models/x", ""), Some(PathBuf::from("models/x")));
        assert_eq!(rel("./models/x", "."), Some(PathBuf::from("models/x")));
        assert_eq!(
            rel("proj/shared/../m", "proj"),
            Some(PathBuf::from("shared/../m"))
        );
        assert_eq!(rel("/a/b/m", "/a/b"), Some(PathBuf::from("m")));
        assert_eq!(rel("/x/m", "/a/b"), None);

        let cache = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snapshot = cache
            .path()
            .join("models--org--name/snapshots")
            .join(commit);
        Preset::Tiny.save(&snapshot, 1).unwrap();
        let lookup = cache.path().to_string_lossy().into_owned();
        let hub = Hub::new(crate::hub::HubConfig::from_lookup(|name| match name {
            "HF_HUB_CACHE" => Some(lookup.clone()),
            "HF_HUB_OFFLINE" => Some("1".into()),
            _ => None,
        }));
        let project = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(project.path().join("models/x")).unwrap();
        let resolver = ModelResolver::new(hub, project.path().to_path_buf());
        let entry = Path::new("/nowhere/entry");
        let hub_ref = FolderRef::Hub {
            repo: "org/name".into(),
            commit: commit.into(),
        };
        assert_eq!(resolver.folder(&hub_ref, entry).unwrap(), snapshot);
        let local = FolderRef::Pipeline {
            path: "models/x".into(),
        };
        assert_eq!(
            resolver.folder(&local, entry).unwrap(),
            project.path().join("models/x")
        );
        let gone = FolderRef::Pipeline {
            path: "models/y".into(),
        };
        let err = resolver.folder(&gone, entry).unwrap_err().to_string();
        assert!(
            err.contains("models/y") && err.contains("relative to its own folder"),
            "{err}"
        );
        let inside = FolderRef::Entry {
            path: "checkpoint".into(),
        };
        assert_eq!(
            resolver.folder(&inside, entry).unwrap(),
            entry.join("checkpoint")
        );
    }

    #[test]
    fn tiny_preset_saves_a_loadable_hub_layout_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let count = Preset::Tiny.save(dir.path(), 5).unwrap();
        assert!(count > 20, "{count} tensors");
        let model = load(dir.path(), &LoadOptions::default());
        assert!(model.is_ok(), "{:?}", model.err());
        let template = crate::model::chat::ChatTemplate::from_model_dir(dir.path());
        assert!(template.is_ok(), "{:?}", template.err());
        // Same seed, same bytes; another seed, other weights.
        let again = tempfile::tempdir().unwrap();
        Preset::Tiny.save(again.path(), 5).unwrap();
        let a = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let b = std::fs::read(again.path().join("model.safetensors")).unwrap();
        assert_eq!(blake3::hash(&a), blake3::hash(&b));
        let other = tempfile::tempdir().unwrap();
        Preset::Tiny.save(other.path(), 6).unwrap();
        let c = std::fs::read(other.path().join("model.safetensors")).unwrap();
        assert_ne!(blake3::hash(&a), blake3::hash(&c));
        assert!(Preset::parse("huge").is_err());
    }
}
