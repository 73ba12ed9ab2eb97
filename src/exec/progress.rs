//! Progress bars for long stages: counts and ETA on a terminal, silent otherwise.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Hands out progress bars; hidden when stderr is not a terminal or when quiet.
#[derive(Clone, Debug)]
pub(crate) struct Progress {
    multi: MultiProgress,
    visible: bool,
    quiet: bool,
}

impl Progress {
    /// Visible only when stderr is a terminal and `quiet` is false.
    pub(crate) fn new(quiet: bool) -> Self {
        let visible = !quiet && std::io::stderr().is_terminal();
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
            visible,
            quiet,
        }
    }

    /// A bar for `len` items, labelled `what` (e.g. "images", "samples").
    pub(crate) fn bar(&self, len: u64, what: &str) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(len));
        if self.visible {
            // The template is a constant; a parse failure would be a bug, so fall back silently.
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} {prefix} [{bar:30}] {pos}/{len} {msg} ({per_sec}, eta {eta})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(what.to_owned());
        }
        bar
    }

    /// Prints a line above the bars (or to stderr when bars are hidden); nothing when quiet.
    pub(crate) fn println(&self, line: &str) {
        if self.quiet {
            return;
        }
        if self.visible {
            // Printing can only fail when the terminal went away; nothing useful to do then.
            let _ = self.multi.println(line);
        } else {
            eprintln!("{line}");
        }
    }
}
