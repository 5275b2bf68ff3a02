//! The repository commands: `list`, `alias`, `resolve`, `share`, `rm`,
//! `prune`. The work is in [`crate::image::manage`]; this wires arguments
//! and configuration to it and prints.

use crate::app::cli::{self, Cli};
use crate::app::exit::{Exit, UsageError};
use crate::app::settings::repository;
use crate::config::{self, Loaded};
use crate::image::manage::Repos;
use crate::image::{manifest, provenance, repo};

/// `[repository] dir` and `shared`, `~` expanded.
pub(crate) fn repos(loaded: &Loaded) -> Repos {
    let r = &loaded.config.repository;
    Repos::new(
        config::expand_home(&r.dir),
        r.shared.iter().map(|d| config::expand_home(d)).collect(),
    )
}

pub(crate) fn list(cli: &Cli, args: &cli::ListArgs, loaded: &Loaded) -> Result<Exit, UsageError> {
    // No repository yet: say where it was looked for and how to set one.
    repository(loaded)?;
    let repos = repos(loaded);
    let (images, problems) = repo::list_dirs(
        &repos.dirs(),
        args.pattern.as_deref(),
        loaded.config.load.chunk_size,
    );
    for (k, problem) in &problems {
        // The main repository unreadable is an error; a shared one, a warning.
        if *k == 0 {
            return Err(UsageError::Other(format!("cannot list {problem}")));
        }
        eprintln!("imaging: warning: cannot list {problem}");
    }
    if cli.global.json {
        for image in &images {
            let mut v = serde_json::to_value(image).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("event".into(), "image".into());
            }
            crate::outln!("{v}");
        }
    } else if images.is_empty() {
        let dirs: Vec<String> = repos
            .dirs()
            .iter()
            .map(|(d, _)| d.display().to_string())
            .collect();
        match &args.pattern {
            Some(p)
                if !repo::list_dirs(&repos.dirs(), None, loaded.config.load.chunk_size)
                    .0
                    .is_empty() =>
            {
                crate::outln!(
                    "no image in {} matches `{p}` (`imaging list` shows them all)",
                    dirs.join(", ")
                );
            }
            _ => {
                crate::outln!("no images in {}", dirs.join(", "));
            }
        }
    } else {
        crate::ui::stdout::write(&repo::format_table(&images, args.long));
    }
    Ok(Exit::Success)
}

pub(crate) fn alias(args: &cli::AliasArgs, loaded: &Loaded) -> Result<Exit, UsageError> {
    let line = repos(loaded)
        .alias(&args.name, &args.image, args.force)
        .map_err(UsageError::Other)?;
    crate::outln!("{line}");
    Ok(Exit::Success)
}

pub(crate) fn resolve(
    cli: &Cli,
    args: &cli::ResolveArgs,
    loaded: &Loaded,
) -> Result<Exit, UsageError> {
    let found = repos(loaded)
        .resolve(&args.name)
        .map_err(UsageError::Other)?;
    // The identity is the manifest's: built (and cached) if need be, as load
    // would. Its size is what a load writes (an `.ndz` decoded).
    let m = manifest::load_or_build(&found.file, loaded.config.load.chunk_size).map_err(|e| {
        UsageError::Other(format!("cannot read image {}: {e}", found.file.display()))
    })?;
    let size = m.size;
    let origin = provenance::read(&found.file);
    if cli.global.json {
        let v = serde_json::json!({
            "event": "resolve",
            "name": args.name,
            "entry": found.entry,
            "path": found.path,
            "alias_to": found.alias_to,
            "file": found.file,
            "location": found.location,
            "size": size,
            "identity": m.identity_hex(),
            "provenance": origin,
        });
        crate::outln!("{v}");
        return Ok(Exit::Success);
    }
    let via = match &found.alias_to {
        Some(to) => format!(
            "{} (alias to {to}, {})",
            found.path.display(),
            found.location
        ),
        None => format!("{} ({})", found.path.display(), found.location),
    };
    crate::outln!("{}", found.file.display());
    crate::outln!("  via       {via}");
    crate::outln!(
        "  size      {} ({size} bytes)",
        crate::ui::fmt::human_bytes(size)
    );
    crate::outln!("  identity  {}", m.identity_hex());
    if let Some(p) = origin {
        crate::outln!("  origin    {}", p.describe());
    }
    Ok(Exit::Success)
}

pub(crate) fn share(args: &cli::ShareArgs, loaded: &Loaded) -> Result<Exit, UsageError> {
    let lines = repos(loaded)
        .share(
            &args.image,
            args.as_name.as_deref(),
            loaded.config.load.chunk_size,
        )
        .map_err(UsageError::Other)?;
    for line in lines {
        crate::outln!("{line}");
    }
    Ok(Exit::Success)
}

pub(crate) fn rm(args: &cli::RmArgs, loaded: &Loaded) -> Result<Exit, UsageError> {
    let removal = repos(loaded)
        .rm(&args.images, args.force, args.dry_run)
        .map_err(UsageError::Other)?;
    for line in &removal.lines {
        crate::outln!("{line}");
    }
    crate::outln!("{}", removal.total(args.dry_run));
    Ok(Exit::Success)
}

pub(crate) fn prune(args: &cli::PruneArgs, loaded: &Loaded) -> Result<Exit, UsageError> {
    let removal = repos(loaded)
        .prune(args.keep, args.pattern.as_deref(), args.dry_run)
        .map_err(UsageError::Other)?;
    for line in &removal.lines {
        crate::outln!("{line}");
    }
    crate::outln!("{}", removal.total(args.dry_run));
    Ok(Exit::Success)
}
