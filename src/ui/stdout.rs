//! Writes to standard output that survive a reader going away.
//!
//! Rust ignores SIGPIPE, so a write into a closed pipe (`imaging list |
//! head -1`) returns `EPIPE`; `println!` would panic on it. Every stdout
//! write of the program goes through here or checks [`closed_by`]: a
//! closed stdout is remembered, later output is dropped, and the callers
//! end their run early and cleanly (children stopped, temp dirs removed).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether standard output was found closed by its reader.
pub fn closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// Whether the result of a stdout write means its reader has gone, and if
/// so remember that for [`closed`].
pub fn closed_by(result: &std::io::Result<()>) -> bool {
    let gone = matches!(result, Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe);
    if gone {
        CLOSED.store(true, Ordering::Relaxed);
    }
    gone
}

/// Write `text` to stdout and flush; false once the reader has gone (any
/// other write error is ignored, like a full terminal would be).
pub fn write(text: &str) -> bool {
    if closed() {
        return false;
    }
    let mut out = std::io::stdout().lock();
    let result = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    !closed_by(&result)
}

/// `println!` that does not panic: see [`write`].
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::ui::stdout::write(&format!("{}\n", format_args!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_pipe_is_remembered_other_errors_are_not() {
        let other: std::io::Result<()> = Err(std::io::Error::other("full"));
        assert!(!closed_by(&other));
        assert!(!closed());
        let pipe: std::io::Result<()> = Err(std::io::ErrorKind::BrokenPipe.into());
        assert!(closed_by(&pipe));
        assert!(closed());
        assert!(!write("dropped\n"));
    }
}
