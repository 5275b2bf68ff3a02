//! What every front end shows, derived from the event stream and sampled
//! board counters: per-node state, bytes, smoothed rates and ETAs, totals,
//! the latest log lines, and the final summary. Rendering reads only this.

use std::collections::VecDeque;
use std::time::Duration;

use crate::engine::events::{Event, NodeState, Summary};
use crate::engine::report::Board;
use crate::ui::fmt::{human_bytes, human_cap, human_rate};

/// Log lines kept for the dashboard.
const LOG_LINES: usize = 200;

#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub state: NodeState,
    pub message: Option<String>,
    pub bytes_sent: u64,
    pub bytes_written: u64,
    /// Bytes this node has to write (0 while unknown).
    pub total: u64,
    /// Bytes written per second, smoothed.
    pub rate: f64,
}

impl NodeView {
    pub fn fraction(&self) -> f64 {
        if self.state.is_success() {
            1.0
        } else if self.total == 0 {
            0.0
        } else {
            (self.bytes_written as f64 / self.total as f64).clamp(0.0, 1.0)
        }
    }

    pub fn eta(&self) -> Option<Duration> {
        if self.state.is_final() || self.rate < 1.0 || self.total == 0 {
            return None;
        }
        let left = self.total.saturating_sub(self.bytes_written) as f64;
        Duration::try_from_secs_f64(left / self.rate).ok()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageHeader {
    pub name: String,
    pub size: u64,
    pub data_size: u64,
    /// The bandwidth cap on the controller's links, bytes/s (0: none).
    pub cap: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub at: Duration,
    pub text: String,
    pub is_error: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub command: String,
    pub image: Option<ImageHeader>,
    pub nodes: Vec<NodeView>,
    pub log: VecDeque<LogLine>,
    pub elapsed: Duration,
    pub summary: Option<Summary>,
    /// Where the run's log file is, if any.
    pub log_path: Option<String>,
    /// Bytes sent on the controller's links (compressed) and their
    /// smoothed rate: what the bandwidth cap limits.
    pub wire_bytes: u64,
    pub wire_rate: f64,
    /// `load` of several images: how many (a row per node and image);
    /// 0 otherwise.
    pub images: usize,
}

impl View {
    pub fn new(command: &str, names: &[String], image: Option<ImageHeader>) -> Self {
        View {
            command: command.into(),
            image,
            nodes: names
                .iter()
                .map(|n| NodeView {
                    name: n.clone(),
                    state: NodeState::Queued,
                    message: None,
                    bytes_sent: 0,
                    bytes_written: 0,
                    total: 0,
                    rate: 0.0,
                })
                .collect(),
            log: VecDeque::new(),
            elapsed: Duration::ZERO,
            summary: None,
            log_path: None,
            wire_bytes: 0,
            wire_rate: 0.0,
            images: 0,
        }
    }

    /// What the rows are: `nodes`, or `node images` (a row per node and image).
    pub fn rows_word(&self) -> &'static str {
        if self.images > 1 {
            "node images"
        } else {
            "nodes"
        }
    }

    /// ` · 12 nodes`, or ` · 12 nodes × 2 images`.
    pub fn scope(&self) -> String {
        let rows = self.nodes.len();
        if self.images > 1 {
            format!(" · {} nodes × {} images", rows / self.images, self.images)
        } else {
            format!(" · {rows} node{}", if rows == 1 { "" } else { "s" })
        }
    }

    pub fn push_log(&mut self, text: String, is_error: bool) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(LogLine {
            at: self.elapsed,
            text,
            is_error,
        });
    }

    /// Fold one event in.
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::State {
                node,
                state,
                message,
            } => {
                let Some(n) = self.nodes.get_mut(*node) else {
                    return;
                };
                n.state = *state;
                n.message = message.clone();
                if state.is_final() {
                    n.rate = 0.0;
                }
                let name = n.name.clone();
                let failed = matches!(state, NodeState::Failed | NodeState::Timeout);
                if state.is_final() || message.is_some() {
                    let text = match message {
                        Some(m) => format!("{name}: {} ({m})", state.label()),
                        None => format!("{name}: {}", state.label()),
                    };
                    self.push_log(text, failed);
                }
            }
            Event::Progress {
                node,
                bytes_sent,
                bytes_written,
                total,
            } => {
                if let Some(n) = self.nodes.get_mut(*node) {
                    n.bytes_sent = *bytes_sent;
                    n.bytes_written = *bytes_written;
                    if *total > 0 {
                        n.total = *total;
                    }
                }
            }
            Event::Log { text, .. } => self.push_log(text.clone(), false),
            Event::Finished(summary) => {
                for (n, s) in self.nodes.iter_mut().zip(&summary.nodes) {
                    n.state = s.state;
                    n.bytes_sent = s.bytes_sent;
                    n.bytes_written = s.bytes_written;
                    n.rate = 0.0;
                    if s.error.is_some() {
                        n.message = s.error.clone();
                    }
                }
                self.elapsed = Duration::from_secs_f64(summary.elapsed_s);
                self.summary = Some(summary.clone());
            }
        }
    }

    /// Take the board's counters; `dt` since the last sample smooths rates.
    pub fn sample(&mut self, board: &Board, elapsed: Duration) {
        let dt = elapsed.saturating_sub(self.elapsed).as_secs_f64();
        self.elapsed = elapsed;
        let wire = board.wire_bytes();
        if dt > 0.0 {
            let instant = wire.saturating_sub(self.wire_bytes) as f64 / dt;
            self.wire_rate += (dt / 2.0).min(1.0) * (instant - self.wire_rate);
        }
        self.wire_bytes = wire;
        for (i, n) in self.nodes.iter_mut().enumerate() {
            let r = board.read(i);
            if dt > 0.0 && !n.state.is_final() {
                let instant = r.bytes_written.saturating_sub(n.bytes_written) as f64 / dt;
                // Exponential smoothing over roughly two seconds.
                let alpha = (dt / 2.0).min(1.0);
                n.rate += alpha * (instant - n.rate);
            }
            n.bytes_sent = r.bytes_sent;
            n.bytes_written = r.bytes_written;
            if r.total > 0 {
                n.total = r.total;
            }
        }
    }

    /// (written, total, rate) over all nodes.
    pub fn totals(&self) -> (u64, u64, f64) {
        let written = self.nodes.iter().map(|n| n.bytes_written).sum();
        let total = self
            .nodes
            .iter()
            .map(|n| n.total.max(n.bytes_written))
            .sum();
        let rate = self.nodes.iter().map(|n| n.rate).sum();
        (written, total, rate)
    }

    /// `wire 38 MiB/s ≤ 40 MiB/s`: what crossed the controller's links
    /// (compressed), beside the cap that limits it; None if neither exists.
    pub fn wire_text(&self, running: bool) -> Option<String> {
        let cap = self.image.as_ref().map_or(0, |i| i.cap);
        if cap == 0 && self.wire_bytes == 0 {
            return None;
        }
        let mut text = if running {
            format!("wire {}", human_rate(self.wire_rate))
        } else {
            format!("wire {}", human_bytes(self.wire_bytes))
        };
        if cap > 0 {
            text.push_str(&format!(" ≤ {}", human_cap(cap)));
        }
        Some(text)
    }

    pub fn eta(&self) -> Option<Duration> {
        let (written, total, rate) = self.totals();
        if rate < 1.0 || total == 0 || self.summary.is_some() {
            return None;
        }
        Duration::try_from_secs_f64(total.saturating_sub(written) as f64 / rate).ok()
    }

    /// How many nodes are in each state, in display order.
    pub fn counts(&self) -> Vec<(NodeState, usize)> {
        let mut out: Vec<(NodeState, usize)> = Vec::new();
        for n in &self.nodes {
            match out.iter_mut().find(|(s, _)| *s == n.state) {
                Some((_, c)) => *c += 1,
                None => out.push((n.state, 1)),
            }
        }
        out.sort_by_key(|(s, _)| *s as u8);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_rate_is_shown_beside_its_cap() {
        let names = vec!["a".to_string()];
        let board = Board::new(&names);
        let image = ImageHeader {
            name: "x.img".into(),
            size: 1 << 30,
            data_size: 1 << 30,
            cap: 40 << 20,
        };
        let mut view = View::new("load", &names, Some(image));
        assert_eq!(view.wire_text(true).unwrap(), "wire 0 B/s ≤ 40 MiB/s");
        board
            .wire
            .store(40 << 20, std::sync::atomic::Ordering::Relaxed);
        view.sample(&board, Duration::from_secs(2));
        assert_eq!(view.wire_text(true).unwrap(), "wire 20 MiB/s ≤ 40 MiB/s");
        assert_eq!(view.wire_text(false).unwrap(), "wire 40 MiB ≤ 40 MiB/s");
        let plain = View::new("wait", &names, None);
        assert_eq!(plain.wire_text(true), None);
    }

    #[test]
    fn sampling_tracks_bytes_and_smooths_rates() {
        let names = vec!["a".to_string(), "b".to_string()];
        let board = Board::new(&names);
        let mut view = View::new("load", &names, None);
        view.apply(&Event::State {
            node: 0,
            state: NodeState::Transferring,
            message: None,
        });
        board.set_progress(0, 100, 10 << 20, 100 << 20);
        view.sample(&board, Duration::from_secs(1));
        assert_eq!(view.nodes[0].bytes_written, 10 << 20);
        assert!(view.nodes[0].rate > 0.0);
        assert!(view.nodes[0].eta().is_some());
        assert_eq!(view.nodes[1].fraction(), 0.0);
        assert!((view.nodes[0].fraction() - 0.1).abs() < 1e-9);
        view.apply(&Event::State {
            node: 1,
            state: NodeState::Failed,
            message: Some("disk full".into()),
        });
        assert!(view.log.back().unwrap().is_error);
        assert!(view.log.back().unwrap().text.contains("disk full"));
    }

    #[test]
    fn rows_per_node_and_image_are_counted_as_such() {
        let info = crate::ui::RunInfo {
            command: "load".into(),
            names: ["n1", "n1", "n2", "n2"].map(String::from).to_vec(),
            row_images: ["a.img", "b.img", "a.img", "b.img"]
                .map(String::from)
                .to_vec(),
            verbose: true,
            image: None,
            log_path: None,
            no_wait: false,
        };
        assert_eq!(info.image_count(), 2);
        assert_eq!(info.label(3), "n2:b.img");
        let mut view = View::new("load", &info.labels(), None);
        view.images = info.image_count();
        assert_eq!(view.scope(), " · 2 nodes × 2 images");
        assert_eq!(view.rows_word(), "node images");
        view.apply(&Event::State {
            node: 1,
            state: NodeState::Done,
            message: None,
        });
        assert_eq!(view.log.back().unwrap().text, "n1:b.img: done");
        let one = View::new("load", &["n1".to_string()], None);
        assert_eq!(
            (one.scope().as_str(), one.rows_word()),
            (" · 1 node", "nodes")
        );
    }
}
