//! How engines report. State changes and log lines travel as [`Event`]s;
//! byte counters live on a [`Board`] of per-node atomics that front ends
//! sample at their own pace, so a node reporting progress a million times
//! a second costs the UI nothing. The board also makes the run's
//! [`Summary`], also when the run is cut short (Ctrl-C, deadline).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::engine::events::{Event, NodeState, NodeSummary, Summary};

/// One node's live counters and state.
#[derive(Debug)]
pub struct NodeCell {
    pub name: String,
    bytes_sent: AtomicU64,
    bytes_written: AtomicU64,
    total: AtomicU64,
    state: Mutex<(NodeState, Option<String>)>,
    /// `save`: the name of the image this node was saved into.
    image: Mutex<Option<String>>,
    /// Milliseconds from the run's start to the node's first final state;
    /// `NOT_FINISHED` until then.
    finished_ms: AtomicU64,
}

const NOT_FINISHED: u64 = u64::MAX;

/// A consistent-enough reading of one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeReading {
    pub state: NodeState,
    pub message: Option<String>,
    pub bytes_sent: u64,
    pub bytes_written: u64,
    /// Bytes this node has to write in all (0 while unknown).
    pub total: u64,
}

/// The live state of every node of a run.
#[derive(Debug)]
pub struct Board {
    pub nodes: Vec<NodeCell>,
    /// Bytes that left the controller for the nodes, as sent (compressed):
    /// what the bandwidth cap limits.
    pub wire: Arc<AtomicU64>,
    started: Instant,
}

impl Board {
    pub fn new(names: &[String]) -> Arc<Self> {
        Arc::new(Board {
            nodes: names
                .iter()
                .map(|name| NodeCell {
                    name: name.clone(),
                    bytes_sent: AtomicU64::new(0),
                    bytes_written: AtomicU64::new(0),
                    total: AtomicU64::new(0),
                    state: Mutex::new((NodeState::Queued, None)),
                    image: Mutex::new(None),
                    finished_ms: AtomicU64::new(NOT_FINISHED),
                })
                .collect(),
            wire: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        })
    }

    /// Bytes sent on the controller's links so far (compressed).
    pub fn wire_bytes(&self) -> u64 {
        self.wire.load(Ordering::Relaxed)
    }

    pub fn read(&self, i: usize) -> NodeReading {
        let cell = &self.nodes[i];
        let (state, message) = cell.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        NodeReading {
            state,
            message,
            bytes_sent: cell.bytes_sent.load(Ordering::Relaxed),
            bytes_written: cell.bytes_written.load(Ordering::Relaxed),
            total: cell.total.load(Ordering::Relaxed),
        }
    }

    /// Set counters directly (engines call this through [`Reporter`]).
    pub fn set_progress(&self, i: usize, bytes_sent: u64, bytes_written: u64, total: u64) {
        let cell = &self.nodes[i];
        cell.bytes_sent.store(bytes_sent, Ordering::Relaxed);
        cell.bytes_written.store(bytes_written, Ordering::Relaxed);
        if total > 0 {
            cell.total.store(total, Ordering::Relaxed);
        }
    }

    fn set_state(&self, i: usize, state: NodeState, message: Option<String>) {
        if state.is_final() {
            let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
            // The first final state counts: a later relabel keeps the time.
            let _ = self.nodes[i].finished_ms.compare_exchange(
                NOT_FINISHED,
                ms,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        *self.nodes[i]
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = (state, message);
    }

    pub fn summary(&self, command: &str, elapsed_s: f64) -> Summary {
        let nodes = (0..self.nodes.len())
            .map(|i| {
                let r = self.read(i);
                let finished = self.nodes[i].finished_ms.load(Ordering::Relaxed);
                NodeSummary {
                    name: self.nodes[i].name.clone(),
                    // Unfinished nodes (a summary taken early) count the whole run.
                    elapsed_s: if finished == NOT_FINISHED {
                        elapsed_s
                    } else {
                        finished as f64 / 1000.0
                    },
                    state: r.state,
                    bytes_sent: r.bytes_sent,
                    bytes_written: r.bytes_written,
                    error: if r.state.is_success() {
                        None
                    } else {
                        r.message
                    },
                    image: self.nodes[i]
                        .image
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                }
            })
            .collect();
        Summary::new(command, elapsed_s, nodes)
    }
}

#[derive(Clone)]
pub struct Reporter {
    tx: UnboundedSender<Event>,
    board: Arc<Board>,
    command: String,
    started: Instant,
    /// A part of the run (one image of a load of several): its node `i`
    /// is the board's row `rows[i]`. None: node `i` is row `i`.
    rows: Option<Arc<[usize]>>,
}

impl Reporter {
    pub fn new(command: &str, board: Arc<Board>, tx: UnboundedSender<Event>) -> Self {
        Reporter {
            tx,
            board,
            command: command.into(),
            started: Instant::now(),
            rows: None,
        }
    }

    /// The same run, seen by a part of it whose node `i` is the board's
    /// row `rows[i]` (a load of several images has a row per node and image).
    pub fn rows(&self, rows: Vec<usize>) -> Reporter {
        let rows: Vec<usize> = match &self.rows {
            Some(mine) => rows.into_iter().map(|r| mine[r]).collect(),
            None => rows,
        };
        Reporter {
            rows: Some(rows.into()),
            ..self.clone()
        }
    }

    /// The board row of node `i`.
    fn row(&self, i: usize) -> usize {
        match &self.rows {
            Some(rows) => rows[i],
            None => i,
        }
    }

    pub fn board(&self) -> &Arc<Board> {
        &self.board
    }

    pub fn state(&self, node: usize, state: NodeState, message: Option<String>) {
        self.set_row_state(self.row(node), state, message);
    }

    fn set_row_state(&self, node: usize, state: NodeState, message: Option<String>) {
        self.board.set_state(node, state, message.clone());
        let _ = self.tx.send(Event::State {
            node,
            state,
            message,
        });
    }

    /// `save`: the node's data is now the image `name` in the repository.
    pub fn image(&self, node: usize, name: &str) {
        *self.board.nodes[self.row(node)]
            .image
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(name.to_string());
    }

    /// Cumulative counters; `total` 0 keeps the known total. No event: front
    /// ends sample the board.
    pub fn progress(&self, node: usize, bytes_sent: u64, bytes_written: u64, total: u64) {
        self.board
            .set_progress(self.row(node), bytes_sent, bytes_written, total);
    }

    pub fn log(&self, node: Option<usize>, text: impl Into<String>) {
        let _ = self.tx.send(Event::Log {
            node: node.map(|i| self.row(i)),
            text: text.into(),
        });
    }

    /// Rows not in a final state are marked `to` (e.g. cancelled) with `why`.
    pub fn close_unfinished(&self, to: NodeState, why: &str) {
        for i in 0..self.board.nodes.len() {
            if !self.board.read(i).state.is_final() {
                self.set_row_state(i, to, Some(why.to_string()));
            }
        }
    }

    /// The summary; also sent to the front end as the last event.
    pub fn finish(&self) -> Summary {
        let summary = self
            .board
            .summary(&self.command, self.started.elapsed().as_secs_f64());
        let _ = self.tx.send(Event::Finished(summary.clone()));
        summary
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_part_of_the_run_reports_on_its_own_rows() {
        // Two nodes × two images, node by node: image 1 is rows 1 and 3.
        let names: Vec<String> = ["n1", "n1", "n2", "n2"].map(String::from).to_vec();
        let board = Board::new(&names);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let report = Reporter::new("load", board.clone(), tx);
        let second = report.rows(vec![1, 3]);
        second.state(1, NodeState::Done, None);
        second.progress(0, 10, 20, 30);
        second.log(Some(1), "n2");
        second.image(0, "b.img");
        assert_eq!(board.read(3).state, NodeState::Done);
        assert_eq!(board.read(2).state, NodeState::Queued);
        assert_eq!(board.read(1).bytes_written, 20);
        assert_eq!(board.read(0).bytes_written, 0);
        assert!(matches!(rx.try_recv(), Ok(Event::State { node: 3, .. })));
        assert!(matches!(
            rx.try_recv(),
            Ok(Event::Log { node: Some(3), .. })
        ));
        // A part of a part: its node 0 is the part's node 1, row 3.
        report
            .rows(vec![1, 3])
            .rows(vec![1])
            .state(0, NodeState::Failed, None);
        assert_eq!(board.read(3).state, NodeState::Failed);
        report.close_unfinished(NodeState::Cancelled, "interrupted");
        let summary = report.finish();
        let states: Vec<_> = summary.nodes.iter().map(|n| n.state).collect();
        assert_eq!(
            states,
            [
                NodeState::Cancelled,
                NodeState::Cancelled,
                NodeState::Cancelled,
                NodeState::Failed
            ]
        );
        assert_eq!(summary.nodes[1].image.as_deref(), Some("b.img"));
    }

    #[test]
    fn each_node_keeps_the_time_it_reached_its_final_state() {
        let board = Board::new(&["fast".into(), "slow".into(), "open".into()]);
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let report = Reporter::new("load", board, tx);
        report.state(0, NodeState::Done, None);
        std::thread::sleep(Duration::from_millis(300));
        report.state(1, NodeState::Failed, Some("no space".into()));
        // A later relabel does not move the time.
        std::thread::sleep(Duration::from_millis(100));
        report.state(1, NodeState::Failed, Some("no space left".into()));
        std::thread::sleep(Duration::from_millis(100));
        let summary = report.finish();
        let [fast, slow, open] = &summary.nodes[..] else {
            panic!("{summary:?}")
        };
        // Sleeps are minimums, so these margins hold on a busy machine too.
        assert!(fast.elapsed_s <= slow.elapsed_s - 0.29, "{summary:?}");
        assert!(slow.elapsed_s >= 0.3, "{slow:?}");
        assert!(slow.elapsed_s <= open.elapsed_s - 0.19, "{summary:?}");
        // Not finished: the whole run.
        assert!(open.elapsed_s >= 0.5, "{open:?}");
        assert!(open.elapsed_s <= summary.elapsed_s + 0.001, "{summary:?}");
        let json = serde_json::to_value(&summary).unwrap();
        assert!(json["nodes"][1]["elapsed_s"].as_f64().unwrap() >= 0.3);
    }
}
