//! Command-line arguments (raw argv; resolved into settings by each command).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub const EXIT_CODES: &str = "\
Exit codes:
  0    every selected node succeeded
  1    one or more nodes failed or timed out (the others still finished)
  2    bad usage, config, node spec or image (nothing was touched)
  130  interrupted by Ctrl-C (after cleanup)";

#[derive(Debug, Parser)]
#[command(
    name = "imaging",
    version,
    about = "Load disk images onto many lab nodes at once, save them back, wait for nodes to come up",
    after_help = EXIT_CODES,
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Extra configuration file, the highest layer
    #[arg(long, global = true, env = "IMAGING_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// One JSON object per event on stdout, and a final summary
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Nodes: `1-12`, `fit04`, `4-16-2`, `~5`, `hv-west`… (default: $NODES)
    #[arg(value_name = "NODES")]
    pub spec: Vec<String>,
    /// Add the configured all-nodes scope ([nodes] all)
    #[arg(short = 'a', long = "all")]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Return once every node accepts SSH, or report those that never did
    #[command(after_help = EXIT_CODES)]
    Wait(WaitArgs),
    /// Print the selected node names, space separated, in inventory order
    Nodes(NodeArgs),
    /// Print the effective configuration, each value with the file it came from
    Config,
    /// Create `imaging-<command>` symlinks to this executable in DIR
    InstallLinks {
        /// Directory for the links (e.g. ~/.local/bin)
        dir: PathBuf,
    },
}

#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    #[command(flatten)]
    pub nodes: NodeArgs,
    /// Give up after SECS seconds (default: [wait] timeout)
    #[arg(short = 't', long = "timeout", value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Print nothing; only the exit code tells
    #[arg(short = 's', long = "silent")]
    pub silent: bool,
    /// Print every failed attempt as it happens
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,
}

/// Subcommands reachable through an `imaging-<name>` link.
pub const LINKED: &[&str] = &["load", "save", "wait", "list", "nodes", "config"];

/// argv with busybox-style dispatch: `imaging-wait 1-3` → `imaging wait 1-3`.
pub fn dispatch_argv(mut argv: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let program = argv
        .first()
        .map(|a| {
            std::path::Path::new(a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    if let Some(sub) = program.strip_prefix("imaging-") {
        argv[0] = "imaging".into();
        argv.insert(1, sub.into());
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<std::ffi::OsString> {
        v.iter().map(Into::into).collect()
    }

    #[test]
    fn link_name_selects_the_subcommand() {
        assert_eq!(
            dispatch_argv(os(&["/usr/local/bin/imaging-wait", "-t", "5", "1-3"])),
            os(&["imaging", "wait", "-t", "5", "1-3"])
        );
        assert_eq!(
            dispatch_argv(os(&["imaging", "nodes", "1"])),
            os(&["imaging", "nodes", "1"])
        );
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
