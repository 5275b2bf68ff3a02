//! `imaging status`: what every node holds. Each node is probed at once, in
//! parallel, within one deadline: one SSH login, the agent, one StatusBegin
//! (the agent answers from its stamps and `stat` alone, reading no target),
//! and with `--verify` one VerifyBegin per stamped target, compared with the
//! repository's current image of that name.
//!
//! [`run`] knows nothing of the terminal: `imaging status` prints its
//! results, and verify progress arrives on a channel.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::image::manage::Repos;
use crate::image::manifest::{self, Manifest};
use crate::inventory::Node;
use crate::node::agent_link::{AgentLink, AgentSource};
use crate::node::ssh::{self, SshSettings};
use crate::proto::status::{FileKind, StatusReport, TargetStatus, VerifyBegin, VerifyResult};
use crate::proto::{self, Msg};

/// How many nodes are probed at once (each is an `ssh` process).
const MAX_PROBES: usize = 64;

/// Everything a status run needs, checked and ready.
pub struct StatusJob {
    pub nodes: Vec<Node>,
    /// Each node's target, placeholders filled except `{image}` (a pattern
    /// over the target's directory).
    pub targets: Vec<String>,
    pub ssh: SshSettings,
    pub agent: AgentSource,
    pub deadline: Instant,
    pub verify: bool,
    pub catalog: Arc<Catalog>,
}

/// An image's manifest, or why there is none.
type Found = Result<Arc<Manifest>, String>;

/// The repository's current images, by name, as `status` compares them:
/// each manifest read (or built) once per run.
pub struct Catalog {
    repos: Repos,
    chunk_size: u64,
    cache: tokio::sync::Mutex<HashMap<(String, u64), Found>>,
}

impl Catalog {
    pub fn new(repos: Repos, chunk_size: u64) -> Catalog {
        Catalog {
            repos,
            chunk_size,
            cache: Default::default(),
        }
    }

    /// The manifest of the image `name` resolves to now, at `chunk_size`
    /// (0: the configured one), or why there is none.
    pub async fn lookup(&self, name: &str, chunk_size: u64) -> Result<Arc<Manifest>, String> {
        // A stamp's number is the node's word: only a valid chunk size counts.
        let valid = u32::try_from(chunk_size).is_ok_and(crate::image::chunk_size_ok);
        let chunk_size = if valid { chunk_size } else { self.chunk_size };
        let key = (name.to_string(), chunk_size);
        let mut cache = self.cache.lock().await;
        if let Some(found) = cache.get(&key) {
            return found.clone();
        }
        let found = match self.repos.resolve(name) {
            Err(e) => Err(e),
            Ok(resolved) => {
                let file: PathBuf = resolved.file;
                tokio::task::spawn_blocking(move || {
                    manifest::load_or_build(&file, chunk_size)
                        .map(Arc::new)
                        .map_err(|e| format!("cannot read image {}: {e}", file.display()))
                })
                .await
                .unwrap_or_else(|e| Err(format!("reading the image failed: {e}")))
            }
        };
        cache.insert(key, found.clone());
        found
    }
}

/// What a target holds, as `status` tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetState {
    /// Stamped, and unchanged since (size, mtime, inode, device).
    Intact,
    /// Stamped, and changed since.
    Modified,
    Missing,
    /// Present, never stamped by imaging (or a block device, never stamped).
    Unknown,
}

impl TargetState {
    pub fn label(self) -> &'static str {
        match self {
            TargetState::Intact => "intact",
            TargetState::Modified => "modified",
            TargetState::Missing => "missing",
            TargetState::Unknown => "unknown",
        }
    }
}

/// A verify's outcome for one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verified {
    pub chunks: u64,
    pub mismatched: u64,
    /// Against which image (its identity).
    pub image_id: String,
}

/// One target of one node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetInfo {
    pub path: String,
    pub image: Option<String>,
    pub image_id: Option<String>,
    pub loaded_at: Option<String>,
    pub state: TargetState,
    /// The stamp's identity is the repository's current image of that
    /// name; None when there is no stamp, no name, or no such image.
    pub current: Option<bool>,
    /// The stamp's controller user and host (`alice@gateway`) and build.
    pub loaded_by: Option<String>,
    pub tool: Option<String>,
    /// `file`, `block device`, `missing` or `other`.
    pub kind: &'static str,
    /// The file's length now.
    pub size: u64,
    /// Why `current` is None although the stamp names an image, or why the
    /// target could not be looked at, or why its verify failed.
    pub note: Option<String>,
    pub verified: Option<Verified>,
    /// The stamp's identity and chunk size, to compare with the repository.
    #[serde(skip)]
    stamped: Option<(u128, u64)>,
}

/// One node's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStatus {
    pub name: String,
    /// The node answered over SSH (or is local).
    pub ssh_up: bool,
    pub error: Option<String>,
    pub targets: Vec<TargetInfo>,
    /// The agent's rchar after its StatusReport (bytes it read by read
    /// calls), and after its last verify.
    pub agent_rchar: Option<u64>,
    pub agent_rchar_after_verify: Option<u64>,
    pub elapsed_s: f64,
}

/// How far a verify got, for the front end.
#[derive(Debug, Clone)]
pub struct Progress {
    pub node: usize,
    pub target: String,
    pub bytes_checked: u64,
    pub total: u64,
    pub done: bool,
}

/// Probe every node; results in node order.
pub async fn run(job: StatusJob, progress: Option<UnboundedSender<Progress>>) -> Vec<NodeStatus> {
    let job = Arc::new(job);
    let started = std::time::Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_PROBES));
    let mut tasks = JoinSet::new();
    for i in 0..job.nodes.len() {
        let (job, limit, progress) = (job.clone(), limit.clone(), progress.clone());
        tasks.spawn(async move {
            let mut status = NodeStatus {
                name: job.nodes[i].name.clone(),
                ssh_up: false,
                error: None,
                targets: Vec::new(),
                agent_rchar: None,
                agent_rchar_after_verify: None,
                elapsed_s: 0.0,
            };
            let probed = {
                let _permit = limit.acquire().await;
                tokio::time::timeout_at(job.deadline, probe(&job, i, &mut status, &progress)).await
            };
            match probed {
                Ok(Ok(())) => {}
                Ok(Err(e)) => status.error = Some(e),
                Err(_) if status.ssh_up => {
                    status.error = Some("timeout: the agent did not answer in time".into())
                }
                Err(_) => status.error = Some("timeout: no SSH login in time".into()),
            }
            status.elapsed_s = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
            for info in &mut status.targets {
                if info.current.is_none() && info.verified.is_none() {
                    set_current(&job.catalog, info).await;
                }
            }
            (i, status)
        });
    }
    let mut results: Vec<Option<NodeStatus>> = vec![None; job.nodes.len()];
    while let Some(joined) = tasks.join_next().await {
        if let Ok((i, status)) = joined {
            results[i] = Some(status);
        }
    }
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| NodeStatus {
                name: job.nodes[i].name.clone(),
                ssh_up: false,
                error: Some("the probe failed (internal error)".into()),
                targets: Vec::new(),
                agent_rchar: None,
                agent_rchar_after_verify: None,
                elapsed_s: started.elapsed().as_secs_f64(),
            })
        })
        .collect()
}

/// One node: login, agent, StatusBegin, and verifies if asked. Fills
/// `status` as it goes, so a deadline keeps what was learnt.
async fn probe(
    job: &StatusJob,
    i: usize,
    status: &mut NodeStatus,
    progress: &Option<UnboundedSender<Progress>>,
) -> Result<(), String> {
    let mut link = connect_agent(
        &job.ssh,
        &job.agent,
        &job.nodes[i],
        job.deadline,
        &mut status.ssh_up,
    )
    .await?;
    let outcome = converse(job, i, &mut link, status, progress).await;
    link.close().await;
    outcome
}

/// One SSH login (no retry: a node that does not answer is down, and the
/// error says why) and the agent, Hellos exchanged; a local node's agent
/// without SSH. `ssh_up` turns true once the login succeeded.
pub async fn connect_agent(
    ssh: &SshSettings,
    agent: &AgentSource,
    node: &Node,
    deadline: Instant,
    ssh_up: &mut bool,
) -> Result<AgentLink, String> {
    if node.local {
        *ssh_up = true;
        return AgentLink::local_ready().await.map_err(|e| e.to_string());
    }
    let remaining = deadline.saturating_duration_since(Instant::now());
    let session = ssh::connect(ssh, node, Some(remaining))
        .await
        .map_err(|e| e.to_string())?;
    *ssh_up = true;
    agent.start(session).await.map_err(|e| e.to_string())
}

/// Send a request; if the agent cannot take it, its reason is the `Error`
/// frame it sent before it ended (never its stderr), else the write error.
pub async fn send(link: &mut AgentLink, msg: &Msg) -> Result<(), String> {
    let written = match proto::write_msg(&mut link.tx, msg).await {
        Ok(()) => link.tx.flush().await.map_err(proto::ProtocolError::from),
        Err(e) => Err(e),
    };
    match written {
        Ok(()) => Ok(()),
        Err(e) => match crate::node::agent_link::last_word(&mut link.rx).await {
            Some((_, message)) => Err(format!("agent: {message}")),
            None => Err(format!("agent: {e}")),
        },
    }
}

async fn converse(
    job: &StatusJob,
    i: usize,
    link: &mut AgentLink,
    status: &mut NodeStatus,
    progress: &Option<UnboundedSender<Progress>>,
) -> Result<(), String> {
    send(
        link,
        &Msg::StatusBegin {
            targets: vec![job.targets[i].clone()],
        },
    )
    .await?;
    let report: StatusReport = match proto::read_msg(&mut link.rx).await {
        Ok(Msg::StatusReport(r)) => r,
        Ok(Msg::Error { message, .. }) => return Err(format!("agent: {message}")),
        Ok(other) => return Err(format!("agent answered {} to StatusBegin", other.name())),
        Err(e) => return Err(format!("agent: {e}")),
    };
    status.agent_rchar = report.rchar;
    for t in &report.targets {
        status.targets.push(describe(t));
        let verify = job.verify && t.kind != FileKind::Missing && t.error.is_empty();
        if !verify {
            // `current` is looked up after the probe: building a manifest
            // is the controller's time, not the node's.
            continue;
        }
        let k = status.targets.len() - 1;
        let Some(manifest) = set_current(&job.catalog, &mut status.targets[k]).await else {
            continue;
        };
        let result = verify_one(i, link, &t.path, &manifest, progress).await;
        let info = &mut status.targets[k];
        match result {
            Ok(r) => {
                status.agent_rchar_after_verify = r.rchar;
                apply_verify(info, &r, &manifest);
            }
            Err(e) => {
                // The agent ends its session on an error: no more verifies.
                info.note = Some(format!("verify failed: {e}"));
                return Ok(());
            }
        }
    }
    Ok(())
}

/// What a verify says about the target's state: against the very image
/// the stamp names, the content decides.
fn apply_verify(info: &mut TargetInfo, r: &VerifyResult, m: &Manifest) {
    let image_id = m.identity_hex();
    if info.current == Some(true) {
        info.state = if r.mismatched == 0 {
            TargetState::Intact
        } else {
            TargetState::Modified
        };
    }
    info.verified = Some(Verified {
        chunks: r.chunks,
        mismatched: r.mismatched,
        image_id,
    });
}

pub async fn verify_one(
    i: usize,
    link: &mut AgentLink,
    path: &str,
    m: &Manifest,
    progress: &Option<UnboundedSender<Progress>>,
) -> Result<VerifyResult, String> {
    send(
        link,
        &Msg::VerifyBegin(VerifyBegin {
            target: path.to_string(),
            size: m.size,
            chunk_size: m.chunk_size as u32,
            identity: m.identity,
            holder: crate::engine::holder::holder(),
            digests: m.digests.clone(),
            zero: m.zero.clone(),
        }),
    )
    .await?;
    let tell = |bytes_checked: u64, done: bool| {
        if let Some(tx) = progress {
            let _ = tx.send(Progress {
                node: i,
                target: path.to_string(),
                bytes_checked,
                total: m.size,
                done,
            });
        }
    };
    tell(0, false);
    loop {
        match proto::read_msg(&mut link.rx).await {
            Ok(Msg::VerifyProgress { bytes_checked }) => tell(bytes_checked, false),
            Ok(Msg::VerifyResult(r)) => {
                tell(m.size, true);
                return Ok(r);
            }
            Ok(Msg::Error { message, .. }) => return Err(message),
            Ok(other) => return Err(format!("agent answered {} to VerifyBegin", other.name())),
            Err(e) => return Err(format!("agent: {e}")),
        }
    }
}

/// A target as the user sees it, from the agent's report alone (`current`
/// comes from [`set_current`]).
fn describe(t: &TargetStatus) -> TargetInfo {
    let stamp = t.stamp.as_ref();
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let state = match t.kind {
        FileKind::Missing => TargetState::Missing,
        _ if !t.error.is_empty() => TargetState::Unknown,
        FileKind::File => match stamp {
            Some(_) if t.intact => TargetState::Intact,
            Some(_) => TargetState::Modified,
            None => TargetState::Unknown,
        },
        FileKind::Block | FileKind::Other => TargetState::Unknown,
    };
    TargetInfo {
        path: t.path.clone(),
        image: stamp.and_then(|s| nonempty(&s.image)),
        image_id: stamp.map(|s| format!("{:032x}", s.identity)),
        loaded_at: stamp.and_then(|s| nonempty(&s.loaded_at)),
        state,
        current: None,
        loaded_by: stamp.and_then(|s| match (s.user.as_str(), s.host.as_str()) {
            ("", "") => None,
            (user, host) => Some(format!("{user}@{host}")),
        }),
        tool: stamp.and_then(|s| nonempty(&s.tool)),
        kind: match t.kind {
            FileKind::File => "file",
            FileKind::Block => "block device",
            FileKind::Missing => "missing",
            FileKind::Other => "other",
        },
        size: t.size,
        note: nonempty(&t.error),
        verified: None,
        stamped: stamp.map(|s| (s.identity, s.chunk_size)),
    }
}

/// Compare the target's stamp with the repository's image of the name it
/// records, at the chunk size of the load that stamped it (the identity
/// depends on it); returns that image's manifest.
async fn set_current(catalog: &Catalog, info: &mut TargetInfo) -> Option<Arc<Manifest>> {
    let (identity, chunk_size) = info.stamped?;
    let name = info.image.clone()?;
    match catalog.lookup(&name, chunk_size).await {
        Ok(m) => {
            info.current = Some(m.identity == identity);
            Some(m)
        }
        Err(e) => {
            info.note = Some(format!("current unknown: {e}"));
            None
        }
    }
}
