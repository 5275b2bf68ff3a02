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
mod env;
mod error;
mod links;
mod load;
mod lock;
mod mounts;
mod origin;
mod relay;
mod replies;
mod save;
mod session;
mod stamp;
mod status;
mod successor;
mod target;
#[cfg(test)]
mod testkit;
mod throttle;
pub mod used;
mod writeback;

pub use env::AgentEnv;
pub use error::AgentError;
pub use session::{run_agent, serve};

pub use crate::image::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
