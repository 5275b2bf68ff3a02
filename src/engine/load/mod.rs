//! `imaging load`: write an image onto every selected node's target.
//!
//! Per node: `before` hook, wait for SSH, start the agent, let it check
//! what the target holds, send only the chunks it needs (each read and
//! compressed once for all nodes), then Finish: the agent syncs and stamps.
//! A dropped connection is retried with backoff and resumes from what the
//! agent verified; the `after` hook runs whenever `before` ran.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::engine::cancel::Cancel;
use crate::engine::error::NodeError;
use crate::engine::events::NodeState;
use crate::engine::report::Reporter;
use crate::node::hooks;

mod chain;
mod job;
mod refusals;
mod session;
mod star;

pub use job::LoadJob;
use session::Counters;

/// `fanout = "auto"` relays through a chain from this many nodes on.
pub const CHAIN_FROM: usize = 4;

pub async fn load_all(mut job: LoadJob, report: Reporter, cancel: Cancel) {
    job.wire = report.board().wire.clone();
    let job = Arc::new(job);
    // A chain needs all its members at once: the concurrency limit is for
    // star, where every node costs the controller's uplink.
    let limit = if job.chain {
        job.nodes.len()
    } else {
        job.concurrency
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(
        limit.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let mut tasks = JoinSet::new();
    let secret = match job.chain.then(chain::fresh_secret).transpose() {
        Ok(secret) => secret,
        Err(e) => {
            // No secret, no chain: nothing may be sent unauthenticated.
            for i in 0..job.nodes.len() {
                let reason = format!("no randomness from the OS for the relay secret: {e}");
                report.state(i, NodeState::Failed, Some(reason));
            }
            return;
        }
    };
    let coordinator = secret.map(|secret| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let c = chain::Coordinator::new(job.clone(), report.clone(), rx, secret);
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
            load_node(i, job, &report, &cancel, coord).await;
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
    job: Arc<LoadJob>,
    report: &Reporter,
    cancel: &Cancel,
    coord: Option<tokio::sync::mpsc::UnboundedSender<chain::ToCoord>>,
) {
    let node = &job.nodes[i];
    let target = &job.targets[i];
    let counters = Arc::new(Counters::default());
    let mut before_ran = false;
    let mut outcome: Result<NodeState, (NodeState, NodeError)> = Ok(NodeState::Done);
    if !job.before.is_empty() {
        report.state(i, NodeState::Preparing, Some("before hook".into()));
        before_ran = true;
        let command = hooks::expand(&job.before, node, &job.image_name, target);
        if let Err(e) = hooks::run(&command).await {
            let e = NodeError::Hook {
                which: "before",
                message: e,
            };
            outcome = Err((e.state(), e));
        }
    }
    if outcome.is_err()
        && let Some(coord) = &coord
    {
        let _ = coord.send(chain::ToCoord::Out { node: i });
    }
    if outcome.is_ok() {
        // Its own task, so that a panic in it ends as this node failing,
        // with its after hook run, not as a lost task.
        let gone = coord.clone();
        let mut work = {
            let (job, report, counters) = (job.clone(), report.clone(), counters.clone());
            tokio::spawn(async move {
                forced_panic(&job.nodes[i].name);
                if job.is_image[i] {
                    // The target is the image file itself (see app::guard).
                    if let Some(coord) = &coord {
                        let _ = coord.send(chain::ToCoord::Out { node: i });
                    }
                    report.log(
                        Some(i),
                        format!(
                            "{}: the target is the image itself, nothing to write",
                            job.nodes[i].name
                        ),
                    );
                    return Ok(NodeState::UpToDate);
                }
                match coord {
                    Some(coord) => chain::member(i, &job, &report, &counters, coord).await,
                    None => star::transfer(i, &job, &report, &counters).await,
                }
            })
        };
        let mut ended = false;
        outcome = tokio::select! {
            r = tokio::time::timeout_at(job.deadline, &mut work) => match r {
                Ok(r) => {
                    ended = true;
                    match r {
                        Ok(Ok(state)) => Ok(state),
                        // Gave up because the deadline came (SSH never answered): a timeout.
                        Ok(Err(e)) if Instant::now() >= job.deadline => Err((NodeState::Timeout, e)),
                        Ok(Err(e)) => Err((e.state(), e)),
                        Err(e) => {
                            if let Some(coord) = &gone {
                                let _ = coord.send(chain::ToCoord::Gone { node: i });
                            }
                            Err((NodeState::Failed, task_failure(e)))
                        }
                    }
                }
                Err(_) => Err((NodeState::Timeout, NodeError::Deadline)),
            },
            _ = cancel.cancelled() => Err((NodeState::Cancelled, NodeError::Cancelled)),
        };
        if !ended {
            // Stop the node's work before its after hook runs.
            work.abort();
            let _ = work.await;
        }
    }
    // The after hook runs whatever happened once before ran (an R2LAB
    // next-boot link must never be left behind), even after a cancel.
    if before_ran && !job.after.is_empty() {
        let command = hooks::expand(&job.after, node, &job.image_name, target);
        if let Err(e) = hooks::run(&command).await {
            let e = NodeError::Hook {
                which: "after",
                message: e,
            };
            report.log(Some(i), format!("{}: {e}", node.name));
            if outcome.is_ok() {
                outcome = Err((e.state(), e));
            }
        }
    }
    let written =
        counters.written_before.load(Ordering::Relaxed) + counters.written.load(Ordering::Relaxed);
    report.progress(i, counters.sent.load(Ordering::Relaxed), written, 0);
    match outcome {
        Ok(state) => report.state(i, state, None),
        Err((state, reason)) => report.state(i, state, Some(reason.to_string())),
    }
}

/// Why a node's task ended without an answer: a panic (a bug), in words.
fn task_failure(e: tokio::task::JoinError) -> NodeError {
    if !e.is_panic() {
        return NodeError::Internal(format!("internal error: the node's task ended: {e}"));
    }
    let payload = e.into_panic();
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    NodeError::Internal(format!("internal error: the node's task panicked: {what}"))
}

/// Debug builds only: `IMAGING_TEST_PANIC_NODE=NAME` panics NAME's task,
/// so tests can check that a panic still runs the after hook.
fn forced_panic(name: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("IMAGING_TEST_PANIC_NODE").is_ok_and(|n| n == name) {
        panic!("IMAGING_TEST_PANIC_NODE={name}");
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}
