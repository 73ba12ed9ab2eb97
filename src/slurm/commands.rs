//! [`SlurmCommands`]: Slurm's client commands, found on PATH once, run with their output captured.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::error::SlurmError;

/// Where `sbatch`, `squeue`, `scancel`, `sinfo`, `sacct` and `scontrol` are.
#[derive(Clone, Debug)]
pub struct SlurmCommands {
    sbatch: PathBuf,
    squeue: PathBuf,
    scancel: PathBuf,
    sinfo: PathBuf,
    /// Optional: the final state of a task comes from `sacct` where accounting is on, else
    /// from `scontrol`.
    sacct: Option<PathBuf>,
    scontrol: Option<PathBuf>,
}

impl SlurmCommands {
    /// Finds the commands on PATH; the first one missing is the error.
    pub fn find() -> Result<SlurmCommands, SlurmError> {
        Self::find_in(std::env::var_os("PATH").as_deref())
    }

    /// [`SlurmCommands::find`] in the folders of `path` (PATH's syntax).
    pub fn find_in(path: Option<&OsStr>) -> Result<SlurmCommands, SlurmError> {
        let find = |name: &str| {
            std::env::split_paths(path?)
                .map(|dir| dir.join(name))
                .find(|p| is_executable(p))
        };
        let need =
            |command: &'static str| find(command).ok_or(SlurmError::NotInstalled { command });
        Ok(SlurmCommands {
            sbatch: need("sbatch")?,
            squeue: need("squeue")?,
            scancel: need("scancel")?,
            sinfo: need("sinfo")?,
            sacct: find("sacct"),
            scontrol: find("scontrol"),
        })
    }

    /// The `sbatch` found.
    pub(crate) fn sbatch_path(&self) -> &Path {
        &self.sbatch
    }

    pub(crate) fn sbatch<I, S>(&self, args: I, script: &str) -> Result<String, SlurmError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(&self.sbatch, args, Some(script))
    }

    pub(crate) fn squeue<I, S>(&self, args: I) -> Result<String, SlurmError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(&self.squeue, args, None)
    }

    pub(crate) fn scancel<I, S>(&self, args: I) -> Result<String, SlurmError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(&self.scancel, args, None)
    }

    pub(crate) fn sinfo<I, S>(&self, args: I) -> Result<String, SlurmError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(&self.sinfo, args, None)
    }

    /// `sacct …`, or `None` where it is missing or accounting is off (its error).
    pub(crate) fn sacct<I, S>(&self, args: I) -> Option<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(self.sacct.as_ref()?, args, None).ok()
    }

    /// `scontrol …`, or `None` where it is missing or fails (a job already purged).
    pub(crate) fn scontrol<I, S>(&self, args: I) -> Option<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(self.scontrol.as_ref()?, args, None).ok()
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs `program args` (with `stdin` fed when given) and returns its stdout; a non-zero exit is
/// [`SlurmError::Command`] with its stderr.
fn run<I, S>(program: &Path, args: I, stdin: Option<&str>) -> Result<String, SlurmError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let shown = || {
        let mut text = program
            .file_name()
            .unwrap_or(program.as_os_str())
            .to_string_lossy()
            .into_owned();
        for a in &args {
            text.push(' ');
            text.push_str(&a.to_string_lossy());
        }
        text
    };
    let failed = |status: String, stderr: String| SlurmError::Command {
        command: shown(),
        status,
        stderr,
    };
    let mut child = Command::new(program)
        .args(&args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed("could not start".into(), e.to_string()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| failed("could not write its input".into(), e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed("could not wait for it".into(), e.to_string()))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    // What Slurm's clients print without a reachable controller: no slurm.conf found (nor a DNS
    // SRV record), or a configured controller that does not answer.
    let unreachable = [
        "Could not establish a configuration source",
        "Unable to contact slurm controller",
    ];
    if unreachable.iter().any(|m| stderr.contains(m)) {
        let detail = stderr.lines().last().unwrap_or_default().trim().to_string();
        return Err(SlurmError::NoController {
            command: shown(),
            detail,
        });
    }
    Err(failed(out.status.to_string(), stderr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_sbatch_on_path_is_an_error_naming_the_fix() {
        let empty = tempfile::tempdir().unwrap();
        let err = SlurmCommands::find_in(Some(empty.path().as_os_str())).unwrap_err();
        assert!(matches!(
            err,
            SlurmError::NotInstalled { command: "sbatch" }
        ));
        let text = err.to_string();
        assert!(
            text.contains("`sbatch` is not on PATH")
                && text.contains("login node")
                && text.contains("leave out `--executor slurm`"),
            "{text}"
        );
        assert!(SlurmCommands::find_in(None).is_err());
    }

    #[test]
    fn no_controller_is_an_error_naming_the_fix() {
        // What `sinfo` prints on a machine with Slurm's clients and no cluster.
        let err = run(
            Path::new("/bin/sh"),
            [
                "-c",
                "echo 'sinfo: error: fetch_config: DNS SRV lookup failed' >&2; \
                 echo 'sinfo: fatal: Could not establish a configuration source' >&2; exit 1",
            ],
            None,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, SlurmError::NoController { .. })
                && text.contains("cannot reach a Slurm controller")
                && text.contains("Could not establish a configuration source")
                && text.contains("SLURM_CONF")
                && text.contains("leave out `--executor slurm`"),
            "{text}"
        );
    }

    #[test]
    fn a_failing_command_is_an_error_with_its_stderr() {
        let err = run(
            Path::new("/bin/sh"),
            ["-c", "echo 'sbatch: error: invalid partition' >&2; exit 1"],
            None,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("`sh -c ")
                && text.contains("exit status: 1")
                && text.ends_with("sbatch: error: invalid partition"),
            "{text}"
        );
        assert_eq!(
            run(
                Path::new("/bin/cat"),
                std::iter::empty::<&str>(),
                Some("script")
            )
            .unwrap(),
            "script"
        );
    }
}
