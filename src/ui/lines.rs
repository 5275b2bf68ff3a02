//! Plain lines, for pipes and logs: one line per notable event.

use std::io::Write;

use super::RunInfo;
use crate::events::{Event, NodeState};

pub struct Lines {
    info: RunInfo,
}

impl Lines {
    pub fn new(info: &RunInfo) -> Self {
        Lines { info: info.clone() }
    }

    fn name(&self, i: usize) -> &str {
        self.info.names.get(i).map(String::as_str).unwrap_or("?")
    }

    pub fn show(&mut self, out: &mut impl Write, event: &Event) -> std::io::Result<()> {
        match event {
            Event::State {
                node,
                state,
                message,
            } => {
                let name = self.name(*node);
                if self.info.command == "wait" {
                    // rhubarbe's wording, which lab scripts grep for.
                    match state {
                        NodeState::Ok => writeln!(out, "{name} ssh OK")?,
                        s if s.is_final() => writeln!(
                            out,
                            "{name} ssh KO ({})",
                            message.as_deref().unwrap_or(s.label())
                        )?,
                        _ => {}
                    }
                } else {
                    match message {
                        Some(m) => writeln!(out, "{name} {} ({m})", state.label())?,
                        None => writeln!(out, "{name} {}", state.label())?,
                    }
                }
            }
            Event::Progress { .. } => {}
            Event::Log { text, .. } => {
                if self.info.verbose {
                    writeln!(out, "{text}")?
                }
            }
            Event::Finished(summary) => {
                let failed: Vec<&str> = summary.failed().map(|n| n.name.as_str()).collect();
                if !failed.is_empty() && self.info.command != "wait" {
                    writeln!(
                        out,
                        "{} of {} nodes failed: {}",
                        failed.len(),
                        summary.nodes.len(),
                        failed.join(" ")
                    )?;
                }
            }
        }
        out.flush()
    }
}
