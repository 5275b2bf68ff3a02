//! Fan-out by relay chain (Kascade/Kadeploy's way): the controller streams
//! the chunks any node needs to the first node over SSH; every node
//! verifies and writes what it needs and forwards everything, as received,
//! to the next node over a direct TCP connection that a per-run secret
//! guards. The controller's uplink carries one copy, whatever the number of
//! nodes.
//!
//! Each node keeps its own SSH session to the controller, for the relay
//! set-up, honest progress (bytes written on that node) and its final
//! catch-up: after the stream ends, a node reports the chunks it still
//! lacks (lost while the chain was repaired) and gets them directly.
//! A node that dies or stalls is cut out: its predecessor is linked to its
//! successor. Nothing already verified is sent again.
//!
//! A member that holds the chain back (see [`super::slow`]) is moved to the
//! tail, once (and the member that waited on it too, if the chain is still
//! held back around that one), and fed from there without waiting: what it
//! cannot take as the stream passes comes directly from the controller
//! after the stream, so the others go at their own pace and it at its own.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::delta::{self, BlockMap, Tally};
use super::job::LoadJob;
use super::refusals::Refusals;
use super::session::{Counters, Plan, begin, open_link};
use super::slow::{Reading, Sample, Suspect, Verdict, Watch};
use crate::engine::error::NodeError;
use crate::engine::events::NodeState;
use crate::engine::report::Reporter;
use crate::engine::source::{SourceError, WireChunk};
use crate::node::agent_link::{AgentLink, Tx};
use crate::proto::{self, Msg};

/// How long a relay set-up step may take before the node is cut out.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// A head that takes no data for this long is cut out.
const STALL: Duration = Duration::from_secs(10);
/// How often the chain's waits are looked at while the head takes a chunk
/// (members report them every 250 ms, mid-wait too). Looking every 100 ms
/// found a slow member no sooner on the lab.
const WATCH_EVERY: Duration = Duration::from_millis(250);

pub(super) type SharedTx = Arc<Mutex<Tx>>;

/// What node tasks tell the coordinator.
pub(super) enum ToCoord {
    /// Ready, needs `needed`; `cut` ends the member when it is cut out.
    Joined {
        node: usize,
        tx: SharedTx,
        needed: Vec<usize>,
        /// Its block digests: chunks that all their nodes can take as
        /// small patches stay out of the stream.
        blocks: Arc<BlockMap>,
        cut: oneshot::Sender<String>,
        counters: Arc<Counters>,
    },
    /// Not part of the chain (up to date, failed before joining, cancelled).
    Out {
        node: usize,
    },
    Port {
        node: usize,
        port: u16,
    },
    Linked {
        node: usize,
    },
    /// `node` lost its link to the successor at `peer`.
    Lost {
        node: usize,
        peer: String,
        reason: String,
    },
    /// The member ended (finished, failed, or its agent died).
    Gone {
        node: usize,
    },
    /// The member finished: the whole stream passed through it.
    Finished {
        node: usize,
    },
    /// The member wrote chunk `index`.
    Wrote {
        node: usize,
        index: usize,
    },
    /// What the member forwarded so far and how long it waited on its
    /// successor (its agent's RelayStats).
    Stats {
        node: usize,
        forwarded: u64,
        blocked_ms: u64,
    },
}

struct Member {
    node: usize,
    tx: SharedTx,
    cut: Option<oneshot::Sender<String>>,
    port: Option<u16>,
    counters: Arc<Counters>,
    /// Its latest RelayStats.
    forwarded: u64,
    blocked_ms: u64,
    /// The last chunk of the stream it wrote, if any.
    wrote: Option<usize>,
}

pub(super) struct Coordinator {
    job: Arc<LoadJob>,
    report: Reporter,
    rx: mpsc::UnboundedReceiver<ToCoord>,
    secret: Vec<u8>,
    /// Alive members in chain order.
    chain: Vec<Member>,
    /// Per member: the "addr:port" it was last told to forward to.
    successor_of: HashMap<usize, String>,
    stream_ended: bool,
    /// Members whose link to their successor is up.
    linked: std::collections::HashSet<usize>,
    /// Members found slow and moved to the tail: fed without waiting.
    slow: std::collections::HashSet<usize>,
    /// How many members may still be moved in this stream (one).
    moves_left: usize,
    /// After the move, the member that had waited on the moved one: moved
    /// too if the chain is still held back around it (see [`Suspect`]).
    suspect: Option<Suspect>,
    watch: Watch,
}

/// The run's relay secret: it only has to be unguessable by other hosts
/// of the lab for the length of a run, so 256 bits from the OS.
pub(super) fn fresh_secret() -> Result<Vec<u8>, getrandom::Error> {
    let mut secret = vec![0u8; 32];
    getrandom::fill(&mut secret)?;
    Ok(secret)
}

impl Coordinator {
    pub(super) fn new(
        job: Arc<LoadJob>,
        report: Reporter,
        rx: mpsc::UnboundedReceiver<ToCoord>,
        secret: Vec<u8>,
    ) -> Self {
        Coordinator {
            job,
            report,
            rx,
            secret,
            chain: Vec::new(),
            successor_of: HashMap::new(),
            stream_ended: false,
            linked: std::collections::HashSet::new(),
            slow: std::collections::HashSet::new(),
            moves_left: 0,
            suspect: None,
            watch: Watch::default(),
        }
    }

    fn address(&self, node: usize) -> String {
        let n = &self.job.nodes[node];
        match &n.data_address {
            Some(a) => a.clone(),
            // A local agent runs on this machine, whatever its name says.
            None if n.local => "127.0.0.1".into(),
            None => n.address.clone(),
        }
    }

    fn name(&self, node: usize) -> &str {
        &self.job.nodes[node].name
    }

    fn position(&self, node: usize) -> Option<usize> {
        self.chain.iter().position(|m| m.node == node)
    }

    /// Send a control message to a member; false if it cannot take it
    /// (gone, or stalled for [`STALL`]).
    async fn send(&self, node: usize, msg: &Msg) -> bool {
        let Some(p) = self.position(node) else {
            return false;
        };
        let tx = self.chain[p].tx.clone();
        let sent = tokio::time::timeout(STALL, async move {
            let mut tx = tx.lock().await;
            proto::write_msg(&mut *tx, msg).await.is_ok() && tx.flush().await.is_ok()
        });
        matches!(sent.await, Ok(true))
    }

    /// Remove `node` from the chain; if `why`, tell its task it was cut out.
    /// Its predecessor is linked to its successor.
    async fn cut(&mut self, node: usize, why: Option<String>) {
        let Some(p) = self.position(node) else { return };
        let mut member = self.chain.remove(p);
        if let (Some(why), Some(cut)) = (why, member.cut.take()) {
            self.report.log(
                Some(node),
                format!("{}: cut out of the relay chain: {why}", self.name(node)),
            );
            let _ = cut.send(why);
        }
        if p > 0 && p < self.chain.len() {
            let (pred, succ) = (self.chain[p - 1].node, self.chain[p].node);
            self.link(pred, succ).await;
        } else if p == 0 && !self.chain.is_empty() {
            let head = self.chain[0].node;
            self.report.log(
                Some(head),
                format!("{}: now heads the relay chain", self.name(head)),
            );
        }
        if self.stream_ended {
            // Whoever is downstream may have missed the end of the stream.
            let downstream: Vec<usize> = self.chain[p.min(self.chain.len())..]
                .iter()
                .map(|m| m.node)
                .collect();
            for n in downstream {
                self.send(n, &Msg::StreamEnd).await;
            }
        }
    }

    /// Take a live member out of the chain because its predecessor could
    /// not forward to it (not because it died): its own stream ends now, so
    /// it asks for what it still lacks and gets that directly from the
    /// controller, like the catch-up after the stream. A member that did
    /// die fails through its own session.
    async fn detach(&mut self, node: usize, why: String) {
        let Some(p) = self.position(node) else { return };
        let tx = self.chain[p].tx.clone();
        self.report.log(
            Some(node),
            format!(
                "{}: out of the relay chain ({why}); it gets its data directly from the controller",
                self.name(node)
            ),
        );
        self.cut(node, None).await;
        // In a task of its own: a stalled agent must not hold up the chain.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(STALL, async move {
                let mut tx = tx.lock().await;
                proto::write_msg(&mut *tx, &Msg::StreamEnd).await.is_ok()
                    && tx.flush().await.is_ok()
            })
            .await;
        });
    }

    async fn link(&mut self, from: usize, to: usize) {
        let Some(port) = self.position(to).and_then(|p| self.chain[p].port) else {
            return;
        };
        let addr = self.address(to);
        self.linked.remove(&from);
        self.watch.reset();
        self.successor_of.insert(from, format!("{addr}:{port}"));
        let msg = Msg::RelayConnect {
            secret: self.secret.clone(),
            addr,
            port,
            lossy: self.slow.contains(&to),
        };
        if !self.send(from, &msg).await {
            self.report.log(
                Some(from),
                format!("{}: cannot reach its agent to relink", self.name(from)),
            );
        }
    }

    /// Handle one event; returns false once every task has ended.
    async fn handle(&mut self, event: Option<ToCoord>) -> bool {
        match event {
            None => return false,
            Some(ToCoord::Gone { node }) => {
                if self.position(node).is_some() {
                    self.cut(node, None).await;
                }
            }
            // Everything it had to forward went out before the stream's end
            // reached it: nothing to repair.
            Some(ToCoord::Finished { node }) => self.chain.retain(|m| m.node != node),
            Some(ToCoord::Lost { node, peer, reason }) => {
                // Only a loss of the link we asked for cuts its successor;
                // a report about an older, replaced link is stale.
                let current = self.successor_of.get(&node).cloned();
                if current.as_deref() == Some(peer.as_str())
                    && let Some(p) = self.position(node)
                    && let Some(next) = self.chain.get(p + 1).map(|m| m.node)
                    // Not a successor that finished and left meanwhile.
                    && self.chain[p + 1].port.map(|port| format!("{}:{port}", self.address(next)))
                        == current
                {
                    self.successor_of.remove(&node);
                    let why = format!("{} could not forward to it: {reason}", self.name(node));
                    self.detach(next, why).await;
                }
            }
            Some(ToCoord::Port { node, port }) => {
                if let Some(p) = self.position(node) {
                    self.chain[p].port = Some(port);
                }
            }
            Some(ToCoord::Linked { node }) => {
                self.linked.insert(node);
            }
            Some(ToCoord::Wrote { node, index }) => {
                if let Some(p) = self.position(node) {
                    let wrote = &mut self.chain[p].wrote;
                    *wrote = Some(wrote.map_or(index, |w| w.max(index)));
                }
            }
            Some(ToCoord::Stats {
                node,
                forwarded,
                blocked_ms,
            }) => {
                if let Some(p) = self.position(node) {
                    self.chain[p].forwarded = forwarded;
                    self.chain[p].blocked_ms = blocked_ms;
                }
            }
            Some(ToCoord::Out { .. } | ToCoord::Joined { .. }) => {}
        }
        true
    }

    pub(super) async fn run(mut self) {
        // 1. Everyone joins or drops out: the stream starts when the chain is known.
        let mut settled = std::collections::HashSet::new();
        let total = self.job.nodes.len();
        let mut joined = Vec::new();
        while settled.len() < total {
            match self.rx.recv().await {
                Some(ToCoord::Joined {
                    node,
                    tx,
                    needed,
                    blocks,
                    cut,
                    counters,
                }) => {
                    settled.insert(node);
                    joined.push((node, needed, blocks));
                    self.chain.push(Member {
                        node,
                        tx,
                        cut: Some(cut),
                        port: None,
                        counters,
                        forwarded: 0,
                        blocked_ms: 0,
                        wrote: None,
                    });
                }
                Some(ToCoord::Out { node }) => {
                    settled.insert(node);
                }
                Some(ToCoord::Gone { node } | ToCoord::Finished { node }) => {
                    settled.insert(node);
                    self.chain.retain(|m| m.node != node);
                }
                Some(_) => {}
                None => return,
            }
        }
        self.chain.sort_by_key(|m| m.node);
        // One move per stream: after it, the stream goes back through the
        // chain and the members after the moved one are busy catching up,
        // which must not pass for another slow member. A second move only
        // corrects the first (see Suspect).
        self.moves_left = 1;
        self.suspect = None;
        if self.chain.is_empty() {
            return self.drain().await;
        }
        let union: BTreeSet<usize> = joined
            .iter()
            .flat_map(|(_, n, _)| n.iter().copied())
            .collect();
        let patchable = patchable(&joined);
        let order: Vec<&str> = self.chain.iter().map(|m| self.name(m.node)).collect();
        self.report.log(
            None,
            format!("relay chain: controller -> {}", order.join(" -> ")),
        );

        // 2. Listeners on all but the head, then each node linked to the next.
        let listen = Msg::RelayListen {
            secret: self.secret.clone(),
            bind: self.job.relay_bind.clone(),
            port_min: self.job.relay_ports.0,
            port_max: self.job.relay_ports.1,
        };
        let tail: Vec<usize> = self.chain.iter().skip(1).map(|m| m.node).collect();
        for &n in &tail {
            if !self.send(n, &listen).await {
                self.cut(n, Some("its agent did not take the relay set-up".into()))
                    .await;
            }
        }
        let deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
        while self.chain.iter().skip(1).any(|m| m.port.is_none()) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(event) => {
                    if !self.handle(event).await {
                        return;
                    }
                }
                Err(_) => {
                    let slow: Vec<usize> = self
                        .chain
                        .iter()
                        .skip(1)
                        .filter(|m| m.port.is_none())
                        .map(|m| m.node)
                        .collect();
                    for n in slow {
                        self.cut(n, Some("no relay port within 15 s".into())).await;
                    }
                }
            }
        }
        let pairs: Vec<(usize, usize)> = self
            .chain
            .windows(2)
            .map(|w| (w[0].node, w[1].node))
            .collect();
        for (a, b) in pairs {
            self.link(a, b).await;
        }
        // Stream once every link is up (or within the set-up time): a chunk
        // that reaches a member before its successor link is up is not
        // forwarded, and every node after it would get it directly.
        let deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
        while self
            .chain
            .windows(2)
            .any(|w| !self.linked.contains(&w[0].node))
        {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(event) => {
                    if !self.handle(event).await {
                        return;
                    }
                }
                Err(_) => break,
            }
        }

        // 3. The stream, to whoever heads the chain; repairs between chunks.
        // A chunk that every node lacking it can take as a patch, for less
        // than the chunk, stays out: those nodes get patches in the catch-up.
        let mut ahead = std::collections::VecDeque::new();
        let mut queue = union.iter().copied();
        let source = self.job.source.clone();
        let prepare = |c: usize| {
            let (source, nodes) = (source.clone(), patchable.get(&c).cloned());
            tokio::spawn(async move { streamed(source, c, nodes).await })
        };
        for _ in 0..3 {
            if let Some(c) = queue.next() {
                ahead.push_back(prepare(c));
            }
        }
        // Chunks streamed so far, in order.
        let mut in_stream = Vec::new();
        let mut left_out = 0;
        while let Some(next) = ahead.pop_front() {
            if let Some(c) = queue.next() {
                ahead.push_back(prepare(c));
            }
            while let Ok(event) = self.rx.try_recv() {
                if !self.handle(Some(event)).await {
                    return;
                }
            }
            let chunk = match next.await {
                Ok(Ok(Some(chunk))) => {
                    in_stream.push(chunk.index as usize);
                    chunk
                }
                Ok(Ok(None)) => {
                    left_out += 1;
                    continue;
                }
                Ok(Err(e)) => return self.abandon(e.to_string()).await,
                Err(e) => return self.abandon(e.to_string()).await,
            };
            self.job.on_wire(chunk.data.len() as u64).await;
            // A head that cannot take the chunk is cut; the next one heads.
            let mut moved_from = None;
            while let Some(head) = self.chain.first() {
                let (node, tx) = (head.node, head.tx.clone());
                let piece = chunk.clone();
                let mut write = tokio::spawn(tokio::time::timeout(STALL, async move {
                    let mut tx = tx.lock().await;
                    stream_chunk(&mut tx, &piece)
                        .await
                        .map_err(|e| e.to_string())?;
                    tx.flush().await.map_err(|e| e.to_string())
                }));
                // While the head takes the chunk (seconds, behind a slow
                // member), the chain is watched: a move need not wait for
                // the chunk's end.
                let mut tick = tokio::time::interval(WATCH_EVERY);
                tick.tick().await;
                let sent = loop {
                    tokio::select! {
                        done = &mut write => break done,
                        _ = tick.tick() => {
                            while let Ok(event) = self.rx.try_recv() {
                                if !self.handle(Some(event)).await {
                                    write.abort();
                                    return;
                                }
                            }
                            if let Some(from) = self.route_around_slow(&in_stream).await {
                                moved_from = Some(from);
                            }
                        }
                    }
                };
                let sent = match sent {
                    Ok(sent) => sent,
                    Err(e) => Ok(Err(e.to_string())),
                };
                match sent {
                    Ok(Ok(())) => {
                        for m in &self.chain {
                            m.counters.sent.fetch_add(chunk.raw_len, Ordering::Relaxed);
                        }
                        break;
                    }
                    Ok(Err(_)) => self.cut(node, None).await,
                    Err(_) => {
                        self.cut(
                            node,
                            Some(format!("stalled: took no data for {}s", STALL.as_secs())),
                        )
                        .await
                    }
                }
            }
            if self.chain.is_empty() {
                break;
            }
            // The members after a moved one lost what it had not passed
            // on yet; if its predecessor could not be asked to pass that on
            // again, the stream goes back to the oldest of it, once through
            // the chain rather than to each of them after it.
            let moved_from = match moved_from {
                Some(from) => Some(from),
                None => self.route_around_slow(&in_stream).await,
            };
            if let Some(from) = moved_from {
                let again: Vec<usize> = in_stream.iter().copied().filter(|&c| c >= from).collect();
                for &c in again.iter().rev() {
                    let source = self.job.source.clone();
                    ahead.push_front(tokio::spawn(async move { source.get(c).await.map(Some) }));
                }
            }
        }
        if left_out > 0 {
            self.report.log(
                None,
                format!(
                    "relay chain: {left_out} chunk{} left out of the stream: the nodes that lack {} get block patches directly",
                    if left_out == 1 { "" } else { "s" },
                    if left_out == 1 { "it" } else { "them" },
                ),
            );
        }
        self.stream_ended = true;
        while let Some(head) = self.chain.first().map(|m| m.node) {
            if self.send(head, &Msg::StreamEnd).await {
                break;
            }
            self.cut(head, None).await;
        }
        self.drain().await;
    }

    /// Look at the chain's waits; move a member that holds it back to the
    /// tail. Between chunks, so no relink waits on the head's stream.
    /// Returns the chunk to stream again from, after a move whose Replay
    /// could not be sent.
    async fn route_around_slow(&mut self, in_stream: &[usize]) -> Option<usize> {
        if self.moves_left == 0 && self.suspect.is_none() {
            return None;
        }
        // Members already moved are fed without waiting: they hold nobody back.
        let members = self
            .chain
            .iter()
            .filter(|m| !self.slow.contains(&m.node))
            .map(|m| Reading {
                node: m.node,
                forwarded: m.forwarded,
                blocked_ms: m.blocked_ms,
            })
            .collect();
        let at = std::time::Instant::now();
        let sample = Sample { at, members };
        let verdict = self.watch.observe(sample);
        if self.moves_left > 0 {
            let verdict = verdict?;
            let moved = self.slow.len();
            let again = self.move_to_tail(&verdict, None, in_stream).await;
            if self.slow.len() > moved {
                self.moves_left -= 1;
                self.suspect = Some(Suspect::of(&verdict, at));
            }
            return again;
        }
        // The first move did not help: its waiter was the slow one.
        let suspect = self.suspect.as_mut()?;
        if !suspect.confirmed(verdict.as_ref(), at) {
            if suspect.expired(at) {
                self.suspect = None;
            }
            return None;
        }
        let (suspect, verdict) = (self.suspect.take()?, verdict?);
        let first = self.slow.iter().next().map(|&n| self.name(n).to_string());
        let verdict = Verdict {
            node: suspect.node,
            ..verdict
        };
        self.move_to_tail(&verdict, first.as_deref(), in_stream)
            .await
    }

    /// Move a slow member to the tail of the chain: its predecessor is
    /// linked to its successor and the tail to it, without waiting for it.
    /// One already at the tail stays there, fed without waiting. What the
    /// members after it lack of the stream so far, the predecessor passes
    /// on again from its own target (Replay): that costs the links from
    /// the predecessor on, not the whole chain from the controller.
    async fn move_to_tail(
        &mut self,
        verdict: &Verdict,
        moved_before: Option<&str>,
        in_stream: &[usize],
    ) -> Option<usize> {
        let node = verdict.node;
        let p = self.position(node)?;
        if p == 0 || !self.slow.insert(node) {
            return None;
        }
        let mib = |rate: f64| rate / f64::from(1u32 << 20);
        let last = self.chain.len() - 1;
        let what = if p == last {
            "fed without waiting at the tail of the chain"
        } else {
            "moved to the tail of the chain"
        };
        let after = moved_before.map_or(String::new(), |n| format!(" (moving {n} did not help)"));
        self.report.log(
            Some(node),
            format!(
                "{}: slow ({:.1} MiB/s against a median of {:.1} MiB/s): {what}{after}",
                self.name(node),
                mib(verdict.rate),
                mib(verdict.median)
            ),
        );
        let pred = self.chain[p - 1].node;
        if p == last {
            self.link(pred, node).await;
            return None;
        }
        // The oldest chunk a member after it may lack.
        let from = self.chain[p + 1..]
            .iter()
            .filter(|m| !self.slow.contains(&m.node))
            .map(|m| m.wrote.map_or(0, |w| w + 1))
            .min();
        let member = self.chain.remove(p);
        let tail = self.chain[last - 1].node;
        let succ = self.chain[p].node;
        self.chain.push(member);
        self.link(tail, node).await;
        self.link(pred, succ).await;
        self.unlink(node).await;
        let from = from?;
        let mut bitmap = vec![0u8; proto::bitmap_len(self.job.source.manifest().chunk_count())];
        for &c in in_stream.iter().filter(|&&c| c >= from) {
            proto::set_bit(&mut bitmap, c);
        }
        if self.send(pred, &Msg::Replay { bitmap }).await {
            None
        } else {
            Some(from)
        }
    }

    /// Tell `node` to forward to nobody: it ends the chain now.
    async fn unlink(&mut self, node: usize) {
        self.successor_of.remove(&node);
        self.linked.remove(&node);
        let msg = Msg::RelayConnect {
            secret: self.secret.clone(),
            addr: String::new(),
            port: 0,
            lossy: false,
        };
        self.send(node, &msg).await;
    }

    /// The image cannot be read: every member fails with the reason.
    async fn abandon(mut self, reason: String) {
        let nodes: Vec<usize> = self.chain.iter().map(|m| m.node).collect();
        for n in nodes {
            self.cut(n, Some(reason.clone())).await;
        }
        self.drain().await;
    }

    async fn drain(mut self) {
        loop {
            let event = self.rx.recv().await;
            if !self.handle(event).await {
                break;
            }
        }
    }
}

/// One node's part of a chain load: check the target, join the chain, and
/// report progress until the node is done (or cut out, or gone).
pub(super) async fn member(
    i: usize,
    job: &LoadJob,
    report: &Reporter,
    counters: &Arc<Counters>,
    coord: mpsc::UnboundedSender<ToCoord>,
) -> Result<NodeState, NodeError> {
    let (result, end) = member_inner(i, job, report, counters, &coord).await;
    // Tell the coordinator first: it drops its handle on the agent's stdin,
    // so the agent sees the end and the link closes at once.
    let _ = coord.send(match result {
        Ok(_) => ToCoord::Finished { node: i },
        Err(_) => ToCoord::Gone { node: i },
    });
    if let Some(end) = end {
        end.close().await;
    }
    result
}

async fn member_inner(
    i: usize,
    job: &LoadJob,
    report: &Reporter,
    counters: &Arc<Counters>,
    coord: &mpsc::UnboundedSender<ToCoord>,
) -> (
    Result<NodeState, NodeError>,
    Option<crate::node::agent_link::LinkEnd>,
) {
    let out = |r: Result<NodeState, NodeError>| {
        let _ = coord.send(ToCoord::Out { node: i });
        r
    };
    let mut link = match open_link(i, job, report, false).await {
        Ok(link) => link,
        Err(e) => return (out(Err(e)), None),
    };
    let (needed, base, mut total, blocks) = match begin(i, job, report, counters, &mut link).await {
        Err(e) => {
            let e = e.explained(&mut link.rx).await;
            let end = close_pipes(link);
            return (out(Err(e)), Some(end));
        }
        Ok(Plan::UpToDate) => {
            let end = close_pipes(link);
            return (out(Ok(NodeState::UpToDate)), Some(end));
        }
        Ok(Plan::Send {
            needed,
            base,
            total,
            blocks,
        }) => (needed, base, total, Arc::new(blocks)),
    };
    let AgentLink { tx, mut rx, end } = link;
    let tx: SharedTx = Arc::new(Mutex::new(tx));
    let (cut_tx, mut cut_rx) = oneshot::channel::<String>();
    if needed.is_empty() {
        // Only zero regions changed: nothing to relay, just finish.
        let _ = coord.send(ToCoord::Out { node: i });
    } else {
        report.state(i, NodeState::Transferring, Some("relay chain".into()));
        let _ = coord.send(ToCoord::Joined {
            node: i,
            tx: tx.clone(),
            needed: needed.clone(),
            blocks: blocks.clone(),
            cut: cut_tx,
            counters: counters.clone(),
        });
    }
    let mut finish_sent = false;
    let mut sent_direct = std::collections::HashSet::new();
    if needed.is_empty() {
        finish_sent = true;
        if let Err(e) = send_direct(job, &tx, &[], counters, &blocks).await {
            return (Err(e.explained(&mut rx).await), Some(end));
        }
    }
    let mut cut_open = true;
    let mut refusals = Refusals::default();
    let result = loop {
        tokio::select! {
            why = &mut cut_rx, if cut_open => match why {
                Ok(why) => break Err(NodeError::Cut(why)),
                Err(_) => cut_open = false,
            },
            msg = proto::read_msg(&mut rx) => match msg {
                Ok(Msg::Written { index, bytes_written }) => {
                    counters.written.store(bytes_written, Ordering::Relaxed);
                    let _ = coord.send(ToCoord::Wrote { node: i, index: index as usize });
                    report.progress(i, counters.sent.load(Ordering::Relaxed), base + bytes_written, total);
                }
                Ok(Msg::RelayPort { port }) => {
                    let _ = coord.send(ToCoord::Port { node: i, port });
                }
                Ok(Msg::RelayLinked { .. }) => {
                    let _ = coord.send(ToCoord::Linked { node: i });
                }
                Ok(Msg::RelayStats { forwarded, blocked_ms }) => {
                    let _ = coord.send(ToCoord::Stats { node: i, forwarded, blocked_ms });
                }
                Ok(Msg::RelayLost { peer, reason }) => {
                    let _ = coord.send(ToCoord::Lost { node: i, peer, reason });
                }
                Ok(Msg::RelayRefused { peer, reason }) => {
                    if let Some(line) = refusals.note(&peer, reason, tokio::time::Instant::now()) {
                        report.log(Some(i), format!("{}: {line}", job.nodes[i].name));
                    }
                }
                Ok(Msg::Missing { bitmap }) => {
                    if finish_sent {
                        continue;
                    }
                    let missing: Vec<usize> = needed
                        .iter()
                        .copied()
                        .filter(|&c| proto::bit(&bitmap, c) && sent_direct.insert(c))
                        .collect();
                    if !missing.is_empty() {
                        report.log(Some(i), format!("{}: catching up on {} chunks directly", job.nodes[i].name, missing.len()));
                    }
                    report.state(i, NodeState::Syncing, None);
                    finish_sent = true;
                    match send_direct(job, &tx, &missing, counters, &blocks).await {
                        Ok(tally) => {
                            total = total.saturating_sub(tally.spared());
                            if let Some(line) = tally.line() {
                                report.log(Some(i), format!("{}: {line}", job.nodes[i].name));
                            }
                        }
                        Err(e) => break Err(e),
                    }
                }
                Ok(Msg::Finished { bytes_written }) => {
                    counters.written.store(bytes_written, Ordering::Relaxed);
                    break Ok(NodeState::Done);
                }
                Ok(Msg::Error { kind, message }) => {
                    break Err(delta::traced(&job.source, NodeError::Agent { kind, message }).await)
                }
                Ok(other) => break Err(NodeError::Protocol(format!("agent sent {} during the relay", other.name()))),
                Err(e) => break Err(NodeError::Lost(format!("agent connection lost ({e})"))),
            },
        }
    };
    for line in refusals.rest() {
        report.log(Some(i), format!("{}: {line}", job.nodes[i].name));
    }
    let result = match result {
        Err(e) => Err(e.explained(&mut rx).await),
        ok => ok,
    };
    drop(tx);
    drop(rx);
    (result, Some(end))
}

/// Send one chunk down the stream: whole if it is small, else in
/// [`proto::STREAM_PIECE`]s that each hop forwards as they arrive.
async fn stream_chunk(tx: &mut Tx, chunk: &WireChunk) -> Result<(), proto::ProtocolError> {
    let data = &chunk.data;
    if data.len() <= proto::STREAM_PIECE {
        return proto::write_stream_chunk(tx, chunk.index, chunk.codec, None, data).await;
    }
    let total = u32::try_from(data.len()).map_err(|_| proto::ProtocolError::TooLarge(u32::MAX))?;
    for (k, piece) in data.chunks(proto::STREAM_PIECE).enumerate() {
        // Within `total`, a u32.
        let offset = (k * proto::STREAM_PIECE) as u32;
        proto::write_stream_chunk(tx, chunk.index, chunk.codec, Some((offset, total)), piece)
            .await?;
    }
    Ok(())
}

fn close_pipes(link: AgentLink) -> crate::node::agent_link::LinkEnd {
    let AgentLink { tx, rx, end } = link;
    drop(tx);
    drop(rx);
    end
}

/// Chunks a member lacks after the stream, straight from the controller
/// (as patches where its block digests allow), then Finish.
async fn send_direct(
    job: &LoadJob,
    tx: &SharedTx,
    chunks: &[usize],
    counters: &Counters,
    blocks: &BlockMap,
) -> Result<Tally, NodeError> {
    let mut tally = Tally::default();
    for &c in chunks {
        let out = delta::outgoing(&job.source, c, blocks.get(&c).cloned())
            .await
            .map_err(NodeError::from)?;
        job.on_wire(out.wire_len()).await;
        let mut tx = tx.lock().await;
        out.write(&mut tx)
            .await
            .map_err(|e| NodeError::Lost(format!("sending chunk {c}: {e}")))?;
        counters.sent.fetch_add(out.raw_len(), Ordering::Relaxed);
        tally.add(&out);
    }
    let mut tx = tx.lock().await;
    proto::write_msg(&mut *tx, &Msg::Finish)
        .await
        .map_err(|e| NodeError::Lost(format!("sending Finish: {e}")))?;
    tx.flush()
        .await
        .map_err(|e| NodeError::Lost(format!("sending Finish: {e}")))?;
    Ok(tally)
}

/// Per chunk of the stream that every member lacking it holds block
/// digests for: those members' digests. The other chunks are streamed.
fn patchable(joined: &[(usize, Vec<usize>, Arc<BlockMap>)]) -> HashMap<usize, Vec<Arc<BlockMap>>> {
    let mut chunks: HashMap<usize, Option<Vec<Arc<BlockMap>>>> = HashMap::new();
    if joined.iter().all(|(_, _, blocks)| blocks.is_empty()) {
        return HashMap::new();
    }
    for (_, needed, blocks) in joined {
        for &c in needed {
            let entry = chunks.entry(c).or_insert_with(|| Some(Vec::new()));
            match entry {
                Some(nodes) if blocks.contains_key(&c) => nodes.push(blocks.clone()),
                _ => *entry = None,
            }
        }
    }
    chunks
        .into_iter()
        .filter_map(|(c, nodes)| nodes.map(|n| (c, n)))
        .collect()
}

/// Chunk `c` for the stream, or None when the members that lack it (with
/// their block digests in `nodes`) together take less as patches.
async fn streamed(
    source: Arc<crate::engine::source::ChunkSource>,
    c: usize,
    nodes: Option<Vec<Arc<BlockMap>>>,
) -> Result<Option<Arc<WireChunk>>, SourceError> {
    if let Some(nodes) = nodes {
        let s = source.clone();
        let differing = tokio::task::spawn_blocking(move || delta::differing_total(&s, c, &nodes))
            .await
            .map_err(|e| SourceError::Reader(e.to_string()))??;
        if delta::worth_patching(differing, source.manifest().chunk_len(c)) {
            return Ok(None);
        }
    }
    source.get(c).await.map(Some)
}
