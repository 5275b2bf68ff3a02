//! Power through `[power]` command templates: `on`, `off`, `reset` and
//! `status`, one local command per node (an R2LAB CMC's HTTP call, an
//! `ipmitool` line, …), a bounded number at once, each with a timeout after
//! which its whole process group is killed.
//!
//! [`run`] knows nothing of the terminal: `imaging on|off|reset|power`
//! print its results, and a `status` command can put them in a column.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::PowerConfig;
use crate::engine::events::NodeState;
use crate::inventory::Node;
use crate::node::hooks::{self, CommandError};

/// What to ask of the nodes' power controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    On,
    Off,
    Reset,
    /// Read the power state (`imaging power`).
    Status,
}

impl PowerAction {
    /// The `[power]` key holding its template.
    pub fn key(self) -> &'static str {
        match self {
            PowerAction::On => "on",
            PowerAction::Off => "off",
            PowerAction::Reset => "reset",
            PowerAction::Status => "status",
        }
    }

    fn template(self, config: &PowerConfig) -> &str {
        match self {
            PowerAction::On => &config.on,
            PowerAction::Off => &config.off,
            PowerAction::Reset => &config.reset,
            PowerAction::Status => &config.status,
        }
    }
}

/// A node's power as its `status` command told it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    On,
    Off,
    Unknown,
}

impl PowerState {
    pub fn label(self) -> &'static str {
        match self {
            PowerState::On => "on",
            PowerState::Off => "off",
            PowerState::Unknown => "unknown",
        }
    }
}

/// Read a `status` command's output: the word `on` or `off`, in any case,
/// in its last non-empty line (an R2LAB CMC answers `on`; ipmitool prints
/// `Chassis Power is on`); anything else is unknown.
pub fn parse_status(stdout: &str) -> PowerState {
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty());
    last.into_iter()
        .flat_map(|l| l.rsplit(|c: char| !c.is_ascii_alphanumeric()))
        .find_map(|word| match word.to_ascii_lowercase().as_str() {
            "on" => Some(PowerState::On),
            "off" => Some(PowerState::Off),
            _ => None,
        })
        .unwrap_or(PowerState::Unknown)
}

/// One action over some nodes, checked and ready to run.
#[derive(Debug, Clone)]
pub struct PowerJob {
    pub action: PowerAction,
    /// One command per node, placeholders filled.
    pub commands: Vec<String>,
    pub names: Vec<String>,
    pub timeout: Duration,
    pub concurrency: usize,
}

impl PowerJob {
    /// Fill `action`'s template for every node. An action whose template is
    /// empty, or a placeholder a node has no value for, is an error that
    /// names the key (`[power] on`): nothing has run.
    pub fn new(
        action: PowerAction,
        config: &PowerConfig,
        timeout: Duration,
        nodes: &[Node],
    ) -> Result<PowerJob, String> {
        let key = action.key();
        let template = action.template(config);
        if template.trim().is_empty() {
            return Err(format!(
                "`[power] {key}` is not configured: set it to a command, e.g. \
                 {key} = \"curl -sSf http://{{cmc}}/{key}\" (see imaging.conf.example)"
            ));
        }
        for node in nodes {
            if let Some(p) = hooks::missing_placeholder(template, node) {
                return Err(format!(
                    "`[power] {key}` uses {p}, which node {} has no value for \
                     (set `{}` in its [[node]] entry or the inventory)",
                    node.name,
                    p.trim_matches(|c| c == '{' || c == '}')
                        .replace("pxe_mac", "mac")
                ));
            }
        }
        Ok(PowerJob {
            action,
            commands: nodes
                .iter()
                .map(|n| hooks::expand(template, n, "", ""))
                .collect(),
            names: nodes.iter().map(|n| n.name.clone()).collect(),
            timeout,
            concurrency: config.concurrency.max(1),
        })
    }
}

/// How one node's command went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodePower {
    pub name: String,
    /// `ok`, `failed` or `timeout`.
    pub state: NodeState,
    /// Why it failed: the command's last stderr line, else its exit status.
    pub error: Option<String>,
    /// From the run's start to this node's result.
    pub elapsed_s: f64,
    /// For `status`: what the node's power is (`unknown` when the command
    /// failed or its answer names neither on nor off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power: Option<PowerState>,
    /// For `status`: the last line it printed, to show an unknown answer.
    #[serde(skip)]
    pub answer: Option<String>,
}

/// Run the job's commands, at most `concurrency` at once; results in the
/// nodes' order. Dropping the future kills every command still running.
pub async fn run(job: &PowerJob) -> Vec<NodePower> {
    let started = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(
        job.concurrency
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, command) in job.commands.iter().enumerate() {
        let (slots, command, timeout) = (slots.clone(), command.clone(), job.timeout);
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await;
            (i, hooks::run_command(&command, timeout).await)
        });
    }
    let mut results: Vec<Option<NodePower>> = vec![None; job.commands.len()];
    while let Some(joined) = tasks.join_next().await {
        let Ok((i, outcome)) = joined else { continue };
        results[i] = Some(node_power(job, i, outcome, started.elapsed()));
    }
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| NodePower {
                name: job.names[i].clone(),
                state: NodeState::Failed,
                error: Some("the command's task ended abnormally".into()),
                elapsed_s: started.elapsed().as_secs_f64(),
                power: (job.action == PowerAction::Status).then_some(PowerState::Unknown),
                answer: None,
            })
        })
        .collect()
}

fn node_power(
    job: &PowerJob,
    i: usize,
    outcome: Result<String, CommandError>,
    elapsed: Duration,
) -> NodePower {
    let status = job.action == PowerAction::Status;
    let (state, error, power, answer) = match outcome {
        Ok(stdout) => {
            let answer = stdout
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_string);
            (
                NodeState::Ok,
                None,
                status.then(|| parse_status(&stdout)),
                answer.filter(|_| status),
            )
        }
        Err(e) => (
            match e {
                CommandError::TimedOut(_) => NodeState::Timeout,
                _ => NodeState::Failed,
            },
            Some(e.reason()),
            status.then_some(PowerState::Unknown),
            None,
        ),
    };
    NodePower {
        name: job.names[i].clone(),
        state,
        error,
        elapsed_s: elapsed.as_secs_f64(),
        power,
        answer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_answers_are_read_from_the_last_line() {
        assert_eq!(parse_status("on"), PowerState::On);
        assert_eq!(parse_status("off\n"), PowerState::Off);
        assert_eq!(parse_status("Chassis Power is on\n"), PowerState::On);
        assert_eq!(parse_status("Chassis Power is OFF"), PowerState::Off);
        assert_eq!(parse_status("booting\non\n\n"), PowerState::On);
        assert_eq!(parse_status("on\nerror\n"), PowerState::Unknown);
        // Whole words only: "Connection" holds "on" but says nothing.
        assert_eq!(parse_status("Connection refused"), PowerState::Unknown);
        assert_eq!(parse_status(""), PowerState::Unknown);
    }

    #[test]
    fn an_unconfigured_action_names_its_key() {
        let nodes = [Node {
            name: "fit01".into(),
            ..Node::default()
        }];
        let err = PowerJob::new(
            PowerAction::Reset,
            &PowerConfig::default(),
            Duration::from_secs(1),
            &nodes,
        )
        .unwrap_err();
        assert!(err.contains("`[power] reset`"), "{err}");
    }

    #[test]
    fn a_node_without_a_cmc_is_refused_before_anything_runs() {
        let config = PowerConfig {
            on: "curl -sSf http://{cmc}/on".into(),
            ..PowerConfig::default()
        };
        let nodes = [
            Node {
                name: "fit01".into(),
                cmc: Some("192.168.1.1".into()),
                ..Node::default()
            },
            Node {
                name: "hv-west".into(),
                ..Node::default()
            },
        ];
        let err =
            PowerJob::new(PowerAction::On, &config, Duration::from_secs(1), &nodes).unwrap_err();
        assert!(err.contains("hv-west") && err.contains("{cmc}"), "{err}");
        let job = PowerJob::new(
            PowerAction::On,
            &config,
            Duration::from_secs(1),
            &nodes[..1],
        )
        .unwrap();
        assert_eq!(job.commands, ["curl -sSf http://192.168.1.1/on"]);
    }
}
