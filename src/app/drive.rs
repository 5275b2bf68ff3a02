//! Running an engine under a front end: the run's description, the
//! checks just before it starts (hook placeholders, the run check), and
//! Ctrl-C.

use crate::app::cli::Cli;
use crate::app::exit::{Exit, UsageError};
use crate::engine::{cancel, check, events, report};
use crate::inventory::Node;
use crate::node::hooks;
use crate::ui;

/// Run an engine with a front end. The first Ctrl-C asks the engine to
/// cancel (it stops transfers and still runs its cleanup, such as `after`
/// hooks); a second one stops waiting for that cleanup. Exits 130 then.
pub(crate) async fn drive<F, Fut>(mode: ui::Mode, info: ui::RunInfo, engine: F) -> Exit
where
    F: FnOnce(report::Reporter, cancel::Cancel) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let board = report::Board::new(&info.names);
    let reporter = report::Reporter::new(&info.command, board.clone(), tx);
    // A row per node and image: the summary names both.
    for (row, image) in info.row_images.iter().enumerate() {
        reporter.image(row, image);
    }
    let (canceller, cancel) = cancel::pair();
    let feed = ui::Feed {
        info,
        board,
        events: rx,
        canceller: canceller.clone(),
        started: std::time::Instant::now(),
    };
    let frontend = tokio::spawn(ui::consume(mode, feed));
    let engine = engine(reporter.clone(), cancel);
    tokio::pin!(engine);
    let mut interrupted = false;
    loop {
        tokio::select! {
            _ = &mut engine => break,
            _ = tokio::signal::ctrl_c() => {
                if interrupted {
                    break;
                }
                interrupted = true;
                canceller.cancel();
            }
        }
    }
    // A cancel may also come from the front end (the dashboard's `q`).
    let interrupted = interrupted || canceller.is_cancelled();
    if interrupted {
        reporter.close_unfinished(events::NodeState::Cancelled, "interrupted");
    }
    let summary = reporter.finish();
    let _ = frontend.await;
    if interrupted {
        Exit::Interrupted
    } else if summary.ok {
        Exit::Success
    } else {
        Exit::NodesFailed
    }
}

pub(crate) fn run_info(
    cli: &Cli,
    command: &str,
    nodes: &[Node],
    verbose: bool,
    image: Option<ui::ImageHeader>,
) -> ui::RunInfo {
    ui::RunInfo {
        command: command.into(),
        names: nodes.iter().map(|n| n.name.clone()).collect(),
        row_images: Vec::new(),
        verbose,
        image,
        log_path: cli.global.log.clone().or_else(ui::logfile::default_path),
        no_wait: cli.global.no_wait,
    }
}

/// A hook that uses a placeholder some node has no value for (`{cmc}`,
/// `{mac}`) is refused before anything runs.
pub(crate) fn hooks_have_values(
    key: &str,
    template: &str,
    nodes: &[Node],
) -> Result<(), UsageError> {
    for node in nodes {
        if let Some(p) = hooks::missing_placeholder(template, node) {
            return Err(UsageError::Other(format!(
                "`{key}` uses {p}, which node {} has no value for",
                node.name
            )));
        }
    }
    Ok(())
}

/// The run check (`[load] check`): false if Ctrl-C ended it (the run ends
/// with 130), an error if it failed (exit 2). It runs last before the
/// engine starts: listening for Ctrl-C replaces the default SIGINT action
/// for the rest of the process, and only `drive` listens after it.
pub(crate) async fn run_check(
    key: &str,
    template: &str,
    nodes: &[Node],
) -> Result<bool, UsageError> {
    if template.trim().is_empty() {
        return Ok(true);
    }
    tokio::select! {
        r = check::run(key, template, nodes) => r.map(|()| true).map_err(UsageError::Other),
        _ = tokio::signal::ctrl_c() => {
            eprintln!("imaging: `{key}` interrupted");
            Ok(false)
        }
    }
}
