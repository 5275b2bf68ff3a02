//! `imaging`: load disk images onto many lab nodes, save them back, wait for
//! them to come up.
//!
//! The engine modules (`config`, `inventory`, `nodespec`, `ssh`, `wait`, …)
//! never touch the terminal; they report through [`report::Reporter`] and
//! the front ends in [`ui`] draw.

pub mod agent;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod digest;
pub mod events;
pub mod inventory;
pub mod manifest;
pub mod nodespec;
pub mod protocol;
pub mod repo;
pub mod report;
pub mod ssh;
pub mod ui;
pub mod wait;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::cli::{Cli, Command, NodeArgs};
use crate::config::Loaded;
use crate::inventory::Node;

/// Every way a run can end, with its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    NodesFailed = 1,
    Usage = 2,
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// Errors a user causes before anything is touched: exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Spec(#[from] nodespec::SpecError),
    #[error("{0}")]
    Other(String),
}

/// Parse argv (with `imaging-<sub>` dispatch) and run.
pub fn main_with_args(argv: Vec<OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(cli::dispatch_argv(argv)) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    ssh::adopt_orphans();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imaging: cannot start the async runtime: {e}");
            return Exit::Usage.into();
        }
    };
    let exit = runtime.block_on(run(cli));
    // Dropping the runtime drops every task still alive, which closes their
    // SSH sessions; then no ssh process of ours may outlive us.
    drop(runtime);
    ssh::end_orphans();
    exit.into()
}

pub async fn run(cli: Cli) -> Exit {
    match run_inner(cli).await {
        Ok(exit) => exit,
        Err(e) => {
            eprintln!("imaging: error: {e}");
            Exit::Usage
        }
    }
}

async fn run_inner(cli: Cli) -> Result<Exit, UsageError> {
    let loaded = || config::load(cli.global.config.as_deref());
    match &cli.command {
        Command::Config => {
            let loaded = loaded()?;
            print!("{}", config::describe(&loaded));
            Ok(Exit::Success)
        }
        Command::Nodes(args) => {
            let loaded = loaded()?;
            let nodes = select(&loaded, args)?;
            let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
            println!("{}", names.join(" "));
            Ok(Exit::Success)
        }
        Command::Wait(args) => {
            let loaded = loaded()?;
            let nodes = select(&loaded, &args.nodes)?;
            let timeout = args.timeout.unwrap_or(loaded.config.wait.timeout as f64);
            let timeout = Duration::try_from_secs_f64(timeout).map_err(|_| {
                UsageError::Other(format!("--timeout {timeout}: not a number of seconds"))
            })?;
            let ssh = ssh::SshSettings::from_config(&loaded.config).map_err(|e| {
                UsageError::Other(format!("cannot create the SSH control directory: {e}"))
            })?;
            let mode = if cli.global.json {
                ui::Mode::Json
            } else if args.silent {
                ui::Mode::Silent
            } else {
                ui::Mode::Lines
            };
            let info = ui::RunInfo {
                command: "wait".into(),
                names: nodes.iter().map(|n| n.name.clone()).collect(),
                verbose: args.verbose,
            };
            let deadline = tokio::time::Instant::now() + timeout;
            let verbose = args.verbose;
            Ok(drive(mode, info, move |report| {
                wait::wait_all(nodes, ssh, deadline, verbose, report)
            })
            .await)
        }
        Command::InstallLinks { dir } => {
            install_links(dir)?;
            Ok(Exit::Success)
        }
    }
}

/// Run an engine with a front end; Ctrl-C cancels the engine (dropping it
/// closes its sessions), marks unfinished nodes cancelled and exits 130.
async fn drive<F, Fut>(mode: ui::Mode, info: ui::RunInfo, engine: F) -> Exit
where
    F: FnOnce(report::Reporter) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let reporter = report::Reporter::new(&info.command, &info.names, tx);
    let frontend = tokio::spawn(ui::consume(mode, info, rx));
    let interrupted = tokio::select! {
        _ = engine(reporter.clone()) => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    if interrupted {
        reporter.close_unfinished(events::NodeState::Cancelled, "interrupted");
    }
    let summary = reporter.finish();
    let _ = frontend.await;
    if interrupted {
        Exit::Interrupted
    } else if summary.ok {
        Exit::Success
    } else {
        Exit::NodesFailed
    }
}

/// Resolve the node arguments: `-a` scope, then the spec, else `$NODES`.
pub fn select(loaded: &Loaded, args: &NodeArgs) -> Result<Vec<Node>, UsageError> {
    let inventory = loaded.config.inventory()?;
    let mut tokens = Vec::new();
    if args.all {
        match &loaded.config.nodes.all {
            Some(all) if !all.trim().is_empty() => tokens.push(all.clone()),
            _ => {
                return Err(UsageError::Other(
                    "-a: no all-nodes scope configured (set [nodes] all, e.g. all = \"1-37\")"
                        .into(),
                ));
            }
        }
    }
    tokens.extend(args.spec.iter().cloned());
    if tokens.is_empty()
        && let Ok(env) = std::env::var("NODES")
    {
        tokens.push(env);
    }
    let repo = config::expand_home(&loaded.config.repository.dir);
    let is_image = |token: &str| {
        !token.contains('/')
            && (repo.join(token).is_file() || repo.join(format!("{token}.img")).is_file())
    };
    Ok(nodespec::select_nodes(&inventory, &tokens, &is_image)?)
}

fn install_links(dir: &std::path::Path) -> Result<(), UsageError> {
    let exe = std::env::current_exe()
        .map_err(|e| UsageError::Other(format!("cannot find this executable: {e}")))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| UsageError::Other(format!("cannot create {}: {e}", dir.display())))?;
    for sub in cli::LINKED {
        let link = dir.join(format!("imaging-{sub}"));
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).map_err(|e| {
                UsageError::Other(format!("cannot replace {}: {e}", link.display()))
            })?;
        }
        std::os::unix::fs::symlink(&exe, &link)
            .map_err(|e| UsageError::Other(format!("cannot create {}: {e}", link.display())))?;
        println!("{} -> {}", link.display(), exe.display());
    }
    Ok(())
}
