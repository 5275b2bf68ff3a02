//! Resolving the command line over the configuration, in one place for
//! every command: the nodes (`-a`, the spec, `$NODES`), `-t` over each
//! command's configured timeout (0: no deadline), the targets, the SSH
//! settings and the agent, the repository, and the output mode.

use std::time::Duration;

use crate::app::cli::{Cli, NodeArgs};
use crate::app::exit::UsageError;
use crate::config::{self, Loaded};
use crate::image::repo;
use crate::inventory::{Node, nodespec};
use crate::node::{agent_link, hooks, ssh};
use crate::ui;

pub(crate) fn output_mode(cli: &Cli) -> ui::Mode {
    ui::Mode::resolve(cli.global.json, cli.global.curses, cli.global.plain)
}

/// `-t SECS` (else the config's timeout) as a deadline; 0 means none, for
/// every command alike.
pub(crate) fn deadline(
    timeout: Option<f64>,
    default_secs: u64,
) -> Result<tokio::time::Instant, UsageError> {
    let secs = timeout.unwrap_or(default_secs as f64);
    if secs.is_nan() || secs < 0.0 {
        return Err(UsageError::Other(format!(
            "--timeout {secs}: not a number of seconds (0: no deadline)"
        )));
    }
    let secs = if secs == 0.0 {
        10.0 * 365.0 * 86400.0
    } else {
        secs
    };
    let d = timeout_secs(secs)?;
    tokio::time::Instant::now()
        .checked_add(d)
        .ok_or_else(|| UsageError::Other(format!("--timeout {secs}: too far in the future")))
}

/// A `--timeout` in seconds: a number from 0 to [`config::MAX_SECONDS`].
pub(crate) fn timeout_secs(secs: f64) -> Result<Duration, UsageError> {
    let max = crate::config::MAX_SECONDS;
    if !(0.0..=max as f64).contains(&secs) {
        return Err(UsageError::Other(format!(
            "--timeout {secs}: not a number of seconds from 0 to {max} (10 years)"
        )));
    }
    Duration::try_from_secs_f64(secs)
        .map_err(|_| UsageError::Other(format!("--timeout {secs}: not a number of seconds")))
}

/// Each node's target: its own, else `[load] target`, placeholders filled.
/// Each node's target, to be read back (`save`). A template holding
/// `{image}` (a host with one file per image) needs `image`, the file to
/// read: without it `{image}` would be empty and name no image's file.
pub(crate) fn targets(
    loaded: &Loaded,
    nodes: &[Node],
    image: Option<&str>,
) -> Result<Vec<String>, UsageError> {
    let mut out = Vec::with_capacity(nodes.len());
    for n in nodes {
        let template = n.target.as_deref().unwrap_or(&loaded.config.load.target);
        let whose = match &n.target {
            Some(_) => format!("node {}'s own target", n.name),
            None => format!("[load] target (for node {})", n.name),
        };
        let templated = template.contains("{image}");
        let image = match (templated, image) {
            (true, Some(image)) => image,
            (true, None) => {
                return Err(UsageError::Other(format!(
                    "{whose} is \"{template}\": one file per image ({{image}}); say which to \
                     save with -i IMAGE (its file name there, as `imaging status {}` shows)",
                    n.name
                )));
            }
            (false, Some(image)) => {
                return Err(UsageError::Other(format!(
                    "-i {image}: {whose} is \"{template}\", without {{image}}: the node \
                     holds one image there, and save reads it without -i"
                )));
            }
            (false, None) => "",
        };
        out.push(hooks::expand(template, n, image, ""));
    }
    Ok(out)
}

/// The `[ssh]` settings; a configured identity file must exist.
/// The SSH settings; a missing `identity_file` is a usage error when a
/// selected node is reached over SSH (local agents need no key).
pub(crate) fn ssh_settings(
    loaded: &Loaded,
    nodes: &[Node],
) -> Result<ssh::SshSettings, UsageError> {
    let ssh = ssh::SshSettings::from_config(&loaded.config)
        .map_err(|e| UsageError::Other(format!("cannot create the SSH control directory: {e}")))?;
    if let Some(key) = &ssh.identity_file
        && !key.is_file()
        && nodes.iter().any(|n| !n.local)
    {
        return Err(UsageError::Other(format!(
            "[ssh] identity_file {}: no such file",
            key.display()
        )));
    }
    Ok(ssh)
}

pub(crate) fn ssh_and_agent(
    loaded: &Loaded,
    nodes: &[Node],
) -> Result<(ssh::SshSettings, agent_link::AgentSource), UsageError> {
    let ssh = ssh_settings(loaded, nodes)?;
    let agent = agent_link::AgentSource::new(&loaded.config.load.agent_path).map_err(|e| {
        UsageError::Other(format!("cannot read this executable for the agent: {e}"))
    })?;
    Ok((ssh, agent))
}

/// Which config files were read, or, if none, where they were looked for
/// and how to start one.
pub(crate) fn config_files_note(loaded: &Loaded) -> String {
    if loaded.files.is_empty() {
        let looked: Vec<String> = config::default_paths()
            .iter()
            .map(|p| absolute(p).display().to_string())
            .collect();
        format!(
            "no config file found (looked for {}); start from imaging.conf.example, \
             and check with `imaging config`",
            looked.join(", ")
        )
    } else {
        let read: Vec<String> = loaded
            .files
            .iter()
            .map(|f| absolute(std::path::Path::new(f)).display().to_string())
            .collect();
        format!("config read from {}", read.join(", "))
    }
}

/// `p` against the working directory, for messages.
pub(crate) fn absolute(p: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The image repository, which must exist: else say how to set it.
pub(crate) fn repository(loaded: &Loaded) -> Result<std::path::PathBuf, UsageError> {
    let dir = config::expand_home(&loaded.config.repository.dir);
    if dir.is_dir() {
        return Ok(dir);
    }
    let what = if dir.exists() {
        "is not a directory"
    } else {
        "does not exist"
    };
    let origin = loaded
        .origin
        .get("repository.dir")
        .map(String::as_str)
        .unwrap_or(config::BUILTIN);
    Err(UsageError::Other(format!(
        "image repository {} {what} (repository.dir from {origin}); create it, or set \
         `[repository] dir = \"/path/to/images\"` in a config file; {}",
        dir.display(),
        config_files_note(loaded)
    )))
}

/// Resolve the node arguments: `-a` scope, then the spec, else `$NODES`.
pub fn select(loaded: &Loaded, args: &NodeArgs) -> Result<Vec<Node>, UsageError> {
    let inventory = loaded.config.inventory()?;
    if inventory.nodes.is_empty() {
        return Err(UsageError::Other(format!(
            "the inventory is empty: no [[node]] entry and no [nodes] inventory file; {}",
            config_files_note(loaded)
        )));
    }
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
            && (repo.join(token).is_file()
                || repo.join(format!("{token}.img")).is_file()
                || repo.join(format!("{token}.ndz")).is_file())
    };
    let mut nodes = nodespec::select_nodes(&inventory, &tokens, &is_image).map_err(|e| {
        // A file-like token is most likely an image given without -i: say
        // that first, and briefly.
        match repo::images_a_token_may_mean(&repo, &e.token) {
            Some(names) if names.is_empty() => UsageError::Other(format!(
                "`{}` is not a node; did you forget -i? (no image of that name in {})",
                e.token,
                repo.display()
            )),
            Some(names) => UsageError::Other(format!(
                "`{}` is not a node; did you forget -i? ({})",
                e.token,
                names.join(", ")
            )),
            None => e.into(),
        }
    })?;
    // Number order, whichever inventory a node came from (the JSON file's
    // nodes are read before the inline ones); unnumbered names after.
    nodes.sort_by_key(|n| (n.number.is_none(), n.number));
    Ok(nodes)
}
