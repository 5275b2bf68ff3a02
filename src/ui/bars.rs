//! Default on a terminal: an indicatif bar per node plus a total, each
//! ending with the node's state; failures are printed above the bars.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{View, fmt};
use crate::engine::events::{Event, NodeState};

pub const REFRESH: Duration = Duration::from_millis(100);

pub struct Bars {
    multi: MultiProgress,
    nodes: Vec<ProgressBar>,
    total: ProgressBar,
    bytes: bool,
}

fn style(template: &str) -> ProgressStyle {
    fmt::bar_style(template).progress_chars("█▉▊▋▌▍▎▏ ")
}

impl Bars {
    pub fn new(view: &View) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout_with_hz(10));
        // wait has no bytes: a spinner and the state are all there is.
        let bytes = view.command != "wait";
        let width = view.nodes.iter().map(|n| n.name.len()).max().unwrap_or(4);
        let node_style = if bytes {
            style(&format!(
                "{{prefix:{width}}} [{{bar:30}}] {{written:>10}}/{{total:<10}} {{rate:>12}} {{msg}}"
            ))
        } else {
            style(&format!("{{prefix:{width}}} {{spinner}} {{msg}}"))
        };
        let nodes = view
            .nodes
            .iter()
            .map(|n| {
                let bar = multi.add(ProgressBar::new(0).with_style(node_style.clone()));
                bar.set_prefix(n.name.clone());
                bar.set_message(n.state.label());
                bar
            })
            .collect();
        let total = multi.add(ProgressBar::new(0).with_style(style(&format!(
            "{{prefix:{width}}} [{{bar:30}}] {{written:>10}}/{{total:<10}} {{rate:>12}} {{msg}}"
        ))));
        total.set_prefix("total");
        if !bytes {
            total.set_style(style(&format!("{{prefix:{width}}} {{msg}}")));
        }
        Bars {
            multi,
            nodes,
            total,
            bytes,
        }
    }

    pub fn event(&mut self, view: &View, event: &Event) {
        if let Event::State {
            node,
            state,
            message,
        } = event
            && let Some(bar) = self.nodes.get(*node)
        {
            bar.set_message(match message {
                Some(m) => format!("{} ({m})", state.label()),
                None => state.label().to_string(),
            });
            if matches!(state, NodeState::Failed | NodeState::Timeout) {
                let _ = self.multi.println(format!(
                    "{}: {} {}",
                    view.nodes[*node].name,
                    state.label(),
                    message.as_deref().unwrap_or("")
                ));
            }
            if state.is_final() {
                bar.finish();
            }
        }
    }

    pub fn tick(&mut self, view: &View) {
        for (bar, n) in self.nodes.iter().zip(&view.nodes) {
            if self.bytes {
                bar.set_length(n.total.max(n.bytes_written));
                bar.set_position(n.bytes_written);
            } else if !n.state.is_final() {
                bar.tick();
            }
        }
        let (written, total, _) = view.totals();
        let done = view.nodes.iter().filter(|n| n.state.is_final()).count();
        if self.bytes {
            self.total.set_length(total.max(written));
            self.total.set_position(written);
        }
        self.total
            .set_message(format!("{done}/{} nodes finished", view.nodes.len()));
    }

    pub fn finish(&mut self) {
        self.total.finish();
        let _ = self.multi.clear();
    }
}
