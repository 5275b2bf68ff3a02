//! The steps of one node's load session that the star and the chain share:
//! open the agent link and begin the load. What goes wrong is a
//! [`NodeError`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::engine::error::NodeError;
use crate::engine::events::NodeState;
use crate::engine::report::Reporter;
use crate::engine::wait;
use crate::node::agent_link::AgentLink;
use crate::proto::{self, Msg, ProtocolError};

use super::delta::BlockMap;
use super::job::LoadJob;

/// Byte counters of one node, over all its attempts.
#[derive(Default)]
pub(super) struct Counters {
    pub sent: AtomicU64,
    pub written_before: AtomicU64,
    pub written: AtomicU64,
    /// A patch met a target that changed: later attempts send whole chunks.
    pub no_delta: AtomicBool,
}

pub(super) async fn open_link(
    i: usize,
    job: &LoadJob,
    report: &Reporter,
    retry: bool,
) -> Result<AgentLink, NodeError> {
    let node = &job.nodes[i];
    if node.local {
        report.state(i, NodeState::Connecting, Some("local agent".into()));
        return AgentLink::local_ready().await.map_err(NodeError::from);
    }
    report.state(i, NodeState::WaitingForSsh, None);
    // The first connection may wait for a node booting into its imaging
    // environment; a reconnection waits only so long.
    let until = if retry {
        Instant::now()
            .checked_add(job.reconnect_wait)
            .map_or(job.deadline, |t| job.deadline.min(t))
    } else {
        job.deadline
    };
    let session = wait::connect_when_up(node, &job.ssh, until, None, &|_| {})
        .await
        .map_err(|e| {
            if retry {
                NodeError::NotBack(e)
            } else {
                NodeError::Ssh(e)
            }
        })?;
    report.state(i, NodeState::Connecting, None);
    job.agent.start(session).await.map_err(NodeError::from)
}

/// What a node needs, once its agent has checked the target.
pub(super) enum Plan {
    UpToDate,
    Send {
        needed: Vec<usize>,
        /// Bytes written before this attempt plus those zeroed while checking.
        base: u64,
        /// What the node will have written when done (less what patches
        /// spare, as they go).
        total: u64,
        /// Block digests of needed chunks that the target held data for:
        /// those may travel as patches.
        blocks: BlockMap,
    },
}

/// LoadBegin, Needed (the Hellos were exchanged when the link opened).
pub(super) async fn begin(
    i: usize,
    job: &LoadJob,
    report: &Reporter,
    counters: &Counters,
    link: &mut AgentLink,
) -> Result<Plan, NodeError> {
    let m = job.source.manifest();
    report.state(i, NodeState::Checking, None);
    proto::write_msg(
        &mut link.tx,
        &Msg::LoadBegin(proto::LoadBegin {
            target: job.targets[i].clone(),
            size: m.size,
            chunk_size: m.chunk_size as u32,
            identity: m.identity,
            force: job.force,
            force_mounted: job.force,
            verify: job.verify,
            holder: crate::engine::holder::holder(),
            digests: m.digests.clone(),
            zero: m.zero.clone(),
            image: job.image_name.clone(),
            user: crate::image::provenance::current_user(),
            host: crate::image::provenance::host_name(),
        }),
    )
    .await?;
    link.tx.flush().await.map_err(ProtocolError::from)?;
    let (bitmap, zeroed, announced) = match proto::read_msg(&mut link.rx).await? {
        Msg::Needed {
            up_to_date: true, ..
        } => return Ok(Plan::UpToDate),
        Msg::Needed {
            bitmap,
            bytes_written,
            block_digests,
            ..
        } => (bitmap, bytes_written, block_digests),
        Msg::Error { kind, message } => return Err(NodeError::Agent { kind, message }),
        other => {
            return Err(NodeError::Protocol(format!(
                "agent answered {} to LoadBegin",
                other.name()
            )));
        }
    };
    let needed: Vec<usize> = (0..m.chunk_count())
        .filter(|&c| proto::bit(&bitmap, c))
        .collect();
    let mut blocks = super::delta::read_block_digests(m, &bitmap, announced, &mut link.rx).await?;
    if counters.no_delta.load(Ordering::Relaxed) {
        blocks.clear();
    }
    let before = counters.written_before.load(Ordering::Relaxed);
    let total = before + zeroed + needed.iter().map(|&c| m.chunk_len(c)).sum::<u64>();
    counters.written.store(zeroed, Ordering::Relaxed);
    report.progress(
        i,
        counters.sent.load(Ordering::Relaxed),
        before + zeroed,
        total,
    );
    Ok(Plan::Send {
        needed,
        base: before,
        total,
        blocks,
    })
}
