//! `imaging wait`: probe every node until a real SSH login runs a command.

use std::time::Duration;

use openssh::Session;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::engine::backoff::Backoff;
use crate::engine::events::NodeState;
use crate::engine::report::Reporter;
use crate::inventory::Node;
use crate::node::ssh::{self, SshSettings};

/// How many probes may be in flight at once (each is an `ssh` process).
const MAX_PROBES: usize = 64;

/// Wait for every node; each ends `Ok`, or `Failed` with the last reason.
pub async fn wait_all(
    nodes: Vec<Node>,
    ssh: SshSettings,
    deadline: Instant,
    verbose: bool,
    report: Reporter,
) {
    let ssh = std::sync::Arc::new(ssh);
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_PROBES));
    let mut tasks = JoinSet::new();
    for (i, node) in nodes.into_iter().enumerate() {
        let (ssh, report, limit) = (ssh.clone(), report.clone(), limit.clone());
        tasks.spawn(async move {
            if node.local {
                // A local node is this machine: up by definition.
                report.state(i, NodeState::Ok, Some("local".into()));
                return;
            }
            report.state(i, NodeState::WaitingForSsh, None);
            let last = std::sync::Mutex::new(None);
            let outcome = tokio::time::timeout_at(
                deadline,
                wait_one(&node, &ssh, deadline, verbose, i, &report, &limit, &last),
            )
            .await;
            match outcome {
                Ok(Ok(())) => report.state(i, NodeState::Ok, None),
                Ok(Err(reason)) => report.state(i, NodeState::Failed, Some(reason)),
                // Cut mid-attempt: the last attempt that did finish says more.
                Err(_) => {
                    let last = last.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let reason = match last {
                        Some(reason) => format!("timeout: {reason}"),
                        None => "timeout: the SSH handshake never completed".into(),
                    };
                    report.state(i, NodeState::Failed, Some(reason))
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Probe until success or the deadline; the error is the last failure's
/// reason, also kept in `last` for when the deadline cuts an attempt short.
#[allow(clippy::too_many_arguments)]
pub async fn wait_one(
    node: &Node,
    ssh: &SshSettings,
    deadline: Instant,
    verbose: bool,
    index: usize,
    report: &Reporter,
    limit: &tokio::sync::Semaphore,
    last: &std::sync::Mutex<Option<String>>,
) -> Result<(), String> {
    let on_failure = |e: &str| {
        *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        if verbose {
            report.log(Some(index), format!("{}: {e}", node.name));
        }
    };
    let session = connect_when_up(node, ssh, deadline, Some(limit), &on_failure).await?;
    let ran = ssh::run_ok(&session, "true").await;
    let _ = session.close().await;
    ran.map_err(|e| e.to_string())
}

/// Connect to `node`, retrying with backoff until it answers or `deadline`
/// passes; `on_failure` sees every failed attempt. A failure that stays
/// (a refused key, a wrong host key) ends it at once. Used by `wait` and by
/// every command that needs a node's SSH.
pub async fn connect_when_up(
    node: &Node,
    ssh: &SshSettings,
    deadline: Instant,
    limit: Option<&tokio::sync::Semaphore>,
    on_failure: &(dyn Fn(&str) + Send + Sync),
) -> Result<Session, String> {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(3));
    let mut last = String::from("no attempt finished");
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(format!("timeout: {last}"));
        }
        let attempt = {
            let _permit = match limit {
                Some(l) => Some(l.acquire().await.map_err(|e| e.to_string())?),
                None => None,
            };
            ssh::connect(ssh, node, Some(remaining)).await
        };
        match attempt {
            Ok(session) => return Ok(session),
            Err(e) if !e.is_retryable() => return Err(e.to_string()),
            Err(e) => {
                on_failure(&e.reason);
                last = e.reason;
            }
        }
        let pause = backoff.next_delay();
        if Instant::now() + pause >= deadline {
            tokio::time::sleep_until(deadline).await;
            return Err(format!("timeout: {last}"));
        }
        tokio::time::sleep(pause).await;
    }
}
