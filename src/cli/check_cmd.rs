//! `vlmpipe check` and `vlmpipe graph`: load and check a pipeline, never touching the network.

use std::io::{IsTerminal, Write};
use std::path::Path;

use super::Outcome;
use super::args::{DiagnosticFormat, GraphFormat, ParamOverrides};
use crate::dsl::render::escape_control;
use crate::plan::{self, CheckResult, Plan};

/// Loads `file`, printing diagnostics (warnings too) to stderr. Returns the plan when there is no
/// error.
pub(crate) fn load_and_report(file: &Path, params: &ParamOverrides) -> Option<Plan> {
    let result = plan::load_pipeline_with(file, &params.set, &params.read_policy(file));
    print_diagnostics(&result);
    result.plan
}

/// Prints the diagnostics of `result` to stderr, coloured on a terminal.
pub(crate) fn print_diagnostics(result: &CheckResult) {
    if !result.diagnostics.is_empty() {
        let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        eprint!("{}", plan::render_diagnostics(result, color));
    }
}

pub(crate) fn check(
    file: &Path,
    params: &ParamOverrides,
    format: DiagnosticFormat,
) -> anyhow::Result<Outcome> {
    let result = plan::load_pipeline_with(file, &params.set, &params.read_policy(file));
    match format {
        DiagnosticFormat::Human => {
            print_diagnostics(&result);
            if let Some(plan) = &result.plan {
                println!(
                    "{}: ok, pipeline `{}` with {} stages",
                    escape_control(&file.display().to_string()),
                    plan.settings.name,
                    plan.nodes.len()
                );
            } else {
                let errors = result.diagnostics.iter().filter(|d| d.is_error()).count();
                eprintln!(
                    "{}: {errors} error{}",
                    escape_control(&file.display().to_string()),
                    if errors == 1 { "" } else { "s" }
                );
            }
        }
        DiagnosticFormat::Json => {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut out, &plan::render_json(&result))?;
            writeln!(out)?;
        }
    }
    Ok(if result.has_errors() {
        Outcome::Problems
    } else {
        Outcome::Success
    })
}

pub(crate) fn graph(
    file: &Path,
    params: &ParamOverrides,
    format: GraphFormat,
) -> anyhow::Result<Outcome> {
    let Some(plan) = load_and_report(file, params) else {
        return Ok(Outcome::Problems);
    };
    let text = match format {
        GraphFormat::Text => plan::graph::render_text(&plan),
        GraphFormat::Dot => plan::graph::render_dot(&plan),
        GraphFormat::Mermaid => plan::graph::render_mermaid(&plan),
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    Ok(Outcome::Success)
}
