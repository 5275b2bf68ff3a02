//! `imaging demo`, the README's first command, end to end.

mod common;

use std::process::Command;

fn demo(extra: &[&str]) -> (i32, String) {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imaging"))
        .args(["demo", "--nodes", "3", "--size", "48M", "-b", "0"])
        .args(extra)
        .env("HOME", home.path())
        .env("XDG_STATE_HOME", home.path().join("state"))
        .env("XDG_RUNTIME_DIR", home.path().join("run"))
        .env_remove("IMAGING_CONFIG")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn demo_on_sshd_nodes_loads_saves_and_waits() {
    let (code, text) = demo(&[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("real sshd processes"), "{text}");
    assert!(text.contains("load: all 3 nodes succeeded"), "{text}");
    assert!(text.contains("identical to demo.img"), "{text}");
    assert_eq!(text.matches(" ssh OK").count(), 3, "{text}");
    assert!(text.contains("all done"), "{text}");
}

#[test]
fn demo_on_local_nodes_needs_no_sshd() {
    let (code, text) = demo(&["--local"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("local agent processes"), "{text}");
    assert!(text.contains("identical to demo.img"), "{text}");
    // Piped output is lines, not a dashboard.
    assert!(text.contains("NODE") && text.contains("WRITTEN"), "{text}");
    assert!(
        !text.contains("\x1b[?1049h"),
        "alternate screen in piped output"
    );
}

#[test]
fn demo_in_a_terminal_shows_the_dashboard_and_exits_0() {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imaging"));
    cmd.args(["demo", "--nodes", "3", "--size", "48M", "-b", "16M"])
        .env("HOME", home.path())
        .env("XDG_STATE_HOME", home.path().join("state"))
        .env("XDG_RUNTIME_DIR", home.path().join("run"))
        .env_remove("IMAGING_CONFIG")
        .env_remove("NO_COLOR");
    let rc = home.path().join("rc");
    let tmux = common::Tmux::new("demo");
    tmux.start(home.path(), &cmd, &rc, 120, 36);
    let screen = tmux.wait_for("the dashboard", 60, |s| {
        s.contains("imaging load · demo.img")
    });
    assert!(
        screen.contains("demo01") && screen.contains("demo03"),
        "{screen}"
    );
    tmux.wait_for("the end of the load", 60, |s| s.contains("press any key"));
    tmux.keys("Enter");
    let code = tmux.exit_code(&rc, 90);
    let screen = tmux.capture();
    assert_eq!(code, 0, "{screen}");
    assert!(screen.contains("all done"), "{screen}");
}
