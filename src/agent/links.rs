//! What the relay's listener side and its successor side share: the load's
//! event queues, the relay timeout and secret, and the table of relay sockets.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::proto::{Msg, ProtocolError, RELAY_SECRET_LEN};

/// What the load's main loop reads, from [`Inbox`]: every source merged into
/// two bounded queues, so a fast sender waits for the disk and the successor.
pub(super) enum Event {
    /// A frame from the controller, or why its stream stopped.
    Control(Result<Msg, ProtocolError>),
    /// StreamChunk, StreamPiece or StreamEnd from an authenticated
    /// predecessor; `conn` numbers its connection (a later one is newer).
    Relayed { peer: String, conn: u64, msg: Msg },
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

/// The sending side of the load's queues: frames relayed by a predecessor
/// go into a queue of their own, everything else (the controller's frames,
/// link outcomes, refusals) into the control queue, which the main loop
/// reads first. So a RelayConnect, or the link it made, takes effect at
/// once: behind a slow successor, the relayed pieces queued before it take
/// seconds to pass on, and until it takes effect the chain waits for that
/// successor.
#[derive(Clone)]
pub(super) struct Events {
    control: Sender<Event>,
    relayed: Sender<Event>,
}

/// The load's main loop no longer reads its queues.
#[derive(Debug)]
pub(super) struct LoopGone;

/// The receiving side of [`Events`].
pub(super) struct Inbox {
    control: Receiver<Event>,
    relayed: Receiver<Event>,
}

/// Queues of `capacity` events each.
pub(super) fn events(capacity: usize) -> (Events, Inbox) {
    let (control, control_rx) = crossbeam_channel::bounded(capacity);
    let (relayed, relayed_rx) = crossbeam_channel::bounded(capacity);
    (
        Events { control, relayed },
        Inbox {
            control: control_rx,
            relayed: relayed_rx,
        },
    )
}

impl Events {
    /// Queue `event`, waiting while its queue is full; an error once the
    /// main loop is gone.
    pub(super) fn send(&self, event: Event) -> Result<(), LoopGone> {
        match event {
            Event::Relayed { .. } => self.relayed.send(event),
            _ => self.control.send(event),
        }
        .map_err(|_| LoopGone)
    }
}

impl Inbox {
    /// The next event, a control one first; `None` once every sender is
    /// gone and both queues are empty.
    pub(super) fn recv(&mut self) -> Option<Event> {
        let event = crossbeam_channel::select_biased! {
            recv(self.control) -> event => event,
            recv(self.relayed) -> event => event,
        };
        // Every sender ([`Events`]) holds both queues, so they close
        // together; a closed queue is always ready, and what either still
        // holds comes first.
        event
            .ok()
            .or_else(|| self.control.try_recv().ok())
            .or_else(|| self.relayed.try_recv().ok())
    }
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

#[cfg(test)]
mod tests {
    use super::{Event, events};
    use crate::proto::Msg;

    fn relayed(n: u32) -> Event {
        Event::Relayed {
            peer: format!("p{n}"),
            conn: 1,
            msg: Msg::StreamEnd,
        }
    }

    fn name(event: Option<Event>) -> String {
        match event {
            Some(Event::Relayed { peer, .. }) => peer,
            Some(Event::Control(Ok(msg))) => msg.name().to_string(),
            Some(_) => "other".into(),
            None => "closed".into(),
        }
    }

    #[test]
    fn control_events_go_first_and_the_inbox_ends_when_both_queues_do() {
        let (tx, mut inbox) = events(4);
        tx.send(relayed(1)).unwrap();
        tx.send(relayed(2)).unwrap();
        tx.send(Event::Control(Ok(Msg::Finish))).unwrap();
        assert_eq!(name(inbox.recv()), "Finish");
        assert_eq!(name(inbox.recv()), "p1");
        // The control queue closes first (its senders gone): what is
        // relayed still comes, then the end.
        let (control, relayed_only) = (tx.control.clone(), tx.relayed.clone());
        drop((tx, control));
        relayed_only.send(relayed(3)).unwrap();
        assert_eq!(name(inbox.recv()), "p2");
        assert_eq!(name(inbox.recv()), "p3");
        drop(relayed_only);
        assert_eq!(name(inbox.recv()), "closed");
        assert_eq!(name(inbox.recv()), "closed");
    }
}
