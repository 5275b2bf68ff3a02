//! Default on a terminal: an indicatif bar per node plus a total, each
//! ending with the node's state; failures are printed above the bars.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::fmt;
use super::view::View;
use crate::engine::events::{Event, NodeState};

pub const REFRESH: Duration = Duration::from_millis(100);

/// Keys typed while the bars run are not echoed: an echoed `^C` moves the
/// cursor under indicatif's feet, and the bars it then fails to clear stay
/// above the summary. Restored when the bars end (or are dropped).
struct NoEcho(Option<libc::termios>);

impl NoEcho {
    fn new() -> NoEcho {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a zeroed termios the
        // call fills; nothing is kept but the copy.
        unsafe {
            if libc::isatty(0) != 1 {
                return NoEcho(None);
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return NoEcho(None);
            }
            let mut quiet = saved;
            quiet.c_lflag &= !libc::ECHO;
            if libc::tcsetattr(0, libc::TCSANOW, &quiet) != 0 {
                return NoEcho(None);
            }
            NoEcho(Some(saved))
        }
    }

    fn restore(&mut self) {
        if let Some(saved) = self.0.take() {
            // SAFETY: puts back the settings read in `new`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &saved);
            }
        }
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        self.restore();
    }
}

pub struct Bars {
    no_echo: NoEcho,
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
            no_echo: NoEcho::new(),
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
        let wire = view
            .wire_text(view.summary.is_none())
            .map(|w| format!(" · {w}"))
            .unwrap_or_default();
        self.total
            .set_message(format!("{done}/{} nodes finished{wire}", view.nodes.len()));
    }

    pub fn finish(&mut self) {
        // Every bar goes, so no stale progress line stays above the summary.
        for bar in self.nodes.iter().chain([&self.total]) {
            bar.finish_and_clear();
        }
        let _ = self.multi.clear();
        self.no_echo.restore();
    }
}
