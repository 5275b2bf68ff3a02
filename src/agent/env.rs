//! The agent's environment: where it keeps its state on the node, and how
//! many threads and frames in flight it uses.

use std::path::PathBuf;

/// Threads that check the target's chunks before a load, and that read and
/// compress chunks during a save.
pub(super) const WORKERS: usize = 2;
/// Frames received but not yet written: enough to overlap receiving with
/// verifying and writing, bounded so memory stays a few chunks.
pub(super) const RECEIVE_QUEUE: usize = 4;

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
