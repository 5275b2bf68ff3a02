//! The program: parse argv, resolve CLI over config, run a command, map
//! its outcome to an exit code.

mod clean;
pub mod cli;
pub mod demo;
mod drive;
mod exit;
mod guard;
mod load_cmd;
pub mod plan;
pub mod power;
mod repo_cmds;
mod save_cmd;
mod settings;
pub mod shell;
mod status;
mod wait_cmd;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

use crate::agent;
use crate::app::cli::{Cli, Command};
use crate::config;
use crate::config::Loaded;
use crate::engine::power::PowerAction;
use crate::image::{import, repo};
use crate::node::ssh;

pub use exit::{Exit, UsageError};
use load_cmd::run_load;
use save_cmd::run_save;
use settings::repository;
pub use settings::select;
use wait_cmd::run_wait;

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

/// `import X.ndz [-o NAME]`: decode into a new raw image in the repository.
async fn run_import(
    cli: &Cli,
    args: &cli::ImportArgs,
    loaded: &Loaded,
) -> Result<Exit, UsageError> {
    let config = &loaded.config;
    let repo_dir = repository(loaded)?;
    let source =
        crate::image::manage::resolve_image(&repo_dir, &args.image).map_err(UsageError::Other)?;
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
