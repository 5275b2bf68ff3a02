//! `imaging agent`: the node side of a load or a save.
//!
//! The controller starts `imaging agent` over SSH and speaks the protocol of
//! [`crate::proto`] on its stdin/stdout. One session serves one request:
//!
//! - a load checks what the target already holds (a stamp left by the last
//!   complete load, else the chunk digests), asks only for the chunks it
//!   lacks, verifies each against the manifest before writing it, syncs and
//!   stamps the target;
//! - a save streams the target's chunks back, zero chunks as flags only.
//!
//! A load can also be a link of a relay chain (fan-out): the agent then
//! listens for its predecessor and forwards the stream to its successor
//! over TCP, every link authenticated with the run's secret (see "relay").
//!
//! Everything the controller or the disk says is checked; errors end the
//! session with `Msg::Error` and a non-zero exit code, never a panic.

use std::collections::HashMap;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::Scope;
use std::time::{Duration, Instant, SystemTime};

use crate::image::digest::{ChunkDigest, chunk_digest, is_zero};
use crate::proto::{
    Codec, HeldImage, Msg, ProtocolError, RELAY_SECRET_LEN, bit, bitmap_len, check_hello,
    read_msg_sync, set_bit, write_msg_sync, write_stream_chunk_sync,
};

/// Smallest chunk size the agent accepts.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size the agent accepts (frames are capped just above it).
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

/// Threads that check the target's chunks before a load, and that read and
/// compress chunks during a save.
const WORKERS: usize = 2;
/// Frames received but not yet written: enough to overlap receiving with
/// verifying and writing, bounded so memory stays a few chunks.
const RECEIVE_QUEUE: usize = 4;

/// Where the agent keeps its state on the node.
#[derive(Debug, Clone)]
pub struct AgentEnv {
    /// Load stamps: one small file per regular-file target.
    pub stamp_dir: PathBuf,
}

impl AgentEnv {
    /// `~/.cache/imaging/stamps` (the user cache dir); relative to the
    /// working directory if there is no home at all.
    pub fn from_home() -> AgentEnv {
        let cache = directories::ProjectDirs::from("", "", "imaging")
            .map(|dirs| dirs.cache_dir().to_path_buf())
            .unwrap_or_else(|| PathBuf::from(".cache").join("imaging"));
        AgentEnv {
            stamp_dir: cache.join("stamps"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    /// The target cannot be used, or reading or writing it failed.
    #[error("{0}")]
    Target(String),
    /// Chunk data that does not match the manifest.
    #[error("{0}")]
    Verify(String),
    /// The controller went away in the middle of a request.
    #[error("connection closed {0}")]
    Closed(&'static str),
    /// The controller sent `Error` and stopped.
    #[error("the controller stopped: {0}")]
    Peer(String),
    /// The relay listener cannot be opened.
    #[error("{0}")]
    Relay(String),
}

impl AgentError {
    /// 2: malformed or unexpected protocol input; 3: the target, the disk,
    /// verification, or the connection failed.
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Protocol(ProtocolError::Io(_) | ProtocolError::Closed) => 3,
            AgentError::Protocol(_) => 2,
            AgentError::Target(_)
            | AgentError::Verify(_)
            | AgentError::Closed(_)
            | AgentError::Peer(_)
            | AgentError::Relay(_) => 3,
        }
    }
}

fn malformed(text: String) -> AgentError {
    AgentError::Protocol(ProtocolError::Malformed(text))
}

/// `imaging agent`: serve one session on stdin/stdout. Returns the exit code.
pub fn run_agent() -> i32 {
    let env = AgentEnv::from_home();
    // Own descriptors rather than the std handles: no extra buffering layer,
    // and the input can move to the receiving thread.
    let own = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().map(File::from);
    crate::proto::pipes::widen(io::stdin().as_fd());
    crate::proto::pipes::widen(io::stdout().as_fd());
    let result = match (own(io::stdin().as_fd()), own(io::stdout().as_fd())) {
        (Ok(input), Ok(output)) => serve(input, output, &env),
        _ => serve(io::stdin(), io::stdout(), &env),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("imaging agent: {e}");
            e.exit_code()
        }
    }
}

/// Serve one session: Hello exchange, then one LoadBegin or SaveBegin
/// request to completion. On error the controller is sent `Msg::Error`
/// (best effort, once) before this returns.
pub fn serve<R: Read + Send, W: Write>(
    input: R,
    output: W,
    env: &AgentEnv,
) -> Result<(), AgentError> {
    let mut input = BufReader::with_capacity(1 << 20, input);
    let mut out = Replies::new(output);
    let result = session(&mut input, &mut out, env);
    if let Err(e) = &result {
        out.report(e);
    }
    result
}

/// The agent's side of the stream: frames, flushed when a reply is complete.
struct Replies<W: Write> {
    w: BufWriter<W>,
    error_sent: bool,
}

impl<W: Write> Replies<W> {
    fn new(w: W) -> Self {
        Replies {
            w: BufWriter::with_capacity(64 << 10, w),
            error_sent: false,
        }
    }

    /// Queue a frame; it leaves with the next flush or when the buffer fills.
    fn send(&mut self, msg: &Msg) -> Result<(), AgentError> {
        write_msg_sync(&mut self.w, msg)?;
        Ok(())
    }

    fn reply(&mut self, msg: &Msg) -> Result<(), AgentError> {
        self.send(msg)?;
        self.w.flush().map_err(ProtocolError::from)?;
        Ok(())
    }

    /// Tell the controller why we stop. Sent before waiting for the
    /// receiving thread, which only ends once the controller closes.
    fn report(&mut self, e: &AgentError) {
        if self.error_sent || matches!(e, AgentError::Peer(_)) {
            return;
        }
        self.error_sent = true;
        let _ = write_msg_sync(
            &mut self.w,
            &Msg::Error {
                message: e.to_string(),
            },
        );
        let _ = self.w.flush();
    }
}

fn session<R: Read + Send, W: Write>(
    input: &mut R,
    out: &mut Replies<W>,
    env: &AgentEnv,
) -> Result<(), AgentError> {
    out.reply(&Msg::hello())?;
    let hello = read_msg_sync(input).map_err(|e| closed_as(e, "before Hello"))?;
    check_hello(&hello)?;
    let request = match read_msg_sync(input) {
        // A controller may only check the agent's version.
        Err(ProtocolError::Closed) => return Ok(()),
        other => other?,
    };
    match request {
        Msg::LoadBegin {
            target,
            size,
            chunk_size,
            identity,
            force,
            force_mounted,
            digests,
            zero,
            image,
        } => {
            let mut req = LoadRequest::new(
                target,
                size,
                chunk_size,
                identity,
                force,
                force_mounted,
                digests,
                zero,
            )?;
            req.image = image;
            load(input, out, env, &req)
        }
        Msg::SaveBegin {
            target,
            chunk_size,
            level,
        } => save(out, env, &target, chunk_size, level),
        Msg::Error { message } => Err(AgentError::Peer(message)),
        other => Err(malformed(format!(
            "expected LoadBegin or SaveBegin, got {}",
            other.name()
        ))),
    }
}

fn closed_as(e: ProtocolError, when: &'static str) -> AgentError {
    match e {
        ProtocolError::Closed => AgentError::Closed(when),
        e => e.into(),
    }
}

fn check_chunk_size(chunk_size: u32) -> Result<(), AgentError> {
    if chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        Ok(())
    } else {
        Err(malformed(format!(
            "chunk size {chunk_size} is not a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
        )))
    }
}

/// Geometry shared by loads and saves.
#[derive(Debug, Clone, Copy)]
struct Layout {
    size: u64,
    chunk_size: u64,
    chunks: usize,
}

impl Layout {
    fn new(size: u64, chunk_size: u32) -> Result<Layout, AgentError> {
        check_chunk_size(chunk_size)?;
        let chunks = size.div_ceil(u64::from(chunk_size));
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

    fn offset(&self, i: usize) -> u64 {
        i as u64 * self.chunk_size
    }

    fn chunk_len(&self, i: usize) -> usize {
        // At most chunk_size, which fits in usize.
        (self.size - self.offset(i)).min(self.chunk_size) as usize
    }
}

struct LoadRequest {
    target: String,
    layout: Layout,
    identity: u128,
    force: bool,
    force_mounted: bool,
    digests: Vec<ChunkDigest>,
    zero: Vec<u8>,
    /// The image's name, for the stamp ("" if the controller did not say).
    image: String,
}

impl LoadRequest {
    #[allow(clippy::too_many_arguments)]
    fn new(
        target: String,
        size: u64,
        chunk_size: u32,
        identity: u128,
        force: bool,
        force_mounted: bool,
        digests: Vec<ChunkDigest>,
        zero: Vec<u8>,
    ) -> Result<LoadRequest, AgentError> {
        check_chunk_size(chunk_size)?;
        let chunks = size.div_ceil(u64::from(chunk_size));
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
            digests,
            zero,
            image: String::new(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetKind {
    File,
    Block,
}

/// An open target: a regular file or a block device.
struct Target {
    file: File,
    kind: TargetKind,
    /// As the controller named it, for messages.
    name: String,
    /// Bytes before this session: the file length or the device size.
    old_len: u64,
}

impl Target {
    fn io_error(&self, what: &str, offset: u64, e: io::Error) -> AgentError {
        AgentError::Target(format!(
            "cannot {what} {} at offset {offset}: {e}",
            self.name
        ))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), AgentError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_error("read", offset, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), AgentError> {
        crate::image::fileio::write_all_at(&self.file, buf, offset)
            .map_err(|e| self.io_error("write", offset, e))
    }

    /// True if `[offset, offset+len)` is a hole, known without reading.
    /// Only regular files have holes; any doubt answers false.
    fn is_hole(&self, offset: u64, len: usize) -> bool {
        if self.kind != TargetKind::File {
            return false;
        }
        let Ok(at) = libc::off_t::try_from(offset) else {
            return false;
        };
        // SAFETY: lseek on a descriptor we own; the shared file position it
        // moves is never used (all I/O is positioned).
        let data = unsafe { libc::lseek(self.file.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data at or after offset.
            return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        }
        data as u64 >= offset.saturating_add(len as u64)
    }

    /// Make a region read as zeros: punch a hole in a file, else write
    /// `zeros` (the region's length of them).
    fn zero_region(&self, offset: u64, zeros: &[u8]) -> Result<(), AgentError> {
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

fn kind_name(meta: &Metadata) -> &'static str {
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

fn not_usable(name: &str, meta: &Metadata) -> AgentError {
    AgentError::Target(format!(
        "{name} is {}, not a block device or a regular file",
        kind_name(meta)
    ))
}

fn open_load_target(req: &LoadRequest) -> Result<Target, AgentError> {
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
            let mut file = options.open(path).map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    AgentError::Target(format!(
                        "refusing to write {name}: it is mounted or held by the kernel (busy); \
                         force_mounted overrides"
                    ))
                } else {
                    AgentError::Target(format!("cannot open {name}: {e}"))
                }
            })?;
            let device_size = file
                .seek(SeekFrom::End(0))
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

fn file_target(file: File, name: String) -> Result<Target, AgentError> {
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

// ---------------------------------------------------------------- load

fn load<R: Read + Send, W: Write>(
    input: &mut R,
    out: &mut Replies<W>,
    env: &AgentEnv,
    req: &LoadRequest,
) -> Result<(), AgentError> {
    let target = open_load_target(req)?;
    let stamp = (target.kind == TargetKind::File).then(|| StampFile::new(env, &target));

    if let Some(stamp) = &stamp
        && !req.force
        && stamp.matches(&target, req)
    {
        out.reply(&Msg::Needed {
            up_to_date: true,
            bitmap: vec![],
            bytes_written: 0,
        })?;
        return match read_msg_sync(input) {
            Err(ProtocolError::Closed) => Ok(()),
            Ok(Msg::Finish) => out.reply(&Msg::Finished { bytes_written: 0 }),
            Ok(Msg::Error { message }) => Err(AgentError::Peer(message)),
            Ok(other) => Err(malformed(format!(
                "expected Finish after an up-to-date reply, got {}",
                other.name()
            ))),
            Err(e) => Err(e.into()),
        };
    }

    // From here on the target changes: a partial load must never look stamped.
    if let Some(stamp) = &stamp {
        stamp.remove()?;
    }
    if target.kind == TargetKind::File && target.old_len < req.layout.size {
        target.file.set_len(req.layout.size).map_err(|e| {
            AgentError::Target(format!(
                "cannot extend {} to {} bytes: {e}",
                target.name, req.layout.size
            ))
        })?;
    }
    let (needed, zeroed) = plan(&target, req)?;
    out.reply(&Msg::Needed {
        up_to_date: false,
        bitmap: needed.clone(),
        bytes_written: zeroed,
    })?;

    let (tx, rx) = sync_channel(RECEIVE_QUEUE);
    std::thread::scope(|s| {
        let control = tx.clone();
        s.spawn(move || forward_frames(input, control));
        let mut relay = Relay::new(s, tx);
        let result = receive(rx, out, &mut relay, &target, req, needed, zeroed);
        // Close the listener and the relay links: their threads end before
        // the scope waits for them.
        drop(relay);
        match result {
            Ok(bytes_written) => {
                if let Some(stamp) = &stamp {
                    stamp.write(&target, req);
                }
                out.reply(&Msg::Finished { bytes_written })
            }
            Err(e) => {
                // Before the scope waits for the receiving thread: that thread
                // may be blocked until the controller, told, closes.
                out.report(&e);
                Err(e)
            }
        }
    })
}

/// Decide which chunks the target lacks, zeroing on the way the regions
/// that must read as zero and do not. Returns the needed bitmap and the
/// bytes written while zeroing.
fn plan(target: &Target, req: &LoadRequest) -> Result<(Vec<u8>, u64), AgentError> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let outcomes: Vec<Result<(Vec<usize>, u64), AgentError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| s.spawn(|| plan_worker(target, req, &next, &failed)))
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(AgentError::Target("a checking thread failed".into())))
            })
            .collect()
    });
    let mut bitmap = vec![0u8; bitmap_len(req.layout.chunks)];
    let mut zeroed = 0;
    for outcome in outcomes {
        let (needed, bytes) = outcome?;
        for i in needed {
            set_bit(&mut bitmap, i);
        }
        zeroed += bytes;
    }
    Ok((bitmap, zeroed))
}

fn plan_worker(
    target: &Target,
    req: &LoadRequest,
    next: &AtomicUsize,
    failed: &AtomicBool,
) -> Result<(Vec<usize>, u64), AgentError> {
    let mut buf = Vec::new();
    let mut needed = Vec::new();
    let mut zeroed = 0u64;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= req.layout.chunks || failed.load(Ordering::Relaxed) {
            return Ok((needed, zeroed));
        }
        match check_chunk(target, req, i, &mut buf) {
            Ok(Check::Present) => {}
            Ok(Check::Needed) => needed.push(i),
            Ok(Check::Zeroed(bytes)) => zeroed += bytes,
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
    }
}

enum Check {
    /// The target already holds the chunk.
    Present,
    Needed,
    /// A zero chunk whose region held data and was zeroed now.
    Zeroed(u64),
}

fn check_chunk(
    target: &Target,
    req: &LoadRequest,
    i: usize,
    buf: &mut Vec<u8>,
) -> Result<Check, AgentError> {
    let offset = req.layout.offset(i);
    let len = req.layout.chunk_len(i);
    if bit(&req.zero, i) {
        if target.is_hole(offset, len) {
            return Ok(Check::Present);
        }
        buf.resize(len, 0);
        target.read_at(&mut buf[..len], offset)?;
        if is_zero(&buf[..len]) {
            return Ok(Check::Present);
        }
        buf.fill(0);
        target.zero_region(offset, &buf[..len])?;
        return Ok(Check::Zeroed(len as u64));
    }
    let needed = req.force
        || offset + len as u64 > target.old_len
        // The image chunk has data: a hole cannot match it.
        || target.is_hole(offset, len)
        || {
            buf.resize(len, 0);
            target.read_at(&mut buf[..len], offset)?;
            chunk_digest(&buf[..len]) != req.digests[i]
        };
    Ok(if needed {
        Check::Needed
    } else {
        Check::Present
    })
}

/// What the load's main loop reads: every source merged into one bounded
/// queue, so a fast sender waits for the disk and the successor.
enum Event {
    /// A frame from the controller, or why its stream stopped.
    Control(Result<Msg, ProtocolError>),
    /// StreamChunk or StreamEnd from an authenticated predecessor.
    Relayed { peer: String, msg: Msg },
    /// An incoming relay connection was refused or dropped.
    Refused { peer: String, reason: String },
    /// The outcome of RelayConnect number `attempt`.
    Linked {
        attempt: u64,
        addr: String,
        port: u16,
        result: Result<TcpStream, String>,
    },
    /// The link that RelayConnect number `attempt` made broke.
    SuccessorGone { attempt: u64, reason: String },
}

/// The receiving thread: the controller's frames into the queue until the
/// load's last one.
fn forward_frames<R: Read>(input: &mut R, tx: SyncSender<Event>) {
    loop {
        let msg = read_msg_sync(input);
        // After anything else the load ends: reading on would only wait for
        // a controller that waits for us.
        let more = matches!(
            msg,
            Ok(Msg::Chunk { .. }
                | Msg::StreamChunk { .. }
                | Msg::StreamEnd
                | Msg::RelayListen { .. }
                | Msg::RelayConnect { .. })
        );
        if tx.send(Event::Control(msg)).is_err() || !more {
            return;
        }
    }
}

/// Where a StreamChunk from the controller came from, in RelayRefused.
const FROM_CONTROLLER: &str = "controller";

/// Verify and write chunks, relay the stream, until Finish; sync. Returns
/// bytes written.
fn receive<W: Write>(
    rx: Receiver<Event>,
    out: &mut Replies<W>,
    relay: &mut Relay<'_, '_>,
    target: &Target,
    req: &LoadRequest,
    outstanding: Vec<u8>,
    bytes_written: u64,
) -> Result<u64, AgentError> {
    let mut unpacker = Unpacker::new()?;
    let mut load = Loading {
        target,
        req,
        outstanding,
        bytes_written,
    };
    loop {
        let event = rx
            .recv()
            .map_err(|_| AgentError::Closed("before the load finished"))?;
        let msg = match event {
            Event::Control(msg) => msg.map_err(|e| closed_as(e, "before the load finished"))?,
            Event::Relayed { peer, msg } => {
                load.relayed(out, relay, &mut unpacker, &peer, msg)?;
                continue;
            }
            Event::Refused { peer, reason } => {
                out.reply(&Msg::RelayRefused { peer, reason })?;
                continue;
            }
            Event::Linked {
                attempt,
                addr,
                port,
                result,
            } => {
                if let Some(reply) = relay.linked(attempt, addr, port, result) {
                    out.reply(&reply)?;
                }
                continue;
            }
            Event::SuccessorGone { attempt, reason } => {
                if let Some(lost) = relay.successor_gone(attempt, reason) {
                    out.reply(&lost)?;
                }
                continue;
            }
        };
        match msg {
            Msg::Chunk { index, codec, data } => {
                let i = load.chunk_index(index).map_err(malformed)?;
                let bytes = unpacker.unpack(req, i, codec, &data)?;
                load.write(out, i, bytes)?;
            }
            Msg::StreamChunk { index, codec, data } => {
                let i = load.chunk_index(index).map_err(malformed)?;
                load.stream_chunk(out, relay, &mut unpacker, FROM_CONTROLLER, i, codec, &data)?;
            }
            Msg::StreamEnd => load.stream_end(out, relay)?,
            Msg::RelayListen {
                secret,
                bind,
                port_min,
                port_max,
            } => {
                let port = relay.listen(&secret, &bind, port_min, port_max)?;
                out.reply(&Msg::RelayPort { port })?;
            }
            Msg::RelayConnect { secret, addr, port } => relay.connect(&secret, addr, port)?,
            Msg::Finish => {
                let layout = req.layout;
                let outstanding = &load.outstanding;
                if let Some(missing) = (0..layout.chunks).find(|&i| bit(outstanding, i)) {
                    let count = (0..layout.chunks).filter(|&i| bit(outstanding, i)).count();
                    return Err(malformed(format!(
                        "Finish before chunk {missing} was written ({count} needed chunks missing)"
                    )));
                }
                finish(target, req)?;
                return Ok(load.bytes_written);
            }
            Msg::Error { message } => return Err(AgentError::Peer(message)),
            other => {
                return Err(malformed(format!(
                    "unexpected {} during a load",
                    other.name()
                )));
            }
        }
    }
}

/// A load between Needed and Finish.
struct Loading<'a> {
    target: &'a Target,
    req: &'a LoadRequest,
    /// Bit i set: chunk i is needed and not yet written.
    outstanding: Vec<u8>,
    bytes_written: u64,
}

impl Loading<'_> {
    fn chunk_index(&self, index: u32) -> Result<usize, String> {
        let i = index as usize;
        if i < self.req.layout.chunks {
            Ok(i)
        } else {
            Err(format!(
                "chunk index {index} out of range: the image has {} chunks",
                self.req.layout.chunks
            ))
        }
    }

    /// Write chunk `i`'s verified data and acknowledge it.
    fn write<W: Write>(
        &mut self,
        out: &mut Replies<W>,
        i: usize,
        bytes: &[u8],
    ) -> Result<(), AgentError> {
        self.target.write_at(bytes, self.req.layout.offset(i))?;
        self.bytes_written += bytes.len() as u64;
        if let Some(b) = self.outstanding.get_mut(i / 8) {
            *b &= !(1 << (i % 8));
        }
        out.reply(&Msg::Written {
            // i came from a u32.
            index: i as u32,
            bytes_written: self.bytes_written,
        })
    }

    /// A frame from a predecessor: only the stream travels there.
    fn relayed<W: Write>(
        &mut self,
        out: &mut Replies<W>,
        relay: &mut Relay<'_, '_>,
        unpacker: &mut Unpacker,
        peer: &str,
        msg: Msg,
    ) -> Result<(), AgentError> {
        let refuse = |reason: String| Msg::RelayRefused {
            peer: peer.to_string(),
            reason,
        };
        match msg {
            Msg::StreamChunk { index, codec, data } => match self.chunk_index(index) {
                Ok(i) => self.stream_chunk(out, relay, unpacker, peer, i, codec, &data),
                Err(reason) => out.reply(&refuse(reason)),
            },
            Msg::StreamEnd => self.stream_end(out, relay),
            // The connection's reader lets nothing else through.
            other => out.reply(&refuse(format!(
                "unexpected {} on a relay connection",
                other.name()
            ))),
        }
    }

    /// Verify and write the chunk if this node needs it, forward it in any
    /// case. Data that fails verification is neither written nor forwarded:
    /// the controller hears of it and sends the chunk directly later.
    #[allow(clippy::too_many_arguments)]
    fn stream_chunk<W: Write>(
        &mut self,
        out: &mut Replies<W>,
        relay: &mut Relay<'_, '_>,
        unpacker: &mut Unpacker,
        source: &str,
        i: usize,
        codec: Codec,
        data: &[u8],
    ) -> Result<(), AgentError> {
        let bytes = if bit(&self.outstanding, i) {
            match unpacker.unpack(self.req, i, codec, data) {
                Ok(bytes) => Some(bytes),
                Err(AgentError::Verify(reason)) => {
                    return out.reply(&Msg::RelayRefused {
                        peer: source.to_string(),
                        reason,
                    });
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        // Forward first: the successor's work overlaps with this write.
        // i came from a u32.
        let index = i as u32;
        if let Some(lost) = relay.forward(|s| write_stream_chunk_sync(s, index, codec, data)) {
            out.reply(&lost)?;
        }
        match bytes {
            Some(bytes) => self.write(out, i, bytes),
            None => Ok(()),
        }
    }

    /// Pass the end of the stream on, then tell the controller what is missing.
    fn stream_end<W: Write>(
        &mut self,
        out: &mut Replies<W>,
        relay: &mut Relay<'_, '_>,
    ) -> Result<(), AgentError> {
        if let Some(lost) = relay.forward(|s| write_msg_sync(s, &Msg::StreamEnd)) {
            out.reply(&lost)?;
        }
        out.reply(&Msg::Missing {
            bitmap: self.outstanding.clone(),
        })
    }
}

/// Turns a chunk as it travels into its data, checked against the manifest.
struct Unpacker {
    decompressor: zstd::bulk::Decompressor<'static>,
    buf: Vec<u8>,
}

impl Unpacker {
    fn new() -> Result<Unpacker, AgentError> {
        Ok(Unpacker {
            decompressor: zstd::bulk::Decompressor::new()
                .map_err(|e| AgentError::Target(format!("cannot start zstd: {e}")))?,
            buf: Vec::new(),
        })
    }

    /// Chunk `i`'s data; any mismatch is `AgentError::Verify`.
    fn unpack<'a>(
        &'a mut self,
        req: &LoadRequest,
        i: usize,
        codec: Codec,
        data: &'a [u8],
    ) -> Result<&'a [u8], AgentError> {
        let len = req.layout.chunk_len(i);
        let bytes: &[u8] = match codec {
            Codec::Raw => data,
            Codec::Zstd => {
                self.buf.clear();
                // The capacity bounds the output: at most a chunk (earlier
                // chunks were no larger), checked below.
                self.buf.reserve_exact(len);
                self.decompressor
                    .decompress_to_buffer(data, &mut self.buf)
                    .map_err(|e| {
                        AgentError::Verify(format!(
                            "chunk {i} failed verification: cannot decompress: {e}"
                        ))
                    })?;
                &self.buf
            }
        };
        if bytes.len() != len {
            return Err(AgentError::Verify(format!(
                "chunk {i} failed verification: {} bytes, expected {len}",
                bytes.len()
            )));
        }
        if chunk_digest(bytes) != req.digests[i] {
            return Err(AgentError::Verify(format!("chunk {i} failed verification")));
        }
        Ok(bytes)
    }
}

fn finish(target: &Target, req: &LoadRequest) -> Result<(), AgentError> {
    if target.kind == TargetKind::File {
        let len = target
            .file
            .metadata()
            .map_err(|e| AgentError::Target(format!("cannot stat {}: {e}", target.name)))?
            .len();
        if len != req.layout.size {
            target.file.set_len(req.layout.size).map_err(|e| {
                AgentError::Target(format!(
                    "cannot truncate {} to {} bytes: {e}",
                    target.name, req.layout.size
                ))
            })?;
        }
    }
    target
        .file
        .sync_all()
        .map_err(|e| AgentError::Target(format!("cannot sync {}: {e}", target.name)))
}

// ---------------------------------------------------------------- relay
//
// Threads, all scoped to the load and all feeding the one bounded queue the
// main loop reads (so a fast predecessor waits for this node's disk and its
// successor, and the wait travels up the chain):
// - the controller's reader (as without a relay);
// - the listener, once RelayListen came: accepts, polling for the end of
//   the load, one thread per connection (at most MAX_RELAY_CONNECTIONS);
// - per connection: the handshake (5 s in all), then its frames;
// - per RelayConnect: connect and handshake, 5 s each, so the load goes on
//   meanwhile; the main loop installs the link it makes;
// - per successor: a watcher that reports the link's end at once, even
//   while nothing is being forwarded.
// The main loop alone writes to the successor (5 s without progress =
// stalled) and to the controller. At the end of the load every socket is
// shut down, so each of these threads ends.
//
// Handshake, connector C to listener L, with the 32-byte secret as the key:
//   C→L  "IMGRELAY" ‖ version 1 ‖ nonce_c (16 bytes)
//   L→C  nonce_l (16) ‖ blake3_keyed(secret, "L" ‖ nonce_c ‖ nonce_l)
//   C→L  blake3_keyed(secret, "C" ‖ nonce_l ‖ nonce_c)
// then ordinary frames, StreamChunk and StreamEnd only, from C to L.

/// How long a relay connect may take, a relay handshake as a whole, and one
/// write to the successor without progress.
const RELAY_TIMEOUT: Duration = Duration::from_secs(5);
/// Incoming relay connections open at once (handshaking or relaying); more
/// are refused.
const MAX_RELAY_CONNECTIONS: usize = 16;
/// How often the listening thread looks whether the load is over.
const ACCEPT_POLL: Duration = Duration::from_millis(100);
/// Read buffer of a predecessor connection.
const RELAY_READ_BUFFER: usize = 256 << 10;
/// The connector's first bytes: `IMGRELAY`, version, then its nonce.
const RELAY_MAGIC: [u8; 8] = *b"IMGRELAY";
const RELAY_VERSION: u8 = 1;

type Secret = [u8; RELAY_SECRET_LEN];

fn relay_secret(secret: &[u8]) -> Result<Secret, AgentError> {
    Secret::try_from(secret).map_err(|_| {
        malformed(format!(
            "the relay secret has {} bytes, not {RELAY_SECRET_LEN}",
            secret.len()
        ))
    })
}

/// The agent's place in a relay chain: its listener (whose threads feed
/// predecessors' frames into the load's queue) and its successor.
struct Relay<'scope, 'env> {
    scope: &'scope Scope<'scope, 'env>,
    events: SyncSender<Event>,
    connections: Arc<Connections>,
    listening: bool,
    /// RelayConnects so far: only the latest one's outcome counts.
    attempt: u64,
    successor: Option<Successor>,
}

impl<'scope, 'env> Relay<'scope, 'env> {
    fn new(scope: &'scope Scope<'scope, 'env>, events: SyncSender<Event>) -> Self {
        Relay {
            scope,
            events,
            connections: Arc::default(),
            listening: false,
            attempt: 0,
            successor: None,
        }
    }

    /// Open the listener; its thread accepts until the load ends.
    fn listen(
        &mut self,
        secret: &[u8],
        bind: &str,
        port_min: u16,
        port_max: u16,
    ) -> Result<u16, AgentError> {
        if self.listening {
            return Err(malformed("a second RelayListen in one load".into()));
        }
        let secret = relay_secret(secret)?;
        let listener = bind_relay(bind, port_min, port_max)?;
        let port = listener
            .local_addr()
            .and_then(|a| listener.set_nonblocking(true).map(|()| a.port()))
            .map_err(|e| AgentError::Relay(format!("cannot set up the relay listener: {e}")))?;
        self.listening = true;
        let scope = self.scope;
        let connections = Arc::clone(&self.connections);
        let events = self.events.clone();
        self.scope
            .spawn(move || accept_relays(scope, listener, secret, connections, events));
        Ok(port)
    }

    /// Drop the successor and link to another in the background: the load
    /// goes on meanwhile, and `linked` gets the outcome.
    fn connect(&mut self, secret: &[u8], addr: String, port: u16) -> Result<(), AgentError> {
        let secret = relay_secret(secret)?;
        self.successor = None;
        self.attempt += 1;
        let attempt = self.attempt;
        let connections = Arc::clone(&self.connections);
        let events = self.events.clone();
        self.scope.spawn(move || {
            let result = link_successor(&addr, port, &secret, &connections);
            let _ = events.send(Event::Linked {
                attempt,
                addr,
                port,
                result,
            });
        });
        Ok(())
    }

    /// A RelayConnect's outcome: the reply for the controller, unless a
    /// later RelayConnect superseded it (its link then just closes).
    fn linked(
        &mut self,
        attempt: u64,
        addr: String,
        port: u16,
        result: Result<TcpStream, String>,
    ) -> Option<Msg> {
        if attempt != self.attempt {
            return None;
        }
        Some(
            match result.and_then(|stream| self.install(stream, attempt, format!("{addr}:{port}")))
            {
                Ok(()) => Msg::RelayLinked { addr, port },
                Err(reason) => Msg::RelayLost {
                    peer: format!("{addr}:{port}"),
                    reason,
                },
            },
        )
    }

    fn install(&mut self, stream: TcpStream, attempt: u64, peer: String) -> Result<(), String> {
        let watched = stream
            .set_write_timeout(Some(RELAY_TIMEOUT))
            .and_then(|()| stream.set_read_timeout(None))
            .and_then(|()| stream.set_nodelay(true))
            .and_then(|()| stream.try_clone())
            .map_err(|e| format!("cannot set up the successor link: {e}"))?;
        let events = self.events.clone();
        self.scope
            .spawn(move || watch_successor(watched, attempt, events));
        self.successor = Some(Successor {
            stream,
            attempt,
            peer,
        });
        Ok(())
    }

    /// The link of RelayConnect `attempt` broke: the RelayLost to send if it
    /// is still the successor.
    fn successor_gone(&mut self, attempt: u64, reason: String) -> Option<Msg> {
        if self.successor.as_ref()?.attempt != attempt {
            return None;
        }
        let peer = self.successor.as_ref()?.peer.clone();
        self.successor = None;
        Some(Msg::RelayLost { peer, reason })
    }

    /// Send a frame to the successor, if any. On failure the successor is
    /// dropped and the RelayLost for the controller returned.
    fn forward(
        &mut self,
        write: impl FnOnce(&mut TcpStream) -> Result<(), ProtocolError>,
    ) -> Option<Msg> {
        let successor = self.successor.as_mut()?;
        let e = write(&mut successor.stream).err()?;
        let peer = successor.peer.clone();
        self.successor = None;
        let reason = match e {
            ProtocolError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                "successor stalled".to_string()
            }
            e => format!("successor link failed: {e}"),
        };
        Some(Msg::RelayLost { peer, reason })
    }
}

impl Drop for Relay<'_, '_> {
    /// The load is over: close the successor link, the listener and every
    /// relay connection, so their threads end.
    fn drop(&mut self) {
        self.successor = None;
        self.connections.close_all();
    }
}

/// The link to the next node of the chain.
struct Successor {
    stream: TcpStream,
    attempt: u64,
    /// `addr:port`, named in RelayLost.
    peer: String,
}

impl Drop for Successor {
    /// Shut down, not just close: the watching thread holds a clone.
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Relay sockets that threads block on (handshakes, predecessors), so the
/// end of the load can shut them all down.
#[derive(Default)]
struct Connections {
    table: Mutex<ConnectionTable>,
}

#[derive(Default)]
struct ConnectionTable {
    closed: bool,
    last_id: u64,
    open: HashMap<u64, TcpStream>,
}

impl Connections {
    fn table(&self) -> std::sync::MutexGuard<'_, ConnectionTable> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Track a socket; refused once the load is over or `limit` are open.
    fn add(&self, stream: &TcpStream, limit: usize) -> Result<u64, String> {
        let clone = stream
            .try_clone()
            .map_err(|e| format!("cannot track the connection: {e}"))?;
        let mut table = self.table();
        if table.closed {
            return Err("the load is over".into());
        }
        if table.open.len() >= limit {
            return Err(format!("too many relay connections (at most {limit})"));
        }
        table.last_id += 1;
        let id = table.last_id;
        table.open.insert(id, clone);
        Ok(id)
    }

    fn remove(&self, id: u64) {
        self.table().open.remove(&id);
    }

    fn closed(&self) -> bool {
        self.table().closed
    }

    fn close_all(&self) {
        let mut table = self.table();
        table.closed = true;
        for stream in table.open.values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        table.open.clear();
    }
}

/// Bind `bind` ("" = 0.0.0.0) on the first free port of the range; (0, 0)
/// takes any free port.
fn bind_relay(bind: &str, port_min: u16, port_max: u16) -> Result<TcpListener, AgentError> {
    let ip: IpAddr = if bind.is_empty() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        bind.parse().map_err(|_| {
            AgentError::Relay(format!(
                "cannot open the relay listener on {bind:?}: not an IP address"
            ))
        })?
    };
    if port_min > port_max {
        return Err(malformed(format!(
            "RelayListen port range {port_min} to {port_max} is empty"
        )));
    }
    let ports = if port_max == 0 {
        0..=0
    } else {
        port_min.max(1)..=port_max
    };
    let mut last = None;
    for port in ports {
        match TcpListener::bind((ip, port)) {
            Ok(listener) => return Ok(listener),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied
                ) =>
            {
                last = Some(e);
            }
            Err(e) => {
                return Err(AgentError::Relay(format!(
                    "cannot open the relay listener on {ip} port {port}: {e}"
                )));
            }
        }
    }
    Err(AgentError::Relay(format!(
        "cannot open the relay listener on {ip}: no free port from {port_min} to {port_max}{}",
        last.map(|e| format!(" ({e})")).unwrap_or_default()
    )))
}

/// The listening thread: accept until the load is over, one thread per
/// connection.
fn accept_relays<'scope>(
    scope: &'scope Scope<'scope, '_>,
    listener: TcpListener,
    secret: Secret,
    connections: Arc<Connections>,
    events: SyncSender<Event>,
) {
    while !connections.closed() {
        if !wait_readable(&listener, ACCEPT_POLL) {
            continue;
        }
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            // Out of descriptors, say: try again later rather than spin.
            Err(_) => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        let peer = peer.to_string();
        let tracked = stream
            .set_nonblocking(false)
            .map_err(|e| format!("cannot set up the connection: {e}"))
            .and_then(|()| connections.add(&stream, MAX_RELAY_CONNECTIONS));
        match tracked {
            Ok(id) => {
                let connections = Arc::clone(&connections);
                let events = events.clone();
                scope.spawn(move || {
                    relay_predecessor(&stream, &peer, &secret, &events);
                    connections.remove(id);
                });
            }
            Err(reason) => {
                let _ = stream.shutdown(Shutdown::Both);
                if events.send(Event::Refused { peer, reason }).is_err() {
                    return;
                }
            }
        }
    }
}

/// Wait until the listener has a connection to accept, at most `timeout`.
fn wait_readable(listener: &TcpListener, timeout: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one pollfd, valid for the call, on a descriptor we own.
    unsafe { libc::poll(&mut fd, 1, millis) > 0 }
}

/// One incoming connection: authenticate it, then pass its StreamChunk and
/// StreamEnd frames to the main loop until it ends.
fn relay_predecessor(stream: &TcpStream, peer: &str, secret: &Secret, events: &SyncSender<Event>) {
    let refuse = |reason: String| {
        let _ = stream.shutdown(Shutdown::Both);
        let _ = events.send(Event::Refused {
            peer: peer.to_string(),
            reason,
        });
    };
    if let Err(reason) = accept_handshake(stream, secret) {
        return refuse(reason);
    }
    // A predecessor may be quiet for long (the Missing phase, a slow
    // controller): no read timeout from here on.
    if let Err(e) = stream.set_read_timeout(None) {
        return refuse(format!("cannot set up the connection: {e}"));
    }
    let mut input = BufReader::with_capacity(RELAY_READ_BUFFER, stream);
    loop {
        match read_msg_sync(&mut input) {
            Ok(msg @ (Msg::StreamChunk { .. } | Msg::StreamEnd)) => {
                let relayed = Event::Relayed {
                    peer: peer.to_string(),
                    msg,
                };
                if events.send(relayed).is_err() {
                    return;
                }
            }
            Ok(other) => {
                return refuse(format!("unexpected {} on a relay connection", other.name()));
            }
            // The predecessor went away, or the load is over: a relink or
            // the end of the chain, nothing to report.
            Err(ProtocolError::Closed | ProtocolError::Io(_)) => return,
            Err(e) => return refuse(e.to_string()),
        }
    }
}

/// Watch the successor link for its end: a successor never sends anything.
fn watch_successor(stream: TcpStream, attempt: u64, events: SyncSender<Event>) {
    let mut byte = [0u8; 1];
    let reason = loop {
        match (&stream).read(&mut byte) {
            Ok(0) => break "the successor closed the connection".to_string(),
            Ok(_) => break "the successor sent data on the relay link".to_string(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break format!("successor link failed: {e}"),
        }
    };
    let _ = stream.shutdown(Shutdown::Both);
    let _ = events.send(Event::SuccessorGone { attempt, reason });
}

/// Connect to the next node and authenticate, within [`RELAY_TIMEOUT`]
/// each. The socket is tracked meanwhile so the end of the load cuts it.
fn link_successor(
    addr: &str,
    port: u16,
    secret: &Secret,
    connections: &Connections,
) -> Result<TcpStream, String> {
    let fail = |what: String| format!("cannot link to {addr} port {port}: {what}");
    let candidates: Vec<SocketAddr> = (addr, port)
        .to_socket_addrs()
        .map_err(|e| fail(e.to_string()))?
        .collect();
    let deadline = Instant::now() + RELAY_TIMEOUT;
    let mut error = fail("no address".into());
    let mut connected = None;
    for candidate in candidates {
        let Some(left) = time_left(deadline) else {
            error = fail("connection timed out".into());
            break;
        };
        match TcpStream::connect_timeout(&candidate, left) {
            Ok(stream) => {
                connected = Some(stream);
                break;
            }
            Err(e) => error = fail(e.to_string()),
        }
    }
    let stream = connected.ok_or(error)?;
    let id = connections.add(&stream, usize::MAX).map_err(fail)?;
    let shaken = connect_handshake(&stream, secret);
    connections.remove(id);
    shaken.map_err(fail)?;
    Ok(stream)
}

/// blake3 keyed with the secret over `role ‖ first ‖ second`: what each side
/// shows to prove it holds the secret (`L` the listener, `C` the connector).
fn proof(secret: &Secret, role: u8, first: &[u8; 16], second: &[u8; 16]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new_keyed(secret);
    hasher.update(&[role]);
    hasher.update(first);
    hasher.update(second);
    hasher.finalize()
}

fn nonce() -> [u8; 16] {
    let mut nonce = [0u8; 16];
    fastrand::fill(&mut nonce);
    nonce
}

/// The listener's side: the connector's magic, version and nonce; ours and
/// our proof; the connector's proof. Err is the reason for RelayRefused.
fn accept_handshake(stream: &TcpStream, secret: &Secret) -> Result<(), String> {
    let deadline = Instant::now() + RELAY_TIMEOUT;
    let mut magic = [0u8; 8];
    read_by(stream, &mut magic, deadline).map_err(handshake_error)?;
    if magic != RELAY_MAGIC {
        return Err("not a relay peer".into());
    }
    let mut version = [0u8; 1];
    read_by(stream, &mut version, deadline).map_err(handshake_error)?;
    if version[0] != RELAY_VERSION {
        return Err(format!(
            "relay version {}, this agent speaks {RELAY_VERSION}",
            version[0]
        ));
    }
    let mut nonce_c = [0u8; 16];
    read_by(stream, &mut nonce_c, deadline).map_err(handshake_error)?;
    let nonce_l = nonce();
    write_by(stream, &nonce_l, deadline).map_err(handshake_error)?;
    let ours = proof(secret, b'L', &nonce_c, &nonce_l);
    write_by(stream, ours.as_bytes(), deadline).map_err(handshake_error)?;
    let mut theirs = [0u8; 32];
    read_by(stream, &mut theirs, deadline).map_err(|e| {
        if hung_up(&e) {
            "the peer hung up instead of proving it holds the secret (a different secret?)"
                .to_string()
        } else {
            handshake_error(e)
        }
    })?;
    // blake3::Hash compares in constant time.
    if blake3::Hash::from_bytes(theirs) != proof(secret, b'C', &nonce_l, &nonce_c) {
        return Err("bad secret".into());
    }
    Ok(())
}

/// The connector's side of [`accept_handshake`].
fn connect_handshake(stream: &TcpStream, secret: &Secret) -> Result<(), String> {
    let deadline = Instant::now() + RELAY_TIMEOUT;
    let nonce_c = nonce();
    let mut hello = [0u8; 25];
    hello[..8].copy_from_slice(&RELAY_MAGIC);
    hello[8] = RELAY_VERSION;
    hello[9..].copy_from_slice(&nonce_c);
    write_by(stream, &hello, deadline).map_err(handshake_error)?;
    let mut nonce_l = [0u8; 16];
    let mut theirs = [0u8; 32];
    read_by(stream, &mut nonce_l, deadline)
        .and_then(|()| read_by(stream, &mut theirs, deadline))
        .map_err(|e| {
            if hung_up(&e) {
                "the listener hung up during the handshake (not a relay listener?)".to_string()
            } else {
                handshake_error(e)
            }
        })?;
    if blake3::Hash::from_bytes(theirs) != proof(secret, b'L', &nonce_c, &nonce_l) {
        return Err("bad secret: the listener does not hold this run's secret".into());
    }
    let ours = proof(secret, b'C', &nonce_l, &nonce_c);
    write_by(stream, ours.as_bytes(), deadline).map_err(handshake_error)
}

/// The other side closed (a reset if it left our bytes unread).
fn hung_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

fn handshake_error(e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "handshake timed out".into(),
        _ if hung_up(&e) => "connection closed during the handshake".into(),
        _ => format!("handshake failed: {e}"),
    }
}

fn time_left(deadline: Instant) -> Option<Duration> {
    Some(deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero())
}

fn timed_out() -> io::Error {
    io::ErrorKind::TimedOut.into()
}

/// `read_exact` that gives up at `deadline`, however the bytes trickle in.
fn read_by(stream: &TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        stream.set_read_timeout(Some(time_left(deadline).ok_or_else(timed_out)?))?;
        match (&*stream).read(&mut buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `write_all` that gives up at `deadline`.
fn write_by(stream: &TcpStream, buf: &[u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        stream.set_write_timeout(Some(time_left(deadline).ok_or_else(timed_out)?))?;
        match (&*stream).write(&buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- stamps

/// What a complete load leaves behind, so the next load of the same image
/// onto an unchanged file can answer "up to date" without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    identity: u128,
    size: u64,
    mtime_ns: i128,
    inode: u64,
    dev: u64,
    target: String,
    /// The loaded image's name; "" if unknown. Not part of what makes a
    /// stamp match: the same identity under another name is the same data.
    image: String,
}

impl Stamp {
    fn of(meta: &Metadata, identity: u128, target: &str, image: &str) -> Stamp {
        Stamp {
            identity,
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            inode: meta.ino(),
            dev: meta.dev(),
            target: target.to_string(),
            // One line per field: a name that cannot be one line is not kept.
            image: if image.contains(['\n', '\r']) {
                String::new()
            } else {
                image.to_string()
            },
        }
    }

    fn encode(&self) -> String {
        let image = if self.image.is_empty() {
            String::new()
        } else {
            format!("image {}\n", self.image)
        };
        format!(
            "imaging-stamp 1\nidentity {:032x}\nsize {}\nmtime_ns {}\ninode {}\ndev {}\ntarget {}\n{image}end\n",
            self.identity, self.size, self.mtime_ns, self.inode, self.dev, self.target
        )
    }

    /// Anything unexpected is no stamp.
    fn decode(text: &str) -> Option<Stamp> {
        let mut lines = text.lines();
        if lines.next()? != "imaging-stamp 1" {
            return None;
        }
        let mut field = |name: &str| {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' '))
        };
        let mut stamp = Stamp {
            identity: u128::from_str_radix(field("identity")?, 16).ok()?,
            size: field("size")?.parse().ok()?,
            mtime_ns: field("mtime_ns")?.parse().ok()?,
            inode: field("inode")?.parse().ok()?,
            dev: field("dev")?.parse().ok()?,
            target: field("target")?.to_string(),
            image: String::new(),
        };
        let mut last = lines.next()?;
        // Optional (stamps written before it existed lack it).
        if let Some(image) = last.strip_prefix("image ") {
            stamp.image = image.to_string();
            last = lines.next()?;
        }
        (last == "end" && lines.next().is_none()).then_some(stamp)
    }
}

/// The stamp of one target file: `<stamp_dir>/<xxh3-128 of its path>.stamp`.
struct StampFile {
    path: PathBuf,
    /// The target's canonical path, recorded in the stamp.
    key: String,
}

impl StampFile {
    fn new(env: &AgentEnv, target: &Target) -> StampFile {
        let key = std::fs::canonicalize(&target.name)
            .unwrap_or_else(|_| PathBuf::from(&target.name))
            .to_string_lossy()
            .into_owned();
        let hash = xxhash_rust::xxh3::xxh3_128(Path::new(&key).as_os_str().as_bytes());
        StampFile {
            path: env.stamp_dir.join(format!("{hash:032x}.stamp")),
            key,
        }
    }

    fn matches(&self, target: &Target, req: &LoadRequest) -> bool {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return false;
        };
        let Some(stamp) = Stamp::decode(&text) else {
            return false;
        };
        let Ok(meta) = target.file.metadata() else {
            return false;
        };
        stamp.size == req.layout.size
            && stamp == Stamp::of(&meta, req.identity, &self.key, &stamp.image)
    }

    /// What the stamp says was last loaded, whether or not the target
    /// changed since (a save records it as the image the node held).
    fn held(&self) -> Option<HeldImage> {
        let stamp = Stamp::decode(&std::fs::read_to_string(&self.path).ok()?)?;
        Some(HeldImage {
            identity: stamp.identity,
            image: stamp.image,
        })
    }

    fn remove(&self) -> Result<(), AgentError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AgentError::Target(format!(
                "cannot remove the load stamp {}: {e}",
                self.path.display()
            ))),
        }
    }

    /// Best effort: without a stamp the next load only reads more.
    fn write(&self, target: &Target, req: &LoadRequest) {
        if let Err(e) = self.try_write(target, req) {
            eprintln!(
                "imaging agent: warning: cannot write the load stamp {}: {e}",
                self.path.display()
            );
        }
    }

    fn try_write(&self, target: &Target, req: &LoadRequest) -> io::Result<()> {
        // Read after every write and the sync, so the stamp sees the final mtime.
        let meta = target.file.metadata()?;
        settle_past(&meta);
        let stamp = Stamp::of(&meta, req.identity, &self.key, &req.image);
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = self
            .path
            .with_extension(format!("stamp.tmp{}", std::process::id()));
        let written = write_synced(&tmp, stamp.encode().as_bytes())
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// File times come from a clock that may lag by a tick: a write in the
/// same tick as the last load write could leave the mtime unchanged and the
/// stamp wrongly valid. Wait until any later write must get a later mtime
/// (git's "racy clean" problem). Loads end with an fsync, so this rarely waits.
fn settle_past(meta: &Metadata) {
    const TICK_MARGIN: Duration = Duration::from_millis(25);
    const LONGEST_WAIT: Duration = Duration::from_millis(100);
    let Ok(mtime) = meta.modified() else {
        return;
    };
    if let Ok(ahead) = (mtime + TICK_MARGIN).duration_since(SystemTime::now()) {
        std::thread::sleep(ahead.min(LONGEST_WAIT));
    }
}

// ---------------------------------------------------------------- save

fn save<W: Write>(
    out: &mut Replies<W>,
    env: &AgentEnv,
    target: &str,
    chunk_size: u32,
    level: i32,
) -> Result<(), AgentError> {
    check_chunk_size(chunk_size)?;
    let target = open_save_target(target)?;
    let layout = Layout::new(target.old_len, chunk_size)?;
    let held = (target.kind == TargetKind::File)
        .then(|| StampFile::new(env, &target).held())
        .flatten();
    out.reply(&Msg::SaveInfo {
        size: layout.size,
        held,
    })?;

    let level = level.min(*zstd::compression_level_range().end());
    let zero_digests = ZeroDigests::new(&layout);
    let workers = WORKERS.min(layout.chunks).max(1);
    std::thread::scope(|s| {
        // One queue per worker, worker w taking chunks w, w+workers, …: the
        // chunks leave in order and memory stays bounded.
        let queues: Vec<Receiver<Result<Msg, AgentError>>> = (0..workers)
            .map(|w| {
                let (tx, rx) = sync_channel(RECEIVE_QUEUE / workers);
                let (target, zero_digests) = (&target, &zero_digests);
                s.spawn(move || save_worker(target, layout, level, zero_digests, w, workers, tx));
                rx
            })
            .collect();
        for i in 0..layout.chunks {
            match queues[i % workers].recv() {
                Ok(Ok(msg)) => out.send(&msg)?,
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(AgentError::Target(format!(
                        "reading {} stopped at chunk {i}",
                        target.name
                    )));
                }
            }
        }
        Ok(())
    })?;
    out.reply(&Msg::SaveEnd)
}

fn open_save_target(name: &str) -> Result<Target, AgentError> {
    let mut file =
        File::open(name).map_err(|e| AgentError::Target(format!("cannot open {name}: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| AgentError::Target(format!("cannot stat {name}: {e}")))?;
    let (kind, size) = if meta.is_file() {
        (TargetKind::File, meta.len())
    } else if meta.file_type().is_block_device() {
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| AgentError::Target(format!("cannot size {name}: {e}")))?;
        (TargetKind::Block, size)
    } else {
        return Err(not_usable(name, &meta));
    };
    Ok(Target {
        file,
        kind,
        name: name.to_string(),
        old_len: size,
    })
}

/// Digests of the all-zero chunks: one per chunk length (full and last).
struct ZeroDigests {
    full: (usize, ChunkDigest),
    last: (usize, ChunkDigest),
}

impl ZeroDigests {
    fn new(layout: &Layout) -> ZeroDigests {
        let full_len = layout.chunk_size as usize;
        let full = (full_len, chunk_digest(&vec![0u8; full_len]));
        let last_len = layout
            .chunks
            .checked_sub(1)
            .map_or(0, |i| layout.chunk_len(i));
        let last = if last_len == full_len {
            full
        } else {
            (last_len, chunk_digest(&vec![0u8; last_len]))
        };
        ZeroDigests { full, last }
    }

    fn get(&self, len: usize) -> ChunkDigest {
        if len == self.full.0 {
            self.full.1
        } else if len == self.last.0 {
            self.last.1
        } else {
            chunk_digest(&vec![0u8; len])
        }
    }
}

fn save_worker(
    target: &Target,
    layout: Layout,
    level: i32,
    zero_digests: &ZeroDigests,
    first: usize,
    step: usize,
    tx: SyncSender<Result<Msg, AgentError>>,
) {
    let mut compressor = if level > 0 {
        match zstd::bulk::Compressor::new(level) {
            Ok(c) => Some(c),
            Err(e) => {
                let _ = tx.send(Err(AgentError::Target(format!(
                    "cannot start zstd at level {level}: {e}"
                ))));
                return;
            }
        }
    } else {
        None
    };
    let mut buf = Vec::new();
    for i in (first..layout.chunks).step_by(step) {
        let msg = save_chunk(
            target,
            &layout,
            i,
            zero_digests,
            compressor.as_mut(),
            &mut buf,
        );
        let failed = msg.is_err();
        if tx.send(msg).is_err() || failed {
            return;
        }
    }
}

fn save_chunk(
    target: &Target,
    layout: &Layout,
    i: usize,
    zero_digests: &ZeroDigests,
    compressor: Option<&mut zstd::bulk::Compressor<'static>>,
    buf: &mut Vec<u8>,
) -> Result<Msg, AgentError> {
    let offset = layout.offset(i);
    let len = layout.chunk_len(i);
    // Fewer than 2^32 chunks: checked by Layout::new.
    let index = i as u32;
    let zero_chunk = || Msg::SaveChunk {
        index,
        digest: zero_digests.get(len),
        zero: true,
        codec: Codec::Raw,
        data: vec![],
    };
    if target.is_hole(offset, len) {
        return Ok(zero_chunk());
    }
    buf.resize(len, 0);
    let data = &mut buf[..len];
    target.read_at(data, offset)?;
    if is_zero(data) {
        return Ok(zero_chunk());
    }
    let digest = chunk_digest(data);
    let packed = compressor
        .and_then(|c| c.compress(data).ok())
        .filter(|packed| packed.len() < len);
    let (codec, data) = match packed {
        Some(packed) => (Codec::Zstd, packed),
        None => (Codec::Raw, data.to_vec()),
    };
    Ok(Msg::SaveChunk {
        index,
        digest,
        zero: false,
        codec,
        data,
    })
}

// ---------------------------------------------------------------- mounts

type DevNum = (u32, u32);

/// Major and minor numbers of a `st_rdev` (glibc's encoding).
fn dev_numbers(rdev: u64) -> DevNum {
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
    (major as u32, minor as u32)
}

fn parse_dev_numbers(text: &str) -> Option<DevNum> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    dev: DevNum,
    mount_point: String,
    /// The mount source (`/dev/sda1`), which names the device even where
    /// `dev` does not (btrfs reports an anonymous device number).
    source: String,
}

/// `/proc/self/mountinfo`: `id parent major:minor root mount-point options
/// [optional…] - fstype source super-options`. Lines that do not parse are
/// skipped.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dev = parse_dev_numbers(fields.get(2)?)?;
            let mount_point = unescape(fields.get(4)?);
            let source = fields
                .iter()
                .skip(6)
                .position(|f| *f == "-")
                .and_then(|p| fields.get(6 + p + 2))
                .map(|s| unescape(s))
                .unwrap_or_default();
            Some(Mount {
                dev,
                mount_point,
                source,
            })
        })
        .collect()
}

/// `/proc/swaps`: a header, then `Filename Type Size Used Priority`.
fn parse_swaps(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| !line.starts_with("Filename"))
        .filter_map(|line| line.split_whitespace().next())
        .map(unescape)
        .collect()
}

/// Undo the kernel's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| {
            bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A block device and its partitions, each with a name for messages.
fn device_family(name: &str, dev: DevNum) -> Vec<(DevNum, String)> {
    let mut family = vec![(dev, name.to_string())];
    let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", dev.0, dev.1));
    if let Ok(entries) = std::fs::read_dir(&sys) {
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.join("partition").is_file() {
                continue;
            }
            let Some(part) = std::fs::read_to_string(path.join("dev"))
                .ok()
                .and_then(|t| parse_dev_numbers(&t))
            else {
                continue;
            };
            family.push((
                part,
                format!("partition {}", entry.file_name().to_string_lossy()),
            ));
        }
    }
    family
}

/// Everything that uses one of `family`: mounts, swap, holders
/// (device-mapper, RAID). `dev_of` gives a path's block device numbers.
fn users_of(
    family: &[(DevNum, String)],
    mounts: &[Mount],
    swaps: &[String],
    holders: &[(DevNum, String)],
    dev_of: impl Fn(&str) -> Option<DevNum>,
) -> Vec<String> {
    let member = |dev: Option<DevNum>| {
        dev.and_then(|d| family.iter().find(|(f, _)| *f == d))
            .map(|(_, name)| name.as_str())
    };
    let mut users = Vec::new();
    for m in mounts {
        let source_dev = || {
            m.source
                .starts_with("/dev/")
                .then(|| dev_of(&m.source))
                .flatten()
        };
        if let Some(name) = member(Some(m.dev)).or_else(|| member(source_dev())) {
            users.push(format!("{name} is mounted on {}", m.mount_point));
        }
    }
    for s in swaps {
        if let Some(name) = member(dev_of(s)) {
            users.push(format!("{name} is used as swap"));
        }
    }
    for (dev, holder) in holders {
        if let Some(name) = member(Some(*dev)) {
            users.push(format!("{name} is held by {holder}"));
        }
    }
    users
}

/// Holders (`/sys/dev/block/M:m/holders/*`) of each member of a family.
fn holders_of(family: &[(DevNum, String)]) -> Vec<(DevNum, String)> {
    let mut holders = Vec::new();
    for (dev, _) in family {
        let dir = format!("/sys/dev/block/{}:{}/holders", dev.0, dev.1);
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                holders.push((*dev, entry.file_name().to_string_lossy().into_owned()));
            }
        }
    }
    holders
}

fn block_dev_of(path: &str) -> Option<DevNum> {
    let meta = std::fs::metadata(path).ok()?;
    meta.file_type()
        .is_block_device()
        .then(|| dev_numbers(meta.rdev()))
}

/// Refuse a block device that is mounted, used as swap or held, itself or
/// through a partition.
fn refuse_if_in_use(name: &str, rdev: u64) -> Result<(), AgentError> {
    let family = device_family(name, dev_numbers(rdev));
    let mounts =
        parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    let swaps = parse_swaps(&std::fs::read_to_string("/proc/swaps").unwrap_or_default());
    let holders = holders_of(&family);
    let users = users_of(&family, &mounts, &swaps, &holders, block_dev_of);
    if users.is_empty() {
        Ok(())
    } else {
        Err(AgentError::Target(format!(
            "refusing to write {name}: it is mounted or in use: {} (force_mounted overrides)",
            users.join("; ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{MAGIC, VERSION};
    use std::os::unix::net::UnixStream;

    const CS: u32 = MIN_CHUNK_SIZE;
    const CSU: usize = CS as usize;

    /// A test image: one letter per full chunk (`z` zeros, `r` random,
    /// `t` compressible text), then `tail` random bytes.
    struct Image {
        data: Vec<u8>,
    }

    impl Image {
        fn new(pattern: &str, tail: usize, seed: u64) -> Image {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut data = Vec::new();
            for (i, c) in pattern.chars().enumerate() {
                let mut chunk = vec![0u8; CSU];
                match c {
                    'z' => {}
                    'r' => rng.fill(&mut chunk),
                    _ => {
                        let text: Vec<u8> = (0..)
                            .flat_map(|n| {
                                format!("line {n} of chunk {i} seed {seed}\n").into_bytes()
                            })
                            .take(CSU)
                            .collect();
                        chunk.copy_from_slice(&text);
                    }
                }
                data.extend(chunk);
            }
            let mut t = vec![0u8; tail];
            rng.fill(&mut t);
            data.extend(t);
            Image { data }
        }

        fn layout(&self) -> Layout {
            Layout::new(self.data.len() as u64, CS).unwrap()
        }

        fn chunk_data(&self, i: usize) -> &[u8] {
            let l = self.layout();
            let at = l.offset(i) as usize;
            &self.data[at..at + l.chunk_len(i)]
        }

        fn digests(&self) -> Vec<u128> {
            (0..self.layout().chunks)
                .map(|i| chunk_digest(self.chunk_data(i)))
                .collect()
        }

        fn zero_bitmap(&self) -> Vec<u8> {
            let n = self.layout().chunks;
            let mut b = vec![0; bitmap_len(n)];
            for i in 0..n {
                if is_zero(self.chunk_data(i)) {
                    set_bit(&mut b, i);
                }
            }
            b
        }

        fn identity(&self) -> u128 {
            let bytes: Vec<u8> = self
                .digests()
                .iter()
                .flat_map(|d| d.to_le_bytes())
                .collect();
            xxhash_rust::xxh3::xxh3_128(&bytes)
        }

        fn begin(&self, target: &Path, force: bool) -> Msg {
            Msg::LoadBegin {
                target: target.to_string_lossy().into_owned(),
                size: self.data.len() as u64,
                chunk_size: CS,
                identity: self.identity(),
                force,
                force_mounted: false,
                digests: self.digests(),
                zero: self.zero_bitmap(),
                image: "test.img".into(),
            }
        }

        /// Even chunks travel compressed, odd ones raw.
        fn chunk(&self, i: usize) -> Msg {
            let raw = self.chunk_data(i);
            let (codec, data) = if i.is_multiple_of(2) {
                (Codec::Zstd, zstd::bulk::compress(raw, 3).unwrap())
            } else {
                (Codec::Raw, raw.to_vec())
            };
            Msg::Chunk {
                index: i as u32,
                codec,
                data,
            }
        }

        fn data_chunks(&self) -> Vec<usize> {
            (0..self.layout().chunks)
                .filter(|&i| !is_zero(self.chunk_data(i)))
                .collect()
        }

        fn bytes_of(&self, chunks: &[usize]) -> u64 {
            chunks
                .iter()
                .map(|&i| self.layout().chunk_len(i) as u64)
                .sum()
        }

        /// Begin, the given chunks, Finish.
        fn load(&self, target: &Path, force: bool, chunks: &[usize]) -> Vec<Msg> {
            let mut msgs = vec![self.begin(target, force)];
            msgs.extend(chunks.iter().map(|&i| self.chunk(i)));
            msgs.push(Msg::Finish);
            msgs
        }
    }

    fn env(dir: &tempfile::TempDir) -> AgentEnv {
        AgentEnv {
            stamp_dir: dir.path().join("stamps"),
        }
    }

    fn encode(msgs: &[Msg]) -> Vec<u8> {
        let mut buf = Vec::new();
        for m in msgs {
            write_msg_sync(&mut buf, m).unwrap();
        }
        buf
    }

    fn decode_all(mut out: &[u8]) -> Vec<Msg> {
        let mut msgs = Vec::new();
        loop {
            match read_msg_sync(&mut out) {
                Ok(m) => msgs.push(m),
                Err(ProtocolError::Closed) => return msgs,
                Err(e) => panic!("the agent sent a bad frame: {e}"),
            }
        }
    }

    fn run_bytes(env: &AgentEnv, input: &[u8]) -> (Result<(), AgentError>, Vec<Msg>) {
        let mut out = Vec::new();
        let result = serve(input, &mut out, env);
        let replies = decode_all(&out);
        assert_eq!(
            replies.first(),
            Some(&Msg::hello()),
            "the agent greets first"
        );
        if let Err(e) = &result
            && !matches!(e, AgentError::Peer(_))
        {
            assert_eq!(
                replies.last(),
                Some(&Msg::Error {
                    message: e.to_string()
                }),
                "the controller is told why"
            );
        }
        (result, replies)
    }

    /// A controller's Hello, then `msgs`, then the end of the stream.
    fn run(env: &AgentEnv, msgs: &[Msg]) -> (Result<(), AgentError>, Vec<Msg>) {
        let mut all = vec![Msg::hello()];
        all.extend_from_slice(msgs);
        run_bytes(env, &encode(&all))
    }

    fn needed(replies: &[Msg]) -> (bool, Vec<u8>, u64) {
        match &replies[1] {
            Msg::Needed {
                up_to_date,
                bitmap,
                bytes_written,
            } => (*up_to_date, bitmap.clone(), *bytes_written),
            other => panic!("expected Needed, got {other:?}"),
        }
    }

    fn bits(bitmap: &[u8], n: usize) -> Vec<usize> {
        (0..n).filter(|&i| bit(bitmap, i)).collect()
    }

    fn stamps(env: &AgentEnv) -> usize {
        std::fs::read_dir(&env.stamp_dir).map_or(0, |d| d.count())
    }

    fn err_of(result: Result<(), AgentError>) -> AgentError {
        match result {
            Ok(()) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn load_onto_missing_file_writes_image_with_holes() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rzzzzztzzzzzrzzzzzzzzzzzzzzzzz", 1000, 1);
        let data = image.data_chunks();
        assert_eq!(data, vec![0, 6, 12, 30]);

        let (result, replies) = run(&env, &image.load(&target, false, &data));
        result.unwrap();

        let (up_to_date, bitmap, zeroed) = needed(&replies);
        assert!(!up_to_date);
        assert_eq!(bits(&bitmap, image.layout().chunks), data);
        assert_eq!(zeroed, 0);
        let mut total = 0;
        for (reply, &i) in replies[2..].iter().zip(&data) {
            total += image.layout().chunk_len(i) as u64;
            assert_eq!(
                *reply,
                Msg::Written {
                    index: i as u32,
                    bytes_written: total
                }
            );
        }
        assert_eq!(replies.len(), 2 + data.len() + 1);
        assert_eq!(
            replies.last(),
            Some(&Msg::Finished {
                bytes_written: image.bytes_of(&data)
            })
        );

        let written = std::fs::read(&target).unwrap();
        assert_eq!(written.len(), image.data.len());
        assert!(written == image.data, "target bytes differ from the image");
        let meta = std::fs::metadata(&target).unwrap();
        assert!(
            meta.blocks() * 512 < meta.len() / 2,
            "zero chunks should be holes: {} blocks for {} bytes",
            meta.blocks(),
            meta.len()
        );
        assert_eq!(stamps(&env), 1);
    }

    #[test]
    fn second_load_of_same_image_is_up_to_date() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rtzr", 333, 2);
        run(&env, &image.load(&target, false, &image.data_chunks()))
            .0
            .unwrap();

        // The controller may simply hang up…
        let (result, replies) = run(&env, &[image.begin(&target, false)]);
        result.unwrap();
        assert_eq!(replies.len(), 2);
        assert_eq!(needed(&replies), (true, vec![], 0));

        // …or finish.
        let (result, replies) = run(&env, &[image.begin(&target, false), Msg::Finish]);
        result.unwrap();
        assert_eq!(
            replies[1..],
            [
                Msg::Needed {
                    up_to_date: true,
                    bitmap: vec![],
                    bytes_written: 0
                },
                Msg::Finished { bytes_written: 0 }
            ]
        );

        // Another image onto the same file is not up to date.
        let other = Image::new("rtzr", 333, 3);
        let (result, replies) = run(&env, &other.load(&target, false, &other.data_chunks()));
        result.unwrap();
        assert!(!needed(&replies).0);
        assert!(std::fs::read(&target).unwrap() == other.data);
    }

    #[test]
    fn changed_chunks_are_the_only_ones_needed() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rtrtrtrtrt", 4321, 4);
        run(&env, &image.load(&target, false, &image.data_chunks()))
            .0
            .unwrap();

        let file = OpenOptions::new().write(true).open(&target).unwrap();
        for i in [2, 5, 10] {
            file.write_all_at(b"changed", image.layout().offset(i) + 100)
                .unwrap();
        }
        drop(file);

        let (result, replies) = run(&env, &image.load(&target, false, &[2, 5, 10]));
        result.unwrap();
        let (up_to_date, bitmap, zeroed) = needed(&replies);
        assert!(!up_to_date);
        assert_eq!(bits(&bitmap, image.layout().chunks), vec![2, 5, 10]);
        assert_eq!(zeroed, 0);
        assert!(std::fs::read(&target).unwrap() == image.data);
    }

    #[test]
    fn larger_old_file_is_truncated_and_stray_data_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rzrz", 100, 5);
        std::fs::write(&target, vec![0xaa; image.data.len() + 3 * CSU]).unwrap();

        let data = image.data_chunks();
        let (result, replies) = run(&env, &image.load(&target, false, &data));
        result.unwrap();
        let (_, bitmap, zeroed) = needed(&replies);
        assert_eq!(bits(&bitmap, image.layout().chunks), data);
        assert_eq!(zeroed, 2 * CS as u64, "chunks 1 and 3 held 0xaa");
        assert_eq!(
            replies.last(),
            Some(&Msg::Finished {
                bytes_written: zeroed + image.bytes_of(&data)
            })
        );
        let written = std::fs::read(&target).unwrap();
        assert_eq!(written.len(), image.data.len());
        assert!(written == image.data);
    }

    #[test]
    fn corrupt_chunk_fails_verification_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rrt", 0, 6);
        let old = vec![0x55; image.data.len()];
        std::fs::write(&target, &old).unwrap();

        let mut bad = image.chunk_data(1).to_vec();
        bad[17] ^= 1;
        let msgs = [
            image.begin(&target, false),
            Msg::Chunk {
                index: 1,
                codec: Codec::Raw,
                data: bad,
            },
            Msg::Finish,
        ];
        let (result, _) = run(&env, &msgs);
        let e = err_of(result);
        assert!(matches!(e, AgentError::Verify(_)), "{e:?}");
        assert_eq!(e.to_string(), "chunk 1 failed verification");
        assert_eq!(e.exit_code(), 3);
        assert!(std::fs::read(&target).unwrap() == old, "nothing written");
        assert_eq!(stamps(&env), 0);

        // Compressed data that expands to the wrong length.
        let short = zstd::bulk::compress(&image.chunk_data(2)[..1000], 3).unwrap();
        let msgs = [
            image.begin(&target, false),
            Msg::Chunk {
                index: 2,
                codec: Codec::Zstd,
                data: short,
            },
        ];
        let e = err_of(run(&env, &msgs).0);
        assert!(
            e.to_string().starts_with("chunk 2 failed verification"),
            "{e}"
        );
        // Compressed data that expands beyond a chunk.
        let long = zstd::bulk::compress(&vec![7u8; 3 * CSU], 3).unwrap();
        let msgs = [
            image.begin(&target, false),
            Msg::Chunk {
                index: 0,
                codec: Codec::Zstd,
                data: long,
            },
        ];
        let e = err_of(run(&env, &msgs).0);
        assert!(matches!(e, AgentError::Verify(_)), "{e:?}");
        assert!(std::fs::read(&target).unwrap() == old, "nothing written");
    }

    #[test]
    fn connection_lost_mid_load_leaves_no_stamp_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rtrtzrtrt", 999, 7);
        let data = image.data_chunks();

        let mut msgs = vec![image.begin(&target, false)];
        msgs.extend([0, 1, 2].map(|i| image.chunk(i)));
        let (result, replies) = run(&env, &msgs);
        let e = err_of(result);
        assert_eq!(e.to_string(), "connection closed before the load finished");
        assert_eq!(e.exit_code(), 3);
        assert_eq!(replies.len(), 2 + 3 + 1, "three Written, then Error");
        assert_eq!(stamps(&env), 0);

        let rest: Vec<usize> = data.iter().copied().filter(|&i| i > 2).collect();
        let (result, replies) = run(&env, &image.load(&target, false, &rest));
        result.unwrap();
        assert_eq!(bits(&needed(&replies).1, image.layout().chunks), rest);
        assert!(std::fs::read(&target).unwrap() == image.data);
        assert_eq!(stamps(&env), 1);
    }

    #[test]
    fn finish_before_needed_chunks_arrive_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rtr", 0, 8);
        let e = err_of(run(&env, &image.load(&target, false, &[0, 2])).0);
        assert!(e.to_string().contains("before chunk 1"), "{e}");
        assert_eq!(e.exit_code(), 2);
        assert_eq!(stamps(&env), 0);
    }

    #[test]
    fn force_needs_every_data_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rztzr", 10, 9);
        let data = image.data_chunks();
        run(&env, &image.load(&target, false, &data)).0.unwrap();

        let (result, replies) = run(&env, &image.load(&target, true, &data));
        result.unwrap();
        let (up_to_date, bitmap, _) = needed(&replies);
        assert!(!up_to_date);
        assert_eq!(bits(&bitmap, image.layout().chunks), data);
        assert_eq!(stamps(&env), 1);
    }

    #[test]
    fn empty_image_makes_an_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        std::fs::write(&target, b"old contents").unwrap();
        let image = Image::new("", 0, 10);
        let (result, replies) = run(&env, &image.load(&target, false, &[]));
        result.unwrap();
        assert_eq!(replies.last(), Some(&Msg::Finished { bytes_written: 0 }));
        assert_eq!(std::fs::metadata(&target).unwrap().len(), 0);
    }

    #[test]
    fn verify_error_reaches_a_controller_that_stays_connected() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rr", 0, 11);
        let (mut controller, agent) = UnixStream::pair().unwrap();
        let agent_in = agent.try_clone().unwrap();
        std::thread::scope(|s| {
            let session = s.spawn(|| serve(agent_in, agent, &env));
            write_msg_sync(&mut controller, &Msg::hello()).unwrap();
            write_msg_sync(&mut controller, &image.begin(&target, false)).unwrap();
            assert_eq!(read_msg_sync(&mut controller).unwrap(), Msg::hello());
            assert!(matches!(
                read_msg_sync(&mut controller).unwrap(),
                Msg::Needed { .. }
            ));
            let bad = Msg::Chunk {
                index: 0,
                codec: Codec::Raw,
                data: image.chunk_data(1).to_vec(),
            };
            write_msg_sync(&mut controller, &bad).unwrap();
            // The agent answers before the controller closes anything.
            let reply = read_msg_sync(&mut controller).unwrap();
            assert_eq!(
                reply,
                Msg::Error {
                    message: "chunk 0 failed verification".into()
                }
            );
            drop(controller);
            let e = err_of(session.join().unwrap());
            assert!(matches!(e, AgentError::Verify(_)));
        });
    }

    #[test]
    fn save_reports_holes_zeros_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let source = dir.path().join("disk.img");
        // Chunk 1 is a hole, chunk 3 written zeros, chunk 6 a partial tail.
        let image = Image::new("rzrztr", 5000, 12);
        let file = File::create(&source).unwrap();
        file.set_len(image.data.len() as u64).unwrap();
        for i in [0, 2, 3, 4, 5, 6] {
            let at = image.layout().offset(i);
            file.write_all_at(image.chunk_data(i), at).unwrap();
        }
        drop(file);

        for level in [3, 0] {
            let (result, replies) = run(
                &env,
                &[Msg::SaveBegin {
                    target: source.to_string_lossy().into_owned(),
                    chunk_size: CS,
                    level,
                }],
            );
            result.unwrap();
            assert_eq!(
                replies[1],
                Msg::SaveInfo {
                    size: image.data.len() as u64,
                    held: None,
                }
            );
            let chunks = image.layout().chunks;
            assert_eq!(replies.len(), 2 + chunks + 1);
            assert_eq!(replies.last(), Some(&Msg::SaveEnd));
            for (i, reply) in replies[2..2 + chunks].iter().enumerate() {
                let Msg::SaveChunk {
                    index,
                    digest,
                    zero,
                    codec,
                    data,
                } = reply
                else {
                    panic!("expected SaveChunk, got {reply:?}");
                };
                let original = image.chunk_data(i);
                assert_eq!(*index as usize, i);
                assert_eq!(*digest, chunk_digest(original), "chunk {i}");
                assert_eq!(*zero, is_zero(original), "chunk {i}");
                let bytes = match codec {
                    Codec::Raw => data.clone(),
                    Codec::Zstd => zstd::bulk::decompress(data, CSU).unwrap(),
                };
                if *zero {
                    assert!(data.is_empty());
                } else {
                    assert!(bytes == original, "chunk {i} data");
                }
                let expect = match (level, i) {
                    (3, 4) => Codec::Zstd, // text compresses
                    _ => Codec::Raw,       // random data does not; zeros travel as flags
                };
                assert_eq!(*codec, expect, "chunk {i} level {level}");
            }
        }
    }

    #[test]
    fn save_of_a_missing_or_odd_target_is_a_target_error() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        for target in [dir.path().join("missing"), dir.path().to_path_buf()] {
            let e = err_of(
                run(
                    &env,
                    &[Msg::SaveBegin {
                        target: target.to_string_lossy().into_owned(),
                        chunk_size: CS,
                        level: 1,
                    }],
                )
                .0,
            );
            assert!(matches!(e, AgentError::Target(_)), "{e:?}");
            assert!(e.to_string().contains(&*target.to_string_lossy()), "{e}");
            assert_eq!(e.exit_code(), 3);
        }
    }

    #[test]
    fn directory_target_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("r", 0, 13);
        let e = err_of(run(&env, &[image.begin(dir.path(), false)]).0);
        assert!(matches!(e, AgentError::Target(_)), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&*dir.path().to_string_lossy()), "{text}");
        assert!(text.contains("is a directory"), "{text}");
        assert_eq!(e.exit_code(), 3);

        let nowhere = dir.path().join("no-such-dir").join("disk.img");
        let e = err_of(run(&env, &[image.begin(&nowhere, false)]).0);
        assert!(e.to_string().contains("no-such-dir"), "{e}");
        assert_eq!(e.exit_code(), 3);
    }

    #[test]
    fn hello_only_is_a_clean_probe() {
        let dir = tempfile::tempdir().unwrap();
        let (result, replies) = run(&env(&dir), &[]);
        result.unwrap();
        assert_eq!(replies, vec![Msg::hello()]);
    }

    fn assert_malformed(env: &AgentEnv, input: &[u8], needle: &str) {
        let (result, _) = run_bytes(env, input);
        let e = err_of(result);
        assert_eq!(e.exit_code(), 2, "{e}");
        assert!(e.to_string().contains(needle), "{e:?} lacks {needle:?}");
    }

    #[test]
    fn malformed_input_is_refused_with_exit_code_2() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rt", 0, 14);
        let hello = encode(&[Msg::hello()]);
        let with_hello = |msgs: &[Msg]| [hello.clone(), encode(msgs)].concat();

        assert_malformed(&env, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3], "refused");
        let wrong_magic = Msg::Hello {
            magic: *b"IMAGINE\0",
            version: VERSION,
            build: "x".into(),
        };
        assert_malformed(&env, &encode(&[wrong_magic]), "magic");
        let wrong_version = Msg::Hello {
            magic: MAGIC,
            version: VERSION + 1,
            build: "x".into(),
        };
        assert_malformed(&env, &encode(&[wrong_version]), "version");
        assert_malformed(&env, &encode(&[image.chunk(0)]), "expected Hello");
        assert_malformed(
            &env,
            &with_hello(&[image.chunk(0)]),
            "expected LoadBegin or SaveBegin, got Chunk",
        );
        assert_malformed(
            &env,
            &with_hello(&[
                image.begin(&target, false),
                Msg::Chunk {
                    index: 2,
                    codec: Codec::Raw,
                    data: vec![],
                },
            ]),
            "out of range",
        );
        assert_malformed(
            &env,
            &with_hello(&[image.begin(&target, false), Msg::SaveEnd]),
            "unexpected SaveEnd",
        );
        for chunk_size in [0, 1000, CS / 2, 3 * CS, MAX_CHUNK_SIZE * 2, u32::MAX] {
            let Msg::LoadBegin {
                target,
                size,
                identity,
                digests,
                zero,
                ..
            } = image.begin(&target, false)
            else {
                unreachable!()
            };
            let begin = Msg::LoadBegin {
                target: target.clone(),
                size,
                chunk_size,
                identity,
                force: false,
                force_mounted: false,
                digests,
                zero,
                image: String::new(),
            };
            assert_malformed(&env, &with_hello(&[begin]), "chunk size");
            let save = Msg::SaveBegin {
                target,
                chunk_size,
                level: 3,
            };
            assert_malformed(&env, &with_hello(&[save]), "chunk size");
        }
        let fresh = dir.path().join("fresh.img");
        let Msg::LoadBegin {
            target: t,
            size,
            identity,
            mut digests,
            zero,
            ..
        } = image.begin(&fresh, false)
        else {
            unreachable!()
        };
        digests.push(1);
        let begin = |digests: Vec<u128>, zero: Vec<u8>| Msg::LoadBegin {
            target: t.clone(),
            size,
            chunk_size: CS,
            identity,
            force: false,
            force_mounted: false,
            digests,
            zero,
            image: String::new(),
        };
        assert_malformed(
            &env,
            &with_hello(&[begin(digests.clone(), zero.clone())]),
            "digests",
        );
        digests.pop();
        assert_malformed(
            &env,
            &with_hello(&[begin(digests, vec![0, 0])]),
            "zero bitmap",
        );
        assert!(
            !fresh.exists(),
            "nothing is created for a malformed request"
        );

        // Every cut of a valid start is an error (or, right after the Hello, a probe).
        let input = with_hello(&[image.begin(&target, false)]);
        for cut in 0..input.len() {
            let (result, _) = run_bytes(&env, &input[..cut]);
            match result {
                // The stream ending inside a length prefix is a clean close.
                Ok(()) => assert!((hello.len()..hello.len() + 4).contains(&cut), "cut {cut}"),
                Err(e) => assert!([2, 3].contains(&e.exit_code()), "{e}"),
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        #[test]
        fn random_input_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let dir = tempfile::tempdir().unwrap();
            let (result, _) = run_bytes(&env(&dir), &bytes);
            let e = err_of(result);
            proptest::prop_assert!([2, 3].contains(&e.exit_code()));
        }

        #[test]
        fn random_frames_after_hello_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let dir = tempfile::tempdir().unwrap();
            let input = [encode(&[Msg::hello()]), bytes].concat();
            if let Err(e) = run_bytes(&env(&dir), &input).0 {
                proptest::prop_assert!([2, 3].contains(&e.exit_code()));
            }
        }

        #[test]
        fn random_frames_during_a_load_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let dir = tempfile::tempdir().unwrap();
            let image = Image::new("rt", 7, 15);
            let input = [
                encode(&[Msg::hello(), image.begin(&dir.path().join("disk.img"), false)]),
                bytes,
            ]
            .concat();
            let e = err_of(run_bytes(&env(&dir), &input).0);
            proptest::prop_assert!([2, 3].contains(&e.exit_code()));
        }

        #[test]
        fn stamp_decoding_never_panics(text in ".{0,200}") {
            let _ = Stamp::decode(&text);
        }
    }

    // ------------------------------------------------------------ relay

    const SECRET: Secret = [42; RELAY_SECRET_LEN];
    const LOCALHOST: &str = "127.0.0.1";
    /// Longest a test waits for one reply: a hung agent fails the test.
    const REPLY_WAIT: Duration = Duration::from_secs(30);

    /// An agent serving one load in a thread, driven as a controller would:
    /// frames in on one end of a socket pair, replies collected by a thread.
    struct Driven {
        name: &'static str,
        ctl: UnixStream,
        replies: std::sync::mpsc::Receiver<Msg>,
        /// Replies not yet taken by `wait_for`.
        pending: std::collections::VecDeque<Msg>,
        /// Every reply, in order.
        log: Vec<Msg>,
    }

    type Session<'scope> = std::thread::ScopedJoinHandle<'scope, Result<(), AgentError>>;

    impl Driven {
        /// Start an agent, send Hello and `begin`; returns the Needed bitmap.
        fn start<'scope>(
            s: &'scope Scope<'scope, '_>,
            env: &'scope AgentEnv,
            name: &'static str,
            begin: Msg,
        ) -> (Driven, Session<'scope>, Vec<u8>) {
            let (ctl, agent) = UnixStream::pair().unwrap();
            ctl.set_write_timeout(Some(REPLY_WAIT)).unwrap();
            let agent_in = agent.try_clone().unwrap();
            let session = s.spawn(move || serve(agent_in, agent, env));
            let mut from_agent = ctl.try_clone().unwrap();
            let (tx, replies) = std::sync::mpsc::channel();
            s.spawn(move || {
                while let Ok(msg) = read_msg_sync(&mut from_agent) {
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
            });
            let mut node = Driven {
                name,
                ctl,
                replies,
                pending: Default::default(),
                log: Vec::new(),
            };
            node.send(&Msg::hello());
            node.send(&begin);
            node.wait_for("Hello", |m| matches!(m, Msg::Hello { .. }));
            let Msg::Needed {
                up_to_date: false,
                bitmap,
                ..
            } = node.wait_for("Needed", |m| matches!(m, Msg::Needed { .. }))
            else {
                panic!("{name}: expected Needed with up_to_date false");
            };
            (node, session, bitmap)
        }

        fn send(&mut self, msg: &Msg) {
            write_msg_sync(&mut self.ctl, msg).unwrap();
        }

        /// The first reply, pending or to come, that `pred` accepts.
        fn wait_for(&mut self, what: &str, pred: impl Fn(&Msg) -> bool) -> Msg {
            if let Some(at) = self.pending.iter().position(&pred) {
                return self.pending.remove(at).unwrap();
            }
            let deadline = Instant::now() + REPLY_WAIT;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let msg = self.replies.recv_timeout(left).unwrap_or_else(|e| {
                    panic!(
                        "{}: no {what} ({e}); got {:?}",
                        self.name,
                        self.log.iter().map(Msg::name).collect::<Vec<_>>()
                    )
                });
                self.log.push(msg.clone());
                if pred(&msg) {
                    return msg;
                }
                self.pending.push_back(msg);
            }
        }

        fn written(&self) -> Vec<usize> {
            self.log
                .iter()
                .filter_map(|m| match m {
                    Msg::Written { index, .. } => Some(*index as usize),
                    _ => None,
                })
                .collect()
        }

        fn count(&self, name: &str) -> usize {
            self.log.iter().filter(|m| m.name() == name).count()
        }

        fn listen(&mut self) -> u16 {
            self.send(&Msg::RelayListen {
                secret: SECRET.to_vec(),
                bind: LOCALHOST.into(),
                port_min: 0,
                port_max: 0,
            });
            match self.wait_for("RelayPort", |m| matches!(m, Msg::RelayPort { .. })) {
                Msg::RelayPort { port } => port,
                _ => unreachable!(),
            }
        }

        /// RelayConnect; the reply, RelayLinked or RelayLost.
        fn connect(&mut self, port: u16, secret: &Secret) -> Msg {
            self.send(&Msg::RelayConnect {
                secret: secret.to_vec(),
                addr: LOCALHOST.into(),
                port,
            });
            self.wait_for("RelayLinked or RelayLost", |m| {
                matches!(m, Msg::RelayLinked { .. } | Msg::RelayLost { .. })
            })
        }

        fn link(&mut self, port: u16) {
            let reply = self.connect(port, &SECRET);
            assert_eq!(
                reply,
                Msg::RelayLinked {
                    addr: LOCALHOST.into(),
                    port
                },
                "{}",
                self.name
            );
        }

        fn missing(&mut self) -> Vec<u8> {
            match self.wait_for("Missing", |m| matches!(m, Msg::Missing { .. })) {
                Msg::Missing { bitmap } => bitmap,
                _ => unreachable!(),
            }
        }

        fn refused(&mut self) -> (String, String) {
            match self.wait_for("RelayRefused", |m| matches!(m, Msg::RelayRefused { .. })) {
                Msg::RelayRefused { peer, reason } => (peer, reason),
                _ => unreachable!(),
            }
        }

        /// Finish; the Finished reply's bytes.
        fn finish(&mut self) -> u64 {
            self.send(&Msg::Finish);
            match self.wait_for("Finished", |m| {
                matches!(m, Msg::Finished { .. } | Msg::Error { .. })
            }) {
                Msg::Finished { bytes_written } => bytes_written,
                other => panic!("{}: {other:?}", self.name),
            }
        }

        /// What a killed controller connection looks like to the agent.
        fn hang_up(&self) {
            let _ = self.ctl.shutdown(Shutdown::Both);
        }
    }

    impl Drop for Driven {
        /// A failing test must not leave an agent waiting for its controller.
        fn drop(&mut self) {
            self.hang_up();
        }
    }

    fn streamed(chunk: Msg) -> Msg {
        match chunk {
            Msg::Chunk { index, codec, data } => Msg::StreamChunk { index, codec, data },
            other => other,
        }
    }

    fn no_bits(bitmap: &[u8]) -> bool {
        bitmap.iter().all(|&b| b == 0)
    }

    /// A raw relay peer that passed the handshake.
    fn relay_peer(port: u16, secret: &Secret) -> TcpStream {
        let stream = TcpStream::connect((LOCALHOST, port)).unwrap();
        connect_handshake(&stream, secret).unwrap();
        stream
    }

    #[test]
    fn chain_of_three_agents_loads_every_target() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rtzrtrzzttr", 777, 20);
        let data = image.data_chunks();
        let targets = ["a", "b", "c"].map(|n| dir.path().join(format!("{n}.img")));
        std::thread::scope(|s| {
            let (mut a, a_session, _) =
                Driven::start(s, &env, "a", image.begin(&targets[0], false));
            let (mut b, b_session, _) =
                Driven::start(s, &env, "b", image.begin(&targets[1], false));
            let (mut c, c_session, _) =
                Driven::start(s, &env, "c", image.begin(&targets[2], false));
            let b_port = b.listen();
            let c_port = c.listen();
            a.link(b_port);
            b.link(c_port);
            for &i in &data {
                a.send(&streamed(image.chunk(i)));
            }
            a.send(&Msg::StreamEnd);
            for node in [&mut a, &mut b, &mut c] {
                let missing = node.missing();
                assert_eq!(missing.len(), bitmap_len(image.layout().chunks));
                assert!(no_bits(&missing), "{}: {missing:?}", node.name);
                assert_eq!(node.finish(), image.bytes_of(&data), "{}", node.name);
                assert_eq!(node.written(), data, "{} acks its own writes", node.name);
                for quiet in ["RelayLost", "RelayRefused", "Error"] {
                    assert_eq!(node.count(quiet), 0, "{}: {quiet}", node.name);
                }
            }
            for session in [a_session, b_session, c_session] {
                session.join().unwrap().unwrap();
            }
        });
        for target in &targets {
            assert!(std::fs::read(target).unwrap() == image.data, "{target:?}");
        }
        assert_eq!(stamps(&env), 3);
    }

    #[test]
    fn a_node_writes_only_what_it_needs_and_forwards_everything() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rtrtrtr", 100, 21);
        let data = image.data_chunks();
        let (a_target, b_target, c_target) = (
            dir.path().join("a.img"),
            dir.path().join("b.img"),
            dir.path().join("c.img"),
        );
        // B already holds the image but for chunks 1 and 4.
        let mut held = image.data.clone();
        for i in [1, 4] {
            held[image.layout().offset(i) as usize + 9] ^= 0xff;
        }
        std::fs::write(&b_target, &held).unwrap();
        std::thread::scope(|s| {
            let (mut a, _, _) = Driven::start(s, &env, "a", image.begin(&a_target, false));
            let (mut b, _, b_needed) = Driven::start(s, &env, "b", image.begin(&b_target, false));
            let (mut c, _, _) = Driven::start(s, &env, "c", image.begin(&c_target, false));
            assert_eq!(bits(&b_needed, image.layout().chunks), vec![1, 4]);
            let (b_port, c_port) = (b.listen(), c.listen());
            a.link(b_port);
            b.link(c_port);
            for &i in &data {
                a.send(&streamed(image.chunk(i)));
            }
            a.send(&Msg::StreamEnd);
            for node in [&mut a, &mut b, &mut c] {
                assert!(no_bits(&node.missing()), "{}", node.name);
                node.finish();
            }
            assert_eq!(a.written(), data);
            assert_eq!(b.written(), vec![1, 4], "b writes only what it lacked");
            assert_eq!(c.written(), data, "b forwarded what it did not need");
        });
        for target in [&a_target, &b_target, &c_target] {
            assert!(std::fs::read(target).unwrap() == image.data, "{target:?}");
        }
    }

    #[test]
    fn a_dead_middle_node_is_cut_out_and_its_successor_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rtrtrtrt", 0, 22);
        let data = image.data_chunks();
        let (a_target, b_target, c_target) = (
            dir.path().join("a.img"),
            dir.path().join("b.img"),
            dir.path().join("c.img"),
        );
        std::thread::scope(|s| {
            let (mut a, a_session, _) = Driven::start(s, &env, "a", image.begin(&a_target, false));
            let (b, b_session, _) = Driven::start(s, &env, "b", image.begin(&b_target, false));
            let (mut c, c_session, _) = Driven::start(s, &env, "c", image.begin(&c_target, false));
            let mut b = b;
            let (b_port, c_port) = (b.listen(), c.listen());
            a.link(b_port);
            b.link(c_port);
            for i in 0..3 {
                a.send(&streamed(image.chunk(i)));
            }
            c.wait_for("Written 2", |m| matches!(m, Msg::Written { index: 2, .. }));

            // B dies: its controller connection drops and its sockets close.
            b.hang_up();
            // B notices on reading (closed) or on acknowledging (broken pipe).
            let e = err_of(b_session.join().unwrap());
            assert!(
                matches!(
                    e,
                    AgentError::Closed(_) | AgentError::Protocol(ProtocolError::Io(_))
                ),
                "{e:?}"
            );
            let lost = a.wait_for("RelayLost", |m| matches!(m, Msg::RelayLost { .. }));
            assert!(matches!(lost, Msg::RelayLost { .. }));

            // Chunks that pass while A has no successor never reach C…
            for i in 3..5 {
                a.send(&streamed(image.chunk(i)));
            }
            a.wait_for("Written 4", |m| matches!(m, Msg::Written { index: 4, .. }));
            // …and the relink carries the rest.
            a.link(c_port);
            for i in 5..8 {
                a.send(&streamed(image.chunk(i)));
            }
            a.send(&Msg::StreamEnd);
            assert!(no_bits(&a.missing()));
            let missing = c.missing();
            assert_eq!(bits(&missing, image.layout().chunks), vec![3, 4]);
            for i in bits(&missing, image.layout().chunks) {
                c.send(&image.chunk(i));
            }
            a.finish();
            c.finish();
            let mut c_written = c.written();
            c_written.sort_unstable();
            assert_eq!(c_written, data);
            assert_eq!(
                c.count("RelayRefused"),
                0,
                "a predecessor's end is no refusal"
            );
            a_session.join().unwrap().unwrap();
            c_session.join().unwrap().unwrap();
        });
        for target in [&a_target, &c_target] {
            assert!(std::fs::read(target).unwrap() == image.data, "{target:?}");
        }
    }

    #[test]
    fn a_wrong_secret_is_refused_and_the_chain_still_completes() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rtr", 5, 23);
        let data = image.data_chunks();
        let targets = [dir.path().join("a.img"), dir.path().join("b.img")];
        let wrong: Secret = [7; RELAY_SECRET_LEN];
        std::thread::scope(|s| {
            let (mut a, _, _) = Driven::start(s, &env, "a", image.begin(&targets[0], false));
            let (mut b, _, _) = Driven::start(s, &env, "b", image.begin(&targets[1], false));
            let b_port = b.listen();

            // An agent given another secret: both ends say so.
            let Msg::RelayLost { reason, .. } = a.connect(b_port, &wrong) else {
                panic!("a linked with a wrong secret");
            };
            assert!(reason.contains("secret"), "{reason}");
            assert!(b.refused().1.contains("secret"));

            // A stranger that sends a proof made with another secret.
            let stranger = TcpStream::connect((LOCALHOST, b_port)).unwrap();
            let nonce_c = [1u8; 16];
            let mut hello = RELAY_MAGIC.to_vec();
            hello.push(RELAY_VERSION);
            hello.extend_from_slice(&nonce_c);
            (&stranger).write_all(&hello).unwrap();
            let mut nonce_l = [0u8; 16];
            let mut their_proof = [0u8; 32];
            (&stranger).read_exact(&mut nonce_l).unwrap();
            (&stranger).read_exact(&mut their_proof).unwrap();
            (&stranger)
                .write_all(proof(&wrong, b'C', &nonce_l, &nonce_c).as_bytes())
                .unwrap();
            let (peer, reason) = b.refused();
            assert_eq!(peer, stranger.local_addr().unwrap().to_string());
            assert_eq!(reason, "bad secret");
            // Refused: the connection is closed.
            let mut rest = Vec::new();
            let _ = (&stranger).read_to_end(&mut rest);
            assert!(rest.is_empty());

            a.link(b_port);
            for &i in &data {
                a.send(&streamed(image.chunk(i)));
            }
            a.send(&Msg::StreamEnd);
            for node in [&mut a, &mut b] {
                assert!(no_bits(&node.missing()), "{}", node.name);
                node.finish();
                assert_eq!(node.written(), data, "{}", node.name);
            }
        });
        for target in &targets {
            assert!(std::fs::read(target).unwrap() == image.data);
        }
    }

    #[test]
    fn garbage_on_a_relay_port_is_refused_and_the_listener_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rt", 0, 24);
        let targets = [dir.path().join("a.img"), dir.path().join("b.img")];
        std::thread::scope(|s| {
            let (mut a, _, _) = Driven::start(s, &env, "a", image.begin(&targets[0], false));
            let (mut b, b_session, _) =
                Driven::start(s, &env, "b", image.begin(&targets[1], false));
            let port = b.listen();

            let mut noise = vec![0u8; 4096];
            fastrand::Rng::with_seed(24).fill(&mut noise);
            noise[0] = b'X';
            let peer = TcpStream::connect((LOCALHOST, port)).unwrap();
            let _ = (&peer).write_all(&noise);
            assert_eq!(
                b.refused(),
                (
                    peer.local_addr().unwrap().to_string(),
                    "not a relay peer".into()
                )
            );

            let peer = TcpStream::connect((LOCALHOST, port)).unwrap();
            (&peer).write_all(b"IMGRELAY\x02").unwrap();
            assert!(b.refused().1.contains("relay version 2"));

            let peer = TcpStream::connect((LOCALHOST, port)).unwrap();
            (&peer).write_all(b"IMGRE").unwrap();
            peer.shutdown(Shutdown::Write).unwrap();
            assert!(b.refused().1.contains("closed during the handshake"));

            // After a good handshake: a frame longer than any chunk…
            let peer = relay_peer(port, &SECRET);
            (&peer).write_all(&[0xff, 0xff, 0xff, 0x7f, 36]).unwrap();
            let reason = b.refused().1;
            assert!(reason.contains("refused"), "{reason}");
            // …a frame that does not decode…
            let peer = relay_peer(port, &SECRET);
            (&peer).write_all(&[1, 0, 0, 0, 200]).unwrap();
            assert!(b.refused().1.contains("unknown message tag 200"));
            // …anything but the stream.
            let mut peer = relay_peer(port, &SECRET);
            write_msg_sync(&mut peer, &Msg::Finish).unwrap();
            assert_eq!(b.refused().1, "unexpected Finish on a relay connection");
            // A relayed chunk beyond the image.
            write_msg_sync(
                &mut relay_peer(port, &SECRET),
                &streamed(Msg::Chunk {
                    index: 99,
                    codec: Codec::Raw,
                    data: vec![1],
                }),
            )
            .unwrap();
            assert!(b.refused().1.contains("chunk index 99 out of range"));

            // Silence: the handshake has a deadline.
            let silent = TcpStream::connect((LOCALHOST, port)).unwrap();
            let started = Instant::now();
            assert_eq!(b.refused().1, "handshake timed out");
            assert!(started.elapsed() < RELAY_TIMEOUT + Duration::from_secs(5));
            drop(silent);

            // The listener still takes a real predecessor.
            a.link(port);
            for i in image.data_chunks() {
                a.send(&streamed(image.chunk(i)));
            }
            a.send(&Msg::StreamEnd);
            for node in [&mut a, &mut b] {
                assert!(no_bits(&node.missing()), "{}", node.name);
                node.finish();
            }
            b_session.join().unwrap().unwrap();
        });
        assert!(std::fs::read(&targets[1]).unwrap() == image.data);
    }

    #[test]
    fn a_relayed_chunk_that_fails_verification_is_refused_not_written_nor_forwarded() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rtr", 0, 25);
        let targets = [dir.path().join("b.img"), dir.path().join("c.img")];
        std::thread::scope(|s| {
            let (mut b, _, _) = Driven::start(s, &env, "b", image.begin(&targets[0], false));
            let (mut c, _, _) = Driven::start(s, &env, "c", image.begin(&targets[1], false));
            let (b_port, c_port) = (b.listen(), c.listen());
            b.link(c_port);
            let mut predecessor = relay_peer(b_port, &SECRET);
            let mut bad = image.chunk_data(1).to_vec();
            bad[3] ^= 1;
            let corrupt = Msg::StreamChunk {
                index: 1,
                codec: Codec::Raw,
                data: bad,
            };
            for msg in [streamed(image.chunk(0)), corrupt, streamed(image.chunk(2))] {
                write_msg_sync(&mut predecessor, &msg).unwrap();
            }
            write_msg_sync(&mut predecessor, &Msg::StreamEnd).unwrap();
            let (peer, reason) = b.refused();
            assert_eq!(peer, predecessor.local_addr().unwrap().to_string());
            assert_eq!(reason, "chunk 1 failed verification");
            for node in [&mut b, &mut c] {
                assert_eq!(bits(&node.missing(), 3), vec![1], "{}", node.name);
                assert_eq!(node.written(), vec![0, 2], "{}", node.name);
                node.send(&image.chunk(1));
                node.finish();
            }
            assert_eq!(c.count("RelayRefused"), 0, "the bad chunk went no further");
        });
        for target in &targets {
            assert!(std::fs::read(target).unwrap() == image.data);
        }
    }

    #[test]
    fn relay_requests_that_cannot_be_met() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rt", 0, 26);
        let target = dir.path().join("disk.img");
        let taken = TcpListener::bind((LOCALHOST, 0)).unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let listen = |bind: &str, port_min, port_max| Msg::RelayListen {
            secret: SECRET.to_vec(),
            bind: bind.into(),
            port_min,
            port_max,
        };

        // A port range with no free port, a bind that is no address: fatal.
        for (request, needle) in [
            (listen(LOCALHOST, taken_port, taken_port), "no free port"),
            (listen("node-7", 0, 0), "not an IP address"),
        ] {
            let (result, replies) = run(&env, &[image.begin(&target, false), request]);
            let e = err_of(result);
            assert!(matches!(e, AgentError::Relay(_)), "{e:?}");
            assert!(e.to_string().contains(needle), "{e}");
            assert_eq!(e.exit_code(), 3);
            assert!(matches!(replies.last(), Some(Msg::Error { .. })));
        }
        // Controller mistakes: malformed.
        let twice = [
            image.begin(&target, false),
            listen(LOCALHOST, 0, 0),
            listen(LOCALHOST, 0, 0),
        ];
        assert_malformed(
            &env,
            &encode(&[&[Msg::hello()], &twice[..]].concat()),
            "second RelayListen",
        );
        let backwards = [image.begin(&target, false), listen(LOCALHOST, 9, 8)];
        assert_malformed(
            &env,
            &encode(&[&[Msg::hello()], &backwards[..]].concat()),
            "port range",
        );
        let beyond = [
            image.begin(&target, false),
            streamed(Msg::Chunk {
                index: 2,
                codec: Codec::Raw,
                data: vec![],
            }),
        ];
        assert_malformed(
            &env,
            &encode(&[&[Msg::hello()], &beyond[..]].concat()),
            "out of range",
        );

        // Something that is no relay listener: RelayLost, and the load goes
        // on without a successor.
        std::thread::scope(|s| {
            // Accept one connection and hang up on it; bounded, should the test fail first.
            taken.set_nonblocking(true).unwrap();
            s.spawn(|| {
                let deadline = Instant::now() + REPLY_WAIT;
                while Instant::now() < deadline {
                    if taken.accept().is_ok() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            let (mut a, a_session, _) = Driven::start(s, &env, "a", image.begin(&target, false));
            let Msg::RelayLost { reason, .. } = a.connect(taken_port, &SECRET) else {
                panic!("linked to no relay listener");
            };
            assert!(
                reason.starts_with(&format!("cannot link to {LOCALHOST} port {taken_port}: ")),
                "{reason}"
            );
            assert!(reason.contains("hung up"), "{reason}");
            for i in image.data_chunks() {
                a.send(&streamed(image.chunk(i)));
            }
            a.send(&Msg::StreamEnd);
            assert!(no_bits(&a.missing()));
            // StreamEnd again: the same answer.
            a.send(&Msg::StreamEnd);
            assert!(no_bits(&a.missing()));
            a.finish();
            a_session.join().unwrap().unwrap();
        });
        assert!(std::fs::read(&target).unwrap() == image.data);
    }

    #[test]
    fn handshake_proofs_bind_the_secret_the_role_and_both_nonces() {
        let (n1, n2) = ([1u8; 16], [2u8; 16]);
        let p = proof(&SECRET, b'L', &n1, &n2);
        let mut input = vec![b'L'];
        input.extend_from_slice(&n1);
        input.extend_from_slice(&n2);
        assert_eq!(p, blake3::keyed_hash(&SECRET, &input));
        assert_ne!(p, proof(&SECRET, b'C', &n1, &n2));
        assert_ne!(p, proof(&SECRET, b'L', &n2, &n1));
        assert_ne!(p, proof(&[0; RELAY_SECRET_LEN], b'L', &n1, &n2));
    }

    #[test]
    fn stamps_round_trip_and_garbage_is_no_stamp() {
        let stamp = Stamp {
            identity: u128::MAX - 5,
            size: 1 << 40,
            mtime_ns: -1_500_000_000,
            inode: 42,
            dev: 2049,
            target: "/var/lib/images/a b.img".into(),
            image: "ubuntu 24.04.img".into(),
        };
        assert_eq!(Stamp::decode(&stamp.encode()), Some(stamp.clone()));
        let text = stamp.encode();
        for cut in 0..text.len() - 1 {
            assert_eq!(Stamp::decode(&text[..cut]), None, "cut at {cut}");
        }
        assert_eq!(Stamp::decode(&format!("{text}extra\n")), None);
        assert_eq!(Stamp::decode(&text.replace("size", "SIZE")), None);
        // A stamp written before the image line existed still counts.
        let older = text.replace("image ubuntu 24.04.img\n", "");
        let decoded = Stamp::decode(&older).unwrap();
        assert_eq!(
            (decoded.identity, decoded.image.as_str()),
            (stamp.identity, "")
        );
    }

    #[test]
    fn save_reports_what_the_stamp_says_the_target_was_loaded_with() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("held", 0, 16);
        run(&env, &image.load(&target, false, &image.data_chunks()))
            .0
            .unwrap();
        // Changed since the load, as a node that is saved usually is.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap()
            .write_all_at(b"nginx", 3)
            .unwrap();
        let save = Msg::SaveBegin {
            target: target.to_string_lossy().into_owned(),
            chunk_size: CS,
            level: 0,
        };
        let (result, replies) = run(&env, &[save]);
        result.unwrap();
        assert_eq!(
            replies[1],
            Msg::SaveInfo {
                size: image.data.len() as u64,
                held: Some(HeldImage {
                    identity: image.identity(),
                    image: "test.img".into()
                }),
            }
        );
        // Another file was never loaded: nothing held.
        let other = dir.path().join("other.img");
        std::fs::write(&other, vec![1u8; CS as usize]).unwrap();
        let (result, replies) = run(
            &env,
            &[Msg::SaveBegin {
                target: other.to_string_lossy().into_owned(),
                chunk_size: CS,
                level: 0,
            }],
        );
        result.unwrap();
        assert!(
            matches!(&replies[1], Msg::SaveInfo { held: None, .. }),
            "{:?}",
            replies[1]
        );
    }

    #[test]
    fn garbage_stamp_is_no_stamp_and_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rt", 0, 16);
        run(&env, &image.load(&target, false, &image.data_chunks()))
            .0
            .unwrap();
        let stamp = std::fs::read_dir(&env.stamp_dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::write(&stamp, b"\xff\xfe garbage").unwrap();
        let (result, replies) = run(&env, &image.load(&target, false, &[]));
        result.unwrap();
        assert_eq!(needed(&replies), (false, vec![0], 0));
        assert!(Stamp::decode(&std::fs::read_to_string(&stamp).unwrap()).is_some());
    }

    const MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw
30 27 8:1 / /boot/efi rw,relatime shared:5 - vfat /dev/sda1 rw
31 27 0:45 / /srv/my\\040data rw,relatime shared:7 - btrfs /dev/sdb1 rw,space_cache
32 27 259:3 / /home rw shared:9 master:2 - xfs /dev/nvme0n1p3 rw
garbage line
33 27 x:y / /bad rw - ext4 /dev/sdc rw
";

    #[test]
    fn mountinfo_parsing_finds_devices_points_and_sources() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 5);
        assert_eq!(
            mounts[1],
            Mount {
                dev: (8, 2),
                mount_point: "/".into(),
                source: "/dev/sda2".into()
            }
        );
        assert_eq!(mounts[3].mount_point, "/srv/my data");
        assert_eq!(mounts[3].source, "/dev/sdb1");
        assert_eq!(mounts[4].dev, (259, 3));
        assert_eq!(mounts[4].source, "/dev/nvme0n1p3");
        assert!(parse_mountinfo("").is_empty());
        assert!(parse_mountinfo("1 2 3:4").is_empty());
    }

    #[test]
    fn swaps_parsing_skips_the_header() {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
                    /dev/sda3                               partition\t8388604\t\t0\t\t-2\n\
                    /swap\\040file                           file\t\t1048572\t\t0\t\t-3\n";
        assert_eq!(parse_swaps(text), vec!["/dev/sda3", "/swap file"]);
        assert!(parse_swaps("Filename Type Size Used Priority\n").is_empty());
    }

    #[test]
    fn unescape_handles_octal_and_stray_backslashes() {
        assert_eq!(unescape("a\\040b\\011c"), "a b\tc");
        assert_eq!(unescape("\\134"), "\\");
        assert_eq!(unescape("trail\\"), "trail\\");
        assert_eq!(unescape("\\09x\\4"), "\\09x\\4");
    }

    #[test]
    fn users_of_a_disk_name_mounts_swap_and_holders_of_its_partitions() {
        let mounts = parse_mountinfo(MOUNTINFO);
        let dev_of = |path: &str| match path {
            "/dev/sda3" => Some((8, 3)),
            "/dev/sdb1" => Some((8, 17)),
            _ => None,
        };
        let swaps = vec!["/dev/sda3".to_string(), "/swapfile".to_string()];
        let sda = vec![
            ((8, 0), "/dev/sda".to_string()),
            ((8, 1), "partition sda1".to_string()),
            ((8, 2), "partition sda2".to_string()),
            ((8, 3), "partition sda3".to_string()),
        ];
        let users = users_of(&sda, &mounts, &swaps, &[], dev_of);
        assert_eq!(
            users,
            vec![
                "partition sda2 is mounted on /",
                "partition sda1 is mounted on /boot/efi",
                "partition sda3 is used as swap",
            ]
        );

        // btrfs: an anonymous device number, found through the source.
        let sdb = vec![
            ((8, 16), "/dev/sdb".to_string()),
            ((8, 17), "partition sdb1".to_string()),
        ];
        assert_eq!(
            users_of(&sdb, &mounts, &swaps, &[], dev_of),
            vec!["partition sdb1 is mounted on /srv/my data"]
        );

        let sdc = vec![((8, 32), "/dev/sdc".to_string())];
        assert!(users_of(&sdc, &mounts, &swaps, &[], dev_of).is_empty());
        let holders = vec![((8, 32), "dm-0".to_string())];
        assert_eq!(
            users_of(&sdc, &mounts, &swaps, &holders, dev_of),
            vec!["/dev/sdc is held by dm-0"]
        );
    }

    #[test]
    fn device_numbers_decode_like_glibc() {
        assert_eq!(dev_numbers(0x0801), (8, 1));
        assert_eq!(dev_numbers(0x10300), (259, 0));
        // major 259, minor 300: minor's high bits live above bit 20.
        let rdev = (259u64 & 0xfff) << 8 | (300u64 & 0xff) | (300u64 & !0xff) << 12;
        assert_eq!(dev_numbers(rdev), (259, 300));
    }

    /// Real block devices: needs root and loop devices.
    /// `cargo test --lib agent -- --ignored`
    #[test]
    #[ignore]
    fn loop_device_load_and_mount_refusal() {
        use std::process::Command;
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let backing = dir.path().join("backing.img");
        File::create(&backing).unwrap().set_len(8 << 20).unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup failed");
        let device = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        struct Detach(PathBuf);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = Command::new("umount")
                    .arg(&self.0)
                    .stderr(std::process::Stdio::null())
                    .status();
                let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
            }
        }
        let _detach = Detach(device.clone());

        // Stray data where the image has zeros is zeroed on a device too.
        std::fs::write(&device, vec![0x77u8; 8 << 20]).unwrap();
        let image = Image::new("rzt", 100, 17);
        let (result, replies) = run(&env, &image.load(&device, false, &image.data_chunks()));
        result.unwrap();
        assert_eq!(needed(&replies).2, CS as u64);
        let on_disk = std::fs::read(&device).unwrap();
        assert!(on_disk[..image.data.len()] == image.data[..]);
        assert_eq!(stamps(&env), 0, "block devices are not stamped");

        let too_big = Image::new(&"r".repeat(129), 0, 18);
        let e = err_of(run(&env, &[too_big.begin(&device, false)]).0);
        assert!(e.to_string().contains("the image needs"), "{e}");

        let status = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&device)
            .status()
            .unwrap();
        assert!(status.success());
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).unwrap();
        let status = Command::new("mount")
            .arg(&device)
            .arg(&mount_point)
            .status()
            .unwrap();
        assert!(status.success());
        let e = err_of(run(&env, &[image.begin(&device, false)]).0);
        let text = e.to_string();
        assert!(text.contains("mounted"), "{text}");
        assert!(text.contains(&*mount_point.to_string_lossy()), "{text}");
        drop(_detach);

        // A partitioned disk whose partition is mounted: an MBR with one
        // Linux partition at sector 2048.
        let backing = dir.path().join("partitioned.img");
        let mut mbr = [0u8; 512];
        mbr[446 + 4] = 0x83;
        mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        mbr[446 + 12..446 + 16].copy_from_slice(&16384u32.to_le_bytes());
        mbr[510..].copy_from_slice(&[0x55, 0xaa]);
        let file = File::create(&backing).unwrap();
        file.set_len(16 << 20).unwrap();
        file.write_all_at(&mbr, 0).unwrap();
        drop(file);
        let out = Command::new("losetup")
            .args(["-f", "--show", "-P"])
            .arg(&backing)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup -P failed");
        let disk = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let mut partition = disk.clone().into_os_string();
        partition.push("p1");
        let partition = PathBuf::from(partition);
        let _detach_disk = Detach(disk.clone());
        for _ in 0..20 {
            if partition.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if !partition.exists() {
            eprintln!(
                "the kernel found no partition on {}: skipping",
                disk.display()
            );
            return;
        }
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(partition.clone());
        let status = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&partition)
            .status()
            .unwrap();
        assert!(status.success());
        let status = Command::new("mount")
            .arg(&partition)
            .arg(&mount_point)
            .status()
            .unwrap();
        assert!(status.success());
        let e = err_of(run(&env, &[image.begin(&disk, false)]).0);
        let text = e.to_string();
        assert!(text.contains("partition loop"), "{text}");
        assert!(text.contains("is mounted on"), "{text}");
        assert!(text.contains(&*mount_point.to_string_lossy()), "{text}");
    }
}
