//! `executor slurm { ... }`: how the pipeline runs (issue 16), the same settings as the profile's
//! `[slurm]` table and the cluster flags. Run settings only: they reach the launcher through
//! [`crate::plan::PipelineSettings::executor`] and never a stage, so no fingerprint sees them.

use crate::dsl::ast::Decl;
use crate::dsl::diagnostic::{Code, Diagnostic, did_you_mean};
use crate::plan::ExecutorSettings;

use super::Analyzer;

/// The executors a block may configure.
const EXECUTORS: &[&str] = &["slurm"];

/// The fields of `executor slurm { ... }`.
const SLURM_FIELDS: &[&str] = &[
    "active",
    "partition",
    "gpus_per_task",
    "cpus_per_task",
    "max_parallel",
    "sbatch_args",
    "max_retries",
    "probe_timeout",
    "poll_interval",
];

impl<'f> Analyzer<'f, '_> {
    pub(super) fn build_executor(&mut self, decl: &'f Decl) -> Option<ExecutorSettings> {
        let name = decl.name.name.as_str();
        if !EXECUTORS.contains(&name) {
            self.error(
                Diagnostic::error(Code::BadValue, format!("unknown executor `{name}`"))
                    .at(decl.name.span)
                    .with_hint(
                        did_you_mean(name, EXECUTORS.iter().copied()).unwrap_or_else(|| {
                            "known executors: `slurm` (the local one has no settings)".to_owned()
                        }),
                    ),
            );
            return None;
        }
        let block = self.expect_block_body(decl)?;
        // Unknown keys are the shared field check's: one diagnostic each, with its hint.
        let f = self.fields(block, decl, SLURM_FIELDS);
        let mut ok = true;
        let mut u32_field = |a: &mut Self, key: &str, min: i64| match f.expr(key) {
            Some(e) => {
                let v = a.expect_u32(e, key, min);
                ok &= v.is_some();
                v
            }
            None => None,
        };
        let gpus_per_task = u32_field(self, "gpus_per_task", 0);
        let cpus_per_task = u32_field(self, "cpus_per_task", 1);
        let max_parallel = u32_field(self, "max_parallel", 1);
        let max_retries = u32_field(self, "max_retries", 0);
        let mut seconds = |a: &mut Self, key: &str| match f.expr(key) {
            Some(e) => {
                let v = a.expect_f64_in(e, key, 0.0, f64::INFINITY, true);
                ok &= v.is_some();
                v
            }
            None => None,
        };
        let probe_timeout = seconds(self, "probe_timeout");
        let poll_interval = seconds(self, "poll_interval");
        let active = match f.expr("active") {
            Some(e) => {
                let v = self.expect_bool(e, "active");
                ok &= v.is_some();
                v
            }
            None => None,
        };
        let partition = match f.expr("partition") {
            Some(e) => {
                let v = self.expect_str(e, "partition");
                ok &= v.is_some();
                v
            }
            None => None,
        };
        let sbatch_args = match f.expr("sbatch_args") {
            Some(e) => {
                let v = self.expect_str_list(e, "sbatch_args");
                ok &= v.is_some();
                v.unwrap_or_default()
            }
            None => Vec::new(),
        };
        ok.then_some(ExecutorSettings {
            active,
            partition,
            gpus_per_task,
            cpus_per_task,
            max_parallel,
            sbatch_args,
            max_retries,
            probe_timeout,
            poll_interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::plan::{ExecutorSettings, check_source, render_diagnostics};

    const STAGES: &str = "labels l = [\"a\", \"b\"]\n";

    /// The executor settings of `block` after [`STAGES`], or the rendered diagnostics.
    fn check(block: &str) -> Result<Option<ExecutorSettings>, String> {
        let text = format!("{STAGES}{block}");
        let result = check_source(Path::new("/tmp/exec.vp"), &text, &[]);
        match &result.plan {
            Some(plan) => Ok(plan.settings.executor.clone()),
            None => Err(render_diagnostics(&result, false)),
        }
    }

    #[test]
    fn a_slurm_block_gives_every_setting() {
        let settings = check(
            "executor slurm {\n  active = true\n  partition = \"gpu\"  gpus_per_task = 1\n  \
             cpus_per_task = 4  max_parallel = 8  max_retries = 0\n  \
             sbatch_args = [\"--time=02:00:00\", \"--account=vision\"]\n  \
             probe_timeout = 30  poll_interval = 0.5\n}\n",
        )
        .unwrap();
        assert_eq!(
            settings,
            Some(ExecutorSettings {
                active: Some(true),
                partition: Some("gpu".to_owned()),
                gpus_per_task: Some(1),
                cpus_per_task: Some(4),
                max_parallel: Some(8),
                sbatch_args: vec!["--time=02:00:00".to_owned(), "--account=vision".to_owned()],
                max_retries: Some(0),
                probe_timeout: Some(30.0),
                poll_interval: Some(0.5),
            })
        );
        assert_eq!(check("").unwrap(), None);
        assert_eq!(
            check("executor slurm { }").unwrap(),
            Some(ExecutorSettings::default())
        );
    }

    #[test]
    fn bad_settings_are_errors_at_their_place() {
        let cases = [
            // (block, line:column, what the message says)
            (
                "executor slurm {\n  partitoin = \"gpu\"\n}",
                "exec.vp:3:3",
                "unknown field `partitoin`",
            ),
            (
                "executor slurm { nodes = 2 }",
                "exec.vp:2:18",
                "executor `slurm` takes `active`, `partition`, `gpus_per_task`",
            ),
            (
                "executor slurm { cpus_per_task = -4 }",
                "exec.vp:2:34",
                "`cpus_per_task` must be at least 1, found -4",
            ),
            (
                "executor slurm { max_parallel = 0 }",
                "exec.vp:2:33",
                "`max_parallel` must be at least 1",
            ),
            (
                "executor slurm { partition = 3 }",
                "exec.vp:2:30",
                "partition",
            ),
            (
                "executor slurm { sbatch_args = \"--time=1\" }",
                "exec.vp:2:32",
                "a list of strings",
            ),
            (
                "executor slurm { active = \"yes\" }",
                "exec.vp:2:27",
                "active",
            ),
            (
                "executor slurm { poll_interval = 0 }",
                "exec.vp:2:34",
                "`poll_interval` must be above 0",
            ),
            (
                "executor slurmm { }",
                "exec.vp:2:10",
                "unknown executor `slurmm`",
            ),
            (
                "executor slurm { }\nexecutor slurm { }",
                "exec.vp:3:1",
                "the `executor` declaration appears twice",
            ),
        ];
        for (block, at, says) in cases {
            let rendered = check(block).expect_err(block);
            assert!(
                rendered.contains(at) && rendered.contains(says),
                "{block}:\n{rendered}"
            );
        }
        // The hint of an unknown field names every known one.
        let rendered = check("executor slurm { nodes = 2 }").unwrap_err();
        assert!(rendered.contains("`poll_interval`"), "{rendered}");
        // An unknown field is one error, not one per check that sees it.
        let rendered = check("executor slurm { partiton = \"gpu\" }").unwrap_err();
        assert_eq!(
            rendered.matches("unknown field `partiton`").count(),
            1,
            "{rendered}"
        );
    }
}
