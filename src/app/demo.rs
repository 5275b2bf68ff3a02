//! `imaging demo`: the main job on a throwaway lab — a generated disk image
//! loaded onto simulated nodes through the real engine, one node saved
//! back, a wait over all of them — then everything is cleaned up.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Instant;

use crate::app::cli::{Cli, Command, DemoArgs, LoadArgs, NodeArgs, SaveArgs, WaitArgs};
use crate::app::exit::{Exit, UsageError};
use crate::app::load_cmd::run_load;
use crate::app::save_cmd::run_save;
use crate::app::wait_cmd::run_wait;
use crate::ui::fmt::human_bytes;
use crate::{config, lab};

const MIB: u64 = 1 << 20;

/// A disk-like image: per 64 MiB, 20 MiB of text-like data (compresses),
/// 16 MiB of random data (does not), 28 MiB of zeros (free space, a hole).
pub fn generate_image(path: &Path, size: u64) -> std::io::Result<u64> {
    const WORDS: &[&str] = &[
        "kernel", "module", "lib", "usr", "share", "config", "network", "wireless", "node",
        "image", "boot", "firmware", "driver", "ubuntu", "fedora", "ssh", "systemd", "python3",
        "gnuradio", "uhd", "the", "of", "and", "to", "in", "for", "with", "on", "data", "testbed",
    ];
    let mut rng = fastrand::Rng::with_seed(2026);
    let file = std::fs::File::create(path)?;
    let mut out = std::io::BufWriter::with_capacity(4 << 20, file);
    let mut data = 0u64;
    let mut buf = vec![0u8; MIB as usize];
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(MIB);
        let slot = (offset / MIB) % 64;
        let region = &mut buf[..len as usize];
        if slot < 20 {
            let mut at = 0;
            while at < region.len() {
                let word = WORDS[rng.usize(..WORDS.len())].as_bytes();
                let sep: &[u8] = if rng.u8(..12) == 0 { b"\n" } else { b" " };
                for &b in word.iter().chain(sep) {
                    if at < region.len() {
                        region[at] = b;
                        at += 1;
                    }
                }
            }
        } else if slot < 36 {
            rng.fill(region);
        } else {
            out.seek(SeekFrom::Current(len as i64))?;
            offset += len;
            continue;
        }
        out.write_all(region)?;
        data += len;
        offset += len;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.set_len(size)?;
    file.sync_all()?;
    Ok(data)
}

/// Print a demo line; false when stdout's reader has gone.
fn say(cli: &Cli, text: &str) -> bool {
    cli.global.json || crate::outln!("demo: {text}")
}

/// [`say`], ending the demo (temp dir and simulated nodes removed on the
/// way out) when nobody reads its output any more.
macro_rules! say {
    ($cli:expr, $text:expr $(,)?) => {
        if !say($cli, $text) {
            return Ok(Exit::Interrupted);
        }
    };
}

fn node_args(spec: &str) -> NodeArgs {
    NodeArgs {
        spec: vec![spec.to_string()],
        all: false,
    }
}

pub async fn run(cli: &Cli, args: &DemoArgs) -> Result<Exit, UsageError> {
    let started = Instant::now();
    let other = |e: std::io::Error| UsageError::Other(format!("demo: {e}"));
    // Short paths: SSH control sockets live under them.
    let dir = tempfile::Builder::new()
        .prefix("imaging-demo-")
        .tempdir_in("/tmp")
        .map_err(other)?;
    let root = dir.path().to_path_buf();
    for sub in ["images", "targets"] {
        std::fs::create_dir_all(root.join(sub)).map_err(other)?;
    }
    let image = root.join("images/demo.img");
    say!(
        cli,
        &format!(
            "generating a {} disk image in {}",
            human_bytes(args.size),
            image.display()
        ),
    );
    let (path, size) = (image.clone(), args.size);
    let data = tokio::task::spawn_blocking(move || generate_image(&path, size))
        .await
        .map_err(|e| UsageError::Other(e.to_string()))?
        .map_err(other)?;
    say!(
        cli,
        &format!(
            "image: {} of data, the rest is free space (zeros)",
            human_bytes(data)
        ),
    );

    let n = usize::from(args.nodes);
    let unavailable = if args.local {
        Some("--local".to_string())
    } else {
        lab::sshd_unavailable()
    };
    let mut text = format!(
        "[repository]\ndir = \"{}\"\n[load]\ntarget = \"{}/targets/{{name}}.img\"\nbandwidth = {}\n",
        root.join("images").display(),
        root.display(),
        args.bandwidth
    );
    let _lab = match &unavailable {
        Some(why) => {
            say!(
                cli,
                &format!("{n} simulated nodes as local agent processes (no SSH: {why})"),
            );
            for i in 1..=n {
                text.push_str(&format!("[[node]]\nname = \"demo{i:02}\"\nlocal = true\n"));
            }
            None
        }
        None => {
            let lab =
                lab::Lab::start(&root, "demo", n).map_err(|e| UsageError::Other(e.to_string()))?;
            say!(
                cli,
                &format!(
                    "{n} simulated nodes: real sshd processes on 127.0.0.1, ports {:?}",
                    lab.ports()
                ),
            );
            text.push_str(&format!(
                "[ssh]\nuser = \"root\"\nidentity_file = \"{}\"\nknown_hosts = \"strict\"\nknown_hosts_file = \"{}\"\n",
                lab.client_key().display(),
                lab.known_hosts().display()
            ));
            for node in lab.nodes() {
                text.push_str(&format!(
                    "[[node]]\nname = \"{}\"\naddress = \"127.0.0.1\"\nport = {}\n",
                    node.name, node.port
                ));
            }
            Some(lab)
        }
    };
    let conf = root.join("imaging.conf");
    std::fs::write(&conf, &text).map_err(other)?;
    // Only the demo's own configuration: the user's files must not change it.
    let loaded = config::merge(vec![config::parse_layer(
        &conf.display().to_string(),
        &text,
    )?])?;
    let all = format!("1-{n}");
    let phase = Cli {
        global: cli.global.clone(),
        command: Command::Config,
    };
    // The load is the show: on a terminal it gets the dashboard.
    let mut show = Cli {
        global: cli.global.clone(),
        command: Command::Config,
    };
    show.global.curses = true;

    say!(
        cli,
        &format!(
            "1/3 load demo.img onto {n} nodes (bandwidth cap {})",
            crate::ui::fmt::human_cap(args.bandwidth)
        ),
    );
    let load = LoadArgs {
        nodes: node_args(&all),
        image: vec!["demo.img".into()],
        timeout: None,
        force: false,
        verify: false,
        bandwidth: None,
        fanout: None,
        dry_run: false,
    };
    let loaded_exit = run_load(&show, &load, &loaded).await?;
    if loaded_exit == Exit::Interrupted {
        return Ok(Exit::Interrupted);
    }

    say!(cli, "2/3 save demo01 back into a new image");
    let save = SaveArgs {
        nodes: node_args("1"),
        output: Some("demo-copy".into()),
        image: None,
        raw: false,
        timeout: None,
        dry_run: false,
        message: Some("imaging demo".into()),
    };
    let saved_exit = run_save(&phase, &save, &loaded).await?;
    if saved_exit == Exit::Interrupted {
        return Ok(Exit::Interrupted);
    }
    let copy = std::fs::read_dir(root.join("images"))
        .map_err(other)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|f| f.to_string_lossy().ends_with("__demo-copy.img"))
        });
    if let Some(copy) = &copy {
        let chunk = loaded.config.load.chunk_size;
        let same = crate::image::manifest::load_or_build(copy, chunk)
            .and_then(|a| {
                crate::image::manifest::load_or_build(&image, chunk)
                    .map(|b| a.identity == b.identity)
            })
            .unwrap_or(false);
        say!(
            cli,
            &format!(
                "saved {}: {}",
                copy.file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                if same {
                    "identical to demo.img"
                } else {
                    "DIFFERS from demo.img"
                }
            ),
        );
    }

    say!(cli, "3/3 wait for every node");
    let wait = WaitArgs {
        nodes: node_args(&all),
        timeout: Some(30.0),
        silent: false,
        verbose: false,
    };
    let waited_exit = run_wait(&phase, &wait, &loaded).await?;

    let worst = [loaded_exit, saved_exit, waited_exit]
        .into_iter()
        .max_by_key(|e| *e as u8)
        .unwrap_or(Exit::Success);
    say!(
        cli,
        &format!(
            "{} in {:.1}s (exit codes: load {}, save {}, wait {})",
            if worst == Exit::Success {
                "all done"
            } else {
                "finished with failures"
            },
            started.elapsed().as_secs_f64(),
            loaded_exit as u8,
            saved_exit as u8,
            waited_exit as u8
        ),
    );
    if args.keep {
        let kept = dir.keep();
        say!(cli, &format!("kept {}", kept.display()));
    }
    Ok(worst)
}
