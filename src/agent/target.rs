//! The target: its geometry, the load request, and opening it for a load.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::path::Path;

use crate::agent::error::{AgentError, check_chunk_size, malformed};
use crate::agent::mounts::refuse_if_in_use;
use crate::image::digest::{ChunkDigest, is_zero};
use crate::image::fileio::HOLE_BLOCK;
use crate::image::geometry::Geometry;
use crate::image::sparse;
use crate::proto::{LoadBegin, bitmap_len};

/// Geometry shared by loads and saves.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    pub(super) size: u64,
    pub(super) chunk_size: u64,
    pub(super) chunks: usize,
}

impl Layout {
    pub(super) fn new(size: u64, chunk_size: u32) -> Result<Layout, AgentError> {
        check_chunk_size(chunk_size)?;
        let chunks = Geometry::new(size, u64::from(chunk_size)).count();
        // Chunk indices travel as u32.
        if chunks > u64::from(u32::MAX) + 1 {
            return Err(AgentError::Target(format!(
                "{size} bytes make {chunks} chunks of {chunk_size}, more than the protocol can number"
            )));
        }
        Ok(Layout {
            size,
            chunk_size: u64::from(chunk_size),
            chunks: usize::try_from(chunks)
                .map_err(|_| AgentError::Target(format!("{chunks} chunks do not fit in memory")))?,
        })
    }

    fn geometry(&self) -> Geometry {
        Geometry::new(self.size, self.chunk_size)
    }

    pub(super) fn offset(&self, i: usize) -> u64 {
        self.geometry().offset(i)
    }

    pub(super) fn chunk_len(&self, i: usize) -> usize {
        // At most chunk_size, which fits in usize.
        self.geometry().len(i) as usize
    }
}

pub(super) struct LoadRequest {
    pub(super) target: String,
    pub(super) layout: Layout,
    pub(super) identity: u128,
    pub(super) force: bool,
    pub(super) force_mounted: bool,
    /// Ignore the stamp: check every chunk.
    pub(super) verify: bool,
    /// Who asks, for the lock record.
    pub(super) holder: String,
    pub(super) digests: Vec<ChunkDigest>,
    pub(super) zero: Vec<u8>,
    /// The image's name, for the stamp ("" if the controller did not say).
    pub(super) image: String,
    /// The controller's host, user and build, for the stamp (its
    /// `loaded_at` is set when the stamp is written).
    pub(super) origin: crate::agent::origin::Origin,
}

impl LoadRequest {
    /// The request a LoadBegin makes, checked: its image's size, chunk
    /// size, digests and zero map agree, and it names a target. The stamp's
    /// origin takes the controller's user and host; its build is the
    /// caller's to set.
    pub(super) fn new(begin: LoadBegin) -> Result<LoadRequest, AgentError> {
        let LoadBegin {
            target,
            size,
            chunk_size,
            identity,
            force,
            force_mounted,
            verify,
            holder,
            digests,
            zero,
            image,
            user,
            host,
        } = begin;
        check_chunk_size(chunk_size)?;
        if size == 0 {
            // An empty image is a bad image, not a reason to truncate a disk.
            return Err(malformed(
                "LoadBegin has an image of 0 bytes: refusing to load an empty image".into(),
            ));
        }
        let chunks = Geometry::new(size, u64::from(chunk_size)).count();
        if digests.len() as u64 != chunks {
            return Err(malformed(format!(
                "LoadBegin has {} digests for {chunks} chunks of {chunk_size} in {size} bytes",
                digests.len()
            )));
        }
        let layout = Layout::new(size, chunk_size)?;
        if zero.len() != bitmap_len(layout.chunks) {
            return Err(malformed(format!(
                "LoadBegin zero bitmap has {} bytes, {} chunks need {}",
                zero.len(),
                layout.chunks,
                bitmap_len(layout.chunks)
            )));
        }
        if target.is_empty() {
            return Err(malformed("LoadBegin has an empty target".into()));
        }
        Ok(LoadRequest {
            target,
            layout,
            identity,
            force,
            force_mounted,
            verify,
            holder,
            digests,
            zero,
            image,
            origin: crate::agent::origin::Origin {
                loaded_at: String::new(),
                host,
                user,
                tool: String::new(),
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TargetKind {
    File,
    Block,
}

/// An open target: a regular file or a block device.
pub(super) struct Target {
    pub(super) file: File,
    pub(super) kind: TargetKind,
    /// As the controller named it, for messages.
    pub(super) name: String,
    /// Bytes before this session: the file length or the device size.
    pub(super) old_len: u64,
}

impl Target {
    pub(super) fn io_error(&self, what: &str, offset: u64, e: io::Error) -> AgentError {
        AgentError::Target(format!(
            "cannot {what} {} at offset {offset}: {e}",
            self.name
        ))
    }

    pub(super) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), AgentError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_error("read", offset, e))
    }

    pub(super) fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), AgentError> {
        crate::image::fileio::write_all_at(&self.file, buf, offset)
            .map_err(|e| self.io_error("write", offset, e))
    }

    /// Write a chunk's verified data at `offset`. On a file target, runs of
    /// all-zero [`HOLE_BLOCK`]s become holes (punched, so that data the file
    /// held there before is gone too): a file takes the space of its data,
    /// not of its chunks. A device gets every byte.
    pub(super) fn write_data(&self, buf: &[u8], offset: u64) -> Result<(), AgentError> {
        if self.kind != TargetKind::File {
            return self.write_at(buf, offset);
        }
        let mut run_start = 0;
        let mut run_zero = None;
        for (k, block) in buf.chunks(HOLE_BLOCK).enumerate() {
            let zero = is_zero(block);
            let at = k * HOLE_BLOCK;
            match run_zero {
                Some(z) if z != zero => {
                    self.write_run(&buf[run_start..at], offset + run_start as u64, z)?;
                    run_start = at;
                }
                _ => {}
            }
            run_zero = Some(zero);
        }
        match run_zero {
            Some(z) => self.write_run(&buf[run_start..], offset + run_start as u64, z),
            None => Ok(()),
        }
    }

    fn write_run(&self, run: &[u8], offset: u64, zero: bool) -> Result<(), AgentError> {
        if zero {
            self.zero_region(offset, run)
        } else {
            self.write_at(run, offset)
        }
    }

    /// True if `[offset, offset+len)` is a hole, known without reading.
    /// Only regular files have holes; any doubt answers false.
    pub(super) fn is_hole(&self, offset: u64, len: usize) -> bool {
        if self.kind != TargetKind::File {
            return false;
        }
        sparse::is_hole(&self.file, offset, len as u64)
    }

    /// Make a region read as zeros: punch a hole in a file, else write
    /// `zeros` (the region's length of them).
    pub(super) fn zero_region(&self, offset: u64, zeros: &[u8]) -> Result<(), AgentError> {
        let len = zeros.len();
        if self.kind == TargetKind::File
            && let (Ok(at), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        {
            // SAFETY: fallocate on a descriptor we own, within the file.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    at,
                    n,
                )
            };
            if r == 0 {
                return Ok(());
            }
        }
        self.write_at(zeros, offset)
    }
}

pub(super) fn kind_name(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

pub(super) fn not_usable(name: &str, meta: &Metadata) -> AgentError {
    AgentError::Target(format!(
        "{name} is {}, not a block device or a regular file",
        kind_name(meta)
    ))
}

pub(super) fn open_load_target(req: &LoadRequest) -> Result<Target, AgentError> {
    let name = req.target.clone();
    let path = Path::new(&req.target);
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_block_device() => {
            if !req.force_mounted {
                refuse_if_in_use(&name, meta.rdev())?;
            }
            let mut options = OpenOptions::new();
            options.read(true).write(true);
            if !req.force_mounted {
                // An exclusive open fails while the kernel holds the device
                // (mounted, in a RAID or LVM volume): a second line of defence.
                options.custom_flags(libc::O_EXCL);
            }
            let file = options.open(path).map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    AgentError::Target(format!(
                        "refusing to write {name}: it is mounted or held by the kernel (busy); \
                         force_mounted overrides"
                    ))
                } else {
                    AgentError::Target(format!("cannot open {name}: {e}"))
                }
            })?;
            let device_size = sparse::file_size(&file)
                .map_err(|e| AgentError::Target(format!("cannot size {name}: {e}")))?;
            if device_size < req.layout.size {
                return Err(AgentError::Target(format!(
                    "{name} holds {device_size} bytes, the image needs {}",
                    req.layout.size
                )));
            }
            Ok(Target {
                file,
                kind: TargetKind::Block,
                name,
                old_len: device_size,
            })
        }
        Ok(meta) if meta.is_file() => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| AgentError::Target(format!("cannot open {name}: {e}")))?;
            file_target(file, name)
        }
        Ok(meta) => Err(not_usable(&name, &meta)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(AgentError::Target(format!(
                    "cannot create {name}: {} is not a directory",
                    parent.display()
                )));
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| AgentError::Target(format!("cannot create {name}: {e}")))?;
            file_target(file, name)
        }
        Err(e) => Err(AgentError::Target(format!("cannot access {name}: {e}"))),
    }
}

pub(super) fn file_target(file: File, name: String) -> Result<Target, AgentError> {
    let meta = file
        .metadata()
        .map_err(|e| AgentError::Target(format!("cannot stat {name}: {e}")))?;
    if !meta.is_file() {
        return Err(not_usable(&name, &meta));
    }
    Ok(Target {
        file,
        kind: TargetKind::File,
        name,
        old_len: meta.len(),
    })
}
