//! The plan as a picture: an indented text tree, Graphviz DOT, or Mermaid.

use std::fmt::Write as _;

use crate::plan::{NodeId, Plan};

/// Each final node (one nothing reads) with its inputs indented below; a subtree already shown
/// is marked `(see above)` instead of being repeated.
pub fn render_text(plan: &Plan) -> String {
    let mut out = format!(
        "pipeline {} (seed {})\n",
        plan.settings.name, plan.settings.seed
    );
    let mut shown = vec![false; plan.nodes.len()];
    let roots: Vec<NodeId> = plan
        .nodes
        .iter()
        .filter(|n| plan.users_of(n.id).is_empty())
        .map(|n| n.id)
        .collect();
    for root in roots {
        tree(plan, root, 1, &mut shown, &mut out);
    }
    out
}

fn tree(plan: &Plan, id: NodeId, depth: usize, shown: &mut [bool], out: &mut String) {
    let Some(node) = plan.node(id) else { return };
    let indent = "  ".repeat(depth);
    if shown[id.0] && !node.inputs.is_empty() {
        let _ = writeln!(out, "{indent}{} {} (see above)", node.kind(), node.name);
        return;
    }
    shown[id.0] = true;
    let _ = writeln!(out, "{indent}{} {}", node.kind(), node.name);
    for input in &node.inputs {
        tree(plan, *input, depth + 1, shown, out);
    }
}

/// Graphviz DOT, edges from input to user.
pub fn render_dot(plan: &Plan) -> String {
    let mut out = format!(
        "digraph {} {{\n  rankdir=LR;\n  node [shape=box];\n",
        quote(&plan.settings.name)
    );
    for node in &plan.nodes {
        let label = format!("{}\\n{}", node.name.replace('"', "\\\""), node.kind());
        let _ = writeln!(out, "  n{} [label=\"{label}\"];", node.id.0);
    }
    for node in &plan.nodes {
        for input in &node.inputs {
            let _ = writeln!(out, "  n{} -> n{};", input.0, node.id.0);
        }
    }
    out.push_str("}\n");
    out
}

/// A Mermaid flowchart, edges from input to user.
pub fn render_mermaid(plan: &Plan) -> String {
    let mut out = String::from("flowchart LR\n");
    for node in &plan.nodes {
        let label = format!("{} ({})", node.name, node.kind()).replace('"', "#quot;");
        let _ = writeln!(out, "  n{}[\"{label}\"]", node.id.0);
    }
    for node in &plan.nodes {
        for input in &node.inputs {
            let _ = writeln!(out, "  n{} --> n{}", input.0, node.id.0);
        }
    }
    out
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\\\""))
}
