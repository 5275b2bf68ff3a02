//! The `-c` dashboard: screens pinned as snapshots on a `TestBackend`, the
//! key handling, the app loop driven with injected keys, the real binary
//! in a tmux pane against real sshd nodes, and (ignored) a CPU benchmark.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use imaging::engine::events::{Event, NodeState};
use imaging::engine::report::{Board, Reporter};
use imaging::ui::dashboard::{Input, KeyAction, UiState, render, run_app};
use imaging::ui::{Feed, ImageHeader, RunInfo, View};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::Color;
use tokio::sync::mpsc::unbounded_channel;

use common::{Rig, Tmux};

const MIB: u64 = 1 << 20;

fn image() -> ImageHeader {
    ImageHeader {
        name: "lab.img".into(),
        size: 64 * MIB,
        data_size: 22 * MIB,
        cap: 0,
    }
}

fn state(view: &mut View, node: usize, state: NodeState, message: Option<&str>) {
    view.apply(&Event::State {
        node,
        state,
        message: message.map(str::to_string),
    });
}

fn bytes(view: &mut View, node: usize, written: u64, total: u64, rate: f64) {
    let n = &mut view.nodes[node];
    n.bytes_sent = written;
    n.bytes_written = written;
    n.total = total;
    n.rate = rate;
}

const REFUSED: &str = "ssh: connect to host 127.0.0.1 port 2203: Connection refused";

/// node01 transferring (42%), node02 done, node03 failed.
fn three_nodes() -> View {
    let names: Vec<String> = ["node01", "node02", "node03"].map(String::from).into();
    let mut view = View::new("load", &names, Some(image()));
    view.elapsed = Duration::from_secs(3);
    state(&mut view, 0, NodeState::Transferring, None);
    state(&mut view, 1, NodeState::Transferring, None);
    state(&mut view, 2, NodeState::Failed, Some(REFUSED));
    view.elapsed = Duration::from_secs(41);
    view.apply(&Event::Log {
        node: Some(1),
        text: "node02: 22.0 MiB written and verified".into(),
    });
    state(&mut view, 1, NodeState::Done, None);
    bytes(
        &mut view,
        0,
        (22 * MIB * 42).div_ceil(100),
        22 * MIB,
        2.5 * MIB as f64,
    );
    bytes(&mut view, 1, 22 * MIB, 22 * MIB, 0.0);
    view.elapsed = Duration::from_secs(65);
    view
}

/// `n` nodes `fit001`… in every state, at fixed fractions and rates.
fn many_nodes(n: usize) -> View {
    let names: Vec<String> = (1..=n).map(|i| format!("fit{i:03}")).collect();
    let mut view = View::new("load", &names, Some(image()));
    let total = 22 * MIB;
    for i in 0..n {
        view.elapsed = Duration::from_secs(i as u64 / 4);
        match i % 12 {
            0 | 1 => {}
            2 => state(&mut view, i, NodeState::Connecting, None),
            3..=6 => {
                state(&mut view, i, NodeState::Transferring, None);
                let pct = ((i * 37) % 100) as u64;
                bytes(
                    &mut view,
                    i,
                    (total * pct).div_ceil(100),
                    total,
                    (1 + i % 7) as f64 * MIB as f64,
                );
            }
            7 | 8 => {
                state(&mut view, i, NodeState::Done, None);
                bytes(&mut view, i, total, total, 0.0);
            }
            9 => {
                state(&mut view, i, NodeState::UpToDate, None);
                bytes(&mut view, i, 0, total, 0.0);
            }
            10 => {
                state(
                    &mut view,
                    i,
                    NodeState::Failed,
                    Some("disk full on /dev/sda"),
                );
                bytes(&mut view, i, total / 3, total, 0.0);
            }
            _ if i % 24 == 11 => {
                state(
                    &mut view,
                    i,
                    NodeState::Timeout,
                    Some("no answer after 600s"),
                );
            }
            _ => {
                state(&mut view, i, NodeState::Syncing, None);
                bytes(&mut view, i, total, total, 0.0);
            }
        }
    }
    view.elapsed = Duration::from_secs(185);
    view
}

fn draw(view: &View, ui: &mut UiState, width: u16, height: u16) -> Terminal<TestBackend> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    ui.area = Rect::new(0, 0, width, height);
    terminal.draw(|f| render(f, view, ui)).unwrap();
    terminal
}

/// The screen as lines of text (one symbol per cell).
fn lines(buffer: &Buffer) -> Vec<String> {
    let area = buffer.area;
    (area.top()..area.bottom())
        .map(|y| {
            (area.left()..area.right())
                .map(|x| buffer[(x, y)].symbol())
                .collect()
        })
        .collect()
}

fn text(terminal: &Terminal<TestBackend>) -> String {
    lines(terminal.backend().buffer()).join("\n")
}

/// The row of the screen holding `what`.
fn row_with<'a>(screen: &'a str, what: &str) -> &'a str {
    screen
        .lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no row with {what:?} on:\n{screen}"))
}

/// Foreground colour of the cell where `word` starts on the row holding `key`.
fn color_of(buffer: &Buffer, key: &str, word: &str) -> Color {
    for y in buffer.area.top()..buffer.area.bottom() {
        let cells: Vec<&str> = (0..buffer.area.width)
            .map(|x| buffer[(x, y)].symbol())
            .collect();
        let row: String = cells.concat();
        if !row.contains(key) {
            continue;
        }
        let word: Vec<String> = word.chars().map(String::from).collect();
        if let Some(x) = (0..cells.len()).find(|&x| {
            word.iter()
                .enumerate()
                .all(|(k, c)| cells.get(x + k) == Some(&c.as_str()))
        }) {
            return buffer[(x as u16, y)].fg;
        }
    }
    panic!("no {word:?} on a row with {key:?}")
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

fn ctrl_c() -> KeyEvent {
    KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)
}

#[test]
fn three_nodes_at_80x24_show_progress_state_and_the_failure() {
    let view = three_nodes();
    let mut ui = UiState::new(true);
    let terminal = draw(&view, &mut ui, 80, 24);
    insta::assert_snapshot!("three_nodes_80x24", terminal.backend());
    let screen = text(&terminal);
    assert!(screen.contains("imaging load · lab.img 64 MiB (22 MiB data) · 3 nodes"));
    assert!(screen.contains("elapsed 1m05s"));
    assert!(row_with(&screen, "node01").contains("transferring"));
    assert!(row_with(&screen, "node01").contains("42%"));
    assert!(row_with(&screen, "node01").contains("2.5 MiB/s"));
    assert!(row_with(&screen, "node02").contains("done"));
    assert!(row_with(&screen, "node02").contains("100%"));
    let failed = row_with(&screen, "node03 ");
    assert!(
        failed.contains("failed") && failed.contains("ssh: connect"),
        "{failed}"
    );
    // The log pane has the failure in full.
    assert!(screen.contains("node03: failed (ssh: connect to host 127.0.0.1 port 2203"));
    assert!(screen.contains("q cancel"));
    let buffer = terminal.backend().buffer();
    assert_eq!(color_of(buffer, "node03 ", "failed"), Color::Red);
    assert_eq!(color_of(buffer, "node02 ", "done"), Color::Green);
    assert_eq!(color_of(buffer, "node01 ", "transferring"), Color::Cyan);
    assert_eq!(color_of(buffer, "node03: failed", "node03"), Color::Red);
}

#[test]
fn three_nodes_at_200x50_show_written_and_total_and_the_whole_message() {
    let view = three_nodes();
    let mut ui = UiState::new(true);
    let terminal = draw(&view, &mut ui, 200, 50);
    insta::assert_snapshot!("three_nodes_200x50", terminal.backend());
    let screen = text(&terminal);
    assert!(screen.contains("WRITTEN / TOTAL"));
    assert!(row_with(&screen, "node01").contains("9.2 MiB / 22 MiB"));
    assert!(row_with(&screen, "node01").contains("ETA 5s"));
    assert!(row_with(&screen, "node03 ").contains(REFUSED));
}

#[test]
fn no_color_draws_without_colours() {
    let view = three_nodes();
    let mut ui = UiState::new(false);
    let terminal = draw(&view, &mut ui, 80, 24);
    let buffer = terminal.backend().buffer();
    assert!(
        buffer
            .content()
            .iter()
            .all(|c| c.fg == Color::Reset && c.bg == Color::Reset),
        "a coloured cell with NO_COLOR"
    );
    // Same text as in colour.
    let mut coloured = UiState::new(true);
    assert_eq!(text(&terminal), text(&draw(&view, &mut coloured, 80, 24)));
}

#[test]
fn three_hundred_nodes_at_80x24_drop_the_log_pane_and_scroll() {
    let view = many_nodes(300);
    let mut ui = UiState::new(true);
    let terminal = draw(&view, &mut ui, 80, 24);
    insta::assert_snapshot!("many_nodes_80x24", terminal.backend());
    let screen = text(&terminal);
    assert!(
        !screen.contains(" log "),
        "compact layout keeps no log pane"
    );
    // Too many states for one line: counted by kind.
    assert!(screen.contains("50 queued  137 working  75 ok  38 failed"));
    assert!(screen.contains("fit001") && screen.contains("fit019"));
    assert!(!screen.contains("fit020"));
    assert!(screen.contains("1-19 of 300"));
    assert_eq!(ui.page(&view), 19);
    assert!(row_with(&screen, "fit011").contains("disk full"));

    // End shows the last node; PgUp goes back a page; Home to the top.
    ui.on_key(key(KeyCode::End), &view);
    let terminal = draw(&view, &mut ui, 80, 24);
    insta::assert_snapshot!("many_nodes_80x24_end", terminal.backend());
    let screen = text(&terminal);
    assert!(screen.contains("fit300") && screen.contains("282-300 of 300"));
    ui.on_key(key(KeyCode::Down), &view);
    assert_eq!(ui.scroll, 281, "no scrolling past the end");
    ui.on_key(key(KeyCode::PageUp), &view);
    assert_eq!(ui.scroll, 262);
    ui.on_key(key(KeyCode::Up), &view);
    assert_eq!(ui.scroll, 261);
    ui.on_key(key(KeyCode::Home), &view);
    assert_eq!(ui.scroll, 0);
    ui.on_key(key(KeyCode::PageDown), &view);
    assert_eq!(ui.scroll, 19);
}

#[test]
fn three_hundred_nodes_at_200x50_keep_a_log_pane() {
    let view = many_nodes(300);
    let mut ui = UiState::new(true);
    let terminal = draw(&view, &mut ui, 200, 50);
    insta::assert_snapshot!("many_nodes_200x50", terminal.backend());
    let screen = text(&terminal);
    assert!(screen.contains(" log "));
    assert!(screen.contains("25 failed  13 timeout"));
    assert!(screen.contains("fit300: timeout (no answer after 600s)"));
    assert!(screen.contains("1-33 of 300"));
    assert!(row_with(&screen, "fit004").contains("ETA"));
    assert!(row_with(&screen, "fit010").contains("up to date"));
    assert!(row_with(&screen, "fit012").contains("timeout"));
}

#[test]
fn f_shows_only_failed_or_unfinished_nodes() {
    let view = many_nodes(300);
    let mut ui = UiState::new(true);
    assert_eq!(ui.on_key(key(KeyCode::Char('f')), &view), KeyAction::None);
    assert!(ui.only_unfinished);
    let terminal = draw(&view, &mut ui, 80, 24);
    insta::assert_snapshot!("many_nodes_80x24_unfinished", terminal.backend());
    let screen = text(&terminal);
    for name in ["fit008", "fit009", "fit010"] {
        assert!(!screen.contains(name), "{name} succeeded: hidden");
    }
    assert!(screen.contains("fit011") && screen.contains("fit001"));
    // 300 nodes, 25 succeed in each dozen 3 times: 225 left.
    assert!(screen.contains("of 225"), "{screen}");
    assert!(screen.contains("f all nodes"));
    ui.on_key(key(KeyCode::Char('f')), &view);
    assert!(!ui.only_unfinished);
}

#[test]
fn question_mark_opens_the_help_and_any_key_closes_it() {
    let view = three_nodes();
    let mut ui = UiState::new(true);
    ui.on_key(key(KeyCode::Char('?')), &view);
    assert!(ui.help);
    let terminal = draw(&view, &mut ui, 80, 24);
    insta::assert_snapshot!("help_80x24", terminal.backend());
    let screen = text(&terminal);
    assert!(screen.contains("only failed or unfinished nodes"));
    assert!(screen.contains("cancel the run (asks first)"));
    // The key that closes the help does nothing else.
    assert_eq!(ui.on_key(key(KeyCode::Char('q')), &view), KeyAction::None);
    assert!(!ui.help && !ui.confirm_cancel);
}

#[test]
fn q_asks_before_cancelling_and_y_cancels() {
    let view = three_nodes();
    let mut ui = UiState::new(true);
    assert_eq!(ui.on_key(key(KeyCode::Char('q')), &view), KeyAction::None);
    assert!(ui.confirm_cancel);
    let terminal = draw(&view, &mut ui, 80, 24);
    insta::assert_snapshot!("cancel_prompt_80x24", terminal.backend());
    let screen = text(&terminal);
    assert!(screen.contains("Cancel the run? y/n"));
    assert!(screen.contains("after hooks still run"));

    // n and Esc keep going.
    assert_eq!(ui.on_key(key(KeyCode::Char('n')), &view), KeyAction::None);
    assert!(!ui.confirm_cancel);
    ui.on_key(key(KeyCode::Esc), &view);
    assert!(ui.confirm_cancel, "Esc asks too");
    ui.on_key(key(KeyCode::Esc), &view);
    assert!(!ui.confirm_cancel);

    // Ctrl-C is a key in raw mode: it asks, and a second one confirms.
    ui.on_key(ctrl_c(), &view);
    assert!(ui.confirm_cancel);
    assert_eq!(ui.on_key(ctrl_c(), &view), KeyAction::Cancel);
    assert!(ui.cancelling);

    let mut ui = UiState::new(true);
    ui.on_key(key(KeyCode::Char('q')), &view);
    assert_eq!(ui.on_key(key(KeyCode::Char('y')), &view), KeyAction::Cancel);
    assert!(ui.cancelling && !ui.confirm_cancel);
    let terminal = draw(&view, &mut ui, 80, 24);
    insta::assert_snapshot!("cancelling_80x24", terminal.backend());
    assert!(text(&terminal).contains("cancelling…"));
    // Once cancelling, q does not ask again.
    ui.on_key(key(KeyCode::Char('q')), &view);
    assert!(!ui.confirm_cancel);
}

#[test]
fn the_final_screen_shows_the_outcome_and_any_key_quits() {
    let mut view = three_nodes();
    let names: Vec<String> = view.nodes.iter().map(|n| n.name.clone()).collect();
    let board = Board::new(&names);
    let (tx, _rx) = unbounded_channel();
    let reporter = Reporter::new("load", board.clone(), tx);
    board.set_progress(0, 22 * MIB, 22 * MIB, 22 * MIB);
    board.set_progress(1, 22 * MIB, 22 * MIB, 22 * MIB);
    reporter.state(0, NodeState::Done, None);
    reporter.state(1, NodeState::Done, None);
    reporter.state(2, NodeState::Failed, Some(REFUSED.into()));
    let mut summary = reporter.finish();
    summary.elapsed_s = 65.0;
    state(&mut view, 0, NodeState::Done, None);
    view.apply(&Event::Finished(summary));
    let mut ui = UiState::new(true);
    let terminal = draw(&view, &mut ui, 80, 24);
    insta::assert_snapshot!("finished_80x24", terminal.backend());
    let screen = text(&terminal);
    assert!(
        screen.contains("done: 2 ok, 1 failed — press any key"),
        "{screen}"
    );
    // Scrolling keys still browse; anything else quits.
    assert_eq!(ui.on_key(key(KeyCode::Down), &view), KeyAction::None);
    assert_eq!(ui.on_key(key(KeyCode::Char('f')), &view), KeyAction::None);
    assert_eq!(ui.on_key(key(KeyCode::Enter), &view), KeyAction::Quit);
    assert_eq!(ui.on_key(key(KeyCode::Char('q')), &view), KeyAction::Quit);
}

#[test]
fn wait_runs_show_states_and_messages_without_byte_columns() {
    let names: Vec<String> = ["fit01", "fit02", "fit03"].map(String::from).into();
    let mut view = View::new("wait", &names, None);
    state(&mut view, 0, NodeState::Ok, None);
    state(
        &mut view,
        1,
        NodeState::WaitingForSsh,
        Some("connection refused"),
    );
    let mut ui = UiState::new(true);
    let terminal = draw(&view, &mut ui, 80, 24);
    let screen = text(&terminal);
    assert!(screen.contains("imaging wait · 3 nodes"), "{screen}");
    assert!(
        !screen.contains("PROGRESS") && !screen.contains("MiB"),
        "{screen}"
    );
    assert!(row_with(&screen, "fit02").contains("connection refused"));
    assert!(screen.contains("33% · 1/3 nodes finished"), "{screen}");
}

#[test]
fn tiny_and_odd_sizes_draw_without_panicking() {
    let views = [three_nodes(), many_nodes(300), many_nodes(1)];
    for view in &views {
        for (w, h) in [
            (1, 1),
            (10, 3),
            (20, 5),
            (40, 10),
            (79, 23),
            (300, 8),
            (60, 200),
        ] {
            for help in [false, true] {
                let mut ui = UiState::new(true);
                ui.help = help;
                ui.confirm_cancel = !help;
                draw(view, &mut ui, w, h);
            }
        }
    }
}

fn feed_for(names: &[String]) -> (Feed, Reporter, imaging::engine::cancel::Cancel) {
    let board = Board::new(names);
    let (tx, rx) = unbounded_channel();
    let (canceller, cancel) = imaging::engine::cancel::pair();
    let reporter = Reporter::new("load", board.clone(), tx);
    let feed = Feed {
        info: RunInfo {
            command: "load".into(),
            names: names.to_vec(),
            row_images: Vec::new(),
            verbose: true,
            image: Some(image()),
            log_path: None,
            no_wait: false,
        },
        board,
        events: rx,
        canceller,
        started: Instant::now(),
    };
    (feed, reporter, cancel)
}

#[tokio::test]
async fn the_loop_cancels_on_q_y_then_waits_for_a_key_on_the_final_screen() {
    let names: Vec<String> = ["node01", "node02", "node03"].map(String::from).into();
    let (mut feed, reporter, cancel) = feed_for(&names);
    let (keys, mut inputs) = unbounded_channel();
    let mut view = View::new("load", &names, Some(image()));
    let app = tokio::spawn(async move {
        let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
        let mut ui = UiState::new(false);
        run_app(
            &mut terminal,
            &mut feed,
            &mut view,
            &mut ui,
            &mut inputs,
            None,
        )
        .await
        .unwrap();
        (terminal, view, ui)
    });
    for i in 0..3 {
        reporter.state(i, NodeState::Transferring, None);
        reporter.progress(i, MIB, MIB, 22 * MIB);
    }
    keys.send(Input::Key(key(KeyCode::Char('q')))).unwrap();
    keys.send(Input::Key(key(KeyCode::Char('y')))).unwrap();
    tokio::time::timeout(Duration::from_secs(5), cancel.cancelled())
        .await
        .expect("q y cancels the run");
    // What the engines and `drive` do then.
    reporter.close_unfinished(NodeState::Cancelled, "interrupted");
    reporter.finish();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!app.is_finished(), "the final screen waits for a key");
    keys.send(Input::Key(key(KeyCode::Char(' ')))).unwrap();
    let (terminal, view, ui) = tokio::time::timeout(Duration::from_secs(5), app)
        .await
        .expect("a key ends the dashboard")
        .unwrap();
    assert!(ui.cancelling);
    let summary = view.summary.expect("the summary arrived");
    assert!(
        summary
            .nodes
            .iter()
            .all(|n| n.state == NodeState::Cancelled)
    );
    let screen = text(&terminal);
    assert!(
        screen.contains("cancelled: 0 ok, 3 cancelled — press any key"),
        "{screen}"
    );
    assert!(row_with(&screen, "node02").contains("interrupted"));
}

#[tokio::test]
async fn the_loop_ends_when_the_events_end() {
    let names = vec!["a".to_string()];
    let (mut feed, reporter, _cancel) = feed_for(&names);
    let (_keys, mut inputs) = unbounded_channel();
    let mut view = View::new("load", &names, None);
    drop(reporter);
    let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
    let mut ui = UiState::new(false);
    tokio::time::timeout(
        Duration::from_secs(5),
        run_app(
            &mut terminal,
            &mut feed,
            &mut view,
            &mut ui,
            &mut inputs,
            None,
        ),
    )
    .await
    .expect("no engine, no dashboard")
    .unwrap();
    assert!(view.summary.is_none());
}

// ---------------------------------------------------------------------------
// The real binary in a tmux pane.

/// A transferring row with a percent above zero.
fn shows_progress(screen: &str) -> bool {
    screen.lines().any(|l| {
        l.contains("transferring")
            && l.split_whitespace().any(|w| {
                w.strip_suffix('%')
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_some_and(|p| p > 0)
            })
    })
}

fn write_random_image(path: &Path) {
    let mut data = vec![0u8; 64 * MIB as usize];
    fastrand::Rng::with_seed(7).fill(&mut data);
    std::fs::write(path, &data).unwrap();
}

#[test]
fn dashboard_in_a_terminal_cancels_with_q_y_runs_after_hooks_and_restores_the_terminal() {
    let rig = Rig::new(3);
    write_random_image(&rig.dir().join("images/lab.img"));
    let hooks: PathBuf = rig.dir().join("hooks.log");
    let layer = rig.dir().join("dash.conf");
    std::fs::write(
        &layer,
        format!(
            "[load]\nchunk_size = 1048576\nbefore = \"echo before {{name}} >> {0}\"\nafter = \"echo after {{name}} >> {0}\"\n",
            hooks.display()
        ),
    )
    .unwrap();
    let rc = rig.dir().join("rc");
    let mut cmd = rig.imaging();
    cmd.arg("--config")
        .arg(&layer)
        .args(["load", "-c", "-b", "4M", "-i", "lab.img", "1-3"]);
    let tmux = Tmux::new("dash");
    tmux.start(rig.dir(), &cmd, &rc, 120, 40);
    // Every node past its before hook and moving bytes.
    let screen = tmux.wait_for("progress on the dashboard", 60, |s| {
        ["node01", "node02", "node03"].iter().all(|n| {
            s.lines()
                .any(|l| l.contains(n) && l.contains("transferring"))
        }) && shows_progress(s)
    });
    eprintln!("the dashboard:\n{screen}");
    assert!(screen.contains("imaging load · lab.img 64 MiB"), "{screen}");
    assert_eq!(
        tmux.run(&["display", "-p", "-t", "dash", "#{alternate_on}"])
            .trim(),
        "1"
    );

    tmux.keys("q");
    tmux.wait_for("the cancel prompt", 20, |s| {
        s.contains("Cancel the run? y/n")
    });
    tmux.keys("y");
    let screen = tmux.wait_for("the final screen", 20, |s| s.contains("press any key"));
    eprintln!("the final screen:\n{screen}");
    assert!(screen.contains("cancelled:"), "{screen}");
    assert!(!rc.exists(), "the final screen waits for a key");
    tmux.keys("Enter");

    let code = tmux.exit_code(&rc, 20);
    let screen = tmux.capture();
    eprintln!("after the exit:\n{screen}");
    assert_eq!(code, 130, "exit code; the pane shows:\n{screen}");
    let log = std::fs::read_to_string(&hooks).unwrap_or_default();
    for n in ["node01", "node02", "node03"] {
        assert_eq!(log.matches(&format!("before {n}\n")).count(), 1, "{log}");
        assert_eq!(log.matches(&format!("after {n}\n")).count(), 1, "{log}");
    }
    // The terminal is given back, and the summary table printed on it.
    assert_eq!(
        tmux.run(&["display", "-p", "-t", "dash", "#{alternate_on}"])
            .trim(),
        "0"
    );
    assert!(
        screen.contains("NODE") && screen.contains("WRITTEN"),
        "{screen}"
    );
    assert!(
        row_with(&screen, "node02").contains("cancelled"),
        "{screen}"
    );
}

// ---------------------------------------------------------------------------
// Benchmark: `cargo test --release --test dashboard -- --ignored --nocapture`

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture, preferably --release"]
fn bench_dashboard_with_500_busy_nodes_uses_under_10_percent_of_a_core() {
    use ratatui::backend::CrosstermBackend;
    use ratatui::{TerminalOptions, Viewport};

    const NODES: usize = 500;
    const RUN: Duration = Duration::from_secs(5);
    // Events per millisecond: 20 000 state and log events a second.
    const BURST: usize = 20;

    let names: Vec<String> = (1..=NODES).map(|i| format!("node{i:03}")).collect();
    let (mut feed, reporter, _cancel) = feed_for(&names);
    let board = feed.board.clone();
    let rss_before = rss_kib();
    let stop = Arc::new(AtomicBool::new(false));

    // Two threads bump every node's counters as fast as they can.
    let counters: Vec<_> = (0..2)
        .map(|t| {
            let (board, stop) = (board.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut updates = 0u64;
                let mut v = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    v += 4096;
                    for i in (t..NODES).step_by(2) {
                        board.set_progress(i, v, v, 1 << 40);
                        updates += 1;
                    }
                }
                updates
            })
        })
        .collect();
    // And a flood of events on the channel.
    let sent = Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, sent, reporter) = (stop.clone(), sent.clone(), reporter.clone());
        std::thread::spawn(move || {
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..BURST {
                    let node = k % NODES;
                    match k % 4 {
                        0 => reporter.state(node, NodeState::Transferring, None),
                        1 => reporter.state(node, NodeState::Syncing, None),
                        2 => reporter.state(
                            node,
                            NodeState::Transferring,
                            Some("resuming at chunk 12".into()),
                        ),
                        _ => reporter.log(Some(node), format!("node{node:03}: chunk {k} verified")),
                    }
                    k += 1;
                }
                sent.fetch_add(BURST as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    let (keys, mut inputs) = unbounded_channel();
    let ui_thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let backend = CrosstermBackend::new(std::io::sink());
            let mut terminal = Terminal::with_options(
                backend,
                TerminalOptions {
                    viewport: Viewport::Fixed(Rect::new(0, 0, 200, 50)),
                },
            )
            .unwrap();
            let mut view = View::new("load", &feed.info.names, feed.info.image.clone());
            let mut ui = UiState::new(true);
            let (cpu, wall) = (thread_cpu(), Instant::now());
            run_app(
                &mut terminal,
                &mut feed,
                &mut view,
                &mut ui,
                &mut inputs,
                None,
            )
            .await
            .unwrap();
            let frames = terminal.get_frame().count();
            (thread_cpu() - cpu, wall.elapsed(), frames)
        })
    });

    std::thread::sleep(RUN);
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    let updates: u64 = counters.into_iter().map(|t| t.join().unwrap()).sum();
    reporter.finish();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ui_thread.is_finished() {
        assert!(Instant::now() < deadline, "the dashboard did not end");
        let _ = keys.send(Input::Key(key(KeyCode::Enter)));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (cpu, wall, frames) = ui_thread.join().unwrap();
    let rss_after = rss_kib();
    let share = cpu.as_secs_f64() / wall.as_secs_f64();
    eprintln!(
        "dashboard, {NODES} nodes, 200x50: {frames} frames in {wall:.2?}, UI thread CPU {cpu:.2?} = {:.1}% of a core; \
         {} events, {:.1} M counter updates; RSS {rss_before} KiB -> {rss_after} KiB",
        share * 100.0,
        sent.load(Ordering::Relaxed),
        updates as f64 / 1e6,
    );
    assert!(frames >= 25, "only {frames} frames drawn");
    // The 10% budget is for the release build users run; unoptimised
    // ratatui alone takes about 6% here.
    let budget = if cfg!(debug_assertions) { 0.25 } else { 0.10 };
    assert!(
        share < budget,
        "the dashboard used {:.1}% of a core (budget {:.0}%)",
        share * 100.0,
        budget * 100.0
    );
}
