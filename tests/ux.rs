//! The operator's experience: what each command says, in every output mode,
//! through the real binary (and real sshd nodes where nodes are needed).

mod common;

use std::path::Path;
use std::process::Output;

use common::{Rig, Tmux, summary};

const MIB: usize = 1 << 20;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn random_file(path: &Path, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    fastrand::Rng::with_seed(7).fill(&mut data[..len / 2]);
    std::fs::write(path, &data).unwrap();
    data
}

/// The image files in the rig's repository whose name contains `part`.
fn saved(rig: &Rig, part: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(rig.dir().join("images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && n.contains(part))
        .collect();
    names.sort();
    names
}

#[test]
fn save_names_the_new_image_in_every_output_mode() {
    let rig = Rig::new(1);
    random_file(&rig.nodes()[0].target, 4 * MIB);

    // --json: the node entry of the summary carries "image".
    let out = rig
        .imaging()
        .args(["save", "--json", "1", "-o", "injson"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let name = saved(&rig, "injson").pop().expect("an image was saved");
    assert_eq!(summary(&out)["nodes"][0]["image"], name.as_str());

    // Piped (plain lines).
    let out = rig
        .imaging()
        .args(["save", "1", "-o", "piped"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let name = saved(&rig, "piped").pop().expect("an image was saved");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&name),
        "{}",
        text(&out)
    );

    // On a terminal: the default bars, and the dashboard.
    for (mode, extra) in [("bars", None), ("dash", Some("-c"))] {
        let tmux = Tmux::new(&format!("save-{mode}"));
        let rc = rig.dir().join(format!("{mode}.rc"));
        let mut cmd = rig.imaging();
        cmd.args(["save", "1", "-o", mode]);
        if let Some(flag) = extra {
            cmd.args([flag, "--no-wait"]);
        }
        tmux.start(rig.dir(), &cmd, &rc, 120, 30);
        let code = tmux.exit_code(&rc, 60);
        let screen = tmux.capture();
        assert_eq!(code, 0, "{screen}");
        let name = saved(&rig, mode).pop().expect("an image was saved");
        assert!(
            screen.contains(&name),
            "{mode}: {name} not shown in\n{screen}"
        );
    }
}

#[test]
fn an_image_given_without_dash_i_is_caught_by_its_look() {
    let rig = Rig::new_stopped(3);
    std::fs::write(rig.dir().join("images/ubuntu-24.04.img"), b"x").unwrap();
    for token in ["ubuntu.img", "ubuntu", "ubuntu-24.04.img", "ubuntu-24.04"] {
        let out = rig.imaging().args(["load", token, "1-3"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{token}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("did you forget -i? (ubuntu-24.04.img)"),
            "{token}: {err}"
        );
        assert!(err.trim().lines().count() == 1 && err.len() < 100, "{err}");
    }
    // A dotted name that matches nothing still looks like a file.
    let out = rig
        .imaging()
        .args(["load", "debian.img", "1"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did you forget -i? (no image"),
        "{}",
        text(&out)
    );
    // A node-like token keeps its own reason.
    let out = rig.imaging().args(["nodes", "fit99"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no node numbered 99") && !err.contains("-i"),
        "{err}"
    );
}

#[test]
fn timeout_zero_means_no_deadline_for_wait_too() {
    let mut rig = Rig::new_stopped(1);
    // Up: returns at once, as with any deadline.
    rig.start(0);
    let out = rig
        .imaging()
        .args(["wait", "-t", "0", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // Down: it keeps waiting (it used to fail at once) …
    rig.kill(0);
    let mut child = rig
        .imaging()
        .args(["wait", "-t", "0", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(4));
    let still = child.try_wait().unwrap().is_none();
    // Ctrl-C: it cleans up (no ssh left behind) and says it was interrupted.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(130));
    assert!(still, "wait -t 0 ended on a node that is down");
    // … and a negative timeout is a usage error.
    let out = rig.imaging().args(["wait", "-t=-1", "1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("0: no deadline"), "{}", text(&out));
}

/// The binary with no config at all: an empty HOME and working dir.
fn bare(dir: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_imaging"));
    cmd.current_dir(dir)
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir.join("xdg"))
        .env("XDG_STATE_HOME", dir.join("state"))
        .env_remove("IMAGING_CONFIG")
        .env_remove("NODES");
    cmd
}

#[test]
fn without_any_config_the_errors_name_the_files_looked_for() {
    if Path::new("/etc/imaging.conf").exists() || Path::new("/var/lib/imaging/images").exists() {
        eprintln!("skipped: this machine has a system-wide imaging setup");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = bare(dir.path())
        .args(["load", "-i", "x.img", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let home_conf = dir.path().join(".imaging.conf");
    for needle in [
        "inventory is empty",
        "/etc/imaging.conf",
        home_conf.to_str().unwrap(),
        "imaging.conf.example",
        "imaging config",
    ] {
        assert!(err.contains(needle), "{needle} not in: {err}");
    }
    let out = bare(dir.path()).arg("list").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/var/lib/imaging/images does not exist")
            && err.contains("[repository] dir = "),
        "{err}"
    );
}

#[test]
fn a_cancelled_run_says_cancelled_and_leaves_no_stale_bar() {
    let rig = Rig::new(2);
    random_file(&rig.dir().join("images/slow.img"), 32 * MIB);
    let cmd = |extra: &[&str]| {
        let mut c = rig.imaging();
        c.args(["load", "-i", "slow.img", "-b", "1M", "1-2"])
            .args(extra);
        c
    };

    // Piped: Ctrl-C (SIGINT) once the transfer runs.
    let mut child = cmd(&["--plain"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    // Bounded by the run itself: the line comes, or stdout closes.
    while std::io::BufRead::read_line(&mut reader, &mut seen).unwrap_or(0) > 0
        && !seen.contains("transferring")
    {}
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    std::io::Read::read_to_string(&mut reader, &mut seen).unwrap();
    let code = child.wait().unwrap().code();
    let stdout = seen;
    assert_eq!(code, Some(130), "{stdout}");
    assert!(
        stdout.contains("load: cancelled after") && stdout.contains("2 cancelled"),
        "{stdout}"
    );
    assert!(!stdout.contains("nodes failed"), "{stdout}");

    // Bars on a terminal: ^C typed; no bar is left above the summary.
    let tmux = Tmux::new("cancel-bars");
    let rc = rig.dir().join("bars.rc");
    for n in rig.nodes() {
        let _ = std::fs::remove_file(&n.target);
    }
    tmux.start(rig.dir(), &cmd(&[]), &rc, 120, 30);
    tmux.wait_for("the transfer", 180, |s| s.contains("transferring"));
    tmux.keys("C-c");
    assert_eq!(tmux.exit_code(&rc, 60), 130);
    let screen = tmux.capture();
    assert!(screen.contains("load: cancelled after"), "{screen}");
    assert!(
        !screen
            .lines()
            .any(|l| l.contains(" [") && l.contains("B/s")),
        "a progress bar stayed:\n{screen}"
    );
}

#[test]
fn dry_run_is_a_plan_of_nodes_targets_reachability_and_fanout() {
    let mut rig = Rig::new_stopped(3);
    rig.start(0);
    rig.start(1);
    random_file(&rig.dir().join("images/plan.img"), 8 * MIB);
    random_file(&rig.nodes()[0].target, MIB);
    let before = std::fs::read(&rig.nodes()[0].target).unwrap();

    let out = rig
        .imaging()
        .args(["load", "-n", "--json", "-i", "plan.img", "1-3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let plan: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(plan["event"], "plan");
    assert_eq!(plan["size"], 8 * MIB as u64);
    assert_eq!(plan["fanout"], "star");
    let nodes = plan["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert_eq!(nodes[0]["reachable"], true);
    assert_eq!(nodes[0]["target_now"]["kind"], "file");
    assert_eq!(nodes[0]["target_now"]["size"], MIB as u64);
    assert_eq!(nodes[1]["target_now"]["kind"], "missing");
    assert_eq!(nodes[2]["reachable"], false);
    assert!(nodes[2]["error"].as_str().unwrap().len() > 3);
    // No stamp on node 1: the image's data, as a bound; node 2 lacks its
    // target: every data chunk, exactly.
    assert_eq!(nodes[0]["basis"], "upper bound");
    assert_eq!(nodes[0]["would_receive"], plan["data_size"]);
    assert_eq!(nodes[1]["basis"], "missing");
    assert_eq!(nodes[1]["would_receive"], plan["data_size"]);
    assert_eq!(nodes[2]["reason"], "unreachable");
    // Nothing was written.
    assert_eq!(std::fs::read(&rig.nodes()[0].target).unwrap(), before);
    assert!(!rig.nodes()[1].target.exists());

    // A /dev target that does not exist is warned about; text for humans.
    let layer = rig.dir().join("dev.conf");
    std::fs::write(&layer, "[load]\ntarget = \"/dev/imaging-no-such-{name}\"\n").unwrap();
    let out = common::imaging(&rig, &layer)
        .args(["load", "-n", "-i", "plan.img", "--fanout", "chain", "1-2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(stdout.contains("fan-out chain"), "{stdout}");
    assert!(stdout.contains("8.0 MiB"), "{stdout}");
    assert!(
        stdout.contains(
            "warning: /dev/imaging-no-such-node01 does not exist on node01: \
             it would be created as a regular file"
        ),
        "{stdout}"
    );
    assert!(!Path::new("/dev/imaging-no-such-node01").exists());
}

#[test]
fn list_says_when_nothing_matched_and_shows_broken_links() {
    let rig = Rig::new_stopped(1);
    let images = rig.dir().join("images");
    std::fs::write(images.join("a.img"), b"data").unwrap();
    std::os::unix::fs::symlink("gone.img", images.join("old.img")).unwrap();

    let out = rig.imaging().args(["list", "nomatch"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout.contains("matches `nomatch`"), "{stdout}");
    assert!(!stdout.contains("no images"), "{stdout}");

    let out = rig.imaging().arg("list").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let row = stdout
        .lines()
        .find(|l| l.starts_with("old.img"))
        .unwrap_or_else(|| panic!("the broken link is hidden:\n{stdout}"));
    assert!(row.contains("-> gone.img (broken"), "{row}");

    let out = rig
        .imaging()
        .args(["load", "-i", "old.img", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("old.img is a broken alias to gone.img"),
        "{}",
        text(&out)
    );
}

#[test]
fn conflicting_or_meaningless_flags_are_rejected_and_help_has_examples() {
    let rig = Rig::new_stopped(2);
    for args in [
        &["wait", "--json", "--plain", "1"][..],
        &["wait", "-s", "-v", "1"],
        &["load", "-c", "--json", "1"],
        &["list", "-c"],
        &["nodes", "--plain", "1"],
        &["config", "--json"],
    ] {
        let out = rig.imaging().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cannot be used with") || err.contains("has no effect"),
            "{args:?}: {err}"
        );
    }
    let out = rig
        .imaging()
        .args(["nodes", "--json", "1-2"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"["node01","node02"]"#
    );
    for sub in [
        "load",
        "save",
        "wait",
        "list",
        "nodes",
        "config",
        "install-links",
    ] {
        let out = rig.imaging().args([sub, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("Examples:") && help.contains("Exit codes:"),
            "{sub}: {help}"
        );
    }
    let help = String::from_utf8_lossy(
        &rig.imaging()
            .args(["load", "--help"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    for group in ["Selection:", "Output:", "Transfer:"] {
        assert!(help.contains(group), "{group} missing:\n{help}");
    }
    // imaging-wait -V answers like imaging -V.
    let link = rig.dir().join("imaging-wait");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_imaging"), &link).unwrap();
    let out = std::process::Command::new(&link)
        .arg("-V")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("imaging"));
}

#[test]
fn install_links_refuses_to_replace_files_and_names_a_missing_dir() {
    let rig = Rig::new_stopped(0);
    let missing = rig.dir().join("no-such-bin");
    let out = rig
        .imaging()
        .arg("install-links")
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("does not exist"), "{}", text(&out));

    let bin = rig.dir().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::write(bin.join("imaging-wait"), b"#!/bin/sh\necho mine\n").unwrap();
    let out = rig
        .imaging()
        .arg("install-links")
        .arg(&bin)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("-f"), "{}", text(&out));
    assert_eq!(
        std::fs::read(bin.join("imaging-wait")).unwrap(),
        b"#!/bin/sh\necho mine\n"
    );
    assert!(!bin.join("imaging-load").exists(), "nothing is touched");
    let out = rig
        .imaging()
        .args(["install-links", "-f"])
        .arg(&bin)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(bin.join("imaging-wait").read_link().is_ok());
}

#[test]
fn nodes_are_listed_in_number_order_whichever_inventory_holds_them() {
    let rig = Rig::new_stopped(0);
    let json = rig.dir().join("inventory.json");
    std::fs::write(
        &json,
        r#"[{"control": {"hostname": "fit05", "ip": "10.0.0.5"}},
            {"control": {"hostname": "fit06", "ip": "10.0.0.6"}}]"#,
    )
    .unwrap();
    let layer = rig.dir().join("inv.conf");
    std::fs::write(
        &layer,
        format!("[nodes]\ninventory = {json:?}\nall = \"1-6\"\n\n[[node]]\nname = \"fit02\"\n"),
    )
    .unwrap();
    let out = common::imaging(&rig, &layer)
        .args(["nodes", "-a"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "fit02 fit05 fit06",
        "{}",
        text(&out)
    );
}

#[test]
fn bash_completion_offers_subcommands_images_and_nodes() {
    let rig = Rig::new_stopped(2);
    std::fs::write(rig.dir().join("images/ubuntu-24.04.img"), b"x").unwrap();
    let out = rig
        .imaging()
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let script = rig.dir().join("imaging.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    // A bash that loaded the script completes as a user's would.
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_imaging")).parent().unwrap();
    let complete = |line: &str| {
        let probe = format!(
            "source {}; COMP_WORDS=({line}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; \
             _imaging_dynamic imaging; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        );
        let cmd = rig.imaging();
        let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(&probe)
            .envs(
                cmd.get_envs()
                    .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
            )
            .env("PATH", path)
            .current_dir(rig.dir())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(complete("imaging lo").contains("load"));
    assert_eq!(complete("imaging load -i ub").trim(), "ubuntu-24.04.img");
    let nodes = complete("imaging wait node");
    assert!(
        nodes.contains("node01") && nodes.contains("node02"),
        "{nodes}"
    );

    for shell in ["zsh", "fish"] {
        let out = rig.imaging().args(["completions", shell]).output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&out.stdout).contains("load"));
    }
    let man = rig.dir().join("man");
    let out = rig.imaging().arg("man").arg(&man).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let page = std::fs::read_to_string(man.join("imaging-load.1")).unwrap();
    assert!(page.starts_with(".ie") || page.contains(".TH"), "{page}");
}

#[test]
fn config_shows_files_aligned_origins_nodes_per_line_and_unset_keys() {
    let rig = Rig::new_stopped(2);
    let out = rig.imaging().arg("config").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rig_conf = rig.dir().join("imaging.conf");
    assert!(
        stdout.contains(&format!("# read:        {}", rig_conf.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains("# not found:   /etc/imaging.conf"),
        "{stdout}"
    );
    // Every origin comment starts in the same column.
    let columns: std::collections::HashSet<usize> = stdout
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with("# read") && !l.starts_with("# not"))
        .map(|l| l.find("  # ").unwrap_or_else(|| panic!("no origin: {l}")))
        .collect();
    assert_eq!(columns.len(), 1, "{stdout}");
    assert!(stdout.contains("node[0] = { name = \"node01\""), "{stdout}");
    assert!(stdout.contains("node[1] = { name = \"node02\""), "{stdout}");
    assert!(stdout.contains("# nodes.inventory = "), "{stdout}");
}
