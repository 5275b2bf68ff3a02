//! What the relay's listener side and its successor side share: the load's
//! event queue, the relay timeout and secret, and the table of relay sockets.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::proto::{Msg, ProtocolError, RELAY_SECRET_LEN};

/// What the load's main loop reads: every source merged into one bounded
/// queue, so a fast sender waits for the disk and the successor.
pub(super) enum Event {
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

/// How long a relay connect may take, a relay handshake as a whole, and one
/// write to the successor without progress.
pub(super) const RELAY_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) type Secret = [u8; RELAY_SECRET_LEN];

/// Relay sockets that threads block on (handshakes, predecessors), so the
/// end of the load can shut them all down.
#[derive(Default)]
pub(super) struct Connections {
    pub(super) table: Mutex<ConnectionTable>,
}

#[derive(Default)]
pub(super) struct ConnectionTable {
    pub(super) closed: bool,
    pub(super) last_id: u64,
    /// Each socket and whether it has authenticated.
    pub(super) open: HashMap<u64, (TcpStream, bool)>,
}

impl Connections {
    pub(super) fn table(&self) -> std::sync::MutexGuard<'_, ConnectionTable> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Track a socket not yet authenticated; refused once the load is over
    /// or `limit` such sockets are open.
    pub(super) fn add(&self, stream: &TcpStream, limit: usize) -> Result<u64, String> {
        let clone = stream
            .try_clone()
            .map_err(|e| format!("cannot track the connection: {e}"))?;
        let mut table = self.table();
        if table.closed {
            return Err("the load is over".into());
        }
        let pending = table.open.values().filter(|(_, auth)| !auth).count();
        if pending >= limit {
            return Err(format!(
                "too many relay connections in their handshake (at most {limit})"
            ));
        }
        table.last_id += 1;
        let id = table.last_id;
        table.open.insert(id, (clone, false));
        Ok(id)
    }

    /// Count socket `id` as authenticated; refused if `limit` are already.
    pub(super) fn authenticated(&self, id: u64, limit: usize) -> Result<(), String> {
        let mut table = self.table();
        let count = table.open.values().filter(|(_, auth)| *auth).count();
        if count >= limit {
            return Err(format!("too many relay connections (at most {limit})"));
        }
        match table.open.get_mut(&id) {
            Some(entry) => {
                entry.1 = true;
                Ok(())
            }
            None => Err("the load is over".into()),
        }
    }

    pub(super) fn remove(&self, id: u64) {
        self.table().open.remove(&id);
    }

    pub(super) fn closed(&self) -> bool {
        self.table().closed
    }

    pub(super) fn close_all(&self) {
        let mut table = self.table();
        table.closed = true;
        for (stream, _) in table.open.values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        table.open.clear();
    }
}
