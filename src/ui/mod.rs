//! Front ends. Each consumes the run's [`Event`] stream and samples the
//! run's [`Board`](crate::engine::report::Board) at its own pace; none of them is known to the engines.
//! One [`Mode`] is chosen per run.

use std::io::IsTerminal;
use std::time::Duration;

use crate::engine::events::{Event, Summary};

pub mod bars;
pub mod dashboard;
pub mod feed;
pub mod fmt;
pub mod json;
pub mod lines;
pub mod logfile;
pub mod stdout;
pub mod view;

pub use feed::{Feed, RunInfo};
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
