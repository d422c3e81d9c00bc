//! Cooperative interruption. The binary turns SIGINT/SIGTERM into [`request`]; long loops call
//! [`check`] at points where stopping leaves consistent state (between matrices), and unwind
//! with [`Error::Interrupted`]. The library itself installs no signal handlers.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::{Error, Result};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Ask running work to stop at its next check.
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// `Err(Error::Interrupted)` once a stop was requested.
pub fn check(what: &str) -> Result<()> {
    if requested() {
        Err(Error::Interrupted(what.to_string()))
    } else {
        Ok(())
    }
}
