//! The program: parse argv, resolve CLI over config, run a command, map
//! its outcome to an exit code.

mod clean;
pub mod cli;
pub mod demo;
mod guard;
mod load_cmd;
pub mod plan;
pub mod power;
mod repo_cmds;
pub mod shell;
mod status;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::agent;
use crate::app::cli::{Cli, Command, NodeArgs};
use crate::config::Loaded;
use crate::engine::power::PowerAction;
use crate::engine::{cancel, check, events, report, save, wait};
use crate::image::{import, provenance, repo};
use crate::inventory::Node;
use crate::inventory::nodespec;
use crate::node::{agent_link, hooks, ssh};
use crate::{config, ui};

pub(crate) use load_cmd::run_load;

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
    ssh::remove_own_control_dir();
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

/// Commands without a progress display take none of its flags (and say so
/// rather than ignore them); `json_ok` where `--json` has a meaning.
fn reject_display_flags(cli: &Cli, command: &str, json_ok: bool) -> Result<(), UsageError> {
    let g = &cli.global;
    let given = [
        ("-c", g.curses),
        ("--plain", g.plain),
        ("--no-wait", g.no_wait),
        ("--json", g.json && !json_ok),
    ];
    match given.iter().find(|(_, on)| *on) {
        Some((flag, _)) => Err(UsageError::Other(format!(
            "{flag} has no effect on `{command}`; leave it out"
        ))),
        None => Ok(()),
    }
}

async fn run_inner(cli: Cli) -> Result<Exit, UsageError> {
    match &cli.command {
        Command::List(_) => reject_display_flags(&cli, "list", true)?,
        Command::Nodes(_) => reject_display_flags(&cli, "nodes", true)?,
        Command::Config => reject_display_flags(&cli, "config", false)?,
        Command::InstallLinks { .. } => reject_display_flags(&cli, "install-links", false)?,
        Command::Completions { .. } => reject_display_flags(&cli, "completions", false)?,
        Command::Man { .. } => reject_display_flags(&cli, "man", false)?,
        Command::Status(_) => status::reject_flags(&cli)?,
        Command::Clean(_) => reject_display_flags(&cli, "clean", true)?,
        _ => {}
    }
    let loaded = || config::load(cli.global.config.as_deref());
    match &cli.command {
        Command::Config => {
            let loaded = loaded()?;
            let mut looked = config::default_paths();
            looked.extend(cli.global.config.clone());
            crate::ui::stdout::write(&config::describe(&loaded, &looked));
            Ok(Exit::Success)
        }
        Command::Nodes(args) => {
            let loaded = loaded()?;
            let nodes = select(&loaded, args)?;
            let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
            if cli.global.json {
                crate::outln!("{}", serde_json::json!(names));
            } else {
                crate::outln!("{}", names.join(" "));
            }
            Ok(Exit::Success)
        }
        Command::Wait(args) => run_wait(&cli, args, &loaded()?).await,
        Command::Status(args) => status::run_status(&cli, args, &loaded()?).await,
        Command::Clean(args) => clean::run_clean(&cli, args, &loaded()?).await,
        Command::On(args) => power::run_power(&cli, args, PowerAction::On, &loaded()?).await,
        Command::Off(args) => power::run_power(&cli, args, PowerAction::Off, &loaded()?).await,
        Command::Reset(args) => power::run_power(&cli, args, PowerAction::Reset, &loaded()?).await,
        Command::Power(args) => power::run_power(&cli, args, PowerAction::Status, &loaded()?).await,
        Command::Load(args) => run_load(&cli, args, &loaded()?).await,
        Command::Save(args) => run_save(&cli, args, &loaded()?).await,
        Command::Demo(args) => demo::run(&cli, args).await,
        Command::List(args) => repo_cmds::list(&cli, args, &loaded()?),
        Command::Import(args) => run_import(&cli, args, &loaded()?).await,
        Command::Alias(args) => repo_cmds::alias(args, &loaded()?),
        Command::Resolve(args) => repo_cmds::resolve(&cli, args, &loaded()?),
        Command::Share(args) => repo_cmds::share(args, &loaded()?),
        Command::Rm(args) => repo_cmds::rm(args, &loaded()?),
        Command::Prune(args) => repo_cmds::prune(args, &loaded()?),
        Command::Agent => Ok(Exit::Usage),
        Command::Completions { shell } => {
            shell::completions(*shell, &mut std::io::stdout())
                .map_err(|e| UsageError::Other(format!("cannot write the completions: {e}")))?;
            Ok(Exit::Success)
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(dir)
                .map_err(|e| UsageError::Other(format!("cannot create {}: {e}", dir.display())))?;
            let pages = shell::man_pages(dir).map_err(|e| {
                UsageError::Other(format!("cannot write into {}: {e}", dir.display()))
            })?;
            for p in pages {
                crate::outln!("{}", p.display());
            }
            Ok(Exit::Success)
        }
        Command::Complete { what } => {
            // Quiet on any error: a completion must never print noise.
            let Ok(loaded) = loaded() else {
                return Ok(Exit::Success);
            };
            let names: Vec<String> = match what.as_str() {
                "images" => {
                    let repo = config::expand_home(&loaded.config.repository.dir);
                    repo::list(&repo, None, loaded.config.load.chunk_size)
                        .map(|l| l.into_iter().map(|i| i.name).collect())
                        .unwrap_or_default()
                }
                "nodes" => loaded
                    .config
                    .inventory()
                    .map(|inv| inv.nodes.into_iter().map(|n| n.name).collect())
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            for n in names {
                crate::outln!("{n}");
            }
            Ok(Exit::Success)
        }
        Command::InstallLinks { dir, force } => {
            install_links(dir, *force)?;
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
    let deadline = deadline(args.timeout, loaded.config.wait.timeout)?;
    let ssh = ssh_settings(loaded, &nodes)?;
    let mode = match output_mode(cli) {
        _ if args.silent && !cli.global.json => ui::Mode::Silent,
        // `fit01 ssh OK` lines are what wait shows on a terminal too.
        ui::Mode::Bars => ui::Mode::Lines,
        mode => mode,
    };
    let info = run_info(cli, "wait", &nodes, args.verbose, None);
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
    // A row per node and image: the summary names both.
    for (row, image) in info.row_images.iter().enumerate() {
        reporter.image(row, image);
    }
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
        row_images: Vec::new(),
        verbose,
        image,
        log_path: cli.global.log.clone().or_else(ui::logfile::default_path),
        no_wait: cli.global.no_wait,
    }
}

fn output_mode(cli: &Cli) -> ui::Mode {
    ui::Mode::resolve(cli.global.json, cli.global.curses, cli.global.plain)
}

/// `-t SECS` (else the config's timeout) as a deadline; 0 means none, for
/// every command alike.
fn deadline(timeout: Option<f64>, default_secs: u64) -> Result<tokio::time::Instant, UsageError> {
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
fn targets(loaded: &Loaded, nodes: &[Node]) -> Vec<String> {
    nodes
        .iter()
        .map(|n| {
            let template = n.target.as_deref().unwrap_or(&loaded.config.load.target);
            hooks::expand(template, n, "", "")
        })
        .collect()
}

/// The `[ssh]` settings; a configured identity file must exist.
/// The SSH settings; a missing `identity_file` is a usage error when a
/// selected node is reached over SSH (local agents need no key).
fn ssh_settings(loaded: &Loaded, nodes: &[Node]) -> Result<ssh::SshSettings, UsageError> {
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

fn ssh_and_agent(
    loaded: &Loaded,
    nodes: &[Node],
) -> Result<(ssh::SshSettings, agent_link::AgentSource), UsageError> {
    let ssh = ssh_settings(loaded, nodes)?;
    let agent = agent_link::AgentSource::new(&loaded.config.load.agent_path).map_err(|e| {
        UsageError::Other(format!("cannot read this executable for the agent: {e}"))
    })?;
    Ok((ssh, agent))
}

pub(crate) async fn run_save(
    cli: &Cli,
    args: &cli::SaveArgs,
    loaded: &Loaded,
) -> Result<Exit, UsageError> {
    let config = &loaded.config;
    let nodes = select(loaded, &args.nodes)?;
    let repo_dir = repository(loaded)?;
    let started = chrono::Local::now();
    let now = started.naive_local();
    let names = nodes
        .iter()
        .map(|n| repo::save_name(&n.name, now, args.output.as_deref()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| UsageError::Other(format!("-o: {e}")))?;
    // A name that exists already (a save in the same minute) is numbered
    // when the image is complete: `…__golden-2.img`.
    let targets = targets(loaded, &nodes);
    if args.dry_run {
        for ((n, t), name) in nodes.iter().zip(&targets).zip(&names) {
            crate::outln!(
                "would save {}:{} as {}",
                n.name,
                t,
                repo_dir.join(name).display()
            );
        }
        return Ok(Exit::Success);
    }
    // What killed saves left behind: partial files nobody holds locked.
    for name in repo::remove_stale_partials(&repo_dir) {
        eprintln!("imaging: removed {name}, left by an interrupted save");
    }
    let (ssh, agent) = ssh_and_agent(loaded, &nodes)?;
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
        provenance: save::SaveProvenance {
            saved_at: started.to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
            user: provenance::current_user(),
            host: provenance::host_name(),
            comment: args.message.clone(),
        },
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

/// Which config files were read, or, if none, where they were looked for
/// and how to start one.
fn config_files_note(loaded: &Loaded) -> String {
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
    let repo_dir = repository(loaded)?;
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
        crate::outln!("{v}");
    } else {
        crate::outln!(
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

fn install_links(dir: &std::path::Path, force: bool) -> Result<(), UsageError> {
    let exe = std::env::current_exe()
        .map_err(|e| UsageError::Other(format!("cannot find this executable: {e}")))?;
    if !dir.exists() {
        return Err(UsageError::Other(format!(
            "{} does not exist (create it first, e.g. mkdir -p {})",
            dir.display(),
            dir.display()
        )));
    }
    if !dir.is_dir() {
        return Err(UsageError::Other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let links: Vec<std::path::PathBuf> = cli::LINKED
        .iter()
        .map(|sub| dir.join(format!("imaging-{sub}")))
        .collect();
    // Refuse before touching anything: a file in the way is someone's.
    let in_way: Vec<String> = links
        .iter()
        .filter(|l| l.symlink_metadata().is_ok() && std::fs::read_link(l).ok() != Some(exe.clone()))
        .map(|l| l.display().to_string())
        .collect();
    if !in_way.is_empty() && !force {
        return Err(UsageError::Other(format!(
            "already there: {} (use -f to replace)",
            in_way.join(", ")
        )));
    }
    for link in links {
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).map_err(|e| {
                UsageError::Other(format!("cannot replace {}: {e}", link.display()))
            })?;
        }
        std::os::unix::fs::symlink(&exe, &link)
            .map_err(|e| UsageError::Other(format!("cannot create {}: {e}", link.display())))?;
        crate::outln!("{} -> {}", link.display(), exe.display());
    }
    Ok(())
}
