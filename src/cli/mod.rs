//! The command line: parse arguments ([`args`]), resolve them into settings, run a command.
//!
//! Exit codes: 0 success; 1 the command ran and found a problem (pipeline errors, a failed stage,
//! a failed verification); 2 bad usage (clap's own). A closed stdout (`vlmpipe … | head`) exits
//! quietly.

mod args;
mod bench_cmd;
mod bench_llama;
mod bench_quant;
mod bench_table;
mod bench_train;
mod cache_cmd;
mod check_cmd;
mod executor;
mod export_cmd;
mod infer_cmd;
mod render_cmd;
mod report_cmd;
mod run_cmd;
mod watch_cmd;
mod worker_cmd;

use std::process::ExitCode;

use clap::Parser;

use crate::dsl::render::escape_control;

pub(crate) use args::{Cli, Command};

/// What a command reports back to [`main`].
pub(crate) enum Outcome {
    /// Everything worked.
    Success,
    /// The command ran and found problems it already printed.
    Problems,
}

/// Prints `error` and its causes to stderr, skipping a cause whose text was already printed
/// (error types that embed their source in their message would otherwise say it twice).
pub(crate) fn print_error(error: &anyhow::Error) {
    // Messages quote pipeline text and paths, which may hold terminal escapes.
    eprintln!("error: {}", escape_control(&error.to_string()));
    let mut said = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if said.contains(&text) {
            continue;
        }
        eprintln!("  caused by: {}", escape_control(&text));
        said.push('\n');
        said.push_str(&text);
    }
}

/// Entry point called by `main.rs`; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Problems) => ExitCode::from(1),
        Err(error) => {
            if is_broken_pipe(&error) {
                return ExitCode::SUCCESS;
            }
            print_error(&error);
            ExitCode::from(1)
        }
    }
}

/// Opens `--device`, warning on stderr about GPUs `auto` passed over (a CUDA build on a machine
/// without a driver would otherwise fall back to the CPU silently).
pub(crate) fn open_device(arg: &args::DeviceArg) -> anyhow::Result<candle_core::Device> {
    let resolved = arg.device.resolve_explained()?;
    for line in &resolved.fallbacks {
        eprintln!("warning: --device auto: {line}");
    }
    Ok(resolved.device)
}

fn dispatch(cli: Cli) -> anyhow::Result<Outcome> {
    match cli.command {
        Command::Cache(command) => cache_cmd::run(command),
        Command::Report(args) => report_cmd::report(&args),
        Command::Show(args) => report_cmd::show(&args),
        Command::Infer(args) => infer_cmd::run(&args),
        Command::Bench(command) => bench_cmd::run(command),
        Command::Check {
            file,
            params,
            format,
        } => check_cmd::check(&file, &params, format),
        Command::Graph {
            file,
            params,
            format,
        } => check_cmd::graph(&file, &params, format),
        Command::Run(args) => run_cmd::run(&args),
        Command::Watch(args) => watch_cmd::watch(&args),
        Command::Render(args) => render_cmd::render(&args),
        Command::Export(args) => export_cmd::export(&args),
        Command::Worker(args) => worker_cmd::worker(&args),
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
