//! The program: parse argv, resolve CLI over config, run a command, map
//! its outcome to an exit code.

pub mod cli;
pub mod demo;
pub mod power;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::agent;
use crate::app::cli::{Cli, Command, NodeArgs};
use crate::config::Loaded;
use crate::engine::power::PowerAction;
use crate::engine::{cancel, check, events, load, report, save, source, wait};
use crate::image::{import, manifest, reader, repo};
use crate::inventory::Node;
use crate::inventory::nodespec;
use crate::node::{agent_link, hooks, ssh};
use crate::{config, ui};

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
    if let Command::Agent = cli.command {
        // The node side: plain blocking I/O on stdin/stdout, no runtime.
        return ExitCode::from(agent::run_agent().clamp(0, 255) as u8);
    }
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
        Command::Wait(args) => run_wait(&cli, args, &loaded()?).await,
        Command::On(args) => power::run_power(&cli, args, PowerAction::On, &loaded()?).await,
        Command::Off(args) => power::run_power(&cli, args, PowerAction::Off, &loaded()?).await,
        Command::Reset(args) => power::run_power(&cli, args, PowerAction::Reset, &loaded()?).await,
        Command::Power(args) => power::run_power(&cli, args, PowerAction::Status, &loaded()?).await,
        Command::Load(args) => run_load(&cli, args, &loaded()?).await,
        Command::Save(args) => run_save(&cli, args, &loaded()?).await,
        Command::Demo(args) => demo::run(&cli, args).await,
        Command::List(args) => {
            let loaded = loaded()?;
            let repo = config::expand_home(&loaded.config.repository.dir);
            let images = repo::list(
                &repo,
                args.pattern.as_deref(),
                loaded.config.load.chunk_size,
            )
            .map_err(|e| UsageError::Other(format!("cannot list {}: {e}", repo.display())))?;
            if cli.global.json {
                for image in &images {
                    let mut v = serde_json::to_value(image).unwrap_or_default();
                    if let Some(obj) = v.as_object_mut() {
                        obj.insert("event".into(), "image".into());
                    }
                    println!("{v}");
                }
            } else if images.is_empty() {
                println!("no images in {}", repo.display());
            } else {
                print!("{}", crate::ui::list_table(&images));
            }
            Ok(Exit::Success)
        }
        Command::Import(args) => run_import(&cli, args, &loaded()?).await,
        Command::Agent => Ok(Exit::Usage),
        Command::InstallLinks { dir } => {
            install_links(dir)?;
            Ok(Exit::Success)
        }
    }
}

pub(crate) async fn run_wait(
    cli: &Cli,
    args: &cli::WaitArgs,
    loaded: &Loaded,
) -> Result<Exit, UsageError> {
    let nodes = select(loaded, &args.nodes)?;
    let timeout = args.timeout.unwrap_or(loaded.config.wait.timeout as f64);
    let timeout = Duration::try_from_secs_f64(timeout)
        .map_err(|_| UsageError::Other(format!("--timeout {timeout}: not a number of seconds")))?;
    let ssh = ssh::SshSettings::from_config(&loaded.config)
        .map_err(|e| UsageError::Other(format!("cannot create the SSH control directory: {e}")))?;
    let mode = match output_mode(cli) {
        _ if args.silent && !cli.global.json => ui::Mode::Silent,
        // `fit01 ssh OK` lines are what wait shows on a terminal too.
        ui::Mode::Bars => ui::Mode::Lines,
        mode => mode,
    };
    let info = run_info(cli, "wait", &nodes, args.verbose, None);
    let deadline = tokio::time::Instant::now() + timeout;
    let verbose = args.verbose;
    Ok(drive(mode, info, move |report, cancel| async move {
        tokio::select! {
            _ = wait::wait_all(nodes, ssh, deadline, verbose, report) => {}
            _ = cancel.cancelled() => {}
        }
    })
    .await)
}

/// Run an engine with a front end. The first Ctrl-C asks the engine to
/// cancel (it stops transfers and still runs its cleanup, such as `after`
/// hooks); a second one stops waiting for that cleanup. Exits 130 then.
async fn drive<F, Fut>(mode: ui::Mode, info: ui::RunInfo, engine: F) -> Exit
where
    F: FnOnce(report::Reporter, cancel::Cancel) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let board = report::Board::new(&info.names);
    let reporter = report::Reporter::new(&info.command, board.clone(), tx);
    let (canceller, cancel) = cancel::pair();
    let feed = ui::Feed {
        info,
        board,
        events: rx,
        canceller: canceller.clone(),
        started: std::time::Instant::now(),
    };
    let frontend = tokio::spawn(ui::consume(mode, feed));
    let engine = engine(reporter.clone(), cancel);
    tokio::pin!(engine);
    let mut interrupted = false;
    loop {
        tokio::select! {
            _ = &mut engine => break,
            _ = tokio::signal::ctrl_c() => {
                if interrupted {
                    break;
                }
                interrupted = true;
                canceller.cancel();
            }
        }
    }
    // A cancel may also come from the front end (the dashboard's `q`).
    let interrupted = interrupted || canceller.is_cancelled();
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

fn run_info(
    cli: &Cli,
    command: &str,
    nodes: &[Node],
    verbose: bool,
    image: Option<ui::ImageHeader>,
) -> ui::RunInfo {
    ui::RunInfo {
        command: command.into(),
        names: nodes.iter().map(|n| n.name.clone()).collect(),
        verbose,
        image,
        log_path: cli.global.log.clone().or_else(ui::logfile::default_path),
    }
}

fn output_mode(cli: &Cli) -> ui::Mode {
    ui::Mode::resolve(cli.global.json, cli.global.curses, cli.global.plain)
}

fn deadline(timeout: Option<f64>, default_secs: u64) -> Result<tokio::time::Instant, UsageError> {
    let secs = timeout.unwrap_or(default_secs as f64);
    let secs = if secs <= 0.0 {
        10.0 * 365.0 * 86400.0
    } else {
        secs
    };
    let d = Duration::try_from_secs_f64(secs)
        .map_err(|_| UsageError::Other(format!("--timeout {secs}: not a number of seconds")))?;
    Ok(tokio::time::Instant::now() + d)
}

/// Each node's target: its own, else `[load] target`, placeholders filled.
fn targets(loaded: &Loaded, nodes: &[Node]) -> Vec<String> {
    nodes
        .iter()
        .map(|n| {
            let template = n.target.as_deref().unwrap_or(&loaded.config.load.target);
            hooks::expand(template, n, "", "")
        })
        .collect()
}

fn ssh_and_agent(
    loaded: &Loaded,
) -> Result<(ssh::SshSettings, agent_link::AgentSource), UsageError> {
    let ssh = ssh::SshSettings::from_config(&loaded.config)
        .map_err(|e| UsageError::Other(format!("cannot create the SSH control directory: {e}")))?;
    let agent = agent_link::AgentSource::new(&loaded.config.load.agent_path).map_err(|e| {
        UsageError::Other(format!("cannot read this executable for the agent: {e}"))
    })?;
    Ok((ssh, agent))
}

pub(crate) async fn run_load(
    cli: &Cli,
    args: &cli::LoadArgs,
    loaded: &Loaded,
) -> Result<Exit, UsageError> {
    let config = &loaded.config;
    let nodes = select(loaded, &args.nodes)?;
    let repo_dir = config::expand_home(&config.repository.dir);
    let image_arg = args
        .image
        .clone()
        .unwrap_or_else(|| config.repository.default_image.clone());
    let image = repo::resolve_image(&repo_dir, &image_arg).map_err(UsageError::Other)?;
    let targets = targets(loaded, &nodes);
    for (key, template) in [
        ("[load] before", &config.load.before),
        ("[load] after", &config.load.after),
    ] {
        hooks_have_values(key, template, &nodes)?;
    }
    let deadline = deadline(args.timeout, config.load.timeout)?;
    let chunk_size = config.load.chunk_size;
    let path = image.clone();
    if !cli.global.json {
        eprintln!("imaging: reading {} (manifest)", image.display());
    }
    // Everything about the image is checked here, before any node is
    // contacted: a damaged `.ndz` is found while its manifest is built.
    let (file, manifest) = tokio::task::spawn_blocking(move || {
        let file = reader::ImageReader::open(&path)?;
        Ok::<_, std::io::Error>((file, manifest::load_or_build(&path, chunk_size)?))
    })
    .await
    .map_err(|e| UsageError::Other(e.to_string()))?
    .map_err(|e| UsageError::Other(format!("cannot read image {}: {e}", image.display())))?;
    if args.dry_run {
        println!(
            "would load {} ({} bytes, {} of data, {} chunks) onto:",
            image.display(),
            manifest.size,
            manifest.data_size(),
            manifest.chunk_count()
        );
        for (n, t) in nodes.iter().zip(&targets) {
            println!("  {} {}", n.name, t);
        }
        return Ok(Exit::Success);
    }
    let (ssh, agent) = ssh_and_agent(loaded)?;
    let image_name = image
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let header = ui::ImageHeader {
        name: image_name.clone(),
        size: manifest.size,
        data_size: manifest.data_size(),
    };
    let job = load::LoadJob {
        image_name,
        source: source::ChunkSource::new(
            file,
            std::sync::Arc::new(manifest),
            config.load.compression,
        ),
        targets,
        ssh,
        agent,
        force: args.force,
        retries: config.load.retries,
        concurrency: config.load.concurrency,
        rate: source::RateLimit::new(args.bandwidth.unwrap_or(config.load.bandwidth)),
        before: config.load.before.clone(),
        after: config.load.after.clone(),
        deadline,
        reconnect_wait: Duration::from_secs(config.load.reconnect_wait),
        chain: match args.fanout.unwrap_or(config.load.fanout) {
            config::Fanout::Star => false,
            config::Fanout::Chain => true,
            config::Fanout::Auto => nodes.len() >= load::CHAIN_FROM,
        },
        relay_bind: config.load.relay_bind.clone(),
        relay_ports: (config.load.relay_port_min, config.load.relay_port_max),
        nodes,
    };
    if !run_check("[load] check", &config.load.check, &job.nodes).await? {
        return Ok(Exit::Interrupted);
    }
    let info = run_info(cli, "load", &job.nodes, true, Some(header));
    Ok(drive(output_mode(cli), info, move |report, cancel| {
        load::load_all(job, report, cancel)
    })
    .await)
}

pub(crate) async fn run_save(
    cli: &Cli,
    args: &cli::SaveArgs,
    loaded: &Loaded,
) -> Result<Exit, UsageError> {
    let config = &loaded.config;
    let nodes = select(loaded, &args.nodes)?;
    let repo_dir = config::expand_home(&config.repository.dir);
    if !repo_dir.is_dir() {
        return Err(UsageError::Other(format!(
            "image repository {} is not a directory",
            repo_dir.display()
        )));
    }
    let now = chrono::Local::now().naive_local();
    let names = nodes
        .iter()
        .map(|n| repo::save_name(&n.name, now, args.output.as_deref()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| UsageError::Other(format!("-o: {e}")))?;
    for name in &names {
        if repo_dir.join(name).exists() {
            return Err(UsageError::Other(format!(
                "{} already exists in {}",
                name,
                repo_dir.display()
            )));
        }
    }
    let targets = targets(loaded, &nodes);
    if args.dry_run {
        for ((n, t), name) in nodes.iter().zip(&targets).zip(&names) {
            println!(
                "would save {}:{} as {}",
                n.name,
                t,
                repo_dir.join(name).display()
            );
        }
        return Ok(Exit::Success);
    }
    let (ssh, agent) = ssh_and_agent(loaded)?;
    let job = save::SaveJob {
        targets,
        names,
        repo: repo_dir,
        ssh,
        agent,
        chunk_size: config.load.chunk_size,
        level: config.load.compression,
        raw: args.raw,
        deadline: deadline(args.timeout, config.save.timeout)?,
        nodes,
    };
    if !run_check("[save] check", &config.save.check, &job.nodes).await? {
        return Ok(Exit::Interrupted);
    }
    let info = run_info(cli, "save", &job.nodes, true, None);
    Ok(drive(output_mode(cli), info, move |report, cancel| {
        save::save_all(job, report, cancel)
    })
    .await)
}

/// A hook that uses a placeholder some node has no value for (`{cmc}`,
/// `{mac}`) is refused before anything runs.
fn hooks_have_values(key: &str, template: &str, nodes: &[Node]) -> Result<(), UsageError> {
    for node in nodes {
        if let Some(p) = hooks::missing_placeholder(template, node) {
            return Err(UsageError::Other(format!(
                "`{key}` uses {p}, which node {} has no value for",
                node.name
            )));
        }
    }
    Ok(())
}

/// The run check (`[load] check`): false if Ctrl-C ended it (the run ends
/// with 130), an error if it failed (exit 2). It runs last before the
/// engine starts: listening for Ctrl-C replaces the default SIGINT action
/// for the rest of the process, and only `drive` listens after it.
async fn run_check(key: &str, template: &str, nodes: &[Node]) -> Result<bool, UsageError> {
    if template.trim().is_empty() {
        return Ok(true);
    }
    tokio::select! {
        r = check::run(key, template, nodes) => r.map(|()| true).map_err(UsageError::Other),
        _ = tokio::signal::ctrl_c() => {
            eprintln!("imaging: `{key}` interrupted");
            Ok(false)
        }
    }
}

/// `import X.ndz [-o NAME]`: decode into a new raw image in the repository.
async fn run_import(
    cli: &Cli,
    args: &cli::ImportArgs,
    loaded: &Loaded,
) -> Result<Exit, UsageError> {
    let config = &loaded.config;
    let repo_dir = config::expand_home(&config.repository.dir);
    if !repo_dir.is_dir() {
        return Err(UsageError::Other(format!(
            "image repository {} is not a directory",
            repo_dir.display()
        )));
    }
    let source = repo::resolve_image(&repo_dir, &args.image).map_err(UsageError::Other)?;
    let name = import::output_name(&source, args.output.as_deref())
        .map_err(|e| UsageError::Other(format!("-o: {e}")))?;
    if !cli.global.json {
        eprintln!("imaging: decoding {} into {name}", source.display());
    }
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let chunk_size = config.load.chunk_size;
    let task = {
        let cancel = cancel.clone();
        let repo_dir = repo_dir.clone();
        tokio::task::spawn_blocking(move || {
            import::import_ndz(&source, &repo_dir, &name, chunk_size, &cancel)
        })
    };
    tokio::pin!(task);
    // Ctrl-C stops the decoding between chunks; the partial file goes away.
    let result = tokio::select! {
        r = &mut task => r,
        _ = tokio::signal::ctrl_c() => {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            task.await
        }
    }
    .map_err(|e| UsageError::Other(format!("import failed: {e}")))?;
    let imported = match result {
        Ok(imported) => imported,
        Err(import::ImportError::Cancelled) => return Ok(Exit::Interrupted),
        Err(e) => return Err(UsageError::Other(e.to_string())),
    };
    if cli.global.json {
        let mut v = serde_json::to_value(&imported).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("event".into(), "import".into());
        }
        println!("{v}");
    } else {
        println!(
            "{}: {} ({} bytes), {} of data, from {} chunks of {}",
            imported.name,
            crate::ui::fmt::human_bytes(imported.size),
            imported.size,
            crate::ui::fmt::human_bytes(imported.data_size),
            imported.chunks,
            imported.format,
        );
    }
    Ok(Exit::Success)
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
            && (repo.join(token).is_file()
                || repo.join(format!("{token}.img")).is_file()
                || repo.join(format!("{token}.ndz")).is_file())
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
