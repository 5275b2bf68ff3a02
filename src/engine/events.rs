//! The one event stream every engine emits and every front end consumes.
//! Engines never touch the terminal: they send [`Event`]s; front ends draw.

use serde::Serialize;

/// What a node is doing, as shown to the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    Queued,
    Preparing,
    WaitingForSsh,
    Connecting,
    Checking,
    Transferring,
    Syncing,
    /// `wait`: the node accepted an SSH login and ran a command.
    Ok,
    Done,
    UpToDate,
    Failed,
    Timeout,
    Cancelled,
}

impl NodeState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            NodeState::Ok
                | NodeState::Done
                | NodeState::UpToDate
                | NodeState::Failed
                | NodeState::Timeout
                | NodeState::Cancelled
        )
    }

    pub fn is_success(self) -> bool {
        matches!(self, NodeState::Ok | NodeState::Done | NodeState::UpToDate)
    }

    /// The word users see (`waiting for ssh`, `up to date`).
    pub fn label(self) -> &'static str {
        match self {
            NodeState::Queued => "queued",
            NodeState::Preparing => "preparing",
            NodeState::WaitingForSsh => "waiting for ssh",
            NodeState::Connecting => "connecting",
            NodeState::Checking => "checking",
            NodeState::Transferring => "transferring",
            NodeState::Syncing => "syncing",
            NodeState::Ok => "ok",
            NodeState::Done => "done",
            NodeState::UpToDate => "up to date",
            NodeState::Failed => "failed",
            NodeState::Timeout => "timeout",
            NodeState::Cancelled => "cancelled",
        }
    }
}

/// Events carry node indices into the run's node list; front ends name them.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    State {
        node: usize,
        state: NodeState,
        message: Option<String>,
    },
    /// Cumulative counters for one node.
    Progress {
        node: usize,
        bytes_sent: u64,
        bytes_written: u64,
        total: u64,
    },
    Log {
        node: Option<usize>,
        text: String,
    },
    Finished(Summary),
}

/// The last JSON line of every run (the contract scripts rely on).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub command: String,
    pub ok: bool,
    pub elapsed_s: f64,
    pub nodes: Vec<NodeSummary>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeSummary {
    pub name: String,
    pub state: NodeState,
    pub bytes_sent: u64,
    pub bytes_written: u64,
    pub error: Option<String>,
    /// `save`: the name of the image saved from this node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Seconds from the run's start to this node's final state: tells a
    /// slow node from its neighbours.
    pub elapsed_s: f64,
}

impl Summary {
    pub fn new(command: &str, elapsed_s: f64, nodes: Vec<NodeSummary>) -> Self {
        let ok = nodes.iter().all(|n| n.state.is_success());
        Summary {
            command: command.into(),
            ok,
            // Milliseconds are enough for scripts (no `12.345678901`).
            elapsed_s: (elapsed_s * 1000.0).round() / 1000.0,
            nodes,
        }
    }

    pub fn failed(&self) -> impl Iterator<Item = &NodeSummary> {
        self.nodes.iter().filter(|n| !n.state.is_success())
    }
}
