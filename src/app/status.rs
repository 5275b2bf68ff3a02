//! `imaging status NODES [--verify]`: a table of what every node holds (or,
//! with `--json`, a `node` object per node and the summary). `-c` is
//! refused: status is one table printed when the probe ends, in seconds,
//! not a run to watch.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use serde_json::{Value, json};

use crate::app::cli::{Cli, StatusArgs};
use crate::app::exit::{Exit, UsageError};
use crate::app::settings::{deadline, select, ssh_and_agent, timeout_secs};
use crate::config::Loaded;
use crate::engine::power::{self, NodePower, PowerAction, PowerJob};
use crate::engine::status::{self, Catalog, NodeStatus, Progress, StatusJob, TargetInfo};
use crate::node::hooks;
use crate::ui::{RunInfo, logfile};

/// Seconds a node may take without `--verify` and without `-t`.
const DEFAULT_TIMEOUT: f64 = 10.0;

/// `-c` and `--no-wait` mean nothing here: say so rather than ignore them.
pub(super) fn reject_flags(cli: &Cli) -> Result<(), UsageError> {
    let g = &cli.global;
    if g.curses || g.no_wait {
        let flag = if g.curses { "-c" } else { "--no-wait" };
        return Err(UsageError::Other(format!(
            "{flag} has no effect on `status` (it prints one table when every node \
             answered, in seconds); leave it out"
        )));
    }
    Ok(())
}

pub(crate) async fn run_status(
    cli: &Cli,
    args: &StatusArgs,
    loaded: &Loaded,
) -> Result<Exit, UsageError> {
    let config = &loaded.config;
    let nodes = select(loaded, &args.nodes)?;
    // `{image}` stays: the agent lists the files of the directory it names.
    let targets: Vec<String> = nodes
        .iter()
        .map(|n| {
            let template = n.target.as_deref().unwrap_or(&config.load.target);
            hooks::expand(template, n, "{image}", "")
        })
        .collect();
    let secs = args.timeout.unwrap_or(if args.verify {
        config.load.timeout as f64
    } else {
        DEFAULT_TIMEOUT
    });
    let deadline = deadline(Some(secs), 0)?;
    // With `[power] status` configured, each node's power too (a node that
    // is down may be off).
    let power_job = if config.power.status.trim().is_empty() {
        None
    } else {
        let timeout = timeout_secs(config.power.timeout as f64)?;
        Some(
            PowerJob::new(PowerAction::Status, &config.power, timeout, &nodes)
                .map_err(UsageError::Other)?,
        )
    };
    let (ssh, agent) = ssh_and_agent(loaded, &nodes)?;
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let job = StatusJob {
        nodes,
        targets,
        ssh,
        agent,
        deadline,
        verify: args.verify,
        catalog: std::sync::Arc::new(Catalog::new(
            crate::app::repo_cmds::repos(loaded),
            config.load.chunk_size,
        )),
    };
    let json = cli.global.json;
    let bars = !json && !cli.global.plain && std::io::stderr().is_terminal();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let shown = tokio::spawn(show_progress(rx, names.clone(), json, bars));
    let started = std::time::Instant::now();
    let both = async {
        let power = async {
            match &power_job {
                Some(job) => Some(power::run(job).await),
                None => None,
            }
        };
        tokio::join!(status::run(job, args.verify.then_some(tx)), power)
    };
    let (results, powers) = tokio::select! {
        both = both => both,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("imaging: interrupted");
            return Ok(Exit::Interrupted);
        }
    };
    let _ = shown.await;
    let ok = results.iter().all(|r| r.ssh_up && r.error.is_none());
    let powers = powers.unwrap_or_default();
    let mut events: Vec<Value> = results
        .iter()
        .enumerate()
        .map(|(i, r)| node_event(r, powers.get(i)))
        .collect();
    events.push(summary(&results, ok, args.verify));
    let log_path = cli.global.log.clone().or_else(logfile::default_path);
    let mut log = log_path.as_deref().and_then(logfile::LogFile::open);
    if let Some(log) = &mut log {
        log.start(&RunInfo {
            command: "status".into(),
            names,
            verbose: false,
            image: None,
            log_path: log_path.clone(),
            no_wait: false,
            row_images: Vec::new(),
        });
        for e in &events {
            log.record(e.clone());
        }
    }
    if json {
        for e in &events {
            crate::outln!("{e}");
        }
    } else {
        crate::ui::stdout::write(&table(&results, &powers, args.verify));
        let down: Vec<&str> = results
            .iter()
            .filter(|r| !r.ssh_up || r.error.is_some())
            .map(|r| r.name.as_str())
            .collect();
        if !down.is_empty() {
            eprintln!(
                "status: {} of {} nodes did not answer: {} ({:.1}s)",
                down.len(),
                results.len(),
                down.join(" "),
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(if ok { Exit::Success } else { Exit::NodesFailed })
}

/// The summary of the contract: exactly these keys (a verify adds
/// `verify` to each target it read).
fn summary(results: &[NodeStatus], ok: bool, verify: bool) -> Value {
    let nodes: Vec<Value> = results
        .iter()
        .map(|r| {
            let targets: Vec<Value> = r
                .targets
                .iter()
                .map(|t| {
                    let mut v = json!({
                        "path": t.path,
                        "image": t.image,
                        "image_id": t.image_id,
                        "loaded_at": t.loaded_at,
                        "state": t.state,
                        "current": t.current,
                    });
                    if verify && let Some(obj) = v.as_object_mut() {
                        obj.insert("verify".into(), verify_json(t));
                    }
                    v
                })
                .collect();
            json!({
                "name": r.name,
                "ssh": if r.ssh_up { "up" } else { "down" },
                "error": r.error,
                "targets": targets,
            })
        })
        .collect();
    json!({"event": "summary", "command": "status", "ok": ok, "nodes": nodes})
}

fn verify_json(t: &TargetInfo) -> Value {
    match &t.verified {
        Some(v) => json!({
            "chunks": v.chunks,
            "mismatched_chunks": v.mismatched,
            "image_id": v.image_id,
        }),
        None => Value::Null,
    }
}

/// Everything known of one node, before the summary (for scripts that
/// want more than the summary's fields, and the log).
fn node_event(r: &NodeStatus, power: Option<&NodePower>) -> Value {
    let mut v = json!({
        "event": "node",
        "name": r.name,
        "ssh": if r.ssh_up { "up" } else { "down" },
        "error": r.error,
        "elapsed_s": r.elapsed_s,
        "targets": r.targets,
        "debug": {
            "agent_rchar": r.agent_rchar,
            "agent_rchar_after_verify": r.agent_rchar_after_verify,
        },
    });
    if let (Some(p), Some(obj)) = (power, v.as_object_mut()) {
        obj.insert("power".into(), json!(power_word(p)));
        obj.insert("power_error".into(), json!(p.error));
    }
    v
}

/// `on`, `off` or `unknown` (also when the status command failed).
fn power_word(p: &NodePower) -> &'static str {
    p.power.unwrap_or(power::PowerState::Unknown).label()
}

/// One row per target (a node without targets, or down, gets one row).
/// A POWER column after SSH when `[power] status` answered.
fn table(results: &[NodeStatus], powers: &[NodePower], verify: bool) -> String {
    let mut rows: Vec<Vec<String>> = vec![
        [
            "NODE", "SSH", "TARGET", "IMAGE", "IDENTITY", "LOADED", "BY", "STATE", "CURRENT",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    ];
    if verify {
        rows[0].push("VERIFY".into());
    }
    let with_power = !powers.is_empty();
    if with_power {
        rows[0].insert(2, "POWER".into());
    }
    let mut notes = Vec::new();
    for (i, r) in results.iter().enumerate() {
        // The cells every row of the node starts with.
        let mut lead = vec![
            r.name.clone(),
            (if r.ssh_up { "up" } else { "down" }).into(),
        ];
        if with_power {
            lead.push(powers.get(i).map(power_word).unwrap_or("unknown").into());
            if let Some(e) = powers.get(i).and_then(|p| p.error.as_ref()) {
                notes.push(format!("{} power: {e}", r.name));
            }
        }
        if !r.ssh_up || r.targets.is_empty() {
            let why = match &r.error {
                Some(e) => e.clone(),
                None => "no target file matches".into(),
            };
            let mut row = lead.clone();
            row.push(why);
            rows.push(row);
            continue;
        }
        for t in &r.targets {
            let mut row = lead.clone();
            row.extend([
                t.path.clone(),
                t.image.clone().unwrap_or_else(|| "-".into()),
                t.image_id
                    .as_deref()
                    .map(|id| id[..16.min(id.len())].to_string())
                    .unwrap_or_else(|| "-".into()),
                t.loaded_at.clone().unwrap_or_else(|| "-".into()),
                t.loaded_by.clone().unwrap_or_else(|| "-".into()),
                t.state.label().into(),
                match t.current {
                    Some(true) => "yes".into(),
                    Some(false) => "outdated".into(),
                    None => "-".into(),
                },
            ]);
            if verify {
                row.push(match &t.verified {
                    Some(v) => format!("{} of {} chunks differ", v.mismatched, v.chunks),
                    None => "-".into(),
                });
            }
            rows.push(row);
            if let Some(note) = &t.note {
                notes.push(format!("{} {}: {note}", r.name, t.path));
            }
        }
        if let Some(e) = &r.error {
            notes.push(format!("{}: {e}", r.name));
        }
    }
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                // A down node's reason runs to the end of its line.
                .filter(|row| row.len() > c + 1 || row.len() == columns)
                .filter_map(|row| row.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &rows {
        let last = row.len() - 1;
        for (c, cell) in row.iter().enumerate() {
            if c == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push('\n');
    }
    for note in notes {
        out.push_str(&format!("  {note}\n"));
    }
    out
}

/// Verify progress: JSON `progress` events (at most one a second per
/// node, and each end), bars on a terminal, else a line per target on
/// stderr when its verify starts and ends.
async fn show_progress(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Progress>,
    names: Vec<String>,
    json: bool,
    bars: bool,
) {
    let multi = indicatif::MultiProgress::new();
    let mut shown: HashMap<(usize, String), (indicatif::ProgressBar, std::time::Instant)> =
        HashMap::new();
    while let Some(p) = rx.recv().await {
        let name = names.get(p.node).map(String::as_str).unwrap_or("?");
        let key = (p.node, p.target.clone());
        let first = !shown.contains_key(&key);
        let entry = shown.entry(key).or_insert_with(|| {
            let bar = if bars {
                let bar = multi.add(indicatif::ProgressBar::new(p.total));
                bar.set_style(crate::ui::fmt::bar_style(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
                ));
                bar.set_prefix(format!("{name} verifying {}", p.target));
                bar
            } else {
                indicatif::ProgressBar::hidden()
            };
            (bar, std::time::Instant::now() - Duration::from_secs(2))
        });
        entry.0.set_position(p.bytes_checked);
        if json {
            if p.done || entry.1.elapsed() >= Duration::from_secs(1) {
                entry.1 = std::time::Instant::now();
                crate::outln!(
                    "{}",
                    json!({"event": "progress", "node": name, "target": p.target,
                           "bytes_checked": p.bytes_checked, "total": p.total, "done": p.done})
                );
            }
        } else if !bars && (first || p.done) {
            let what = if p.done { "verified" } else { "verifying" };
            eprintln!("{} {name} {what} {}", crate::fmt::clock(), p.target);
        }
        if p.done {
            entry.0.finish_and_clear();
        }
    }
}
