//! Early writeback: as each chunk is written, the kernel is asked to start
//! writing its pages to the disk, so that the sync at the end of a load
//! finds little left to do instead of all of it.
//!
//! The requests go to a thread of their own: `sync_file_range` may wait for
//! the disk's queue, and the loop that receives and relays chunks must not.
//! On a disk slower than the stream the thread falls behind; requests it
//! has no room for are dropped (the final sync writes those pages), so the
//! load runs as it would without it. On the loopback bench (section a of
//! `bench/results.md`) the sync at the end of a 256 MiB load went from
//! 0.11 s to 0.05 s.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::Scope;

/// Requests the thread may be behind by (chunks).
const QUEUE: usize = 16;

/// The writeback thread of one load; it ends when this is dropped.
pub(super) struct Writeback {
    tx: SyncSender<(u64, u64)>,
}

impl Writeback {
    /// Start the thread, in `scope`, for `file`.
    pub(super) fn start<'scope>(scope: &'scope Scope<'scope, '_>, file: &'scope File) -> Writeback {
        let (tx, rx) = sync_channel::<(u64, u64)>(QUEUE);
        scope.spawn(move || {
            for (offset, len) in rx {
                start_writeback(file, offset, len);
            }
        });
        Writeback { tx }
    }

    /// Ask for the `len` bytes written at `offset` to go to the disk. Never
    /// waits: when the thread is behind, the request is dropped.
    pub(super) fn written(&self, offset: u64, len: u64) {
        let _ = self.tx.try_send((offset, len));
    }
}

/// Start writing the dirty pages of a range, without waiting for them.
/// Advisory: a failure here (a file system without it, a pipe) is left to
/// the final sync, which reports the errors that matter.
fn start_writeback(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a syscall on a descriptor we borrow; it reads no memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    /// `cachestat(2)`'s numbers for a whole file: (dirty, writeback) pages,
    /// or None where the kernel has no cachestat (before 6.5).
    fn dirty_pages(file: &File) -> Option<(u64, u64)> {
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            cache: u64,
            dirty: u64,
            writeback: u64,
            evicted: u64,
            recently_evicted: u64,
        }
        // The same number on every architecture (added after the tables
        // were unified).
        const SYS_CACHESTAT: libc::c_long = 451;
        let range = Range { off: 0, len: 0 };
        let mut stat = Stat::default();
        // SAFETY: both structs are repr(C) as the kernel defines them and
        // outlive the call.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                &range as *const Range,
                &mut stat as *mut Stat,
                0,
            )
        };
        (r == 0).then_some((stat.dirty, stat.writeback))
    }

    #[test]
    fn written_chunks_leave_the_dirty_pages_without_a_sync() {
        // Needs a disk's file system: tmpfs pages are never written back.
        let dir = tempfile::tempdir().unwrap();
        let mut file = File::create(dir.path().join("t")).unwrap();
        let data = vec![0x5au8; 8 << 20];
        file.write_all(&data).unwrap();
        let Some((dirty, _)) = dirty_pages(&file) else {
            eprintln!("skipped: this kernel has no cachestat(2) to watch dirty pages with");
            return;
        };
        if dirty == 0 {
            eprintln!("skipped: the file system left no dirty pages to write back");
            return;
        }
        std::thread::scope(|s| {
            let writeback = Writeback::start(s, &file);
            writeback.written(0, data.len() as u64);
        });
        // Without a request, the kernel leaves dirty pages for ~30 s.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (dirty, writeback) = dirty_pages(&file).unwrap();
            if dirty == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{dirty} dirty pages ({writeback} under writeback) 5 s after the request"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
