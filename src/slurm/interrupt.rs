//! Ctrl-C while Slurm tasks are out: cancel them (`scancel`) instead of leaving them running.
//!
//! The handler is installed when the first array is followed. Outside a follow loop a Ctrl-C
//! exits at once, as without a handler; inside one it sets [`interrupted`], which the loop sees
//! at its next poll; a second Ctrl-C exits at once.

use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static FOLLOWING: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();

/// Whether Ctrl-C was pressed while tasks were followed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Held while a follow loop runs: Ctrl-C then cancels rather than exits.
pub(crate) struct Following(());

impl Following {
    pub(crate) fn enter() -> Following {
        INSTALL.call_once(|| {
            // Another handler already set (a library user's) keeps its say; the loop still works.
            let _ = ctrlc::set_handler(|| {
                if INTERRUPTED.swap(true, Ordering::SeqCst) || FOLLOWING.load(Ordering::SeqCst) == 0 {
                    std::process::exit(130);
                }
                eprintln!("interrupted: cancelling the submitted Slurm jobs (Ctrl-C again to quit at once)");
            });
        });
        FOLLOWING.fetch_add(1, Ordering::SeqCst);
        Following(())
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        FOLLOWING.fetch_sub(1, Ordering::SeqCst);
    }
}
