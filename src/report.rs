//! How engines report: a [`Reporter`] sends [`Event`]s to the front end and
//! keeps the book from which the run's [`Summary`] is made, also when the
//! run is cut short (Ctrl-C, deadline).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::events::{Event, NodeState, NodeSummary, Summary};

#[derive(Clone)]
pub struct Reporter {
    tx: UnboundedSender<Event>,
    book: Arc<Mutex<Vec<NodeSummary>>>,
    command: String,
    started: Instant,
}

impl Reporter {
    pub fn new(command: &str, names: &[String], tx: UnboundedSender<Event>) -> Self {
        let book = names
            .iter()
            .map(|name| NodeSummary {
                name: name.clone(),
                state: NodeState::Queued,
                bytes_sent: 0,
                bytes_written: 0,
                error: None,
            })
            .collect();
        Reporter {
            tx,
            book: Arc::new(Mutex::new(book)),
            command: command.into(),
            started: Instant::now(),
        }
    }

    fn with_book<R>(&self, f: impl FnOnce(&mut Vec<NodeSummary>) -> R) -> R {
        // A poisoned book only means another task panicked mid-update; the
        // counters are still the best we know.
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut book)
    }

    pub fn state(&self, node: usize, state: NodeState, message: Option<String>) {
        self.with_book(|b| {
            b[node].state = state;
            if matches!(
                state,
                NodeState::Failed | NodeState::Timeout | NodeState::Cancelled
            ) {
                b[node].error = message.clone();
            }
        });
        let _ = self.tx.send(Event::State {
            node,
            state,
            message,
        });
    }

    pub fn progress(&self, node: usize, bytes_sent: u64, bytes_written: u64, total: u64) {
        self.with_book(|b| {
            b[node].bytes_sent = bytes_sent;
            b[node].bytes_written = bytes_written;
        });
        let _ = self.tx.send(Event::Progress {
            node,
            bytes_sent,
            bytes_written,
            total,
        });
    }

    pub fn log(&self, node: Option<usize>, text: impl Into<String>) {
        let _ = self.tx.send(Event::Log {
            node,
            text: text.into(),
        });
    }

    /// Nodes not in a final state are marked `to` (e.g. cancelled) with `why`.
    pub fn close_unfinished(&self, to: NodeState, why: &str) {
        let open: Vec<usize> =
            self.with_book(|b| (0..b.len()).filter(|&i| !b[i].state.is_final()).collect());
        for i in open {
            self.state(i, to, Some(why.to_string()));
        }
    }

    /// The summary so far; also sent to the front end as the last event.
    pub fn finish(&self) -> Summary {
        let nodes = self.with_book(|b| b.clone());
        let summary = Summary::new(&self.command, self.started.elapsed().as_secs_f64(), nodes);
        let _ = self.tx.send(Event::Finished(summary.clone()));
        summary
    }
}
