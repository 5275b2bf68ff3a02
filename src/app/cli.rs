//! Command-line arguments (raw argv; resolved into settings by each command).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub const EXIT_CODES: &str = "\
Exit codes:
  0    every selected node succeeded
  1    one or more nodes failed or timed out (the others still finished)
  2    bad usage, config, node spec or image (nothing was touched)
  130  interrupted by Ctrl-C (after cleanup)";

const LOAD_HELP: &str = "\
Examples:
  imaging load -i ubuntu-24.04.img 1-12     write the image onto nodes 1 to 12
  imaging load -c -a ~7                    the default image on every node but 7, with the dashboard
  imaging load -n -i base.qcow2 hv-west    the plan only: targets, reachability, fan-out and what
                                           each node would receive (its stamp says; exit 0 if some are down)
  imaging load -n --verify -i base.qcow2 hv-west
                                           the same, exactly: each node compares its chunks' digests
  imaging load -i base.qcow2 -i web.qcow2 hv-west hv-east
                                           both images onto both hosts, into targets
                                           templated with {image}: /var/lib/libvirt/images/{image}
  imaging load -b 40M --json 1-4           cap the controller's links at 40 MiB/s; JSON lines

Exit codes:
  0    every selected node succeeded
  1    one or more nodes failed or timed out (the others still finished)
  2    bad usage, config, node spec or image (nothing was touched)
  130  interrupted by Ctrl-C (after cleanup)";

const SAVE_HELP: &str = "\
Examples:
  imaging save 3 -o golden     saving__fit03__<date>__golden.img in the repository
  imaging save -n 1-4          the names the images would get
  imaging save -i web.qcow2 hv-west   from a target templated with {image}: that file

Exit codes:
  0    every selected node succeeded
  1    one or more nodes failed or timed out (the others still finished)
  2    bad usage, config, node spec or image (nothing was touched)
  130  interrupted by Ctrl-C (after cleanup)";

const WAIT_HELP: &str = "\
Examples:
  imaging wait -t 120 1-12 && run-experiment
  imaging-wait -s 1-12 || echo 'some nodes are down'
  imaging wait -t 0 -v hv-west                  no deadline; print every failed attempt

Exit codes:
  0    every selected node accepted an SSH login
  1    one or more nodes did not before the deadline
  2    bad usage, config or node spec
  130  interrupted by Ctrl-C";

const LIST_HELP: &str = "\
Examples:
  imaging list               every image
  imaging list 'ubuntu*'     images whose name matches a glob (or contains a word)
  imaging list -l            with where each saved image came from
  imaging list --json        one JSON object per image

Exit codes:
  0    listed (also when nothing matched)
  2    bad config, or the repository does not exist";

const NODES_HELP: &str = "\
Examples:
  imaging nodes 1-12 ~5       fit01 … fit12 without fit05
  imaging nodes -a --json     the all-nodes scope, as a JSON array

Exit codes:
  0    printed
  2    bad config or node spec";

const CONFIG_HELP: &str = "\
Examples:
  imaging config                       every key, its value and the file it came from
  imaging --config lab.conf config     with an extra layer on top

Exit codes:
  0    printed
  2    a config file is invalid (its file, line and key are named)";

const DEMO_HELP: &str = "\
Examples:
  imaging demo                 8 simulated nodes, a 1 GiB image, the dashboard on a terminal
  imaging demo -b 0 --size 4G  no cap, a bigger image

Exit codes:
  0    the demo ran and every check held
  1    a step failed";

const LINKS_HELP: &str = "\
Examples:
  imaging install-links ~/.local/bin        imaging-load, imaging-wait, … -> this executable
  imaging install-links -f /usr/local/bin   replace files that are already there

Exit codes:
  0    links created
  2    DIR does not exist, or a file is in the way (without -f)";

const IMPORT_HELP: &str = "\
Examples:
  imaging import old-cluster.ndz               old-cluster.img (raw, sparse) and its manifest
  imaging import /tmp/x.ndz -o ubuntu-20.img   under another name

Exit codes:
  0    every selected node succeeded
  1    one or more nodes failed or timed out (the others still finished)
  2    bad usage, config, node spec or image (nothing was touched)
  130  interrupted by Ctrl-C (after cleanup)";

const ALIAS_HELP: &str = "\
Examples:
  imaging alias default ubuntu-24.04.img   load -i default now loads ubuntu-24.04.img
  imaging alias -f default fedora-41.img   move the alias

Exit codes:
  0    every selected node succeeded
  1    one or more nodes failed or timed out (the others still finished)
  2    bad usage, config, node spec or image (nothing was touched)
  130  interrupted by Ctrl-C (after cleanup)";

const RESOLVE_HELP: &str = "\
Examples:
  imaging resolve default      the file `load -i default` would load

Exit codes:
  0    every selected node succeeded
  1    one or more nodes failed or timed out (the others still finished)
  2    bad usage, config, node spec or image (nothing was touched)
  130  interrupted by Ctrl-C (after cleanup)";

const SHARE_HELP: &str = "\
Examples:
  imaging share golden.img --as lab-golden   into the first shared repository, with an alias

Exit codes:
  0    every selected node succeeded
  1    one or more nodes failed or timed out (the others still finished)
  2    bad usage, config, node spec or image (nothing was touched)
  130  interrupted by Ctrl-C (after cleanup)";

const RM_HELP: &str = "\
Examples:
  imaging rm -n old.img        what would be removed
  imaging rm old.img stale     the images (or aliases) with their manifests

Exit codes:
  0    every selected node succeeded
  1    one or more nodes failed or timed out (the others still finished)
  2    bad usage, config, node spec or image (nothing was touched)
  130  interrupted by Ctrl-C (after cleanup)";

const PRUNE_HELP: &str = "\
Examples:
  imaging prune --keep 3 -n    the saves that would go, keeping 3 per node and name
  imaging prune --keep 1 'saving__fit0*'

Exit codes:
  0    every selected node succeeded
  1    one or more nodes failed or timed out (the others still finished)
  2    bad usage, config, node spec or image (nothing was touched)
  130  interrupted by Ctrl-C (after cleanup)";

const POWER_HELP: &str = "\
Examples:
  imaging on 1-12              through [power] on, for each node
  imaging power -a             each node's power state

Exit codes:
  0    every selected node succeeded
  1    one or more nodes failed or timed out (the others still finished)
  2    bad usage, config, node spec or image (nothing was touched)
  130  interrupted by Ctrl-C (after cleanup)";

const STATUS_HELP: &str = "\
Examples:
  imaging status 1-12           per node: SSH up or down; per target: image, when loaded, intact or not, current or not
  imaging status --json -a      the same as JSON lines (a node object each, then the summary)
  imaging status --verify 3     also read node 3's targets and count the chunks that differ from the image

Exit codes:
  0    every selected node answered
  1    one or more nodes are down or their agent failed
  2    bad usage, config or node spec (nothing was probed)
  130  interrupted by Ctrl-C";

const CLEAN_HELP: &str = "\
Examples:
  imaging clean -n hosts --keep base.qcow2,web.qcow2   what would go from each host's image directory
  imaging clean hosts --keep base.qcow2                remove the other image files imaging wrote there

Only with a target template holding {image} (target = \"/var/lib/libvirt/images/{image}\").
A file imaging did not write (no stamp), or changed since its load, is never removed.

Exit codes:
  0    every selected node answered
  1    one or more nodes are down or their agent failed
  2    bad usage, config or node spec, or a target without {image} (nothing was touched)
  130  interrupted by Ctrl-C";

#[derive(Debug, Parser)]
#[command(
    name = "imaging",
    version,
    propagate_version = true,
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
    #[arg(long, global = true, help_heading = "Output", conflicts_with_all = ["curses", "plain"])]
    pub json: bool,
    /// Full-screen dashboard (q cancels, ? for keys)
    #[arg(
        short = 'c',
        long = "curses",
        global = true,
        help_heading = "Output",
        conflicts_with = "plain"
    )]
    pub curses: bool,
    /// Plain timestamped lines, even on a terminal
    #[arg(long, global = true, help_heading = "Output")]
    pub plain: bool,
    /// With -c: leave the dashboard when the run ends instead of waiting for a key (for scripts)
    #[arg(long = "no-wait", global = true, help_heading = "Output")]
    pub no_wait: bool,
    /// Append every event to FILE (default: ~/.local/state/imaging/imaging.log)
    #[arg(
        long = "log",
        global = true,
        value_name = "FILE",
        help_heading = "Output"
    )]
    pub log: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Nodes: `1-12`, `fit04`, `4-16-2`, `~5`, `hv-west`… (default: $NODES)
    #[arg(value_name = "NODES", help_heading = "Selection")]
    pub spec: Vec<String>,
    /// Add the configured all-nodes scope ([nodes] all)
    #[arg(short = 'a', long = "all", help_heading = "Selection")]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write an image onto every selected node's target
    #[command(after_help = LOAD_HELP)]
    Load(LoadArgs),
    /// Read nodes' targets back into new images in the repository
    #[command(after_help = SAVE_HELP)]
    Save(SaveArgs),
    /// Images in the repositories: format, size, data size, date, manifest state, where, aliases
    #[command(after_help = LIST_HELP)]
    List(ListArgs),
    /// Convert a Frisbee/imagezip .ndz into a raw sparse image with its manifest in the repository
    #[command(after_help = IMPORT_HELP)]
    Import(ImportArgs),
    /// Name an image: make NAME an alias (a symlink in the repository) to IMAGE
    #[command(after_help = ALIAS_HELP)]
    Alias(AliasArgs),
    /// Print the file `-i NAME` would load, its size and identity
    #[command(after_help = RESOLVE_HELP)]
    Resolve(ResolveArgs),
    /// Move an image (with its manifest and provenance) into the first shared repository
    #[command(after_help = SHARE_HELP)]
    Share(ShareArgs),
    /// Remove images (with their manifest and provenance) or aliases from the repository
    #[command(after_help = RM_HELP)]
    Rm(RmArgs),
    /// Keep the N newest saves of each node and name, remove the others
    #[command(after_help = PRUNE_HELP)]
    Prune(PruneArgs),
    /// Return once every node accepts SSH, or report those that never did
    #[command(after_help = WAIT_HELP)]
    Wait(WaitArgs),
    /// What every node holds: SSH up or down, each target's image, when loaded, intact, current
    #[command(after_help = STATUS_HELP)]
    Status(StatusArgs),
    /// Remove from hosts' {image} directories the image files imaging wrote that are not kept
    #[command(after_help = CLEAN_HELP)]
    Clean(CleanArgs),
    /// Print the selected node names, space separated, in number order
    #[command(after_help = NODES_HELP)]
    Nodes(NodeArgs),
    /// Power nodes on, through the `[power] on` command
    #[command(after_help = POWER_HELP)]
    On(PowerArgs),
    /// Power nodes off, through the `[power] off` command
    #[command(after_help = POWER_HELP)]
    Off(PowerArgs),
    /// Reset nodes, through the `[power] reset` command
    #[command(after_help = POWER_HELP)]
    Reset(PowerArgs),
    /// Print each node's power state (on, off, unknown), through the `[power] status` command
    #[command(after_help = POWER_HELP)]
    Power(PowerArgs),
    /// Print the effective configuration, each value with the file it came from
    #[command(after_help = CONFIG_HELP)]
    Config,
    /// The main job on simulated local nodes: generate an image, load it, save one node back, wait
    #[command(after_help = DEMO_HELP)]
    Demo(DemoArgs),
    /// Create `imaging-<command>` symlinks to this executable in DIR
    #[command(after_help = LINKS_HELP)]
    InstallLinks {
        /// Directory for the links (e.g. ~/.local/bin)
        dir: PathBuf,
        /// Replace files that are already there
        #[arg(short = 'f', long = "force")]
        force: bool,
    },
    /// Print shell completions (bash also completes image and node names)
    #[command(
        after_help = "Examples:\n  imaging completions bash > /etc/bash_completion.d/imaging\n  imaging completions zsh > ~/.zfunc/_imaging\n  imaging completions fish > ~/.config/fish/completions/imaging.fish\n\nExit codes:\n  0    printed\n  2    unknown shell"
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Write man pages (imaging.1, imaging-load.1, …) into DIR
    #[command(
        after_help = "Examples:\n  imaging man /usr/local/share/man/man1\n\nExit codes:\n  0    written\n  2    DIR cannot be written"
    )]
    Man {
        /// Directory for the pages (created if missing)
        dir: PathBuf,
    },
    /// Names for the shell completion: `images` or `nodes`
    #[command(name = "__complete", hide = true)]
    Complete { what: String },
    /// The node side, started by the controller over SSH (speaks the agent protocol on stdin/stdout)
    #[command(hide = true)]
    Agent,
}

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub nodes: NodeArgs,
    /// Image name in the repository, or a path (default: [repository] default_image);
    /// repeat for several images in one run, each into its own target: the
    /// target must then contain {image} (the image's file name)
    #[arg(
        short = 'i',
        long = "image",
        value_name = "IMAGE",
        help_heading = "Transfer"
    )]
    pub image: Vec<String>,
    /// Give up after SECS seconds; 0: no deadline (default: [load] timeout)
    #[arg(short = 't', long = "timeout", value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Rewrite every chunk, and write block devices even if mounted
    #[arg(long, help_heading = "Transfer")]
    pub force: bool,
    /// Compare every chunk's digest even when the node's stamp says the
    /// target is up to date (finds in-place changes the stamp cannot see)
    #[arg(long, help_heading = "Transfer")]
    pub verify: bool,
    /// Cap on the bytes leaving this machine, as sent (compressed), over all nodes, per second (K, M, G: 40M); nodes may write faster
    #[arg(short = 'b', long = "bandwidth", value_name = "RATE", value_parser = parse_rate, help_heading = "Transfer")]
    pub bandwidth: Option<u64>,
    /// star, chain or auto (default: [load] fanout)
    #[arg(long, value_name = "MODE", help_heading = "Transfer")]
    pub fanout: Option<crate::config::Fanout>,
    /// The plan, writing nothing: each node's target, reachable or not, what the target is now, what it would receive (its stamp says; with --verify its digests, exactly), the fan-out (--json: one "plan" object per image); exit 0 even if nodes are down
    #[arg(short = 'n', long = "dry-run")]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SaveArgs {
    #[command(flatten)]
    pub nodes: NodeArgs,
    /// A name for the image(s): saving__<node>__<date>__<NAME>.img
    #[arg(
        short = 'o',
        long = "output",
        value_name = "NAME",
        help_heading = "Transfer"
    )]
    pub output: Option<String>,
    /// With a target templated with {image} (a host holding several
    /// images): which of them to save, by its file name on the node (as
    /// `status` shows it); a repository alias is followed to its file
    #[arg(
        short = 'i',
        long = "image",
        value_name = "IMAGE",
        help_heading = "Transfer"
    )]
    pub image: Option<String>,
    /// A comment recorded with the image's provenance (shown by list -l)
    #[arg(short = 'm', long = "message", value_name = "COMMENT")]
    pub message: Option<String>,
    /// Read and save every block; by default blocks that ext2/3/4 file
    /// systems mark free are neither read nor sent and become holes
    #[arg(long, help_heading = "Transfer")]
    pub raw: bool,
    /// Give up after SECS seconds; 0: no deadline (default: [save] timeout)
    #[arg(short = 't', long = "timeout", value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Show what would be done, touch nothing
    #[arg(short = 'n', long = "dry-run")]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Args)]
pub struct AliasArgs {
    /// The alias (`.img` is appended unless present)
    pub name: String,
    /// The image it names (an alias is followed to its image)
    pub image: String,
    /// Move an existing alias (an image is never replaced)
    #[arg(short = 'f', long = "force")]
    pub force: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ResolveArgs {
    /// A name as given to `load -i`
    pub name: String,
}

#[derive(Debug, Clone, Args)]
pub struct ShareArgs {
    /// An image of [repository] dir
    pub image: String,
    /// Also create the alias NAME in the shared repository
    #[arg(long = "as", value_name = "NAME")]
    pub as_name: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RmArgs {
    /// Images or aliases of [repository] dir
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<String>,
    /// Remove an image even if aliases point to it
    #[arg(short = 'f', long = "force")]
    pub force: bool,
    /// Show what would be removed, touch nothing
    #[arg(short = 'n', long = "dry-run")]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Args)]
pub struct PruneArgs {
    /// How many saves of each node and name to keep
    #[arg(long, value_name = "N")]
    pub keep: usize,
    /// Only saves whose name matches (a glob with * and ?, or a substring)
    pub pattern: Option<String>,
    /// Show what would be removed, touch nothing
    #[arg(short = 'n', long = "dry-run")]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Args)]
pub struct PowerArgs {
    #[command(flatten)]
    pub nodes: NodeArgs,
    /// Seconds each node's command may run before it is killed (default: [power] timeout)
    #[arg(short = 't', long = "timeout", value_name = "SECS")]
    pub timeout: Option<f64>,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// How many simulated nodes
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub nodes: u16,
    /// Size of the generated image (suffixes K, M, G)
    #[arg(long, default_value = "1G", value_parser = parse_rate)]
    pub size: u64,
    /// Cap on the bytes sent (compressed) per second, so the load can be watched (0: none)
    #[arg(short = 'b', long = "bandwidth", default_value = "256M", value_parser = parse_rate)]
    pub bandwidth: u64,
    /// Use local agent processes even if sshd is available
    #[arg(long)]
    pub local: bool,
    /// Keep the demo's directory (images, targets, config) and print where it is
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The .ndz: a name in the repository, or a path
    #[arg(value_name = "IMAGE")]
    pub image: String,
    /// Name of the new image in the repository (default: the .ndz name with .img instead of .ndz)
    #[arg(short = 'o', long = "output", value_name = "NAME")]
    pub output: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only images whose name matches (a glob with * and ?, or a substring)
    pub pattern: Option<String>,
    /// Also show where each saved image came from (its provenance)
    #[arg(short = 'l', long = "long")]
    pub long: bool,
}

/// `100M` → 104857600 bytes per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = t.split_at(
        t.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len()),
    );
    let value: f64 = digits
        .parse()
        .map_err(|_| format!("`{text}`: expected a number like 100M"))?;
    let factor = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("B/S")
        .trim_end_matches('B')
    {
        "" => 1u64,
        "K" | "KI" => 1 << 10,
        "M" | "MI" => 1 << 20,
        "G" | "GI" => 1 << 30,
        other => return Err(format!("`{text}`: unknown unit `{other}` (use K, M or G)")),
    };
    Ok((value * factor as f64) as u64)
}

#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    #[command(flatten)]
    pub nodes: NodeArgs,
    /// Give up after SECS seconds; 0: no deadline (default: [wait] timeout)
    #[arg(short = 't', long = "timeout", value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Print nothing; only the exit code tells
    #[arg(
        short = 's',
        long = "silent",
        conflicts_with = "verbose",
        help_heading = "Output"
    )]
    pub silent: bool,
    /// Print every failed attempt as it happens
    #[arg(short = 'v', long = "verbose", help_heading = "Output")]
    pub verbose: bool,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub nodes: NodeArgs,
    /// Also read each stamped target and compare its chunks with the repository's image of that name
    #[arg(long)]
    pub verify: bool,
    /// Give up on a node after SECS seconds; 0: no deadline (default: 10, with --verify [load] timeout)
    #[arg(short = 't', long = "timeout", value_name = "SECS")]
    pub timeout: Option<f64>,
}

#[derive(Debug, Clone, Args)]
pub struct CleanArgs {
    #[command(flatten)]
    pub nodes: NodeArgs,
    /// Images to keep, comma separated (their file names, `.img` optional)
    #[arg(
        long,
        value_name = "IMAGE[,IMAGE…]",
        value_delimiter = ',',
        required = true
    )]
    pub keep: Vec<String>,
    /// Show what would be removed, touch nothing
    #[arg(short = 'n', long = "dry-run")]
    pub dry_run: bool,
    /// Give up on a node after SECS seconds; 0: no deadline (default: 30)
    #[arg(short = 't', long = "timeout", value_name = "SECS")]
    pub timeout: Option<f64>,
}

/// Subcommands reachable through an `imaging-<name>` link.
pub const LINKED: &[&str] = &[
    "load", "save", "wait", "list", "nodes", "config", "import", "on", "off", "reset", "power",
    "alias", "resolve", "share", "rm", "prune", "status", "clean",
];

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
    fn rates_take_binary_suffixes() {
        assert_eq!(parse_rate("100M"), Ok(100 << 20));
        assert_eq!(parse_rate("1.5K"), Ok(1536));
        assert_eq!(parse_rate("2048"), Ok(2048));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10X").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
