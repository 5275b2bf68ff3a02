//! `imaging clean`: on every node at once, remove from the directory of
//! its `{image}` target template the image files imaging stamped that are
//! not kept (the agent decides, file by file; see `agent::clean`).

use std::sync::Arc;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::engine::status::{connect_agent, send};
use crate::inventory::Node;
use crate::node::agent_link::AgentSource;
use crate::node::ssh::SshSettings;
use crate::proto::status::{CleanBegin, CleanEntry};
use crate::proto::{self, Msg};

pub struct CleanJob {
    pub nodes: Vec<Node>,
    /// Each node's target template, `{image}` kept.
    pub patterns: Vec<String>,
    pub keep: Vec<String>,
    pub dry_run: bool,
    pub ssh: SshSettings,
    pub agent: AgentSource,
    pub deadline: Instant,
}

pub struct NodeClean {
    pub name: String,
    pub ssh_up: bool,
    pub error: Option<String>,
    pub entries: Vec<CleanEntry>,
}

/// Clean every node; results in node order.
pub async fn run(job: CleanJob) -> Vec<NodeClean> {
    let job = Arc::new(job);
    let limit = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = JoinSet::new();
    for i in 0..job.nodes.len() {
        let (job, limit) = (job.clone(), limit.clone());
        tasks.spawn(async move {
            let mut result = NodeClean {
                name: job.nodes[i].name.clone(),
                ssh_up: false,
                error: None,
                entries: Vec::new(),
            };
            let _permit = limit.acquire().await;
            match tokio::time::timeout_at(job.deadline, clean_one(&job, i, &mut result)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result.error = Some(e),
                Err(_) => result.error = Some("timeout".into()),
            }
            (i, result)
        });
    }
    let mut results: Vec<Option<NodeClean>> = (0..job.nodes.len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        if let Ok((i, r)) = joined {
            results[i] = Some(r);
        }
    }
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| NodeClean {
                name: job.nodes[i].name.clone(),
                ssh_up: false,
                error: Some("the clean failed (internal error)".into()),
                entries: Vec::new(),
            })
        })
        .collect()
}

async fn clean_one(job: &CleanJob, i: usize, result: &mut NodeClean) -> Result<(), String> {
    let mut link = connect_agent(
        &job.ssh,
        &job.agent,
        &job.nodes[i],
        job.deadline,
        &mut result.ssh_up,
    )
    .await?;
    let begin = Msg::CleanBegin(CleanBegin {
        pattern: job.patterns[i].clone(),
        keep: job.keep.clone(),
        dry_run: job.dry_run,
        holder: crate::engine::holder::holder(),
    });
    let outcome = match send(&mut link, &begin).await {
        Err(e) => Err(e),
        Ok(()) => match proto::read_msg(&mut link.rx).await {
            Ok(Msg::CleanReport(r)) => {
                result.entries = r.entries;
                Ok(())
            }
            Ok(Msg::Error { message, .. }) => Err(format!("agent: {message}")),
            Ok(other) => Err(format!("agent answered {} to CleanBegin", other.name())),
            Err(e) => Err(format!("agent: {e}")),
        },
    };
    link.close().await;
    outcome
}
