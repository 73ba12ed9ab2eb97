//! The `export` stage: writes a model entry's checkpoint (a fine-tune's adapter merged in f32
//! first) as llama.cpp's pair, `<name>-<QUANT>.gguf` + `mmproj-<name>-<QUANT>.gguf`, through
//! [`crate::gguf::export`], the code behind `vlmpipe export --gguf`.
//!
//! The entry holds the pair and a `model.json` naming the entry itself as the model folder, so an
//! eval opens an export like any model ([`ModelResolver::open`]) and evaluates the exact files
//! that ship. The executor copies the pair to `evals/<pipeline>/<stage>/` ([`Stage::exports`]).

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::exec::{Export, Stage, StageContext, StageError, StageOutcome};
use crate::file_error::FileError;
use crate::gguf::{self, GgufOptions, GgufQuant};
use crate::stages::model::{FolderRef, GgufFiles, MODEL_FILE, ModelFile, ModelResolver};
use crate::train::PeftAdapter;
use crate::train::merge::{ExportOrigin, MergeOptions, merge_checkpoint};

/// Bumped when the export's output for the same inputs changes.
const EXPORT_CODE_VERSION: u32 = 1;

/// What an `export` stage writes.
#[derive(Clone, Debug)]
pub(crate) struct ExportConfig {
    /// The node's canonical parameters, with the file name stem (it enters the files).
    pub params: Value,
    /// `<name>` of the files and `general.name` (the stage's name).
    pub name: String,
    /// The pipeline's name (recorded by a merge as the fine-tune's origin).
    pub pipeline: String,
    pub quant: GgufQuant,
    pub mmproj_quant: GgufQuant,
    /// The input slot of the model entry.
    pub model_slot: usize,
    /// Finds the model's folders on this machine (never part of a fingerprint).
    pub models: ModelResolver,
    /// Where the copies go (`evals/<pipeline>/<stage>/`).
    pub export_dir: PathBuf,
}

/// A configured export stage.
pub(crate) struct ExportStage {
    config: ExportConfig,
}

impl ExportStage {
    pub(crate) fn from_config(config: ExportConfig) -> Self {
        Self { config }
    }

    /// The pair's file names in the entry.
    pub(crate) fn file_names(&self) -> (String, String) {
        let c = &self.config;
        gguf::file_names(&c.name, c.quant, c.mmproj_quant)
    }
}

impl Stage for ExportStage {
    fn kind(&self) -> &'static str {
        "export"
    }

    fn uses_device(&self) -> bool {
        true
    }

    fn code_version(&self) -> u32 {
        EXPORT_CODE_VERSION
    }

    fn params(&self) -> Value {
        self.config.params.clone()
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        let config = &self.config;
        let location = config.models.open(ctx.input(config.model_slot)?)?;
        // Another architecture is refused before an adapter is merged.
        gguf::check_architecture(&location.checkpoint_dir)?;
        // A merged fine-tune lives in the stage's work folder until its files are written.
        let mut _merged = None;
        let checkpoint = match &location.adapter_dir {
            None => location.checkpoint_dir.clone(),
            Some(adapter_dir) => {
                let adapter = PeftAdapter::load(adapter_dir, &candle_core::Device::Cpu)?;
                std::fs::create_dir_all(ctx.work_dir).map_err(FileError::create(ctx.work_dir))?;
                let tmp = tempfile::Builder::new()
                    .prefix("merged-")
                    .tempdir_in(ctx.work_dir)
                    .map_err(FileError::create(ctx.work_dir))?;
                let dir = tmp.path().join("checkpoint");
                let options = MergeOptions {
                    dtype: candle_core::DType::F32,
                    force: false,
                    origin: ExportOrigin {
                        pipeline: config.pipeline.clone(),
                        stage: ctx.name.to_owned(),
                    },
                };
                merge_checkpoint(&location.checkpoint_dir, &adapter, &dir, &options)?;
                _merged = Some(tmp);
                dir
            }
        };
        let written = gguf::export(
            &checkpoint,
            ctx.out_dir,
            &GgufOptions {
                name: config.name.clone(),
                quant: config.quant,
                mmproj_quant: config.mmproj_quant,
                force: false,
            },
        )?;
        let model = ModelFile {
            base: FolderRef::Entry { path: ".".into() },
            adapter: None,
            dtype: None,
            // The eval of an export loads exactly the two files this stage wrote.
            gguf: Some(GgufFiles {
                text: file_name(&written.text.path),
                mmproj: file_name(&written.mmproj.path),
            }),
        };
        let path = ctx.out_path(MODEL_FILE);
        let text =
            serde_json::to_string_pretty(&model).map_err(|e| StageError::msg(e.to_string()))?;
        std::fs::write(&path, text).map_err(FileError::write(&path))?;

        let mut warnings = Vec::new();
        let mut files = Vec::new();
        for file in [&written.text, &written.mmproj] {
            for f in &file.fallbacks {
                warnings.push(format!(
                    "`{}` has rows of {} values, not whole {:?} blocks; stored as {:?} (as \
                     llama.cpp's converter does)",
                    f.tensor, f.row, f.wanted, f.used
                ));
            }
            files.push(json!({
                "file": file.path.file_name().map(|n| n.to_string_lossy().into_owned()),
                "bytes": file.bytes,
                "tensors": file.tensors,
            }));
        }
        Ok(StageOutcome {
            metadata: json!({
                "format": "gguf",
                "quant": config.quant.name(),
                "mmproj": config.mmproj_quant.name(),
                "merged_adapter": location.adapter_dir.is_some(),
                "files": files,
            }),
            warnings,
        })
    }

    fn exports(&self) -> Vec<Export> {
        let (text, mmproj) = self.file_names();
        Export::all(&[&text, &mmproj], &self.config.export_dir)
    }
}

/// The name of a file this stage wrote into its own entry.
fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
