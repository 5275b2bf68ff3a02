//! `imaging load`: write an image onto every selected node's target.
//!
//! Per node: `before` hook, wait for SSH, start the agent, let it check
//! what the target holds, send only the chunks it needs (each read and
//! compressed once for all nodes), then Finish: the agent syncs and stamps.
//! A dropped connection is retried with backoff and resumes from what the
//! agent verified; the `after` hook runs whenever `before` ran.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::engine::backoff::Backoff;
use crate::engine::cancel::Cancel;
use crate::engine::events::NodeState;
use crate::engine::report::Reporter;
use crate::engine::source::{ChunkSource, RateLimit};
use crate::engine::wait;
use crate::inventory::Node;
use crate::node::agent_link::{AgentLink, AgentSource};
use crate::node::hooks;
use crate::node::ssh::SshSettings;
use crate::proto::{self, Msg, ProtocolError};

pub mod chain;

/// `fanout = "auto"` relays through a chain from this many nodes on.
pub const CHAIN_FROM: usize = 4;

/// Chunks prepared ahead of the one being sent, per node.
const LOOKAHEAD: usize = 3;

pub struct LoadJob {
    /// The image's name, for hooks (`{image}`).
    pub image_name: String,
    pub source: Arc<ChunkSource>,
    pub nodes: Vec<Node>,
    /// Each node's target, placeholders filled.
    pub targets: Vec<String>,
    pub ssh: SshSettings,
    pub agent: AgentSource,
    pub force: bool,
    pub retries: u32,
    pub concurrency: usize,
    pub rate: Option<Arc<RateLimit>>,
    pub before: String,
    pub after: String,
    pub deadline: Instant,
    /// How long a retry waits for the node's SSH to come back.
    pub reconnect_wait: Duration,
    /// Star (a stream per node) or a relay chain.
    pub chain: bool,
    /// Where relay listeners bind on the nodes ("" = all addresses) and their port range.
    pub relay_bind: String,
    pub relay_ports: (u16, u16),
}

/// Why an attempt ended without success.
pub(crate) enum AttemptError {
    /// Worth another attempt: the connection dropped, SSH is not up yet.
    Retry(String),
    /// The node said no (target refused, verification failed, …).
    Fatal(String),
}

impl From<ProtocolError> for AttemptError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Closed | ProtocolError::Io(_) => {
                AttemptError::Retry(format!("connection lost ({e})"))
            }
            other => AttemptError::Fatal(other.to_string()),
        }
    }
}

/// Byte counters of one node, over all its attempts.
#[derive(Default)]
pub(crate) struct Counters {
    pub sent: AtomicU64,
    pub written_before: AtomicU64,
    pub written: AtomicU64,
}

pub async fn load_all(job: LoadJob, report: Reporter, cancel: Cancel) {
    let job = Arc::new(job);
    // A chain needs all its members at once: the concurrency limit is for
    // star, where every node costs the controller's uplink.
    let limit = if job.chain {
        job.nodes.len()
    } else {
        job.concurrency
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(limit.max(1)));
    let mut tasks = JoinSet::new();
    let coordinator = job.chain.then(|| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let c = chain::Coordinator::new(job.clone(), report.clone(), rx);
        (tx, tokio::spawn(c.run()))
    });
    for i in 0..job.nodes.len() {
        let (job, report, cancel, slots) =
            (job.clone(), report.clone(), cancel.clone(), slots.clone());
        let coord = coordinator.as_ref().map(|(tx, _)| tx.clone());
        tasks.spawn(async move {
            let _slot = tokio::select! {
                permit = slots.acquire_owned() => permit.ok(),
                _ = cancel.cancelled() => None,
            };
            if cancel.is_cancelled() {
                if let Some(coord) = &coord {
                    let _ = coord.send(chain::ToCoord::Out { node: i });
                }
                report.state(
                    i,
                    NodeState::Cancelled,
                    Some("cancelled before it started".into()),
                );
                return;
            }
            load_node(i, &job, &report, &cancel, coord).await;
        });
    }
    let coordinator = coordinator.map(|(tx, handle)| {
        drop(tx);
        handle
    });
    while tasks.join_next().await.is_some() {}
    if let Some(handle) = coordinator {
        handle.abort();
        let _ = handle.await;
    }
}

async fn load_node(
    i: usize,
    job: &LoadJob,
    report: &Reporter,
    cancel: &Cancel,
    coord: Option<tokio::sync::mpsc::UnboundedSender<chain::ToCoord>>,
) {
    let node = &job.nodes[i];
    let target = &job.targets[i];
    let counters = Arc::new(Counters::default());
    let mut before_ran = false;
    let mut outcome: Result<NodeState, (NodeState, String)> = Ok(NodeState::Done);
    if !job.before.is_empty() {
        report.state(i, NodeState::Preparing, Some("before hook".into()));
        before_ran = true;
        let command = hooks::expand(&job.before, node, &job.image_name, target);
        if let Err(e) = hooks::run(&command).await {
            outcome = Err((NodeState::Failed, format!("before hook: {e}")));
        }
    }
    if outcome.is_err()
        && let Some(coord) = &coord
    {
        let _ = coord.send(chain::ToCoord::Out { node: i });
    }
    if outcome.is_ok() {
        let work = async {
            match coord {
                Some(coord) => chain::member(i, job, report, &counters, coord).await,
                None => transfer(i, job, report, &counters).await,
            }
        };
        outcome = tokio::select! {
            r = tokio::time::timeout_at(job.deadline, work) => match r {
                Ok(Ok(state)) => Ok(state),
                // Gave up because the deadline came (SSH never answered): a timeout.
                Ok(Err(reason)) if Instant::now() >= job.deadline => Err((NodeState::Timeout, reason)),
                Ok(Err(reason)) => Err((NodeState::Failed, reason)),
                Err(_) => Err((NodeState::Timeout, "deadline reached".into())),
            },
            _ = cancel.cancelled() => Err((NodeState::Cancelled, "interrupted".into())),
        };
    }
    // The after hook runs whatever happened once before ran (an R2LAB
    // next-boot link must never be left behind), even after a cancel.
    if before_ran && !job.after.is_empty() {
        let command = hooks::expand(&job.after, node, &job.image_name, target);
        if let Err(e) = hooks::run(&command).await {
            report.log(Some(i), format!("{}: after hook: {e}", node.name));
            if outcome.is_ok() {
                outcome = Err((NodeState::Failed, format!("after hook: {e}")));
            }
        }
    }
    let written =
        counters.written_before.load(Ordering::Relaxed) + counters.written.load(Ordering::Relaxed);
    report.progress(i, counters.sent.load(Ordering::Relaxed), written, 0);
    match outcome {
        Ok(state) => report.state(i, state, None),
        Err((state, reason)) => report.state(i, state, Some(reason)),
    }
}

/// Attempts with backoff until one succeeds, fails for good, or retries run out.
async fn transfer(
    i: usize,
    job: &LoadJob,
    report: &Reporter,
    counters: &Counters,
) -> Result<NodeState, String> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    let mut failures = 0;
    loop {
        match attempt(i, job, report, counters, failures > 0).await {
            Ok(state) => return Ok(state),
            Err(AttemptError::Fatal(reason)) => return Err(reason),
            Err(AttemptError::Retry(reason)) => {
                failures += 1;
                let written = counters.written.swap(0, Ordering::Relaxed);
                counters
                    .written_before
                    .fetch_add(written, Ordering::Relaxed);
                if failures > job.retries {
                    return Err(format!("{reason}; gave up after {} retries", job.retries));
                }
                report.log(
                    Some(i),
                    format!(
                        "{}: {reason}; retry {failures}/{} resumes from the verified data",
                        job.nodes[i].name, job.retries
                    ),
                );
                report.state(
                    i,
                    NodeState::WaitingForSsh,
                    Some(format!("retrying: {reason}")),
                );
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

pub(crate) async fn open_link(
    i: usize,
    job: &LoadJob,
    report: &Reporter,
    retry: bool,
) -> Result<AgentLink, AttemptError> {
    let node = &job.nodes[i];
    if node.local {
        report.state(i, NodeState::Connecting, Some("local agent".into()));
        return AgentLink::local_ready().await.map_err(AttemptError::Fatal);
    }
    report.state(i, NodeState::WaitingForSsh, None);
    // The first connection may wait for a node booting into its imaging
    // environment; a reconnection waits only so long.
    let until = if retry {
        job.deadline.min(Instant::now() + job.reconnect_wait)
    } else {
        job.deadline
    };
    let session = wait::connect_when_up(node, &job.ssh, until, None, &|_| {})
        .await
        .map_err(|e| {
            if retry {
                AttemptError::Fatal(format!("did not come back: {e}"))
            } else {
                AttemptError::Fatal(e)
            }
        })?;
    report.state(i, NodeState::Connecting, None);
    job.agent.start(session).await.map_err(AttemptError::Retry)
}

async fn attempt(
    i: usize,
    job: &LoadJob,
    report: &Reporter,
    counters: &Counters,
    retry: bool,
) -> Result<NodeState, AttemptError> {
    let mut link = open_link(i, job, report, retry).await?;
    let result = run_session(i, job, report, counters, &mut link).await;
    let stderr = link.close().await;
    result.map_err(|e| match e {
        // The agent's own words say more than "connection lost".
        AttemptError::Retry(r) | AttemptError::Fatal(r) if r.starts_with("agent:") => {
            AttemptError::Fatal(r)
        }
        AttemptError::Retry(r) => match stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("imaging agent:"))
        {
            Some(last) => {
                AttemptError::Fatal(last.trim_start_matches("imaging agent:").trim().to_string())
            }
            None => AttemptError::Retry(r),
        },
        other => other,
    })
}

/// What a node needs, once its agent has checked the target.
pub(crate) enum Plan {
    UpToDate,
    Send {
        needed: Vec<usize>,
        /// Bytes written before this attempt plus those zeroed while checking.
        base: u64,
        /// What the node will have written when done.
        total: u64,
    },
}

/// LoadBegin, Needed (the Hellos were exchanged when the link opened).
pub(crate) async fn begin(
    i: usize,
    job: &LoadJob,
    report: &Reporter,
    counters: &Counters,
    link: &mut AgentLink,
) -> Result<Plan, AttemptError> {
    let m = job.source.manifest();
    report.state(i, NodeState::Checking, None);
    proto::write_msg(
        &mut link.tx,
        &Msg::LoadBegin {
            target: job.targets[i].clone(),
            size: m.size,
            chunk_size: m.chunk_size as u32,
            identity: m.identity,
            force: job.force,
            force_mounted: job.force,
            digests: m.digests.clone(),
            zero: m.zero.clone(),
            image: job.image_name.clone(),
        },
    )
    .await?;
    link.tx.flush().await.map_err(ProtocolError::from)?;
    let (bitmap, zeroed) = match proto::read_msg(&mut link.rx).await? {
        Msg::Needed {
            up_to_date: true, ..
        } => return Ok(Plan::UpToDate),
        Msg::Needed {
            bitmap,
            bytes_written,
            ..
        } => (bitmap, bytes_written),
        Msg::Error { message } => return Err(AttemptError::Fatal(format!("agent: {message}"))),
        other => {
            return Err(AttemptError::Fatal(format!(
                "agent answered {} to LoadBegin",
                other.name()
            )));
        }
    };
    let needed: Vec<usize> = (0..m.chunk_count())
        .filter(|&c| proto::bit(&bitmap, c))
        .collect();
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
    })
}

async fn run_session(
    i: usize,
    job: &LoadJob,
    report: &Reporter,
    counters: &Counters,
    link: &mut AgentLink,
) -> Result<NodeState, AttemptError> {
    let (needed, before, total) = match begin(i, job, report, counters, link).await? {
        Plan::UpToDate => return Ok(NodeState::UpToDate),
        Plan::Send {
            needed,
            base,
            total,
        } => (needed, base, total),
    };
    report.state(i, NodeState::Transferring, None);

    let AgentLink { tx, rx, .. } = link;
    let send = async {
        let mut ahead = VecDeque::new();
        let mut queue = needed.iter().copied();
        for _ in 0..LOOKAHEAD {
            if let Some(c) = queue.next() {
                let source = job.source.clone();
                ahead.push_back(tokio::spawn(async move { source.get(c).await }));
            }
        }
        while let Some(next) = ahead.pop_front() {
            if let Some(c) = queue.next() {
                let source = job.source.clone();
                ahead.push_back(tokio::spawn(async move { source.get(c).await }));
            }
            let chunk = next
                .await
                .map_err(|e| AttemptError::Fatal(e.to_string()))?
                .map_err(AttemptError::Fatal)?;
            if let Some(rate) = &job.rate {
                rate.take(chunk.data.len() as u64).await;
            }
            proto::write_chunk(tx, chunk.index, chunk.codec, &chunk.data).await?;
            counters.sent.fetch_add(chunk.raw_len, Ordering::Relaxed);
        }
        proto::write_msg(tx, &Msg::Finish).await?;
        tx.flush().await.map_err(ProtocolError::from)?;
        report.state(i, NodeState::Syncing, None);
        Ok::<(), AttemptError>(())
    };
    let receive = async {
        loop {
            match proto::read_msg(rx).await? {
                Msg::Written { bytes_written, .. } => {
                    counters.written.store(bytes_written, Ordering::Relaxed);
                    report.progress(
                        i,
                        counters.sent.load(Ordering::Relaxed),
                        before + bytes_written,
                        total,
                    );
                }
                Msg::Finished { bytes_written } => {
                    counters.written.store(bytes_written, Ordering::Relaxed);
                    return Ok(());
                }
                Msg::Error { message } => {
                    return Err(AttemptError::Fatal(format!("agent: {message}")));
                }
                other => {
                    return Err(AttemptError::Fatal(format!(
                        "agent sent {} during the transfer",
                        other.name()
                    )));
                }
            }
        }
    };
    // The receiver may end first with an error; then stop sending.
    tokio::pin!(send);
    tokio::pin!(receive);
    let mut sent = false;
    loop {
        tokio::select! {
            r = &mut send, if !sent => { r?; sent = true; }
            r = &mut receive => { r?; break; }
        }
    }
    if !sent {
        return Err(AttemptError::Fatal(
            "agent finished before all chunks were sent".into(),
        ));
    }
    Ok(NodeState::Done)
}
