//! The command line: parse arguments, resolve them into settings, run a command.

use std::process::ExitCode;

/// Entry point called by `main.rs`; returns the process exit code.
pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}
