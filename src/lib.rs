//! vlmpipe: declarative pipelines that turn small local vision-language models into image classifiers.
//!
//! Data flow (see ARCHITECTURE.md): pipeline file → [`dsl`] (parse) → [`plan`] (checked, typed DAG)
//! → [`exec`] + [`cache`] → [`stages`] (data, prompt, model, …), with [`model`] holding LFM2-VL itself.

pub mod cache;
pub mod cli;
pub mod decode;
pub mod dsl;
pub(crate) mod dtype;
pub mod exec;
pub(crate) mod file_error;
pub mod gguf;
pub mod hub;
pub mod model;
pub mod plan;
pub(crate) mod read_limits;
pub mod read_policy;
pub(crate) mod rng;
pub mod runner;
pub mod slurm;
pub mod stages;
pub mod train;
