//! What a load is asked to do: the run (the nodes, how to reach and treat
//! them) and, per image, the image and each node's target for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::engine::source::{ChunkSource, RateLimit};
use crate::inventory::Node;
use crate::node::agent_link::AgentSource;
use crate::node::ssh::SshSettings;

/// One `imaging load` over many nodes: what every image of the run shares.
pub struct LoadRun {
    pub nodes: Vec<Node>,
    pub ssh: SshSettings,
    pub agent: AgentSource,
    pub force: bool,
    /// Check every chunk's digest even where the stamp says up to date.
    pub verify: bool,
    pub retries: u32,
    pub concurrency: usize,
    pub rate: Option<Arc<RateLimit>>,
    /// Bytes put on the controller's links (the run's board counts them).
    pub wire: Arc<AtomicU64>,
    pub before: String,
    pub after: String,
    pub deadline: Instant,
    /// How long a retry waits for the node's SSH to come back.
    pub reconnect_wait: Duration,
    /// Star: how long an agent may acknowledge nothing it was sent.
    pub stall_timeout: Duration,
    /// Star (a stream per node) or a relay chain.
    pub chain: bool,
    /// Where relay listeners bind on the nodes ("" = all addresses) and their port range.
    pub relay_bind: String,
    pub relay_ports: (u16, u16),
}

impl LoadRun {
    /// `bytes` (compressed, as sent) are about to leave the controller: the
    /// bandwidth cap paces them, the wire counter counts them.
    pub(crate) async fn on_wire(&self, bytes: u64) {
        if let Some(rate) = &self.rate {
            rate.take(bytes).await;
        }
        self.wire.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// One image of a run, as the command prepared it.
pub struct ImageLoad {
    /// The image's file name, for hooks and stamps (`{image}`).
    pub name: String,
    /// Its chunks, read and compressed once for every node.
    pub source: Arc<ChunkSource>,
    /// Each node's target for this image, placeholders filled.
    pub targets: Vec<String>,
    /// Nodes whose target is the image file itself (a local agent's):
    /// up to date without a session.
    pub is_image: Vec<bool>,
}

/// One image's load over the run's nodes: what the star and the chain
/// strategies work on. The run's settings are reached through it
/// (`job.nodes`, `job.deadline`, …).
pub struct LoadJob {
    pub run: Arc<LoadRun>,
    /// The image's name, for hooks (`{image}`).
    pub image_name: String,
    pub source: Arc<ChunkSource>,
    /// Each node's target, placeholders filled.
    pub targets: Vec<String>,
    /// Nodes whose target is the image file itself (a local agent's):
    /// up to date without a session.
    pub is_image: Vec<bool>,
}

impl LoadJob {
    pub fn new(run: Arc<LoadRun>, image: ImageLoad) -> Self {
        LoadJob {
            run,
            image_name: image.name,
            source: image.source,
            targets: image.targets,
            is_image: image.is_image,
        }
    }
}

impl std::ops::Deref for LoadJob {
    type Target = LoadRun;

    fn deref(&self) -> &LoadRun {
        &self.run
    }
}
