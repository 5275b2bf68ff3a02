//! `imaging on|off|reset|power NODES`: run the `[power]` commands and print
//! one line per node (`fit01 on`, `fit02 failed: …`, `fit03 timeout after
//! 10s`), or with `--json` a state object per node and the summary.

use std::time::Instant;

use serde_json::json;

use crate::app::cli::{Cli, PowerArgs};
use crate::app::exit::{Exit, UsageError};
use crate::app::settings::{select, timeout_secs};
use crate::config::Loaded;
use crate::engine::events::NodeState;
use crate::engine::power::{self, NodePower, PowerAction, PowerJob};
use crate::ui::{RunInfo, logfile};

pub(crate) async fn run_power(
    cli: &Cli,
    args: &PowerArgs,
    action: PowerAction,
    loaded: &Loaded,
) -> Result<Exit, UsageError> {
    let config = &loaded.config.power;
    let nodes = select(loaded, &args.nodes)?;
    let secs = args.timeout.unwrap_or(config.timeout as f64);
    let timeout = timeout_secs(secs)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| UsageError::Other(format!("--timeout {secs}: not a number of seconds")))?;
    let job = PowerJob::new(action, config, timeout, &nodes).map_err(UsageError::Other)?;
    let started = Instant::now();
    // Ctrl-C drops the run, which kills every command still running.
    let results = tokio::select! {
        results = power::run(&job) => results,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("imaging: interrupted");
            return Ok(Exit::Interrupted);
        }
    };
    let ok = results.iter().all(|r| r.state.is_success());
    let mut events: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            let message = r.error.clone().unwrap_or_else(|| message(action, r));
            json!({"event": "state", "node": r.name, "state": r.state, "message": message})
        })
        .collect();
    events.push(json!({
        "event": "summary",
        "command": command_name(action),
        "ok": ok,
        "elapsed_s": started.elapsed().as_secs_f64(),
        "nodes": results,
    }));
    let log_path = cli.global.log.clone().or_else(logfile::default_path);
    let mut log = log_path.as_deref().and_then(logfile::LogFile::open);
    if let Some(log) = &mut log {
        log.start(&RunInfo {
            command: command_name(action).into(),
            names: job.names.clone(),
            row_images: Vec::new(),
            verbose: false,
            image: None,
            log_path: log_path.clone(),
            no_wait: cli.global.no_wait,
        });
        for e in &events {
            log.record(e.clone());
        }
    }
    if cli.global.json {
        for e in &events {
            crate::outln!("{e}");
        }
    } else {
        for r in &results {
            crate::outln!("{} {}", r.name, message(action, r));
        }
        let failed: Vec<&str> = results
            .iter()
            .filter(|r| !r.state.is_success())
            .map(|r| r.name.as_str())
            .collect();
        if !failed.is_empty() {
            eprintln!(
                "{}: {} of {} nodes failed: {}",
                command_name(action),
                failed.len(),
                results.len(),
                failed.join(" ")
            );
            if let Some(log) = &log {
                eprintln!("log: {}", log.path().display());
            }
        }
    }
    Ok(if ok { Exit::Success } else { Exit::NodesFailed })
}

fn command_name(action: PowerAction) -> &'static str {
    match action {
        PowerAction::Status => "power",
        other => other.key(),
    }
}

/// What follows the node's name: `on`, `off`, `reset`, `unknown (answered
/// "…")`, `failed: …`, `timeout after 10s`.
fn message(action: PowerAction, r: &NodePower) -> String {
    match r.state {
        NodeState::Timeout => r.error.clone().unwrap_or_else(|| "timeout".into()),
        s if !s.is_success() => format!(
            "failed: {}",
            r.error.as_deref().unwrap_or("(no reason given)")
        ),
        _ => match (action, r.power) {
            (PowerAction::Status, Some(power::PowerState::Unknown)) => match r.answer.as_deref() {
                Some(answer) => format!("unknown (answered {answer:?})"),
                None => "unknown (no answer)".into(),
            },
            (PowerAction::Status, Some(p)) => p.label().into(),
            (action, _) => action.key().into(),
        },
    }
}
