//! `imaging clean NODES --keep IMAGE[,IMAGE…] [-n]`: remove, from the
//! directory of each node's `{image}` target template, the image files
//! imaging wrote that are not kept. One line per file and a total, or with
//! `--json` a `node` object per node and the summary.

use serde_json::{Value, json};

use crate::app::cli::{CleanArgs, Cli};
use crate::app::exit::{Exit, UsageError};
use crate::app::settings::{deadline, select, ssh_and_agent};
use crate::config::Loaded;
use crate::engine::clean::{self, CleanJob, NodeClean};
use crate::node::hooks;
use crate::proto::status::{CleanAction, CleanEntry};

/// Seconds a node may take without `-t`.
const DEFAULT_TIMEOUT: f64 = 30.0;

pub(crate) async fn run_clean(
    cli: &Cli,
    args: &CleanArgs,
    loaded: &Loaded,
) -> Result<Exit, UsageError> {
    let config = &loaded.config;
    let nodes = select(loaded, &args.nodes)?;
    let keep: Vec<String> = args
        .keep
        .iter()
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .collect();
    if keep.is_empty() {
        return Err(UsageError::Other(
            "--keep names no image: give the images to keep (`--keep base.qcow2,web.qcow2`)".into(),
        ));
    }
    if let Some(bad) = keep.iter().find(|k| k.contains('/')) {
        return Err(UsageError::Other(format!(
            "--keep {bad}: an image's file name, not a path"
        )));
    }
    let mut patterns = Vec::new();
    for n in &nodes {
        let template = n.target.as_deref().unwrap_or(&config.load.target);
        if !template.contains("{image}") {
            return Err(UsageError::Other(format!(
                "`clean` removes image files from the directory of a target template \
                 holding {{image}} (e.g. target = \"/var/lib/libvirt/images/{{image}}\"); \
                 node {}'s target is {template}",
                n.name
            )));
        }
        let pattern = hooks::expand(template, n, "{image}", "");
        let (_, suffix) = pattern.split_once("{image}").unwrap_or_default();
        if suffix.contains('/') || suffix.contains("{image}") {
            return Err(UsageError::Other(format!(
                "node {}'s target {template}: {{image}} must appear once, in the file name",
                n.name
            )));
        }
        patterns.push(pattern);
    }
    let secs = args.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let deadline = deadline(Some(secs), 0)?;
    let (ssh, agent) = ssh_and_agent(loaded, &nodes)?;
    let job = CleanJob {
        nodes,
        patterns,
        keep,
        dry_run: args.dry_run,
        ssh,
        agent,
        deadline,
    };
    let results = tokio::select! {
        results = clean::run(job) => results,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("imaging: interrupted");
            return Ok(Exit::Interrupted);
        }
    };
    let ok = results.iter().all(|r| r.ssh_up && r.error.is_none());
    if cli.global.json {
        for r in &results {
            crate::outln!("{}", node_json(r, "node"));
        }
        let nodes: Vec<Value> = results.iter().map(|r| node_json(r, "")).collect();
        crate::outln!(
            "{}",
            json!({"event": "summary", "command": "clean", "ok": ok, "dry_run": args.dry_run,
                   "nodes": nodes})
        );
    } else {
        crate::ui::stdout::write(&lines(&results, args.dry_run));
    }
    Ok(if ok { Exit::Success } else { Exit::NodesFailed })
}

fn entry_json(e: &CleanEntry) -> Value {
    let action = match e.action {
        CleanAction::Removed => "removed",
        CleanAction::WouldRemove => "would-remove",
        CleanAction::Kept => "kept",
        CleanAction::Skipped => "skipped",
    };
    json!({
        "path": e.path,
        "image": (!e.image.is_empty()).then_some(&e.image),
        "action": action,
        "bytes": e.bytes,
        "reason": (!e.reason.is_empty()).then_some(&e.reason),
    })
}

/// A node's object: the `node` event (with `event`), or its summary entry.
fn node_json(r: &NodeClean, event: &str) -> Value {
    let files: Vec<Value> = r.entries.iter().map(entry_json).collect();
    let mut v = json!({
        "name": r.name,
        "ssh": if r.ssh_up { "up" } else { "down" },
        "error": r.error,
        "files": files,
    });
    if !event.is_empty()
        && let Some(obj) = v.as_object_mut()
    {
        obj.insert("event".into(), event.into());
    }
    v
}

fn lines(results: &[NodeClean], dry_run: bool) -> String {
    let mut out = String::new();
    let (mut count, mut bytes) = (0usize, 0u64);
    for r in results {
        if let Some(e) = &r.error {
            let ssh = if r.ssh_up { "failed" } else { "down" };
            out.push_str(&format!("{} {ssh}: {e}\n", r.name));
            continue;
        }
        if r.entries.is_empty() {
            out.push_str(&format!("{} no image file\n", r.name));
        }
        for e in &r.entries {
            let (name, path) = (&r.name, &e.path);
            let line = match e.action {
                CleanAction::Removed | CleanAction::WouldRemove => {
                    count += 1;
                    bytes += e.bytes;
                    let image = if e.image.is_empty() {
                        String::new()
                    } else {
                        format!("{}, ", e.image)
                    };
                    let size = crate::fmt::human_bytes(e.bytes);
                    format!("{name} {} {path} ({image}{size} on disk)", e.action.label())
                }
                CleanAction::Kept => format!("{name} kept {path}"),
                CleanAction::Skipped => format!("{name} skipped {path}: {}", e.reason),
            };
            out.push_str(&line);
            out.push('\n');
        }
    }
    let files = if count == 1 { "file" } else { "files" };
    if dry_run {
        out.push_str(&format!(
            "would remove {count} {files}, would free {}\n",
            crate::fmt::human_bytes(bytes)
        ));
    } else {
        out.push_str(&format!(
            "removed {count} {files}, freed {}\n",
            crate::fmt::human_bytes(bytes)
        ));
    }
    out
}
