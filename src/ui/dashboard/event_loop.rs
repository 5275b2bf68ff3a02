//! The dashboard's loop: engine events fold into the view, a 10 fps tick
//! draws, keys act; and the `-c` front end around it, which takes the
//! terminal over and gives it back.

use std::io::{self, Write};
use std::time::Duration;

use ratatui::Terminal;
use ratatui::backend::Backend;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::engine::events::{Event, Summary};
use crate::ui::feed::Feed;
use crate::ui::lines::{self, Lines};
use crate::ui::logfile::LogFile;
use crate::ui::view::View;

use super::keys::{Input, KeyAction, KeyReader};
use super::render::render;
use super::state::{UiState, color_from_env};

/// One frame every 100 ms (10 fps).
pub const FRAME: Duration = Duration::from_millis(100);
/// Events folded in per wake-up before the loop looks at its other inputs.
const EVENT_BATCH: usize = 4096;

fn draw<B: Backend>(
    terminal: &mut Terminal<B>,
    view: &View,
    ui: &mut UiState,
) -> Result<(), B::Error> {
    terminal.draw(|frame| {
        ui.area = frame.area();
        render(frame, view, ui);
    })?;
    Ok(())
}

/// Fold one engine event into the view (and the run log).
fn fold(feed: &Feed, view: &mut View, log: &mut Option<&mut LogFile>, event: &Event) {
    if matches!(event, Event::Finished(_)) {
        view.sample(&feed.board, feed.started.elapsed());
    }
    view.apply(event);
    if let Some(log) = log {
        log.event(&feed.info, view, event);
    }
}

/// The dashboard's loop on any backend: engine events update the view, a
/// 10 fps tick samples the board and draws, keys act. After the run's
/// [`Event::Finished`], the final screen stays until a key; returns then
/// (or when the events end without one).
pub async fn run_app<B: Backend>(
    terminal: &mut Terminal<B>,
    feed: &mut Feed,
    view: &mut View,
    ui: &mut UiState,
    inputs: &mut UnboundedReceiver<Input>,
    mut log: Option<&mut LogFile>,
) -> Result<(), B::Error> {
    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut inputs_open = true;
    let mut dirty = true;
    loop {
        let running = view.summary.is_none();
        tokio::select! {
            event = feed.events.recv(), if running => {
                let Some(event) = event else {
                    draw(terminal, view, ui)?;
                    return Ok(());
                };
                fold(feed, view, &mut log, &event);
                // Take what else is queued now: one wake-up per burst.
                for _ in 0..EVENT_BATCH {
                    if view.summary.is_some() {
                        break;
                    }
                    match feed.events.try_recv() {
                        Ok(event) => fold(feed, view, &mut log, &event),
                        Err(_) => break,
                    }
                }
                if view.summary.is_some() {
                    ui.confirm_cancel = false;
                    ui.help = false;
                    draw(terminal, view, ui)?;
                    dirty = false;
                    if !inputs_open || feed.info.no_wait {
                        return Ok(());
                    }
                }
            }
            _ = tick.tick() => {
                if running {
                    view.sample(&feed.board, feed.started.elapsed());
                    // A SIGINT from elsewhere (`kill -INT`) cancels too.
                    ui.cancelling |= feed.canceller.is_cancelled();
                    dirty = true;
                }
                if dirty {
                    draw(terminal, view, ui)?;
                    dirty = false;
                }
            }
            input = inputs.recv(), if inputs_open => {
                match input {
                    None => {
                        // No keys any more: nobody can dismiss the final screen.
                        inputs_open = false;
                        if !running {
                            return Ok(());
                        }
                    }
                    Some(Input::Resize) => dirty = true,
                    Some(Input::Key(key)) => {
                        match ui.on_key(key, view) {
                            KeyAction::Cancel => feed.canceller.cancel(),
                            KeyAction::Quit => return Ok(()),
                            KeyAction::None => {}
                        }
                        dirty = true;
                    }
                }
            }
        }
    }
}

/// Gives the terminal back (`ratatui::restore`) when dropped, so every
/// way out of the dashboard restores it; `ratatui::try_init` also installs
/// a panic hook that restores it before the panic is reported.
struct RestoreOnDrop;

impl Drop for RestoreOnDrop {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// The `-c` front end: take over the terminal, show the run until it is
/// over and a key is pressed, give the terminal back, then print the same
/// summary table as the plain lines.
pub async fn run(mut feed: Feed, mut view: View) -> Option<Summary> {
    let mut log = feed.info.log_path.as_deref().and_then(LogFile::open);
    view.log_path = log.as_ref().map(|l| l.path().display().to_string());
    if let Some(log) = &mut log {
        log.start(&feed.info);
    }
    let failure = match ratatui::try_init() {
        Ok(mut terminal) => {
            let restore = RestoreOnDrop;
            let (tx, mut inputs) = unbounded_channel();
            // Without keys the final screen cannot wait for one: the
            // closed channel makes the loop return at the end instead.
            let keys = KeyReader::spawn(tx).ok();
            let mut ui = UiState::new(color_from_env());
            let result = run_app(
                &mut terminal,
                &mut feed,
                &mut view,
                &mut ui,
                &mut inputs,
                log.as_mut(),
            )
            .await;
            drop(keys);
            drop(terminal);
            drop(restore);
            result.err()
        }
        Err(e) => {
            // try_init may have switched raw mode on before it failed.
            ratatui::restore();
            Some(e)
        }
    };
    let mut out = io::stdout();
    // The screen is gone: the summary repeats every failure's reason.
    let mut plain = Lines::new(&feed.info).with_reasons();
    if let Some(e) = failure {
        // The run goes on; show it as plain lines.
        eprintln!("imaging: the dashboard failed ({e}); going on with plain lines");
        let mut tick = tokio::time::interval(lines::PROGRESS_EVERY);
        tick.tick().await;
        while view.summary.is_none() {
            tokio::select! {
                event = feed.events.recv() => {
                    let Some(event) = event else { break };
                    fold(&feed, &mut view, &mut log.as_mut(), &event);
                    if !matches!(event, Event::Finished(_)) {
                        let _ = plain.show(&mut out, &view, &event);
                    }
                }
                _ = tick.tick() => {
                    view.sample(&feed.board, feed.started.elapsed());
                    let _ = plain.progress(&mut out, &view);
                }
            }
        }
    }
    let summary = view.summary.clone()?;
    let _ = plain.show(&mut out, &view, &Event::Finished(summary.clone()));
    let _ = out.flush();
    Some(summary)
}
