//! Stage implementations: one folder per stage kind, and [`lower`], which builds them from a
//! checked plan.
//!
//! Every kind is built the same way, `XStage::from_config(XConfig)` in its folder's `stage.rs`,
//! where `XConfig` is plain typed configuration (input slots, files, specs, resolved sources):
//!
//! | kind                          | folder      | stage                        |
//! |-------------------------------|-------------|------------------------------|
//! | `dataset`                     | `data/`     | `DatasetStage`               |
//! | `split`, `sample`, `shuffle`  | `rows/`     | `SplitStage`, `SampleStage`  |
//! | `labels`, `prompt`, `grammar` | `declared/` | `LabelsStage`, `PromptStage`, `GrammarStage` |
//! | `model`                       | `model/`    | `ModelStage`                 |
//! | `eval`                        | `eval/`     | `EvalStage`                  |
//! | `finetune`                    | `finetune/` | `FinetuneStage`              |
//! | `export`                      | `export/`   | `ExportStage`                |
//! | `report`                      | `report/`   | `ReportStage`                |
//!
//! Only [`lower`] reads the plan; a new stage kind is a new folder with a `stage.rs` and one arm
//! in `lower`. `data/`, `prompt/`, `eval/` and `report/` also hold the layers their stages use
//! (ingest and row tables, templates, records and metrics, HTML reports).

pub mod data;
pub(crate) mod declared;
pub mod eval;
pub(crate) mod export;
pub(crate) mod finetune;
pub(crate) mod lower;
pub mod model;
pub mod prompt;
pub mod report;
pub(crate) mod rows;
