//! What can go wrong with one node, typed: the load and the save carry a
//! [`NodeError`] from where it happens to the report, and decide on a
//! retry with [`NodeError::is_retryable`], never from the words of a
//! message. What the agent says arrives as a protocol `Error` frame with a
//! kind ([`ErrorKind`]), not as lines of its stderr.
//!
//! Each variant's text is what the node's line in the summary says.

use crate::engine::events::NodeState;
use crate::engine::source::SourceError;
use crate::node::agent_link::{self, Rx, StartError};
use crate::proto::{ErrorKind, ProtocolError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeError {
    /// SSH gave no session: refused for good, or not up by the deadline
    /// (the text says which, with ssh's reason). The wait for the node
    /// already retried what was worth it.
    Ssh(String),
    /// A reconnection: SSH did not come back within `reconnect_wait`.
    NotBack(String),
    /// The agent could not be started, or did not answer its Hello.
    AgentStart(String),
    /// The configured agent is not on the node.
    NoAgent(String),
    /// The agent said why it stopped, in an `Error` frame.
    Agent { kind: ErrorKind, message: String },
    /// The link to the agent broke in the middle of the session.
    Lost(String),
    /// The agent's answer broke the protocol (a bad frame, a message out
    /// of place).
    Protocol(String),
    /// Data from the node failed the controller's verification.
    Verify(String),
    /// The image could not be read.
    Image(String),
    /// The image file no longer matches its manifest: it changed after the
    /// manifest was built (chunk `chunk` told).
    ImageChanged { chunk: usize },
    /// The agent took no data for the stall timeout.
    Stalled { secs: u64 },
    /// The controller's own files (a save's partial file, the repository).
    Local(String),
    /// Cut out of the relay chain.
    Cut(String),
    /// The last failure of an attempt that was retried `retries` times.
    GaveUp { last: Box<NodeError>, retries: u32 },
    /// A local hook around the node failed.
    Hook {
        /// `before` or `after`.
        which: &'static str,
        message: String,
    },
    /// The run's deadline came first.
    Deadline,
    /// The run was interrupted.
    Cancelled,
    /// A bug: the node's task ended without an answer.
    Internal(String),
}

impl NodeError {
    /// Worth another attempt on this node: the link dropped or stalled (on
    /// our side, or the agent says its input went away), or the agent did
    /// not start (its upload or Hello may have been cut). Anything the node
    /// said, refused or failed to verify stays so.
    pub fn is_retryable(&self) -> bool {
        match self {
            NodeError::Lost(_) | NodeError::Stalled { .. } | NodeError::AgentStart(_) => true,
            // A patch met a target that changed since it was checked: a
            // fresh attempt checks it again.
            NodeError::Agent { kind, .. } => matches!(kind, ErrorKind::Closed | ErrorKind::Stale),
            NodeError::Ssh(_)
            | NodeError::NoAgent(_)
            | NodeError::NotBack(_)
            | NodeError::Protocol(_)
            | NodeError::Verify(_)
            | NodeError::Image(_)
            | NodeError::ImageChanged { .. }
            | NodeError::Local(_)
            | NodeError::Cut(_)
            | NodeError::GaveUp { .. }
            | NodeError::Hook { .. }
            | NodeError::Deadline
            | NodeError::Cancelled
            | NodeError::Internal(_) => false,
        }
    }

    /// The agent refused a patch: the target changed since it was checked.
    pub fn is_stale(&self) -> bool {
        matches!(
            self,
            NodeError::Agent {
                kind: ErrorKind::Stale,
                ..
            }
        )
    }

    /// The state a node ends in with this error.
    pub fn state(&self) -> NodeState {
        match self {
            NodeError::Deadline => NodeState::Timeout,
            NodeError::Cancelled => NodeState::Cancelled,
            _ => NodeState::Failed,
        }
    }

    /// A session that failed on its link (a write the agent did not take,
    /// a read cut short) may still hold the agent's `Error` frame, sent
    /// before it ended: then that is the reason, with its kind.
    pub async fn explained(self, rx: &mut Rx) -> NodeError {
        if !matches!(self, NodeError::Lost(_)) {
            return self;
        }
        let said = agent_link::last_word(rx)
            .await
            .map(|(kind, message)| NodeError::Agent { kind, message });
        self.or_agent_said(said)
    }

    /// The link failed, and the agent said why first (or not): the reason.
    pub fn or_agent_said(self, said: Option<NodeError>) -> NodeError {
        match (self, said) {
            (NodeError::Lost(_), Some(said)) => said,
            (e, _) => e,
        }
    }
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeError::Ssh(s)
            | NodeError::AgentStart(s)
            | NodeError::NoAgent(s)
            | NodeError::Lost(s)
            | NodeError::Protocol(s)
            | NodeError::Verify(s)
            | NodeError::Image(s)
            | NodeError::Local(s)
            | NodeError::Internal(s) => f.write_str(s),
            NodeError::NotBack(s) => write!(f, "did not come back: {s}"),
            NodeError::ImageChanged { chunk } => write!(
                f,
                "the image changed while loading (chunk {chunk} no longer matches its manifest)"
            ),
            NodeError::Agent { message, .. } => write!(f, "agent: {message}"),
            NodeError::Stalled { secs } => {
                write!(f, "stalled: the agent took no data for {secs} s")
            }
            NodeError::Cut(why) => write!(f, "cut out of the relay chain: {why}"),
            NodeError::GaveUp { last, retries } => {
                write!(f, "{last}; gave up after {retries} retries")
            }
            NodeError::Hook { which, message } => write!(f, "{which} hook: {message}"),
            NodeError::Deadline => f.write_str("deadline reached"),
            NodeError::Cancelled => f.write_str("interrupted"),
        }
    }
}

impl std::error::Error for NodeError {}

impl From<StartError> for NodeError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Missing(s) => NodeError::NoAgent(s),
            StartError::Failed(s) => NodeError::AgentStart(s),
            StartError::Incompatible(s) => NodeError::Protocol(s),
        }
    }
}

impl From<SourceError> for NodeError {
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Changed { index } => NodeError::ImageChanged { chunk: index },
            SourceError::Read { .. } => NodeError::Image(e.to_string()),
            SourceError::Reader(_) => NodeError::Internal(e.to_string()),
        }
    }
}

impl From<ProtocolError> for NodeError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Closed | ProtocolError::Io(_) => {
                NodeError::Lost(format!("connection lost ({e})"))
            }
            other => NodeError::Protocol(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_broken_link_or_a_failed_start_is_worth_a_retry() {
        let closed = NodeError::Agent {
            kind: ErrorKind::Closed,
            message: "connection closed mid-load".into(),
        };
        let full = NodeError::Agent {
            kind: ErrorKind::Target,
            message: "No space left on device".into(),
        };
        assert!(closed.is_retryable());
        assert!(!full.is_retryable());
        assert!(NodeError::from(ProtocolError::Closed).is_retryable());
        assert!(!NodeError::from(ProtocolError::Malformed("x".into())).is_retryable());
        assert!(NodeError::Stalled { secs: 30 }.is_retryable());
        for e in [
            NodeError::Ssh("permission denied".into()),
            NodeError::from(StartError::Missing("no agent at /x".into())),
            NodeError::Verify("chunk 3 failed verification".into()),
            NodeError::Cut("stalled".into()),
            NodeError::Deadline,
            NodeError::Cancelled,
        ] {
            assert!(!e.is_retryable(), "{e}");
        }
    }

    #[test]
    fn the_agent_s_last_word_replaces_a_lost_link_only() {
        let said = NodeError::Agent {
            kind: ErrorKind::Target,
            message: "No space left on device".into(),
        };
        let lost = NodeError::from(ProtocolError::Closed);
        assert_eq!(lost.clone().or_agent_said(Some(said.clone())), said);
        assert_eq!(lost.clone().or_agent_said(None), lost);
        let bad = NodeError::Protocol("agent sent Needed during the transfer".into());
        assert_eq!(bad.clone().or_agent_said(Some(said)), bad);
    }

    #[test]
    fn texts_say_what_happened() {
        let gave_up = NodeError::GaveUp {
            last: Box::new(NodeError::Stalled { secs: 30 }),
            retries: 2,
        };
        assert_eq!(
            gave_up.to_string(),
            "stalled: the agent took no data for 30 s; gave up after 2 retries"
        );
        assert_eq!(
            NodeError::Hook {
                which: "after",
                message: "exit 3".into()
            }
            .to_string(),
            "after hook: exit 3"
        );
        assert_eq!(NodeError::Deadline.state(), NodeState::Timeout);
        assert_eq!(NodeError::Cancelled.state(), NodeState::Cancelled);
        assert_eq!(NodeError::Deadline.to_string(), "deadline reached");
    }
}
