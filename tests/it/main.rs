//! All integration tests, one binary (linking candle, arrow, parquet, llguidance and tokenizers
//! once instead of once per file). `tests/README.md` says which module needs what.

// The crate's `[lints]` are for shipped code: test helpers may unwrap, and `pub` in a test binary
// only shares a helper between modules.
#![allow(clippy::unwrap_used, unreachable_pub)]

mod data_support;
mod fuzz_support;
mod hub_support;
mod reference_support;
mod support;
mod train_support;

mod architecture;
mod bench_train;
mod benchmarks_doc;
mod cache_kill;
mod cache_store;
mod cli_infer;
mod cli_infer_grammar;
mod data_bench;
mod data_hub;
mod data_sources;
mod data_split;
mod decode_bench;
mod decode_grammar;
mod decode_scoring;
mod device;
mod docs_truth;
mod dsl_check;
mod dsl_fuzz;
mod dsl_linear;
mod dsl_props;
mod eval_export;
mod eval_metrics;
mod export_merged;
mod gguf_export;
mod gguf_import;
mod hostile_images;
mod hostile_pipeline;
mod hub_download;
mod llama_cpp_bench;
mod llama_cpp_parity;
mod model_450m;
mod model_adapter;
mod model_config;
mod model_generate;
mod model_inputs;
mod model_parity_committed;
mod model_parity_shared;
mod model_portable;
mod model_quant;
mod pipeline_eval;
mod pipeline_export;
mod pipeline_finetune;
mod pipeline_run;
mod pipeline_shards;
mod pipeline_slurm;
mod pipelines_hub;
mod processor_parity_committed;
mod processor_parity_shared;
mod processor_robustness;
mod quickstart;
mod read_policy;
mod report_html;
mod run_outputs;
mod runner;
mod slurm;
mod stage_fingerprints;
mod stages_layout;
mod train_interop;
mod train_learns;
mod train_parity;
mod train_resume;
