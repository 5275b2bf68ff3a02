//! The agent's side of the stream: replies framed and flushed, and the
//! one `Error` frame that tells the controller why the agent stops.

use std::io::{BufWriter, Write};

use crate::proto::{Msg, ProtocolError, write_msg_sync};

use super::error::AgentError;

/// The agent's side of the stream: frames, flushed when a reply is complete.
pub(super) struct Replies<W: Write> {
    w: BufWriter<W>,
    error_sent: bool,
}

impl<W: Write> Replies<W> {
    pub(super) fn new(w: W) -> Self {
        Replies {
            w: BufWriter::with_capacity(64 << 10, w),
            error_sent: false,
        }
    }

    /// Queue a frame; it leaves with the next flush or when the buffer fills.
    pub(super) fn send(&mut self, msg: &Msg) -> Result<(), AgentError> {
        write_msg_sync(&mut self.w, msg)?;
        Ok(())
    }

    pub(super) fn reply(&mut self, msg: &Msg) -> Result<(), AgentError> {
        self.send(msg)?;
        self.w.flush().map_err(ProtocolError::from)?;
        Ok(())
    }

    /// Tell the controller why we stop. Sent before waiting for the
    /// receiving thread, which only ends once the controller closes.
    pub(super) fn report(&mut self, e: &AgentError) {
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
