//! One run at a time per target: the agent holds a `flock` on the target
//! (the file itself, or the block device node) for the whole session, an
//! exclusive one for a load and a shared one for a save. A second run finds
//! it taken and fails at once, naming the holder from the record the holder
//! left beside its stamps (`<cache>/imaging/locks/<hash of the path>.lock`).
//!
//! The kernel drops the lock when the holder's process ends, however it
//! ends; a stopped (SIGSTOP) holder keeps it.

use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent::env::AgentEnv;
use crate::agent::error::AgentError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// A load: nobody else may read or write the target.
    Exclusive,
    /// A save: other saves may read alongside, no load may write.
    Shared,
    /// `status --verify`, `load -n --verify`: reads alongside saves, like one.
    Verify,
}

/// A held lock on a target; released when dropped (or when the process ends).
pub(super) struct TargetLock {
    _file: File,
    record: PathBuf,
    text: String,
}

impl TargetLock {
    /// Lock the existing file or device node `path`, without waiting.
    /// `holder` says who asks (the controller's host, pid and command).
    pub(super) fn take(
        env: &AgentEnv,
        path: &Path,
        mode: Mode,
        holder: &str,
    ) -> Result<TargetLock, AgentError> {
        let name = path.display().to_string();
        // Read-only and non-blocking: opening a device node this way claims
        // nothing (the exclusive open for writing comes later).
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| AgentError::Target(format!("cannot open {name} to lock it: {e}")))?;
        let record = record_path(env, path);
        let op = match mode {
            Mode::Exclusive => libc::LOCK_EX,
            Mode::Shared | Mode::Verify => libc::LOCK_SH,
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(AgentError::Busy(format!(
                    "{name} is in use by another run ({}); one load or save at a time per target",
                    read_record(&record)
                )));
            }
            return Err(AgentError::Target(format!("cannot lock {name}: {e}")));
        }
        let what = match mode {
            Mode::Exclusive => "load",
            Mode::Shared => "save",
            Mode::Verify => "verify (status --verify or load -n --verify)",
        };
        let text = format!(
            "{what} by {}, agent pid {}, since {}",
            if holder.is_empty() {
                "an unnamed controller"
            } else {
                holder
            },
            std::process::id(),
            chrono::Local::now().format("%Y-%m-%d %H:%M:%S")
        );
        // Best effort: without a record a second run only names no holder.
        let written = record
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&record, &text));
        if let Err(e) = written {
            eprintln!(
                "imaging agent: warning: cannot write the lock record {}: {e}",
                record.display()
            );
        }
        Ok(TargetLock {
            _file: file,
            record,
            text,
        })
    }
}

impl Drop for TargetLock {
    fn drop(&mut self) {
        // Another shared holder may have replaced the record: leave theirs.
        if std::fs::read_to_string(&self.record).is_ok_and(|t| t == self.text) {
            let _ = std::fs::remove_file(&self.record);
        }
    }
}

/// Who holds the lock, from its record. The holder writes the record right
/// after taking the lock: give it a moment.
fn read_record(record: &Path) -> String {
    for _ in 0..10 {
        if let Ok(text) = std::fs::read_to_string(record)
            && !text.trim().is_empty()
        {
            return text.trim().to_string();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    format!(
        "its holder left no record in {}: another user's run, or a run older than this agent",
        record.display()
    )
}

/// `<stamp dir>/../locks/<xxh3-128 of the canonical path>.lock`.
fn record_path(env: &AgentEnv, path: &Path) -> PathBuf {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let hash = xxhash_rust::xxh3::xxh3_128(key.as_os_str().as_bytes());
    env.stamp_dir
        .with_file_name("locks")
        .join(format!("{hash:032x}.lock"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::testkit::*;

    #[test]
    fn a_held_lock_refuses_a_second_holder_and_names_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        std::fs::write(&target, b"x").unwrap();
        let first = TargetLock::take(&env, &target, Mode::Exclusive, "controller lab pid 77")
            .expect("first lock");
        // flock locks are per open file: a second open in this process conflicts.
        let err = TargetLock::take(&env, &target, Mode::Shared, "controller other pid 88")
            .err()
            .expect("second lock refused");
        let text = err.to_string();
        assert!(text.contains("in use by another run"), "{text}");
        assert!(text.contains("controller lab pid 77"), "{text}");
        assert!(text.contains(&std::process::id().to_string()), "{text}");
        drop(first);
        let a = TargetLock::take(&env, &target, Mode::Shared, "a").expect("shared");
        let b = TargetLock::take(&env, &target, Mode::Shared, "b").expect("shared twice");
        assert!(TargetLock::take(&env, &target, Mode::Exclusive, "c").is_err());
        drop((a, b));
        assert!(TargetLock::take(&env, &target, Mode::Exclusive, "c").is_ok());
        let records = std::fs::read_dir(env.stamp_dir.with_file_name("locks")).unwrap();
        assert_eq!(records.count(), 0, "records are removed with their lock");
    }
}
