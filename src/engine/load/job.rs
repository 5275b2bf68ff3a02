//! What a load is asked to do: the image, the nodes and their targets, and
//! how to reach and treat them.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::engine::source::{ChunkSource, RateLimit};
use crate::inventory::Node;
use crate::node::agent_link::AgentSource;
use crate::node::ssh::SshSettings;

/// One `imaging load` over many nodes.
pub struct LoadJob {
    /// The image's name, for hooks (`{image}`).
    pub image_name: String,
    pub source: Arc<ChunkSource>,
    pub nodes: Vec<Node>,
    /// Each node's target, placeholders filled.
    pub targets: Vec<String>,
    pub ssh: SshSettings,
    pub agent: AgentSource,
    pub force: bool,
    /// Check every chunk's digest even where the stamp says up to date.
    pub verify: bool,
    /// Nodes whose target is the image file itself (a local agent's):
    /// up to date without a session.
    pub is_image: Vec<bool>,
    pub retries: u32,
    pub concurrency: usize,
    pub rate: Option<Arc<RateLimit>>,
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
