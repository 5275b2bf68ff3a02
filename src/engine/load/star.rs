//! Star fan-out: the controller streams its own copy of the chunks to each
//! node, retrying a dropped link with backoff.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::engine::backoff::Backoff;
use crate::engine::error::NodeError;
use crate::engine::events::NodeState;
use crate::engine::report::Reporter;
use crate::node::agent_link::AgentLink;
use crate::proto::{self, Msg, ProtocolError};

use super::delta::{self, Tally};
use super::job::LoadJob;
use super::session::{Counters, Plan, begin, open_link};

/// Chunks prepared ahead of the one being sent, per node.
const LOOKAHEAD: usize = 3;

/// Attempts with backoff until one succeeds, fails for good, or retries run out.
pub(super) async fn transfer(
    i: usize,
    job: &LoadJob,
    report: &Reporter,
    counters: &Counters,
) -> Result<NodeState, NodeError> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    let mut failures = 0;
    loop {
        match attempt(i, job, report, counters, failures > 0).await {
            Ok(state) => return Ok(state),
            Err(e) if !e.is_retryable() => return Err(e),
            Err(e) => {
                let reason = e.to_string();
                failures += 1;
                if e.is_stale() {
                    counters.no_delta.store(true, Ordering::Relaxed);
                }
                let written = counters.written.swap(0, Ordering::Relaxed);
                counters
                    .written_before
                    .fetch_add(written, Ordering::Relaxed);
                if failures > job.retries {
                    return Err(NodeError::GaveUp {
                        last: Box::new(e),
                        retries: job.retries,
                    });
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

/// A chain member whose catch-up patch met a target that changed since it
/// was checked: the node starts over on its own, as in a star load, with
/// whole chunks.
pub(super) async fn after_stale(
    i: usize,
    job: &LoadJob,
    report: &Reporter,
    counters: &Counters,
    e: NodeError,
) -> Result<NodeState, NodeError> {
    report.log(
        Some(i),
        format!(
            "{}: {e}; it starts again on its own, with whole chunks",
            job.nodes[i].name
        ),
    );
    counters.no_delta.store(true, Ordering::Relaxed);
    let written = counters.written.swap(0, Ordering::Relaxed);
    counters
        .written_before
        .fetch_add(written, Ordering::Relaxed);
    transfer(i, job, report, counters).await
}

async fn attempt(
    i: usize,
    job: &LoadJob,
    report: &Reporter,
    counters: &Counters,
    retry: bool,
) -> Result<NodeState, NodeError> {
    let mut link = open_link(i, job, report, retry).await?;
    let result = match run_session(i, job, report, counters, &mut link).await {
        Err(e) => Err(e.explained(&mut link.rx).await),
        ok => ok,
    };
    link.close().await;
    result
}

async fn run_session(
    i: usize,
    job: &LoadJob,
    report: &Reporter,
    counters: &Counters,
    link: &mut AgentLink,
) -> Result<NodeState, NodeError> {
    let (needed, before, total, mut blocks) = match begin(i, job, report, counters, link).await? {
        Plan::UpToDate => return Ok(NodeState::UpToDate),
        Plan::Send {
            needed,
            base,
            total,
            blocks,
        } => (needed, base, total, blocks),
    };
    // Patches write less than their chunks: the total shrinks as they go.
    let total = AtomicU64::new(total);
    report.state(i, NodeState::Transferring, None);

    let AgentLink { tx, rx, .. } = link;
    let watch = StallWatch::new();
    let send = async {
        let mut ahead = VecDeque::new();
        let mut queue = needed.iter().copied();
        // Each chunk whole, or as a patch where the node's block digests
        // show that few of its blocks differ.
        let mut prepare = |c: usize| {
            let (source, theirs) = (job.source.clone(), blocks.remove(&c));
            tokio::spawn(async move { delta::outgoing(&source, c, theirs).await })
        };
        for _ in 0..LOOKAHEAD {
            if let Some(c) = queue.next() {
                ahead.push_back(prepare(c));
            }
        }
        let mut tally = Tally::default();
        while let Some(next) = ahead.pop_front() {
            if let Some(c) = queue.next() {
                ahead.push_back(prepare(c));
            }
            let out = next
                .await
                .map_err(|e| NodeError::Internal(e.to_string()))?
                .map_err(NodeError::from)?;
            job.on_wire(out.wire_len()).await;
            watch.sending(Instant::now());
            out.write(tx).await?;
            counters.sent.fetch_add(out.raw_len(), Ordering::Relaxed);
            total.fetch_sub(out.spared(), Ordering::Relaxed);
            tally.add(&out);
        }
        proto::write_msg(tx, &Msg::Finish).await?;
        tx.flush().await.map_err(ProtocolError::from)?;
        if let Some(line) = tally.line() {
            report.log(Some(i), format!("{}: {line}", job.nodes[i].name));
        }
        report.state(i, NodeState::Syncing, None);
        Ok::<(), NodeError>(())
    };
    let receive = async {
        loop {
            match proto::read_msg(rx).await? {
                Msg::Written { bytes_written, .. } => {
                    watch.acknowledged(Instant::now());
                    counters.written.store(bytes_written, Ordering::Relaxed);
                    report.progress(
                        i,
                        counters.sent.load(Ordering::Relaxed),
                        before + bytes_written,
                        total.load(Ordering::Relaxed),
                    );
                }
                Msg::Finished { bytes_written } => {
                    counters.written.store(bytes_written, Ordering::Relaxed);
                    return Ok(());
                }
                Msg::Error { kind, message } => {
                    let e = NodeError::Agent { kind, message };
                    return Err(delta::traced(&job.source, e).await);
                }
                other => {
                    return Err(NodeError::Protocol(format!(
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
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            r = &mut send, if !sent => { r?; sent = true; }
            r = &mut receive => { r?; break; }
            _ = tick.tick() => {
                if watch.stalled(Instant::now(), job.stall_timeout) {
                    return Err(NodeError::Stalled {
                        secs: job.stall_timeout.as_secs(),
                    });
                }
            }
        }
    }
    if !sent {
        return Err(NodeError::Protocol(
            "agent finished before all chunks were sent".into(),
        ));
    }
    Ok(NodeState::Done)
}

/// Stall detection for one star attempt: the agent acknowledges every chunk
/// it writes (`Written`); chunks sent and not acknowledged for the stall
/// timeout mean a stopped or wedged agent (or a dead link that TCP has not
/// noticed yet). Time the controller spends not sending (bandwidth cap, a
/// slow image) and the final sync are not counted.
struct StallWatch {
    /// Chunks sent and not yet acknowledged; when the agent last
    /// acknowledged, or when chunks became outstanding.
    state: Mutex<(usize, Instant)>,
}

impl StallWatch {
    fn new() -> Self {
        StallWatch {
            state: Mutex::new((0, Instant::now())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Instant)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sending(&self, now: Instant) {
        let mut s = self.lock();
        if s.0 == 0 {
            s.1 = now;
        }
        s.0 += 1;
    }

    fn acknowledged(&self, now: Instant) {
        let mut s = self.lock();
        s.0 = s.0.saturating_sub(1);
        s.1 = now;
    }

    fn stalled(&self, now: Instant, limit: Duration) -> bool {
        let s = self.lock();
        s.0 > 0 && now.duration_since(s.1) >= limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unacknowledged_data_can_stall() {
        let w = StallWatch::new();
        let limit = Duration::from_secs(30);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(
            !w.stalled(at(60), limit),
            "nothing sent: the controller is slow, not the agent"
        );
        w.sending(at(60));
        w.sending(at(61));
        assert!(!w.stalled(at(89), limit));
        w.acknowledged(at(89));
        assert!(
            !w.stalled(at(118), limit),
            "an acknowledgement restarts the clock"
        );
        assert!(w.stalled(at(119), limit));
        w.acknowledged(at(119));
        assert!(
            !w.stalled(at(900), limit),
            "all acknowledged: syncing is not timed"
        );
    }
}
