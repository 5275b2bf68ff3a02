//! `imaging agent`: the node side of a load or a save.
//!
//! The controller starts `imaging agent` over SSH and speaks the protocol of
//! [`crate::proto`] on its stdin/stdout. One session serves one request:
//!
//! - a load checks what the target already holds (a stamp left by the last
//!   complete load, else the chunk digests), asks only for the chunks it
//!   lacks, verifies each against the manifest before writing it, syncs and
//!   stamps the target;
//! - a save streams the target's chunks back, zero chunks as flags only;
//!   unless asked for a raw save, it first finds the blocks that the
//!   target's ext2/3/4 file systems mark free ([`used`]) and does not read
//!   them: they travel as zeros.
//!
//! A load can also be a link of a relay chain (fan-out): the agent then
//! listens for its predecessor and forwards the stream to its successor
//! over TCP, every link authenticated with the run's secret (see "relay").
//!
//! Everything the controller or the disk says is checked; errors end the
//! session with `Msg::Error` and a non-zero exit code, never a panic.

mod clean;
mod delta;
mod load;
mod lock;
mod mounts;
mod relay;
mod save;
mod session;
mod stamp;
mod status;
mod target;
#[cfg(test)]
mod testkit;
pub mod used;

pub use session::{run_agent, serve};

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use crate::proto::{Msg, ProtocolError, write_msg_sync};

pub use crate::image::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

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
    /// Another run holds the target: not worth a retry while it runs.
    #[error("{0}")]
    Busy(String),
    /// A patch did not verify over what the target holds: the target
    /// changed since the check. Nothing was written; a fresh attempt helps.
    #[error("{0}")]
    Stale(String),
}

impl AgentError {
    /// The kind the controller is told in `Msg::Error`.
    pub fn kind(&self) -> crate::proto::ErrorKind {
        use crate::proto::ErrorKind;
        match self {
            AgentError::Protocol(ProtocolError::Io(_) | ProtocolError::Closed)
            | AgentError::Closed(_) => ErrorKind::Closed,
            AgentError::Protocol(_) => ErrorKind::Protocol,
            AgentError::Target(_) | AgentError::Busy(_) => ErrorKind::Target,
            AgentError::Verify(_) => ErrorKind::Verify,
            AgentError::Peer(_) => ErrorKind::Other,
            AgentError::Relay(_) => ErrorKind::Relay,
            AgentError::Stale(_) => ErrorKind::Stale,
        }
    }

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
            | AgentError::Relay(_)
            | AgentError::Busy(_)
            | AgentError::Stale(_) => 3,
        }
    }
}

fn malformed(text: String) -> AgentError {
    AgentError::Protocol(ProtocolError::Malformed(text))
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
                kind: e.kind(),
                message: e.to_string(),
            },
        );
        let _ = self.w.flush();
    }
}

fn closed_as(e: ProtocolError, when: &'static str) -> AgentError {
    match e {
        ProtocolError::Closed => AgentError::Closed(when),
        e => e.into(),
    }
}

fn check_chunk_size(chunk_size: u32) -> Result<(), AgentError> {
    if crate::image::chunk_size_ok(chunk_size) {
        Ok(())
    } else {
        Err(malformed(format!(
            "chunk size {chunk_size} is not a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
        )))
    }
}
