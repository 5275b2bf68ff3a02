//! `imaging load`: from the command line to the engine. Every image is
//! resolved and read, and every node's target for it worked out and
//! checked, before any node is contacted; then the plan (`-n`) or the run.
//!
//! Several `-i` load every image onto every node in one run: each image
//! goes to a target of its own, so the target template must contain
//! `{image}` (the image's file name).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::app::cli::{self, Cli};
use crate::app::drive::{drive, hooks_have_values, run_check, run_info};
use crate::app::exit::{Exit, UsageError};
use crate::app::settings::{deadline, output_mode, repository, select, ssh_and_agent};
use crate::app::{guard, plan, repo_cmds};
use crate::config::{self, Loaded};
use crate::engine::{load, source};
use crate::image::manifest::Manifest;
use crate::image::{manifest, provenance, reader};
use crate::inventory::Node;
use crate::node::hooks;
use crate::ui;

/// One `-i`, resolved: the file it names and the image file's own name.
struct Named {
    arg: String,
    /// The repository entry or path (an alias, or the image itself).
    path: PathBuf,
    /// The image file's own name (an alias followed): `{image}`, and what
    /// the node's stamp records.
    name: String,
    /// Where a saved image came from: one line in the run's log.
    origin: Option<String>,
}

/// One image, ready to load: its file opened and its manifest built.
struct Ready {
    named: Named,
    targets: Vec<String>,
    is_image: Vec<bool>,
    file: reader::ImageReader,
    manifest: Manifest,
}

pub(crate) async fn run_load(
    cli: &Cli,
    args: &cli::LoadArgs,
    loaded: &Loaded,
) -> Result<Exit, UsageError> {
    let config = &loaded.config;
    let nodes = select(loaded, &args.nodes)?;
    let wanted = if args.image.is_empty() {
        vec![config.repository.default_image.clone()]
    } else {
        args.image.clone()
    };
    let named = wanted
        .iter()
        .map(|arg| resolve(loaded, arg))
        .collect::<Result<Vec<_>, _>>()?;
    distinct_names(&named)?;
    let templates = templates(loaded, &nodes, &named)?;
    // Every repository directory: saves go to `dir`, `shared` are searched.
    let repo_dirs: Vec<PathBuf> = std::iter::once(&config.repository.dir)
        .chain(&config.repository.shared)
        .map(|d| config::expand_home(d))
        .collect();
    let mut checked = Vec::with_capacity(named.len());
    for image in named {
        let targets: Vec<String> = nodes
            .iter()
            .zip(&templates)
            .map(|(n, t)| hooks::expand(t, n, &image.name, ""))
            .collect();
        let mut is_image = Vec::new();
        for (k, dir) in repo_dirs.iter().enumerate() {
            let here = guard::targets_in_repository(dir, &image.path, &nodes, &targets)?;
            if k == 0 {
                is_image = here;
            }
        }
        checked.push((image, targets, is_image));
    }
    for (key, template) in [
        ("[load] before", &config.load.before),
        ("[load] after", &config.load.after),
    ] {
        hooks_have_values(key, template, &nodes)?;
    }
    let deadline = deadline(args.timeout, config.load.timeout)?;
    let chunk_size = config.load.chunk_size;
    let mut images = Vec::with_capacity(checked.len());
    for (named, targets, is_image) in checked {
        if !cli.global.json {
            eprintln!("imaging: reading {} (manifest)", named.path.display());
        }
        // Everything about the image is checked here, before any node is
        // contacted: a damaged `.ndz` is found while its manifest is built.
        let path = named.path.clone();
        let (file, manifest) = tokio::task::spawn_blocking(move || {
            let file = reader::ImageReader::open(&path)?;
            Ok::<_, std::io::Error>((file, manifest::load_or_build(&path, chunk_size)?))
        })
        .await
        .map_err(|e| UsageError::Other(e.to_string()))?
        .map_err(|e| {
            UsageError::Other(format!("cannot read image {}: {e}", named.path.display()))
        })?;
        // An image file with data may still hold 0 bytes of disk (an .ndz).
        guard::refuse_empty_image(&named.path, manifest.size)?;
        images.push(Ready {
            named,
            targets,
            is_image,
            file,
            manifest,
        });
    }
    let chain = match args.fanout.unwrap_or(config.load.fanout) {
        config::Fanout::Star => false,
        config::Fanout::Chain => true,
        config::Fanout::Auto => nodes.len() >= load::CHAIN_FROM,
    };
    let cap = args.bandwidth.unwrap_or(config.load.bandwidth);
    let (ssh, agent) = ssh_and_agent(loaded, &nodes)?;
    if args.dry_run {
        // Asking a stamp is quick; a verify reads whole targets.
        let secs = args.timeout.unwrap_or(if args.verify {
            config.load.timeout as f64
        } else {
            DRY_RUN_TIMEOUT
        });
        let how = DryRun {
            ssh,
            agent,
            verify: args.verify,
            force: args.force,
            deadline: crate::app::settings::deadline(Some(secs), 0)?,
            chain,
            cap,
            chunk_size,
        };
        dry_run(cli, how, &nodes, images).await;
        return Ok(Exit::Success);
    }
    let header = ui::ImageHeader {
        name: images
            .iter()
            .map(|i| i.named.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        size: images.iter().map(|i| i.manifest.size).sum(),
        data_size: images.iter().map(|i| i.manifest.data_size()).sum(),
        cap,
    };
    let origins: Vec<String> = images
        .iter()
        .filter_map(|i| i.named.origin.clone())
        .collect();
    let image_names: Vec<String> = images.iter().map(|i| i.named.name.clone()).collect();
    let cache = source::cache_share(images.len());
    let images: Vec<load::ImageLoad> = images
        .into_iter()
        .map(|i| load::ImageLoad {
            name: i.named.name,
            source: source::ChunkSource::new(
                i.file,
                Arc::new(i.manifest),
                config.load.compression,
                cache,
            ),
            targets: i.targets,
            is_image: i.is_image,
        })
        .collect();
    let run = load::LoadRun {
        ssh,
        agent,
        force: args.force,
        verify: args.verify,
        retries: config.load.retries,
        concurrency: config.load.concurrency,
        rate: source::RateLimit::new(cap),
        wire: Default::default(),
        before: config.load.before.clone(),
        after: config.load.after.clone(),
        deadline,
        reconnect_wait: Duration::from_secs(config.load.reconnect_wait),
        stall_timeout: Duration::from_secs(config.load.stall_timeout),
        chain,
        relay_bind: config.load.relay_bind.clone(),
        relay_ports: (config.load.relay_port_min, config.load.relay_port_max),
        nodes,
    };
    if !run_check("[load] check", &config.load.check, &run.nodes).await? {
        return Ok(Exit::Interrupted);
    }
    let mut info = run_info(cli, "load", &run.nodes, true, Some(header));
    if image_names.len() > 1 {
        // A row per node and image, node by node (as load_all numbers them).
        info.names = run
            .nodes
            .iter()
            .flat_map(|n| image_names.iter().map(|_| n.name.clone()))
            .collect();
        info.row_images = run
            .nodes
            .iter()
            .flat_map(|_| image_names.iter().cloned())
            .collect();
    }
    let mode = output_mode(cli);
    if mode == ui::Mode::Bars {
        // Progress bars show no log lines: say it before they start.
        for line in &origins {
            eprintln!("imaging: {line}");
        }
    }
    Ok(drive(mode, info, move |report, cancel| {
        for line in origins {
            report.log(None, line);
        }
        load::load_all(run, images, report, cancel)
    })
    .await)
}

/// Resolve one `-i` (a name in the repositories, or a path) to its file.
fn resolve(loaded: &Loaded, arg: &str) -> Result<Named, UsageError> {
    // A name needs the repository (a path does not): say how to set it.
    if !arg.contains('/') {
        repository(loaded)?;
    }
    let resolved = repo_cmds::repos(loaded)
        .resolve(arg)
        .map_err(UsageError::Other)?;
    let path = resolved.path.clone();
    let bytes = std::fs::metadata(&path)
        .map_err(|e| UsageError::Other(format!("cannot read image {}: {e}", path.display())))?
        .len();
    guard::refuse_empty_image(&path, bytes)?;
    let name = resolved
        .file
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let origin =
        provenance::read(&resolved.file).map(|p| format!("image {name}: {}", p.describe()));
    Ok(Named {
        arg: arg.to_string(),
        path,
        name,
        origin,
    })
}

/// Each image of a run needs a file name of its own: `{image}` makes its
/// targets from it.
fn distinct_names(named: &[Named]) -> Result<(), UsageError> {
    for (k, b) in named.iter().enumerate() {
        if let Some(a) = named[..k].iter().find(|a| a.name == b.name) {
            return Err(UsageError::Other(if a.arg == b.arg {
                format!("-i {} is given twice", b.arg)
            } else {
                format!(
                    "-i {} and -i {} are both the image file {}: the images of one run need \
                     distinct file names, as {{image}} in the target is the file name",
                    a.arg, b.arg, b.name
                )
            }));
        }
    }
    Ok(())
}

/// Each node's target template: its own, else `[load] target`. With
/// several images each must contain `{image}`, else every image would be
/// written onto the same target, one over the other.
fn templates(loaded: &Loaded, nodes: &[Node], named: &[Named]) -> Result<Vec<String>, UsageError> {
    let default = &loaded.config.load.target;
    let mut out = Vec::with_capacity(nodes.len());
    for n in nodes {
        let template = n.target.as_deref().unwrap_or(default);
        if named.len() > 1 && !template.contains("{image}") {
            let whose = match &n.target {
                Some(_) => format!("node {}'s own target", n.name),
                None => format!("[load] target (for node {})", n.name),
            };
            let names: Vec<&str> = named.iter().map(|i| i.name.as_str()).collect();
            return Err(UsageError::Other(format!(
                "{} images in one run ({}) need {{image}} in the target, so that each image \
                 gets a file of its own; {whose} is \"{template}\", which would receive every \
                 image one over the other. Set e.g. target = \"/var/lib/libvirt/images/{{image}}\" \
                 ({{image}} is the image's file name), or load one image per run",
                named.len(),
                names.join(", "),
            )));
        }
        out.push(template.to_string());
    }
    Ok(out)
}

/// How long `load -n` gives each node without `--verify` (default).
const DRY_RUN_TIMEOUT: f64 = 10.0;

/// What `load -n` does, the same for every image.
struct DryRun {
    ssh: crate::node::ssh::SshSettings,
    agent: crate::node::agent_link::AgentSource,
    verify: bool,
    force: bool,
    /// For each image's plan, all nodes at once.
    deadline: tokio::time::Instant,
    chain: bool,
    cap: u64,
    chunk_size: u64,
}

/// `load -n`: the plan of each image, nothing written. Every node is asked
/// (its stamp, or with `--verify` its digests); a node that does not answer
/// is part of the plan, not an error of it.
async fn dry_run(cli: &Cli, how: DryRun, nodes: &[Node], images: Vec<Ready>) {
    let started = tokio::time::Instant::now();
    for (k, image) in images.into_iter().enumerate() {
        if k > 0 && !cli.global.json {
            crate::outln!("");
        }
        if let Some(line) = image.named.origin.as_ref().filter(|_| !cli.global.json) {
            crate::outln!("{line}");
        }
        let m = Arc::new(image.manifest);
        // Each image's plan gets the whole timeout.
        let deadline = how.deadline + started.elapsed();
        let ask = Arc::new(plan::Ask {
            ssh: how.ssh.clone(),
            agent: how.agent.clone(),
            manifest: m.clone(),
            verify: how.verify,
            force: how.force,
            deadline,
        });
        let probed = plan::probe_all(ask.clone(), nodes, &image.targets).await;
        let plan = plan::Plan {
            event: "plan",
            command: "load",
            image: image.named.path.display().to_string(),
            size: m.size,
            data_size: m.data_size(),
            chunks: m.chunk_count(),
            chunk_size: how.chunk_size,
            fanout: if how.chain { "chain" } else { "star" },
            bandwidth: how.cap,
            verify: how.verify,
            nodes: nodes
                .iter()
                .zip(&image.targets)
                .zip(probed)
                .map(|((n, t), p)| plan::node_plan(n, t, p, &ask))
                .collect(),
        };
        if cli.global.json {
            crate::outln!("{}", serde_json::to_string(&plan).unwrap_or_default());
        } else {
            crate::ui::stdout::write(&plan::format(&plan));
        }
    }
}
