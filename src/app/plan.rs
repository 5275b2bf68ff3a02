//! `load -n`: the plan a careful operator reads before a load — the image,
//! the fan-out, and for each node its target, whether it answers over SSH,
//! what its target is now and how much it would receive. Each node gets one
//! SSH login and its agent is asked what its stamp says (StatusBegin: no
//! byte of the target is read); with `--verify` the agent also compares the
//! target's chunks with the image's digests (VerifyBegin), as a load would,
//! and says which differ. Nothing is written to a target or a stamp.

use std::sync::Arc;

use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::engine::status::{send, verify_one};
use crate::image::manifest::Manifest;
use crate::inventory::Node;
use crate::node::agent_link::{AgentLink, AgentSource};
use crate::node::ssh::{self, SshSettings};
use crate::proto::status::{FileKind, StatusReport, TargetStatus, VerifyResult};
use crate::proto::{self, Msg};
use crate::ui::fmt::{human_bytes, human_cap};

/// What a node's target is now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetNow {
    /// `block`, `file`, `missing` or `other`.
    pub kind: String,
    /// Its size in bytes (block devices and files).
    pub size: Option<u64>,
}

/// How a plan knows what a node would receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Basis {
    /// The node's stamp: the target holds this image, unchanged since (0).
    #[serde(rename = "stamp")]
    Stamp,
    /// The agent compared every chunk with the image's digests (`--verify`):
    /// the differing data chunks, exactly.
    #[serde(rename = "digests")]
    Digests,
    /// The target does not exist: every data chunk, exactly.
    #[serde(rename = "missing")]
    Missing,
    /// `--force`: every data chunk, exactly.
    #[serde(rename = "force")]
    Force,
    /// The image's data: the load compares digests first and sends less
    /// when the target already holds some of it.
    #[serde(rename = "upper bound")]
    UpperBound,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodePlan {
    pub name: String,
    pub target: String,
    pub reachable: bool,
    /// Why it is not reachable.
    pub error: Option<String>,
    pub target_now: Option<TargetNow>,
    /// Bytes of image data the node would receive: exact unless `basis` is
    /// `upper bound`. Zero chunks are never sent (the node zeroes them).
    pub would_receive: u64,
    pub basis: Basis,
    /// Why the number is only an upper bound (`no stamp`, `unreachable`…).
    pub reason: Option<String>,
    /// With `--verify`: the chunks that differ from the image's, of all.
    pub differing_chunks: Option<u64>,
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
    /// Digests compared on the nodes (`--verify`).
    pub verify: bool,
    pub nodes: Vec<NodePlan>,
}

/// What a plan asks of every node: the same for all of one image.
pub struct Ask {
    pub ssh: SshSettings,
    pub agent: AgentSource,
    pub manifest: Arc<Manifest>,
    pub verify: bool,
    pub force: bool,
    pub deadline: Instant,
}

/// What was learnt from one node, as far as it got.
#[derive(Debug, Clone, Default)]
pub struct Probed {
    /// The SSH login succeeded (or the node is local).
    pub reachable: bool,
    /// Why the node could not be reached, or why asking its agent failed.
    pub error: Option<String>,
    pub target_now: Option<TargetNow>,
    /// The agent's word on the target (stamp, kind, size).
    pub status: Option<TargetStatus>,
    /// With `--verify`: the agent's digest compare.
    pub verified: Option<Result<VerifyResult, String>>,
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

/// One node: the login, the shell probe of the target, the agent's status
/// of it and, with `--verify`, its digest compare. Fills `p` as it goes.
async fn probe(ask: &Ask, node: &Node, target: &str, p: &mut Probed) -> Result<(), String> {
    let mut link = if node.local {
        p.reachable = true;
        p.target_now = Some(local_probe(target));
        AgentLink::local_ready().await.map_err(|e| e.to_string())?
    } else {
        let remaining = ask.deadline.saturating_duration_since(Instant::now());
        let session = ssh::connect(&ask.ssh, node, Some(remaining))
            .await
            .map_err(|e| e.to_string())?;
        p.reachable = true;
        let out = session
            .shell(probe_command(target))
            .stdin(openssh::Stdio::null())
            .stderr(openssh::Stdio::null())
            .output()
            .await
            .map_err(|e| ssh::describe(&e).to_string())?;
        p.target_now = Some(parse_probe(&String::from_utf8_lossy(&out.stdout)));
        ask.agent.start(session).await.map_err(|e| e.to_string())?
    };
    let asked = converse(ask, &mut link, target, p).await;
    link.close().await;
    asked
}

async fn converse(
    ask: &Ask,
    link: &mut AgentLink,
    target: &str,
    p: &mut Probed,
) -> Result<(), String> {
    send(
        link,
        &Msg::StatusBegin {
            targets: vec![target.to_string()],
        },
    )
    .await?;
    let report: StatusReport = match proto::read_msg(&mut link.rx).await {
        Ok(Msg::StatusReport(r)) => r,
        Ok(Msg::Error { message, .. }) => return Err(format!("agent: {message}")),
        Ok(other) => return Err(format!("agent answered {} to StatusBegin", other.name())),
        Err(e) => return Err(format!("agent: {e}")),
    };
    let Some(status) = report.targets.into_iter().next() else {
        return Err(format!("the agent did not report on {target}"));
    };
    let readable = matches!(status.kind, FileKind::File | FileKind::Block);
    let verify = ask.verify && !ask.force && readable && status.error.is_empty();
    p.status = Some(status);
    if verify {
        p.verified = Some(verify_one(0, link, target, &ask.manifest, &None).await);
    }
    Ok(())
}

/// Ask every node at once, each within the deadline.
pub async fn probe_all(ask: Arc<Ask>, nodes: &[Node], targets: &[String]) -> Vec<Probed> {
    let mut tasks = JoinSet::new();
    for (i, (node, target)) in nodes.iter().zip(targets).enumerate() {
        let (ask, node, target) = (ask.clone(), node.clone(), target.clone());
        tasks.spawn(async move {
            let mut p = Probed::default();
            let asked =
                tokio::time::timeout_at(ask.deadline, probe(&ask, &node, &target, &mut p)).await;
            match asked {
                Ok(Ok(())) => {}
                Ok(Err(e)) => p.error = Some(e),
                Err(_) if p.reachable => {
                    p.error = Some("timeout: the agent did not answer in time".into())
                }
                Err(_) => p.error = Some("timeout: no SSH login in time".into()),
            }
            (i, p)
        });
    }
    let mut out = vec![Probed::default(); nodes.len()];
    for p in &mut out {
        p.error = Some("the probe failed (internal error)".into());
    }
    while let Some(Ok((i, p))) = tasks.join_next().await {
        out[i] = p;
    }
    out
}

/// What the node would receive, exactly when the stamp or a digest compare
/// says it, else the image's data as an upper bound; and why.
pub fn assess(
    m: &Manifest,
    p: &Probed,
    verify: bool,
    force: bool,
) -> (u64, Basis, Option<String>, Option<u64>) {
    let data = m.data_size();
    let bound = |why: String| (data, Basis::UpperBound, Some(why), None);
    if !p.reachable {
        return bound("unreachable".into());
    }
    if force {
        return (data, Basis::Force, None, None);
    }
    let Some(status) = &p.status else {
        return bound(match &p.error {
            Some(e) => format!("no answer from the agent: {e}"),
            None => "no answer from the agent".into(),
        });
    };
    if status.kind == FileKind::Missing && status.error.is_empty() {
        return (data, Basis::Missing, None, None);
    }
    if !status.error.is_empty() {
        return bound(status.error.clone());
    }
    if status.kind == FileKind::Other {
        return bound("the target is not a file or a block device: the load would fail".into());
    }
    if verify {
        return match &p.verified {
            Some(Ok(r)) => match differing_bytes(m, r) {
                Some(bytes) => (bytes, Basis::Digests, None, Some(r.mismatched)),
                None => bound("the agent's verify answer does not fit the image".into()),
            },
            Some(Err(e)) => bound(format!("verify failed: {e}")),
            None => bound(match &p.error {
                Some(e) => format!("verify failed: {e}"),
                None => "not verified".into(),
            }),
        };
    }
    let Some(stamp) = &status.stamp else {
        return bound(match status.kind {
            FileKind::Block => "a block device has no stamp".into(),
            _ => "no stamp".into(),
        });
    };
    if !status.intact {
        return bound("changed since its stamp".into());
    }
    if stamp.identity != m.identity || stamp.size != m.size {
        return bound(match stamp.image.as_str() {
            "" => "the stamp is of another image".into(),
            name => format!("the stamp is of another image ({name})"),
        });
    }
    (0, Basis::Stamp, None, None)
}

/// The bytes of the data chunks a verify found different: what a load
/// sends (a differing zero chunk is zeroed on the node, not sent). None if
/// the answer does not match the image's chunk count.
pub fn differing_bytes(m: &Manifest, r: &VerifyResult) -> Option<u64> {
    let chunks = m.chunk_count();
    if r.chunks != chunks as u64 || r.differing.len() != proto::bitmap_len(chunks) {
        return None;
    }
    Some(
        (0..chunks)
            .filter(|&i| proto::bit(&r.differing, i) && !m.is_zero_chunk(i))
            .map(|i| m.chunk_len(i))
            .sum(),
    )
}

pub fn node_plan(node: &Node, target: &str, p: Probed, ask: &Ask) -> NodePlan {
    let (would_receive, basis, reason, differing_chunks) =
        assess(&ask.manifest, &p, ask.verify, ask.force);
    // The agent's word on the target, where the shell probe had none.
    let target_now = p.target_now.clone().or_else(|| {
        p.status.as_ref().map(|s| TargetNow {
            kind: match s.kind {
                FileKind::Missing => "missing",
                FileKind::File => "file",
                FileKind::Block => "block",
                FileKind::Other => "other",
            }
            .into(),
            size: (s.kind == FileKind::File).then_some(s.size),
        })
    });
    let missing = target_now.as_ref().is_some_and(|t| t.kind == "missing");
    let mut warnings = Vec::new();
    if missing && target.starts_with("/dev/") {
        warnings.push(format!(
            "{target} does not exist on {}: it would be created as a regular file",
            node.name
        ));
    }
    if p.reachable
        && let Some(e) = &p.error
    {
        warnings.push(format!("{}: {e}", node.name));
    }
    NodePlan {
        name: node.name.clone(),
        target: target.to_string(),
        reachable: p.reachable,
        error: if p.reachable { None } else { p.error },
        target_now,
        would_receive,
        basis,
        reason,
        differing_chunks,
        warning: (!warnings.is_empty()).then(|| warnings.join("; ")),
    }
}

/// The WOULD RECEIVE cell.
fn receive_cell(n: &NodePlan, chunks: usize) -> String {
    let bytes = human_bytes(n.would_receive);
    match n.basis {
        Basis::Stamp => "0 B (up to date: stamp)".into(),
        Basis::Digests => match n.differing_chunks {
            Some(0) => "0 B (up to date: digests)".into(),
            Some(d) => format!("{bytes} ({d} of {chunks} chunks differ)"),
            None => bytes,
        },
        Basis::Missing => format!("{bytes} (new target)"),
        Basis::Force => format!("{bytes} (--force)"),
        Basis::UpperBound => match &n.reason {
            Some(why) => format!("at most {bytes} ({why})"),
            None => format!("at most {bytes}"),
        },
    }
}

/// The plan as a table for humans.
pub fn format(plan: &Plan) -> String {
    let mut out = format!(
        "would load {} ({}, {} of data, {} chunk{} of {}) onto {} node{}\n\
         fan-out {}, bandwidth cap {}; nothing is written\n\
         what each node would receive: {}\n",
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
        if plan.verify {
            "exactly, from each node's digest compare of its target"
        } else {
            "from each node's stamp (--verify: exactly, from a digest compare)"
        },
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
                receive_cell(n, plan.chunks),
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
    let total: u64 = plan.nodes.iter().map(|n| n.would_receive).sum();
    let exact = plan.nodes.iter().all(|n| n.basis != Basis::UpperBound);
    out.push_str(&format!(
        "the nodes would receive {}{} in all\n",
        if exact { "" } else { "at most " },
        human_bytes(total)
    ));
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

    /// 4 chunks of 1 MiB and a last one of 100 bytes; chunk 1 is zeros.
    fn manifest() -> Manifest {
        Manifest::from_parts(1 << 20, (4 << 20) + 100, vec![1, 2, 3, 4, 5], vec![0b10])
    }

    fn stamped(m: &Manifest, identity: u128, intact: bool) -> Probed {
        Probed {
            reachable: true,
            status: Some(TargetStatus {
                query: 0,
                path: "/t/a.img".into(),
                kind: FileKind::File,
                size: m.size,
                stamp: Some(crate::proto::status::StampInfo {
                    identity,
                    image: "b.img".into(),
                    loaded_at: String::new(),
                    host: String::new(),
                    user: String::new(),
                    tool: String::new(),
                    size: m.size,
                    mtime_ns: 0,
                    inode: 1,
                    dev: 1,
                    target: "/t/a.img".into(),
                    chunk_size: m.chunk_size,
                }),
                intact,
                error: String::new(),
            }),
            ..Probed::default()
        }
    }

    #[test]
    fn only_an_intact_stamp_of_this_image_says_nothing_to_send() {
        let m = manifest();
        let data = (3 << 20) + 100;
        assert_eq!(m.data_size(), data);
        let p = stamped(&m, m.identity, true);
        assert_eq!(assess(&m, &p, false, false), (0, Basis::Stamp, None, None));
        // --force sends everything, stamp or not.
        assert_eq!(assess(&m, &p, false, true).1, Basis::Force);
        let (bytes, basis, why, _) = assess(&m, &stamped(&m, m.identity, false), false, false);
        assert_eq!((bytes, basis), (data, Basis::UpperBound));
        assert_eq!(why.as_deref(), Some("changed since its stamp"));
        let (_, basis, why, _) = assess(&m, &stamped(&m, 77, true), false, false);
        assert_eq!(basis, Basis::UpperBound);
        assert_eq!(
            why.as_deref(),
            Some("the stamp is of another image (b.img)")
        );
        let mut none = stamped(&m, m.identity, false);
        none.status.as_mut().unwrap().stamp = None;
        assert_eq!(
            assess(&m, &none, false, false).2.as_deref(),
            Some("no stamp")
        );
        let mut missing = none.clone();
        missing.status.as_mut().unwrap().kind = FileKind::Missing;
        assert_eq!(
            assess(&m, &missing, false, false),
            (data, Basis::Missing, None, None)
        );
        let down = Probed {
            error: Some("connection refused".into()),
            ..Probed::default()
        };
        assert_eq!(
            assess(&m, &down, true, false),
            (data, Basis::UpperBound, Some("unreachable".into()), None)
        );
    }

    #[test]
    fn a_verify_counts_the_differing_data_chunks_not_the_zero_ones() {
        let m = manifest();
        // Chunks 1 (zeros: zeroed on the node), 2 and 4 (100 bytes) differ.
        let r = VerifyResult {
            chunks: 5,
            mismatched: 3,
            rchar: None,
            differing: vec![0b10110],
        };
        assert_eq!(differing_bytes(&m, &r), Some((1 << 20) + 100));
        let mut p = stamped(&m, m.identity, true);
        p.verified = Some(Ok(r.clone()));
        // With --verify the digests decide, not the intact stamp.
        assert_eq!(
            assess(&m, &p, true, false),
            ((1 << 20) + 100, Basis::Digests, None, Some(3))
        );
        // An answer of another shape is not believed.
        let short = VerifyResult {
            differing: vec![],
            ..r.clone()
        };
        assert_eq!(differing_bytes(&m, &short), None);
        p.verified = Some(Ok(short));
        assert_eq!(assess(&m, &p, true, false).1, Basis::UpperBound);
        p.verified = Some(Err("busy".into()));
        assert_eq!(
            assess(&m, &p, true, false).2.as_deref(),
            Some("verify failed: busy")
        );
    }
}
