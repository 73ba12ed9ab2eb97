//! Placeholders for the `eval`, `finetune` and `report` stages until their owners wire them.
//!
//! The lead replaces these with `stages::eval::stage::lower_eval`,
//! `stages::train_stage::lower_finetune` and `stages::report::stage::lower_report` (same
//! signatures) and deletes this file. A placeholder stage fails when run, so a pipeline with
//! such a stage reports it as failed instead of pretending it ran.

use serde_json::Value;

use crate::exec::{Stage, StageContext, StageError, StageOutcome};
use crate::plan::{Node, Plan};
use crate::stages::lower::{InputPositions, LowerContext, LowerError};

/// A stage kind whose implementation is not wired into lowering yet.
struct NotWired {
    kind: &'static str,
    params: Value,
}

impl Stage for NotWired {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn code_version(&self) -> u32 {
        0
    }

    fn params(&self) -> Value {
        self.params.clone()
    }

    fn run(&self, _ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        Err(format!("`{}` stages are not wired yet", self.kind).into())
    }
}

fn not_wired(kind: &'static str, node: &Node) -> Box<dyn Stage> {
    Box::new(NotWired {
        kind,
        params: node.canonical_params(),
    })
}

pub fn lower_eval(
    node: &Node,
    _plan: &Plan,
    _ctx: &LowerContext<'_>,
    _inputs: &InputPositions,
) -> Result<Box<dyn Stage>, LowerError> {
    Ok(not_wired("eval", node))
}

pub fn lower_finetune(
    node: &Node,
    _plan: &Plan,
    _ctx: &LowerContext<'_>,
    _inputs: &InputPositions,
) -> Result<Box<dyn Stage>, LowerError> {
    Ok(not_wired("finetune", node))
}

pub fn lower_report(
    node: &Node,
    _plan: &Plan,
    _ctx: &LowerContext<'_>,
    _inputs: &InputPositions,
) -> Result<Box<dyn Stage>, LowerError> {
    Ok(not_wired("report", node))
}
