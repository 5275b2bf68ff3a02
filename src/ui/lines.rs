//! Plain lines, for pipes and logs: a timestamped line per state change,
//! a progress line every few seconds, and a summary table at the end.

use std::io::Write;
use std::time::Duration;

use super::feed::RunInfo;
use super::fmt::{clock, human_bytes, human_duration, human_rate};
use super::view::View;
use crate::engine::events::{Event, NodeState};

pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

pub struct Lines {
    command: String,
    verbose: bool,
    /// `wait`: list each failed node's reason in the summary (after the
    /// dashboard, which showed them on a screen that is gone).
    reasons: bool,
    /// `load` of several images: rows are per node and image.
    images: usize,
}

fn now() -> String {
    clock()
}

impl Lines {
    pub fn new(info: &RunInfo) -> Self {
        Lines {
            command: info.command.clone(),
            verbose: info.verbose,
            reasons: false,
            images: info.image_count(),
        }
    }

    pub fn with_reasons(mut self) -> Self {
        self.reasons = true;
        self
    }

    pub fn show(
        &mut self,
        out: &mut impl Write,
        view: &View,
        event: &Event,
    ) -> std::io::Result<()> {
        match event {
            Event::State {
                node,
                state,
                message,
            } => {
                let name = view
                    .nodes
                    .get(*node)
                    .map(|n| n.name.as_str())
                    .unwrap_or("?");
                if self.command == "wait" {
                    // rhubarbe's wording, which lab scripts grep for.
                    match state {
                        NodeState::Ok => writeln!(out, "{} {name} ssh OK", now())?,
                        s if s.is_final() => writeln!(
                            out,
                            "{} {name} ssh KO ({})",
                            now(),
                            message.as_deref().unwrap_or(s.label())
                        )?,
                        _ => {}
                    }
                } else {
                    match message {
                        Some(m) => writeln!(out, "{} {name} {} ({m})", now(), state.label())?,
                        None => writeln!(out, "{} {name} {}", now(), state.label())?,
                    }
                }
            }
            Event::Progress { .. } => {}
            Event::Log { text, .. } => {
                if self.verbose {
                    writeln!(out, "{} {text}", now())?
                }
            }
            Event::Finished(_) => self.summary(out, view)?,
        }
        out.flush()
    }

    /// Every few seconds while bytes move: one line for the whole run.
    pub fn progress(&mut self, out: &mut impl Write, view: &View) -> std::io::Result<()> {
        if self.command == "wait" || view.summary.is_some() {
            return Ok(());
        }
        let moving = view
            .nodes
            .iter()
            .any(|n| matches!(n.state, NodeState::Transferring | NodeState::Syncing));
        if !moving {
            return Ok(());
        }
        let (written, total, rate) = view.totals();
        let done = view.nodes.iter().filter(|n| n.state.is_final()).count();
        let eta = view
            .eta()
            .map(|d| format!(", ETA {}", human_duration(d)))
            .unwrap_or_default();
        let wire = view
            .wire_text(true)
            .map(|w| format!(", {w}"))
            .unwrap_or_default();
        writeln!(
            out,
            "{} progress: {done}/{} {} finished, {} of {} written, {}{wire}{eta}",
            now(),
            view.nodes.len(),
            view.rows_word(),
            human_bytes(written),
            human_bytes(total),
            human_rate(rate),
        )?;
        out.flush()
    }

    fn summary(&mut self, out: &mut impl Write, view: &View) -> std::io::Result<()> {
        let Some(summary) = &view.summary else {
            return Ok(());
        };
        let per_image = self.images > 0;
        // A row per node and image names both: `fit02:web.qcow2`.
        let label = |n: &crate::engine::events::NodeSummary| match (&n.image, per_image) {
            (Some(image), true) => format!("{}:{image}", n.name),
            _ => n.name.clone(),
        };
        let failed: Vec<String> = summary.failed().map(label).collect();
        if self.command != "wait" {
            let width = summary
                .nodes
                .iter()
                .map(|n| n.name.len())
                .max()
                .unwrap_or(4)
                .max(4);
            // `save`: the new image's name, else the error.
            let last = if self.command == "save" {
                "IMAGE / ERROR"
            } else {
                "ERROR"
            };
            let image_width = summary
                .nodes
                .iter()
                .filter_map(|n| n.image.as_ref().map(|i| i.len()))
                .max()
                .unwrap_or(5)
                .max(5);
            let image_cell = |image: &str| {
                if per_image {
                    format!("{image:image_width$}  ")
                } else {
                    String::new()
                }
            };
            writeln!(
                out,
                "{:width$}  {}{:11}  {:>9}  {:>9}  {last}",
                "NODE",
                image_cell("IMAGE"),
                "STATE",
                "SENT",
                "WRITTEN"
            )?;
            for n in &summary.nodes {
                let last = if per_image {
                    n.error.as_deref()
                } else {
                    n.image.as_deref().or(n.error.as_deref())
                };
                writeln!(
                    out,
                    "{:width$}  {}{:11}  {:>9}  {:>9}  {}",
                    n.name,
                    image_cell(n.image.as_deref().unwrap_or("")),
                    n.state.label(),
                    human_bytes(n.bytes_sent),
                    human_bytes(n.bytes_written),
                    last.unwrap_or(""),
                )?;
            }
        }
        let took = human_duration(Duration::from_secs_f64(summary.elapsed_s));
        if self.command == "wait" && self.reasons {
            for n in summary.failed() {
                writeln!(
                    out,
                    "{} ssh KO ({})",
                    n.name,
                    n.error.as_deref().unwrap_or(n.state.label())
                )?;
            }
        }
        let cancelled = summary
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Cancelled)
            .count();
        if cancelled > 0 {
            // Stopped by the operator: not a failure of the nodes.
            let ok = summary
                .nodes
                .iter()
                .filter(|n| n.state.is_success())
                .count();
            let failed = summary.nodes.len() - ok - cancelled;
            let mut text = format!(
                "{}: cancelled after {took}: {ok} succeeded, {cancelled} cancelled",
                self.command
            );
            if failed > 0 {
                text.push_str(&format!(", {failed} failed"));
            }
            writeln!(out, "{text}")?;
        } else if failed.is_empty() {
            if self.command != "wait" {
                match summary.nodes.len() {
                    n if per_image => writeln!(
                        out,
                        "{}: all {} nodes × {} images succeeded in {took}",
                        self.command,
                        n / self.images.max(1),
                        self.images
                    )?,
                    1 => writeln!(out, "{}: the node succeeded in {took}", self.command)?,
                    n => writeln!(out, "{}: all {n} nodes succeeded in {took}", self.command)?,
                }
            }
        } else {
            writeln!(
                out,
                "{}: {} of {} {} failed in {took}: {}",
                self.command,
                failed.len(),
                summary.nodes.len(),
                if per_image { "node images" } else { "nodes" },
                failed.join(" ")
            )?;
            if let Some(path) = &view.log_path {
                writeln!(out, "log: {path}")?;
            }
        }
        Ok(())
    }
}
