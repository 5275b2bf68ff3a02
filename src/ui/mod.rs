//! Front ends. Each consumes the run's [`Event`] stream and samples the
//! run's [`Board`] at its own pace; none of them is known to the engines.
//! One [`Mode`] is chosen per run.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::cancel::Canceller;
use crate::engine::events::{Event, Summary};
use crate::engine::report::Board;

pub mod bars;
pub mod dashboard;
pub mod fmt;
pub mod json;
pub mod lines;
pub mod logfile;
pub mod stdout;
pub mod view;

pub use view::{ImageHeader, View};

/// How a run shows itself, resolved once per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A progress bar per node and a total (default on a terminal).
    Bars,
    /// Timestamped lines, periodic progress, a final summary table.
    Lines,
    /// One JSON object per event, then the summary.
    Json,
    /// Nothing at all (exit code only).
    Silent,
    /// `-c`: the full-screen dashboard (on a terminal).
    Dashboard,
}

impl Mode {
    /// `--json` wins; then `--plain` or a stdout that is not a terminal
    /// (`-c` included: the dashboard needs a screen); then `-c`; else bars.
    pub fn resolve(json: bool, curses: bool, plain: bool) -> Mode {
        if json {
            Mode::Json
        } else if plain || !std::io::stdout().is_terminal() {
            Mode::Lines
        } else if curses {
            Mode::Dashboard
        } else {
            Mode::Bars
        }
    }
}

/// What a front end knows about the run besides the events.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub command: String,
    /// The node of each row (a row per node, or per node and image).
    pub names: Vec<String>,
    /// `load` of several images: the image of each row (a row per node and
    /// image); empty otherwise.
    pub row_images: Vec<String>,
    pub verbose: bool,
    pub image: Option<ImageHeader>,
    /// Where every event is also appended.
    pub log_path: Option<PathBuf>,
    /// `--no-wait`: the dashboard leaves when the run ends, without a key.
    pub no_wait: bool,
}

impl RunInfo {
    /// The image of row `i`, when rows are per node and image.
    pub fn row_image(&self, i: usize) -> Option<&str> {
        self.row_images.get(i).map(String::as_str)
    }

    /// What names row `i` on screen: `fit01`, or `fit01:base.qcow2` when
    /// rows are per node and image.
    pub fn label(&self, i: usize) -> String {
        let name = self.names.get(i).map(String::as_str).unwrap_or_default();
        match self.row_image(i) {
            Some(image) => format!("{name}:{image}"),
            None => name.to_string(),
        }
    }

    /// How many images the rows are about: 0 unless a row per node and image.
    pub fn image_count(&self) -> usize {
        let mut images: Vec<&String> = self.row_images.iter().collect();
        images.sort();
        images.dedup();
        images.len()
    }

    pub fn labels(&self) -> Vec<String> {
        (0..self.names.len()).map(|i| self.label(i)).collect()
    }
}

/// Everything a front end gets.
pub struct Feed {
    pub info: RunInfo,
    pub board: Arc<Board>,
    pub events: UnboundedReceiver<Event>,
    pub canceller: Canceller,
    pub started: Instant,
}

/// Drain the feed with the chosen front end; returns the final summary if
/// the engine sent one.
pub async fn consume(mode: Mode, mut feed: Feed) -> Option<Summary> {
    let mut view = View::new(
        &feed.info.command,
        &feed.info.labels(),
        feed.info.image.clone(),
    );
    view.images = feed.info.image_count();
    if mode == Mode::Dashboard {
        return dashboard::run(feed, view).await;
    }
    let mut log = feed
        .info
        .log_path
        .as_deref()
        .and_then(logfile::LogFile::open);
    view.log_path = log.as_ref().map(|l| l.path().display().to_string());
    if let Some(log) = &mut log {
        log.start(&feed.info);
    }
    let mut out = std::io::stdout();
    let mut lines = lines::Lines::new(&feed.info);
    let mut bars = (mode == Mode::Bars).then(|| bars::Bars::new(&view));
    let period = match mode {
        Mode::Bars | Mode::Dashboard => bars::REFRESH,
        Mode::Lines => lines::PROGRESS_EVERY,
        Mode::Json => json::PROGRESS_EVERY,
        Mode::Silent => Duration::from_secs(3600),
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.tick().await;
    loop {
        tokio::select! {
            event = feed.events.recv() => {
                let Some(event) = event else { return view.summary };
                if matches!(event, Event::Finished(_)) {
                    view.sample(&feed.board, feed.started.elapsed());
                }
                view.apply(&event);
                if let Some(log) = &mut log {
                    log.event(&feed.info, &view, &event);
                }
                if let Some(bars) = &mut bars {
                    bars.event(&view, &event);
                    if matches!(event, Event::Finished(_)) {
                        bars.tick(&view);
                        bars.finish();
                    }
                }
                let written = match mode {
                    // The bars leave the summary table to the lines printer.
                    Mode::Lines | Mode::Bars if matches!(event, Event::Finished(_)) || mode == Mode::Lines => {
                        lines.show(&mut out, &view, &event)
                    }
                    Mode::Json => json::show(&mut out, &feed.info, &event),
                    _ => Ok(()),
                };
                if stdout::closed_by(&written) {
                    // Nobody reads any more: end the run as an interrupt would.
                    feed.canceller.cancel();
                }
                if let Event::Finished(summary) = event {
                    return Some(summary);
                }
            }
            _ = tick.tick() => {
                view.sample(&feed.board, feed.started.elapsed());
                if let Some(bars) = &mut bars {
                    bars.tick(&view);
                }
                let written = match mode {
                    Mode::Lines => lines.progress(&mut out, &view),
                    Mode::Json => json::progress(&mut out, &feed.info, &view),
                    _ => Ok(()),
                };
                if stdout::closed_by(&written) {
                    feed.canceller.cancel();
                }
            }
        }
    }
}
