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
mod delta;
mod job;
mod refusals;
mod session;
mod slow;
mod star;

pub use job::{ImageLoad, LoadJob, LoadRun};
use session::Counters;

/// `fanout = "auto"` relays through a chain from this many nodes on.
pub const CHAIN_FROM: usize = 4;

/// How one node's load of one image ended.
type Outcome = Result<NodeState, (NodeState, NodeError)>;

/// Load `images` onto every node of `run`. The report's rows are per node
/// and image, node by node: node `i`'s image `k` is row `i * images + k`
/// (row `i` when there is one image). Each node loads its images one
/// after the other between one `before` and one `after` hook; each image
/// has its own chunk source and, in a chain, its own chain.
pub async fn load_all(mut run: LoadRun, images: Vec<ImageLoad>, report: Reporter, cancel: Cancel) {
    run.wire = report.board().wire.clone();
    let run = Arc::new(run);
    let (n, m) = (run.nodes.len(), images.len());
    let jobs: Vec<Arc<LoadJob>> = images
        .into_iter()
        .map(|image| Arc::new(LoadJob::new(run.clone(), image)))
        .collect();
    let reports: Vec<Reporter> = (0..m)
        .map(|k| report.rows((0..n).map(|i| i * m + k).collect()))
        .collect();
    // A chain needs all its members at once: the concurrency limit is for
    // star, where every node costs the controller's uplink.
    let limit = if run.chain { n } else { run.concurrency };
    let slots = Arc::new(tokio::sync::Semaphore::new(
        limit.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let mut tasks = JoinSet::new();
    // A chain per image, each with its own secret.
    let secrets: Result<Vec<Option<Vec<u8>>>, _> = (0..m)
        .map(|_| run.chain.then(chain::fresh_secret).transpose())
        .collect();
    let secrets = match secrets {
        Ok(secrets) => secrets,
        Err(e) => {
            // No secret, no chain: nothing may be sent unauthenticated.
            let reason = format!("no randomness from the OS for the relay secret: {e}");
            for report in &reports {
                for i in 0..n {
                    report.state(i, NodeState::Failed, Some(reason.clone()));
                }
            }
            return;
        }
    };
    let coordinators: Vec<_> = secrets
        .into_iter()
        .zip(jobs.iter().zip(&reports))
        .map(|(secret, (job, report))| {
            secret.map(|secret| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let c = chain::Coordinator::new(job.clone(), report.clone(), rx, secret);
                (tx, tokio::spawn(c.run()))
            })
        })
        .collect();
    let jobs: Arc<[Arc<LoadJob>]> = jobs.into();
    let reports: Arc<[Reporter]> = reports.into();
    for i in 0..n {
        let (jobs, reports, cancel, slots) =
            (jobs.clone(), reports.clone(), cancel.clone(), slots.clone());
        let coords: Vec<Option<Coord>> = coordinators
            .iter()
            .map(|c| c.as_ref().map(|(tx, _)| tx.clone()))
            .collect();
        tasks.spawn(async move {
            let _slot = tokio::select! {
                permit = slots.acquire_owned() => permit.ok(),
                _ = cancel.cancelled() => None,
            };
            if cancel.is_cancelled() {
                for (coord, report) in coords.iter().zip(reports.iter()) {
                    if let Some(coord) = coord {
                        let _ = coord.send(chain::ToCoord::Out { node: i });
                    }
                    report.state(
                        i,
                        NodeState::Cancelled,
                        Some("cancelled before it started".into()),
                    );
                }
                return;
            }
            load_node(i, &jobs, &reports, &cancel, coords).await;
        });
    }
    let handles: Vec<_> = coordinators
        .into_iter()
        .flatten()
        .map(|(tx, handle)| {
            drop(tx);
            handle
        })
        .collect();
    while tasks.join_next().await.is_some() {}
    for handle in handles {
        handle.abort();
        let _ = handle.await;
    }
    // Each chunk is read (and compressed) once for all nodes, unless the
    // nodes drift further apart than the source's cache holds.
    for job in jobs.iter() {
        let reads = job.source.reads.load(Ordering::Relaxed);
        report.log(
            None,
            format!(
                "image {}: {reads} chunk{} read from its file for {n} node{}",
                job.image_name,
                if reads == 1 { "" } else { "s" },
                if n == 1 { "" } else { "s" },
            ),
        );
    }
}

type Coord = tokio::sync::mpsc::UnboundedSender<chain::ToCoord>;

/// One node: the `before` hook, each image in turn, the `after` hook.
async fn load_node(
    i: usize,
    jobs: &[Arc<LoadJob>],
    reports: &[Reporter],
    cancel: &Cancel,
    coords: Vec<Option<Coord>>,
) {
    let run = &jobs[0].run;
    let node = &run.nodes[i];
    // `{image}` and `{target}` of a hook: the run's images and this node's
    // targets, space-separated when there are several.
    let names: Vec<&str> = jobs.iter().map(|j| j.image_name.as_str()).collect();
    let targets: Vec<&str> = jobs.iter().map(|j| j.targets[i].as_str()).collect();
    let (names, targets) = (names.join(" "), targets.join(" "));
    let mut before_ran = false;
    let mut refused: Option<NodeError> = None;
    if !run.before.is_empty() {
        for report in reports {
            report.state(i, NodeState::Preparing, Some("before hook".into()));
        }
        before_ran = true;
        let command = hooks::expand(&run.before, node, &names, &targets);
        if let Err(e) = hooks::run(&command).await {
            refused = Some(NodeError::Hook {
                which: "before",
                message: e,
            });
        }
    }
    let last = jobs.len() - 1;
    let mut ends: Vec<(Outcome, Arc<Counters>)> = Vec::with_capacity(jobs.len());
    for (k, coord) in coords.into_iter().enumerate() {
        let counters = Arc::new(Counters::default());
        let skip = match &refused {
            Some(e) => Some((e.state(), e.clone())),
            None if cancel.is_cancelled() => Some((NodeState::Cancelled, NodeError::Cancelled)),
            None => None,
        };
        let outcome = match skip {
            Some(end) => {
                if let Some(coord) = &coord {
                    let _ = coord.send(chain::ToCoord::Out { node: i });
                }
                Err(end)
            }
            None => load_image(i, &jobs[k], &reports[k], cancel, coord, &counters).await,
        };
        // An image done before the last shows so at once; the last waits
        // for the after hook, which may still fail the node.
        if k < last {
            settle(i, &reports[k], &counters, &outcome);
        }
        ends.push((outcome, counters));
    }
    // The after hook runs whatever happened once before ran (an R2LAB
    // next-boot link must never be left behind), even after a cancel.
    if before_ran && !run.after.is_empty() {
        let command = hooks::expand(&run.after, node, &names, &targets);
        if let Err(e) = hooks::run(&command).await {
            let e = NodeError::Hook {
                which: "after",
                message: e,
            };
            reports[0].log(Some(i), format!("{}: {e}", node.name));
            for (k, (outcome, counters)) in ends.iter_mut().enumerate() {
                if outcome.is_ok() {
                    *outcome = Err((e.state(), e.clone()));
                    if k < last {
                        settle(i, &reports[k], counters, outcome);
                    }
                }
            }
        }
    }
    if let Some((outcome, counters)) = ends.last() {
        settle(i, &reports[last], counters, outcome);
    }
}

/// A node's final counters and state for one image.
fn settle(i: usize, report: &Reporter, counters: &Counters, outcome: &Outcome) {
    let written =
        counters.written_before.load(Ordering::Relaxed) + counters.written.load(Ordering::Relaxed);
    report.progress(i, counters.sent.load(Ordering::Relaxed), written, 0);
    match outcome {
        Ok(state) => report.state(i, *state, None),
        Err((state, reason)) => report.state(i, *state, Some(reason.to_string())),
    }
}

/// One node's load of one image, until the deadline or a cancel.
async fn load_image(
    i: usize,
    job: &Arc<LoadJob>,
    report: &Reporter,
    cancel: &Cancel,
    coord: Option<Coord>,
    counters: &Arc<Counters>,
) -> Outcome {
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
                Some(coord) => match chain::member(i, &job, &report, &counters, coord).await {
                    Err(e) if e.is_stale() => {
                        star::after_stale(i, &job, &report, &counters, e).await
                    }
                    r => r,
                },
                None => star::transfer(i, &job, &report, &counters).await,
            }
        })
    };
    let mut ended = false;
    let outcome = tokio::select! {
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
    outcome
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
