//! Bigger pipes between the controller, ssh and the agent: a chunk of
//! several MiB crosses a 64 KiB pipe in dozens of wake-ups; a 1 MiB pipe
//! takes far fewer context switches per chunk.

use std::os::fd::{AsRawFd, BorrowedFd};

const PIPE_SIZE: libc::c_int = 1 << 20;

/// Grow the pipe behind `fd` to 1 MiB if it is a pipe; anything else (a
/// file, a socket) or a refusal (the system's pipe-max-size) is left as is.
pub fn widen(fd: BorrowedFd<'_>) {
    // SAFETY: fcntl on a descriptor we borrow; F_SETPIPE_SZ fails harmlessly
    // with EBADF/EINVAL/EPERM on non-pipes or over the limit.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_pipe_grows_and_a_file_is_left_alone() {
        let (r, _w) = std::io::pipe().unwrap();
        widen(r.as_fd());
        // SAFETY: querying the size of our own pipe.
        let size = unsafe { libc::fcntl(r.as_raw_fd(), libc::F_GETPIPE_SZ) };
        assert!(size >= PIPE_SIZE, "{size}");
        let f = tempfile::tempfile().unwrap();
        widen(f.as_fd());
    }
}
