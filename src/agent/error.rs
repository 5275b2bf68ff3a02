//! The agent's errors: the kind and exit code each one has, and the
//! checks of a request that fail with them.

use crate::image::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::proto::ProtocolError;

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

pub(super) fn malformed(text: String) -> AgentError {
    AgentError::Protocol(ProtocolError::Malformed(text))
}

pub(super) fn closed_as(e: ProtocolError, when: &'static str) -> AgentError {
    match e {
        ProtocolError::Closed => AgentError::Closed(when),
        e => e.into(),
    }
}

pub(super) fn check_chunk_size(chunk_size: u32) -> Result<(), AgentError> {
    if crate::image::chunk_size_ok(chunk_size) {
        Ok(())
    } else {
        Err(malformed(format!(
            "chunk size {chunk_size} is not a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
        )))
    }
}
