//! `imaging save`: each node's target into a new image of the repository.

use crate::app::cli::{self, Cli};
use crate::app::drive::{drive, run_check, run_info};
use crate::app::exit::{Exit, UsageError};
use crate::app::repo_cmds;
use crate::app::settings::{deadline, output_mode, repository, select, ssh_and_agent, targets};
use crate::config::Loaded;
use crate::engine::save;
use crate::image::{provenance, repo};

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
    let image = args
        .image
        .as_deref()
        .map(|arg| file_on_node(loaded, arg))
        .transpose()?;
    let targets = targets(loaded, &nodes, image.as_deref())?;
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

/// The file `-i` names in a host's `{image}` directory: an image or alias
/// of the repositories gives its image's file name (what `load` wrote
/// there); any other plain file name is taken as it is, so an image the
/// repository no longer has can still be saved.
fn file_on_node(loaded: &Loaded, arg: &str) -> Result<String, UsageError> {
    if arg.is_empty() || arg == "." || arg == ".." || arg.contains('/') {
        return Err(UsageError::Other(format!(
            "-i {arg:?}: the image's file name on the node (as `imaging status` shows it), \
             not a path"
        )));
    }
    let name = repo_cmds::repos(loaded)
        .resolve(arg)
        .ok()
        .and_then(|r| r.file.file_name().map(|f| f.to_string_lossy().into_owned()));
    Ok(name.unwrap_or_else(|| arg.to_string()))
}
