//! `imaging save`: read nodes' targets back into new images.
//!
//! Each image is written under a hidden temporary name, every chunk checked
//! against the digest the agent computed, synced, re-read and compared,
//! given its manifest, and only then linked to its final name (never over
//! an existing file): an interrupted save never looks like a good image.
//!
//! Unless the save is raw, the agent does not read the blocks that the
//! target's ext2/3/4 file systems mark free and sends them as zeros; every
//! all-zero 4 KiB block becomes a hole in the image, so free blocks cost
//! no space. What the agent found on the target goes to the run's log.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::engine::cancel::Cancel;
use crate::engine::error::NodeError;
use crate::engine::events::NodeState;
use crate::engine::report::Reporter;
use crate::engine::wait;
use crate::image::manifest::Manifest;
use crate::image::provenance::{self, Held, Provenance};
use crate::inventory::Node;
use crate::node::agent_link::{AgentLink, AgentSource};
use crate::node::ssh::SshSettings;
use crate::proto::{self, Codec, HeldImage, Msg, ProtocolError};

pub struct SaveJob {
    pub nodes: Vec<Node>,
    pub targets: Vec<String>,
    /// Final file names in the repository, one per node.
    pub names: Vec<String>,
    pub repo: PathBuf,
    pub ssh: SshSettings,
    pub agent: AgentSource,
    pub chunk_size: u64,
    pub level: i32,
    /// Read every block of the target (no free-block analysis).
    pub raw: bool,
    pub deadline: Instant,
    /// Recorded beside each saved image (node, target, identity, size and
    /// what the node held are filled in per node).
    pub provenance: SaveProvenance,
}

/// What is the same for every image of one save run.
pub struct SaveProvenance {
    pub saved_at: String,
    pub user: String,
    pub host: String,
    pub comment: Option<String>,
}

pub async fn save_all(job: SaveJob, report: Reporter, cancel: Cancel) {
    let job = Arc::new(job);
    let mut tasks = JoinSet::new();
    for i in 0..job.nodes.len() {
        let (job, report, cancel) = (job.clone(), report.clone(), cancel.clone());
        tasks.spawn(async move {
            let partial = job.repo.join(crate::image::repo::partial_name(
                &job.names[i],
                std::process::id(),
            ));
            let outcome = tokio::select! {
                r = tokio::time::timeout_at(job.deadline, save_node(i, &job, &report, &partial)) => match r {
                    Ok(Ok(name)) => Ok(name),
                    Ok(Err(e)) if Instant::now() >= job.deadline => Err((NodeState::Timeout, e)),
                    Ok(Err(e)) => Err((e.state(), e)),
                    Err(_) => Err((NodeState::Timeout, NodeError::Deadline)),
                },
                _ = cancel.cancelled() => Err((NodeState::Cancelled, NodeError::Cancelled)),
            };
            match outcome {
                Ok(name) => {
                    report.image(i, &name);
                    report.state(i, NodeState::Done, Some(name));
                }
                Err((state, reason)) => {
                    // Nothing half-written stays behind (the partial is
                    // this run's own: its name carries our pid).
                    let _ = std::fs::remove_file(&partial);
                    report.state(i, state, Some(reason.to_string()));
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

async fn save_node(
    i: usize,
    job: &SaveJob,
    report: &Reporter,
    partial: &Path,
) -> Result<String, NodeError> {
    let node = &job.nodes[i];
    let mut link = if node.local {
        AgentLink::local_ready().await.map_err(NodeError::from)?
    } else {
        report.state(i, NodeState::WaitingForSsh, None);
        let session = wait::connect_when_up(node, &job.ssh, job.deadline, None, &|_| {})
            .await
            .map_err(NodeError::Ssh)?;
        report.state(i, NodeState::Connecting, None);
        job.agent.start(session).await.map_err(NodeError::from)?
    };
    let result = match receive(i, job, report, partial, &mut link).await {
        Err(e) => Err(e.explained(&mut link.rx).await),
        ok => ok,
    };
    link.close().await;
    // The lock on the partial is held until it has its final name.
    let (manifest, held, locked) = result?;
    let name =
        finish_file(partial, &job.repo, &job.names[i], &manifest).map_err(NodeError::Local)?;
    drop(locked);
    let final_path = job.repo.join(&name);
    let p = &job.provenance;
    let provenance = Provenance {
        node: node.name.clone(),
        target: job.targets[i].clone(),
        saved_at: p.saved_at.clone(),
        user: p.user.clone(),
        host: p.host.clone(),
        held: held.map(|h| Held {
            image: (!h.image.is_empty()).then_some(h.image),
            identity: format!("{:032x}", h.identity),
        }),
        comment: p.comment.clone(),
        identity: manifest.identity_hex(),
        size: manifest.size,
    };
    // The image is good without it: say so, do not fail the save.
    if let Err(e) = provenance::write(&final_path, &provenance) {
        report.log(
            Some(i),
            format!("cannot record the provenance of {name}: {e}"),
        );
    }
    Ok(name)
}

async fn receive(
    i: usize,
    job: &SaveJob,
    report: &Reporter,
    partial: &Path,
    link: &mut AgentLink,
) -> Result<(Manifest, Option<HeldImage>, std::fs::File), NodeError> {
    proto::write_msg(
        &mut link.tx,
        &Msg::SaveBegin {
            target: job.targets[i].clone(),
            chunk_size: job.chunk_size as u32,
            level: job.level,
            raw: job.raw,
            holder: crate::engine::holder::holder(),
        },
    )
    .await?;
    link.tx.flush().await.map_err(ProtocolError::from)?;
    let (size, held) = match proto::read_msg(&mut link.rx).await? {
        Msg::SaveInfo { size, held } => (size, held),
        Msg::Error { kind, message } => return Err(NodeError::Agent { kind, message }),
        other => {
            return Err(NodeError::Protocol(format!(
                "agent answered {} to SaveBegin",
                other.name()
            )));
        }
    };
    // Our own name (it carries our pid), locked while we write it.
    let file = crate::image::repo::create_partial(partial)
        .map_err(|e| NodeError::Local(format!("cannot create {}: {e}", partial.display())))?;
    file.set_len(size)
        .map_err(|e| NodeError::Local(format!("{}: {e}", partial.display())))?;
    let chunks = size.div_ceil(job.chunk_size) as usize;
    let mut digests = Vec::with_capacity(chunks);
    let mut zero = vec![0u8; proto::bitmap_len(chunks)];
    let (mut sent, mut written) = (0u64, 0u64);
    report.state(i, NodeState::Transferring, None);
    loop {
        match proto::read_msg(&mut link.rx).await? {
            Msg::SaveChunk {
                index,
                digest,
                zero: is_zero,
                codec,
                data,
            } => {
                let index = index as usize;
                if index != digests.len() || index >= chunks {
                    return Err(NodeError::Protocol(format!(
                        "agent sent chunk {index} out of order"
                    )));
                }
                let offset = index as u64 * job.chunk_size;
                let len = (size - offset).min(job.chunk_size) as usize;
                if is_zero {
                    proto::set_bit(&mut zero, index);
                } else {
                    let raw = match codec {
                        Codec::Raw => data,
                        Codec::Zstd => zstd::bulk::decompress(&data, len).map_err(|e| {
                            NodeError::Verify(format!("chunk {index}: bad compressed data: {e}"))
                        })?,
                    };
                    if raw.len() != len || crate::image::digest::chunk_digest(&raw) != digest {
                        return Err(NodeError::Verify(format!(
                            "chunk {index} failed verification"
                        )));
                    }
                    // The partial file is new: zero blocks left unwritten
                    // are holes. Progress counts the chunk, holes included.
                    crate::image::fileio::write_nonzero_at(&file, &raw, offset).map_err(|e| {
                        NodeError::Local(format!("writing {}: {e}", partial.display()))
                    })?;
                    written += len as u64;
                }
                digests.push(digest);
                if !is_zero {
                    sent += len as u64;
                }
                report.progress(i, sent, written, size);
            }
            Msg::Note { text } => report.log(Some(i), format!("{}: {text}", job.nodes[i].name)),
            Msg::SaveEnd => break,
            Msg::Error { kind, message } => return Err(NodeError::Agent { kind, message }),
            other => {
                return Err(NodeError::Protocol(format!(
                    "agent sent {} during the save",
                    other.name()
                )));
            }
        }
    }
    if digests.len() != chunks {
        return Err(NodeError::Protocol(format!(
            "agent ended after {} of {chunks} chunks",
            digests.len()
        )));
    }
    report.state(i, NodeState::Syncing, None);
    file.sync_all()
        .map_err(|e| NodeError::Local(format!("syncing {}: {e}", partial.display())))?;
    let received = Manifest::from_parts(job.chunk_size, size, digests, zero);
    let partial = partial.to_path_buf();
    let chunk_size = job.chunk_size;
    // Re-read what landed on disk: it must be what the node sent.
    let on_disk = tokio::task::spawn_blocking(move || Manifest::build(&partial, chunk_size))
        .await
        .map_err(|e| NodeError::Internal(e.to_string()))?
        .map_err(|e| NodeError::Local(format!("verifying the saved image: {e}")))?;
    if on_disk.identity != received.identity {
        return Err(NodeError::Verify(
            "the saved file does not read back as received".into(),
        ));
    }
    Ok((on_disk, held, file))
}

/// Write the verified file's manifest, then give the file its final name
/// in `repo`: `name`, else `name` numbered `-2`, `-3`, … when another save
/// took it first (never replacing a file). Returns the name given.
fn finish_file(
    partial: &Path,
    repo: &Path,
    name: &str,
    manifest: &Manifest,
) -> Result<String, String> {
    for n in 1..=1000 {
        let candidate = crate::image::repo::numbered_name(name, n);
        let final_path = repo.join(&candidate);
        if final_path.symlink_metadata().is_ok() {
            continue;
        }
        // A missing manifest is only rebuilt later; it does not stop the save.
        let _ = crate::image::manifest::store_renamed(partial, &final_path, manifest);
        match std::fs::hard_link(partial, &final_path) {
            Ok(()) => {
                let _ = std::fs::remove_file(partial);
                return Ok(candidate);
            }
            // Taken between the check and the link: try the next number.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(format!(
                    "cannot name the image {}: {e}",
                    final_path.display()
                ));
            }
        }
    }
    Err(format!(
        "{name} and its numbered variants all exist in {}; nothing was overwritten",
        repo.display()
    ))
}
