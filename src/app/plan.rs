//! `load -n`: the plan a careful operator reads before a load — the image,
//! the fan-out, and for each node its target, whether it answers over SSH,
//! what its target is now and how much it would receive at most. Nothing
//! is written; each node gets one SSH login that only looks.

use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinSet;

use crate::inventory::Node;
use crate::node::ssh::{self, SshSettings};
use crate::ui::fmt::{human_bytes, human_cap};

/// What a node's target is now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetNow {
    /// `block`, `file`, `missing` or `other`.
    pub kind: String,
    /// Its size in bytes (block devices and files).
    pub size: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodePlan {
    pub name: String,
    pub target: String,
    pub reachable: bool,
    /// Why it is not reachable.
    pub error: Option<String>,
    pub target_now: Option<TargetNow>,
    /// An upper bound: the image's non-zero data (the node's agent sends
    /// less when the target already holds some of it).
    pub would_receive_at_most: u64,
    pub warning: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub event: &'static str,
    pub command: &'static str,
    pub image: String,
    pub size: u64,
    pub data_size: u64,
    pub chunks: usize,
    pub chunk_size: u64,
    /// `star` or `chain`, as the run would choose it.
    pub fanout: &'static str,
    /// Bytes per second on the controller's links (0: none).
    pub bandwidth: u64,
    pub nodes: Vec<NodePlan>,
}

/// The shell probe: what is at the target, and its size.
fn probe_command(target: &str) -> String {
    let t = shell_quote(target);
    format!(
        "if [ -b {t} ]; then echo block $(blockdev --getsize64 {t} 2>/dev/null); \
         elif [ -f {t} ]; then echo file $(stat -c %s {t}); \
         elif [ -e {t} ]; then echo other; else echo missing; fi"
    )
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn parse_probe(out: &str) -> TargetNow {
    let mut words = out.split_whitespace();
    let kind = words.next().unwrap_or("other").to_string();
    let size = words.next().and_then(|s| s.parse().ok());
    TargetNow { kind, size }
}

fn local_probe(target: &str) -> TargetNow {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(target) {
        Ok(m) if m.is_file() => TargetNow {
            kind: "file".into(),
            size: Some(m.len()),
        },
        Ok(m) if m.file_type().is_block_device() => TargetNow {
            kind: "block".into(),
            size: None,
        },
        Ok(_) => TargetNow {
            kind: "other".into(),
            size: None,
        },
        Err(_) => TargetNow {
            kind: "missing".into(),
            size: None,
        },
    }
}

async fn probe(ssh: SshSettings, node: Node, target: String) -> Result<TargetNow, String> {
    if node.local {
        return Ok(local_probe(&target));
    }
    let session = ssh::connect(&ssh, &node, Some(Duration::from_secs(5)))
        .await
        .map_err(|e| e.to_string())?;
    let out = session
        .shell(probe_command(&target))
        .stdin(openssh::Stdio::null())
        .stderr(openssh::Stdio::null())
        .output()
        .await
        .map_err(|e| ssh::describe(&e).to_string());
    let _ = session.close().await;
    Ok(parse_probe(&String::from_utf8_lossy(&out?.stdout)))
}

/// Probe every node at once (each bounded by the SSH connect timeout).
pub async fn probe_all(
    ssh: &SshSettings,
    nodes: &[Node],
    targets: &[String],
) -> Vec<Result<TargetNow, String>> {
    let mut tasks = JoinSet::new();
    for (i, (node, target)) in nodes.iter().zip(targets).enumerate() {
        let (ssh, node, target) = (ssh.clone(), node.clone(), target.clone());
        tasks.spawn(async move { (i, probe(ssh, node, target).await) });
    }
    let mut out: Vec<Result<TargetNow, String>> = vec![Err("not probed".to_string()); nodes.len()];
    while let Some(Ok((i, r))) = tasks.join_next().await {
        out[i] = r;
    }
    out
}

pub fn node_plan(
    node: &Node,
    target: &str,
    probed: Result<TargetNow, String>,
    data_size: u64,
) -> NodePlan {
    let (reachable, error, target_now) = match probed {
        Ok(t) => (true, None, Some(t)),
        Err(e) => (false, Some(e), None),
    };
    let missing = target_now.as_ref().is_some_and(|t| t.kind == "missing");
    let warning = if missing && target.starts_with("/dev/") {
        Some(format!(
            "{target} does not exist on {}: it would be created as a regular file",
            node.name
        ))
    } else {
        None
    };
    NodePlan {
        name: node.name.clone(),
        target: target.to_string(),
        reachable,
        error,
        target_now,
        would_receive_at_most: data_size,
        warning,
    }
}

/// The plan as a table for humans.
pub fn format(plan: &Plan) -> String {
    let mut out = format!(
        "would load {} ({}, {} of data, {} chunk{} of {}) onto {} node{}\n\
         fan-out {}, bandwidth cap {}; nothing is written\n",
        plan.image,
        human_bytes(plan.size),
        human_bytes(plan.data_size),
        plan.chunks,
        if plan.chunks == 1 { "" } else { "s" },
        human_bytes(plan.chunk_size),
        plan.nodes.len(),
        if plan.nodes.len() == 1 { "" } else { "s" },
        plan.fanout,
        human_cap(plan.bandwidth),
    );
    let rows: Vec<[String; 5]> = plan
        .nodes
        .iter()
        .map(|n| {
            let now = match &n.target_now {
                Some(t) => match t.size {
                    Some(s) => format!("{} of {}", t.kind, human_bytes(s)),
                    None => t.kind.clone(),
                },
                None => "?".into(),
            };
            [
                n.name.clone(),
                n.target.clone(),
                match &n.error {
                    None => "yes".into(),
                    Some(e) => format!("no: {e}"),
                },
                now,
                format!("≤ {}", human_bytes(n.would_receive_at_most)),
            ]
        })
        .collect();
    let header = ["NODE", "TARGET", "REACHABLE", "TARGET NOW", "WOULD RECEIVE"];
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut s = String::new();
        for (k, (c, w)) in cells.iter().zip(widths).enumerate() {
            if k > 0 {
                s.push_str("  ");
            }
            s.push_str(&format!("{c:<w$}"));
        }
        format!("{}\n", s.trim_end())
    };
    out.push_str(&line(header));
    for row in &rows {
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    for n in &plan.nodes {
        if let Some(w) = &n.warning {
            out.push_str(&format!("warning: {w}\n"));
        }
    }
    let down = plan.nodes.iter().filter(|n| !n.reachable).count();
    if down > 0 {
        out.push_str(&format!(
            "{down} of {} nodes do not answer over SSH now\n",
            plan.nodes.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_output_reads_as_kind_and_size() {
        assert_eq!(
            parse_probe("block 8589934592\n"),
            TargetNow {
                kind: "block".into(),
                size: Some(8 << 30)
            }
        );
        assert_eq!(parse_probe("missing\n").kind, "missing");
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
    }
}
