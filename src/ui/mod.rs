//! Front ends. Each consumes the run's [`Event`] stream until
//! [`Event::Finished`]; none of them is known to the engines.

use tokio::sync::mpsc::UnboundedReceiver;

use crate::events::{Event, Summary};

pub mod json;
pub mod lines;

/// How a run shows itself, resolved once per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Timestamp-free lines for humans and logs.
    Lines,
    /// One JSON object per event, then the summary.
    Json,
    /// Nothing at all (exit code only).
    Silent,
}

/// What a front end knows about the run besides the events.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub command: String,
    pub names: Vec<String>,
    pub verbose: bool,
}

/// Drain `rx` with the chosen front end; returns the final summary if the
/// engine sent one.
pub async fn consume(
    mode: Mode,
    info: RunInfo,
    mut rx: UnboundedReceiver<Event>,
) -> Option<Summary> {
    let mut out = std::io::stdout();
    let mut lines = lines::Lines::new(&info);
    while let Some(event) = rx.recv().await {
        let done = match &event {
            Event::Finished(s) => Some(s.clone()),
            _ => None,
        };
        match mode {
            Mode::Lines => lines.show(&mut out, &event),
            Mode::Json => json::show(&mut out, &info, &event),
            Mode::Silent => Ok(()),
        }
        .ok();
        if done.is_some() {
            return done;
        }
    }
    None
}
