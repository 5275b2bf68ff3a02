//! `-c`: the full-screen dashboard. A header, an overall gauge, one row per
//! node, the latest log lines and a key help line, redrawn at 10 fps from
//! the shared [`View`]; events only update the view, so a flood of them
//! costs no drawing. `q` (or Esc, Ctrl-C) asks before cancelling the run;
//! the engines then stop their transfers and still run their `after` hooks.
//!
//! The terminal is given back on every way out: a guard restores it when
//! dropped, and a panic hook restores it before the panic is reported.
//! Rendering ([`render`]) is a pure function of the view and the
//! [`UiState`], and the loop ([`run_app`]) takes any ratatui backend, so
//! tests drive both on a `TestBackend`.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::backend::{Backend, CrosstermBackend};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, Gauge, Paragraph, Row, Table};
use ratatui::{Frame, Terminal};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::Feed;
use super::fmt::{human_bytes, human_duration, human_rate};
use super::lines::{self, Lines};
use super::logfile::LogFile;
use super::view::{NodeView, View};
use crate::engine::events::{Event, NodeState, Summary};

/// One frame every 100 ms (10 fps).
pub const FRAME: Duration = Duration::from_millis(100);
/// How long the key reader waits before checking whether it should stop.
const KEY_POLL: Duration = Duration::from_millis(100);
/// Events folded in per wake-up before the loop looks at its other inputs.
const EVENT_BATCH: usize = 4096;
/// Below this height, a run with more nodes than rows gives the log pane's
/// lines to the node table.
const SMALL_HEIGHT: u16 = 40;
/// From this width on, columns are long (full state labels, written / total).
const WIDE: u16 = 110;

/// What the loop gets besides engine events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Key(KeyEvent),
    Resize,
}

/// What a key asks the loop to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAction {
    /// Nothing beyond redrawing.
    None,
    /// The user confirmed cancelling the run.
    Cancel,
    /// The run is over and the user is done looking at it.
    Quit,
}

/// Everything the dashboard shows that is not in the [`View`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiState {
    /// Index of the first node row shown (among the rows the filter keeps).
    pub scroll: usize,
    /// `f`: only nodes that did not succeed (failed or not finished).
    pub only_unfinished: bool,
    /// `?`: the key help overlay.
    pub help: bool,
    /// `q`: "Cancel the run? y/n".
    pub confirm_cancel: bool,
    /// Cancel confirmed; the engines are stopping.
    pub cancelling: bool,
    /// Colours (off with `NO_COLOR`).
    pub color: bool,
    /// The screen drawn last: paging and scroll limits depend on it.
    pub area: Rect,
}

impl Default for UiState {
    fn default() -> Self {
        UiState::new(true)
    }
}

/// <https://no-color.org>: set and not empty turns colours off.
pub fn color_from_env() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

impl UiState {
    pub fn new(color: bool) -> Self {
        UiState {
            scroll: 0,
            only_unfinished: false,
            help: false,
            confirm_cancel: false,
            cancelling: false,
            color,
            area: Rect::new(0, 0, 80, 24),
        }
    }

    /// Node rows shown at the current size.
    pub fn page(&self, view: &View) -> usize {
        let shown = shown_nodes(view, self).len();
        Areas::new(self.area, shown).table_rows()
    }

    fn max_scroll(&self, view: &View) -> usize {
        shown_nodes(view, self)
            .len()
            .saturating_sub(self.page(view))
    }

    fn open_cancel_prompt(&mut self) {
        if !self.cancelling {
            self.confirm_cancel = true;
        }
    }

    /// Act on one key. `q`, Esc or Ctrl-C ask "Cancel the run? y/n" (in
    /// raw mode Ctrl-C is a key, not SIGINT); `y` (or Ctrl-C again) answers
    /// [`KeyAction::Cancel`]. Arrows, PgUp/PgDn, Home/End scroll, `f`
    /// filters, `?` shows the keys. On the final screen every other key is
    /// [`KeyAction::Quit`].
    pub fn on_key(&mut self, key: KeyEvent, view: &View) -> KeyAction {
        if key.kind == KeyEventKind::Release {
            return KeyAction::None;
        }
        let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL)
            && matches!(key.code, KeyCode::Char('c' | 'C'));
        let finished = view.summary.is_some();
        if self.confirm_cancel {
            // A second Ctrl-C confirms: people who hit it twice mean it.
            if ctrl_c || matches!(key.code, KeyCode::Char('y' | 'Y')) {
                self.confirm_cancel = false;
                self.cancelling = true;
                return KeyAction::Cancel;
            }
            if matches!(key.code, KeyCode::Char('n' | 'N' | 'q') | KeyCode::Esc) {
                self.confirm_cancel = false;
            }
            return KeyAction::None;
        }
        if self.help && !finished {
            self.help = false;
            if ctrl_c {
                self.open_cancel_prompt();
            }
            return KeyAction::None;
        }
        let page = self.page(view).max(1);
        let max = self.max_scroll(view);
        match key.code {
            KeyCode::Down => self.scroll = (self.scroll + 1).min(max),
            KeyCode::Up => self.scroll = self.scroll.saturating_sub(1).min(max),
            KeyCode::PageDown => self.scroll = (self.scroll + page).min(max),
            KeyCode::PageUp => self.scroll = self.scroll.saturating_sub(page).min(max),
            KeyCode::Home => self.scroll = 0,
            KeyCode::End => self.scroll = max,
            KeyCode::Char('f') => {
                self.only_unfinished = !self.only_unfinished;
                self.scroll = 0;
            }
            // The final screen stays until any other key.
            _ if finished => return KeyAction::Quit,
            KeyCode::Char('?') => self.help = true,
            KeyCode::Char('q') | KeyCode::Esc => self.open_cancel_prompt(),
            _ if ctrl_c => self.open_cancel_prompt(),
            _ => {}
        }
        KeyAction::None
    }

    fn fg(&self, color: Color) -> Style {
        if self.color {
            Style::new().fg(color)
        } else {
            Style::new()
        }
    }

    fn state_style(&self, state: NodeState) -> Style {
        self.fg(state_color(state))
    }
}

fn state_color(state: NodeState) -> Color {
    match state {
        NodeState::Ok | NodeState::Done | NodeState::UpToDate => Color::Green,
        NodeState::Failed | NodeState::Timeout => Color::Red,
        NodeState::Cancelled => Color::Yellow,
        NodeState::Transferring | NodeState::Syncing => Color::Cyan,
        NodeState::Preparing
        | NodeState::WaitingForSsh
        | NodeState::Connecting
        | NodeState::Checking => Color::Magenta,
        NodeState::Queued => Color::DarkGray,
    }
}

/// What a narrow screen counts nodes by.
fn kind(state: NodeState) -> &'static str {
    match state {
        NodeState::Queued => "queued",
        NodeState::Ok | NodeState::Done | NodeState::UpToDate => "ok",
        NodeState::Failed | NodeState::Timeout => "failed",
        NodeState::Cancelled => "cancelled",
        NodeState::Preparing
        | NodeState::WaitingForSsh
        | NodeState::Connecting
        | NodeState::Checking
        | NodeState::Transferring
        | NodeState::Syncing => "working",
    }
}

/// Indices of the nodes the table lists, in inventory order.
fn shown_nodes(view: &View, ui: &UiState) -> Vec<usize> {
    view.nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| !ui.only_unfinished || !n.state.is_success())
        .map(|(i, _)| i)
        .collect()
}

/// Where each part of the screen goes.
struct Areas {
    header: Rect,
    counts: Rect,
    gauge: Rect,
    table: Rect,
    /// Zero height when the node rows need the lines (compact layout).
    log: Rect,
    footer: Rect,
}

impl Areas {
    fn new(area: Rect, rows: usize) -> Areas {
        let h = area.height;
        let avail = h.saturating_sub(4);
        let need = u16::try_from(rows).unwrap_or(u16::MAX).saturating_add(1);
        let log_min = (h / 4).clamp(4, 12);
        let (table, log) = if need.saturating_add(log_min) <= avail {
            // Every node fits: the log pane takes the rest.
            (need, avail - need)
        } else if h < SMALL_HEIGHT {
            (avail, 0)
        } else {
            (avail.saturating_sub(log_min), log_min.min(avail))
        };
        let [header, counts, gauge, table, log, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Length(table),
            Constraint::Length(log),
            Constraint::Length(1),
        ])
        .areas(area);
        Areas {
            header,
            counts,
            gauge,
            table,
            log,
            footer,
        }
    }

    fn table_rows(&self) -> usize {
        usize::from(self.table.height.saturating_sub(1))
    }
}

/// Draw the whole dashboard.
pub fn render(frame: &mut Frame, view: &View, ui: &UiState) {
    let area = frame.area();
    let shown = shown_nodes(view, ui);
    let areas = Areas::new(area, shown.len());
    render_header(frame, areas.header, view, ui);
    render_counts(frame, areas.counts, view, ui);
    render_gauge(frame, areas.gauge, view, ui);
    let first = render_table(frame, areas.table, view, ui, &shown);
    if areas.log.height > 1 {
        render_log(frame, areas.log, view, ui);
    }
    let rows = areas.table_rows();
    render_footer(frame, areas.footer, view, ui, (first, rows, shown.len()));
    if ui.help {
        render_help(frame, area);
    }
    if ui.confirm_cancel {
        render_cancel_prompt(frame, area, ui);
    }
}

/// `left` at the left edge, `right` at the right edge when both fit.
fn render_split(frame: &mut Frame, area: Rect, left: Line, right: Line) {
    let right_width = u16::try_from(right.width())
        .unwrap_or(u16::MAX)
        .min(area.width);
    let [l, _, r] = Layout::horizontal([
        Constraint::Fill(1),
        Constraint::Length(1),
        Constraint::Length(right_width),
    ])
    .areas(area);
    frame.render_widget(Paragraph::new(left), l);
    frame.render_widget(Paragraph::new(right), r);
}

fn render_header(frame: &mut Frame, area: Rect, view: &View, ui: &UiState) {
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let mut left = vec![Span::styled(format!("imaging {}", view.command), bold)];
    if let Some(image) = &view.image {
        left.push(Span::raw(" · "));
        left.push(Span::styled(image.name.clone(), ui.fg(Color::Cyan)));
        left.push(Span::raw(format!(
            " {} ({} data)",
            human_bytes(image.size),
            human_bytes(image.data_size)
        )));
    }
    let n = view.nodes.len();
    left.push(Span::raw(format!(
        " · {n} node{}",
        if n == 1 { "" } else { "s" }
    )));
    if let Some(cap) = view.image.as_ref().map(|i| i.cap).filter(|&c| c > 0) {
        // The cap limits compressed bytes on the controller's links, not
        // the bytes the nodes write: say so where the rates are read.
        left.push(Span::raw(format!(" · wire ≤ {}", human_rate(cap as f64))));
    }
    let right = Line::from(format!("elapsed {}", human_duration(view.elapsed)));
    render_split(frame, area, Line::from(left), right);
}

/// "3 transferring  1 done  1 failed", each in its state's colour.
fn counts_line(counts: &[(String, usize, Style)]) -> Line<'static> {
    let mut spans = Vec::new();
    for (label, count, style) in counts {
        if !spans.is_empty() {
            spans.push(Span::raw("  "));
        }
        spans.push(Span::styled(format!("{count} {label}"), *style));
    }
    Line::from(spans)
}

/// Nodes per state; when that is too long for `width`, per kind of state
/// (queued, working, ok, failed, cancelled).
fn render_counts(frame: &mut Frame, area: Rect, view: &View, ui: &UiState) {
    let counts = view.counts();
    let by_state: Vec<(String, usize, Style)> = counts
        .iter()
        .map(|&(s, c)| (s.label().to_string(), c, ui.state_style(s)))
        .collect();
    let mut right = Vec::new();
    if view.summary.is_none() && has_bytes(view) {
        let (_, _, rate) = view.totals();
        match view.wire_text(true) {
            Some(_) => right.push(Span::raw(format!(
                "write {} · wire {}",
                human_rate(rate),
                human_rate(view.wire_rate)
            ))),
            None => right.push(Span::raw(human_rate(rate))),
        }
        if let Some(eta) = view.eta() {
            right.push(Span::raw(format!("  ETA {}", human_duration(eta))));
        }
    }
    let right = Line::from(right);
    let mut left = counts_line(&by_state);
    if left.width() + right.width() + 1 > usize::from(area.width) {
        // Each kind is shown as (and in the colour of) its first state.
        let kinds = [
            NodeState::Queued,
            NodeState::Transferring,
            NodeState::Done,
            NodeState::Failed,
            NodeState::Cancelled,
        ];
        let by_kind: Vec<(String, usize, Style)> = kinds
            .iter()
            .map(|&like| {
                let count = counts
                    .iter()
                    .filter(|(s, _)| kind(*s) == kind(like))
                    .map(|(_, c)| c)
                    .sum();
                (kind(like).to_string(), count, ui.state_style(like))
            })
            .filter(|(_, count, _)| *count > 0)
            .collect();
        left = counts_line(&by_kind);
    }
    render_split(frame, area, left, right);
}

/// `wait` moves no bytes: its rows have no gauges.
fn has_bytes(view: &View) -> bool {
    view.command != "wait"
}

/// `done` in hundredths of `all`, rounded down: 100 only when complete.
fn percent(done: u64, all: u64) -> u64 {
    if all == 0 {
        return 0;
    }
    (u128::from(done.min(all)) * 100 / u128::from(all)) as u64
}

/// A node's percent, if known.
fn node_percent(n: &NodeView) -> Option<u64> {
    if n.state.is_success() {
        Some(100)
    } else if n.total == 0 {
        None
    } else {
        Some(percent(n.bytes_written, n.total))
    }
}

/// (done, all) for the overall gauge: bytes written over bytes to write, a
/// succeeded node counting as whole; nodes finished over all nodes while
/// nothing is known about bytes.
fn overall_progress(view: &View) -> (u64, u64) {
    let (mut done, mut all) = (0u64, 0u64);
    for n in &view.nodes {
        let size = n.total.max(n.bytes_written);
        all += size;
        done += if n.state.is_success() {
            size
        } else {
            n.bytes_written.min(size)
        };
    }
    if all == 0 || !has_bytes(view) {
        let finished = view.nodes.iter().filter(|n| n.state.is_final()).count();
        return (finished as u64, view.nodes.len() as u64);
    }
    (done, all)
}

fn render_gauge(frame: &mut Frame, area: Rect, view: &View, ui: &UiState) {
    let (done, all) = overall_progress(view);
    let fraction = if all == 0 {
        0.0
    } else {
        (done as f64 / all as f64).clamp(0.0, 1.0)
    };
    let finished = view.nodes.iter().filter(|n| n.state.is_final()).count();
    let mut label = format!(" {}%", percent(done, all));
    if has_bytes(view) {
        let (written, total, _) = view.totals();
        label.push_str(&format!(
            " · {} of {}",
            human_bytes(written),
            human_bytes(total)
        ));
    }
    let cancelled = view
        .summary
        .as_ref()
        .is_some_and(|s| s.nodes.iter().any(|n| n.state == NodeState::Cancelled));
    if cancelled {
        let ok = view.nodes.iter().filter(|n| n.state.is_success()).count();
        label.push_str(&format!(
            " · cancelled: {ok}/{} nodes succeeded ",
            view.nodes.len()
        ));
    } else {
        label.push_str(&format!(
            " · {finished}/{} nodes finished ",
            view.nodes.len()
        ));
    }
    let color = match &view.summary {
        Some(s) if s.ok => Color::Green,
        Some(_) => Color::Yellow,
        None => Color::Cyan,
    };
    let gauge = Gauge::default()
        .ratio(fraction)
        .use_unicode(true)
        .label(Span::styled(
            label,
            Style::new().add_modifier(Modifier::BOLD),
        ))
        .gauge_style(ui.fg(color));
    frame.render_widget(gauge, area);
}

/// Column widths for the node table at a given terminal width.
struct Columns {
    name: u16,
    state: u16,
    bar: u16,
    bytes: u16,
    wide: bool,
    with_bytes: bool,
}

const PCT: u16 = 4;
/// `human_rate` is at most "1023 MiB/s".
const RATE: u16 = 10;

impl Columns {
    fn new(width: u16, view: &View) -> Columns {
        let name = view
            .nodes
            .iter()
            .map(|n| n.name.chars().count())
            .max()
            .unwrap_or(4)
            .clamp(4, 24) as u16;
        let wide = width >= WIDE;
        let with_bytes = has_bytes(view);
        // `wait` has no byte columns: room for "waiting for ssh" whole.
        let state = if wide || !with_bytes { 15 } else { 12 };
        // `human_bytes` is at most 8 wide: "1023 MiB / 1023 MiB" when wide,
        // the bytes written otherwise.
        let bytes = if wide { 19 } else { 8 };
        let fixed = name + state + PCT + bytes + RATE + 6;
        let rest = width.saturating_sub(fixed);
        // The rest is shared by the gauge and the message, which gets more.
        let bar = if rest < 16 { 0 } else { (rest * 2 / 5).min(40) };
        Columns {
            name,
            state,
            bar,
            bytes,
            wide,
            with_bytes,
        }
    }

    fn constraints(&self) -> Vec<Constraint> {
        let mut c = vec![
            Constraint::Length(self.name),
            Constraint::Length(self.state),
        ];
        if self.with_bytes {
            if self.bar > 0 {
                c.push(Constraint::Length(self.bar));
            }
            c.extend([
                Constraint::Length(PCT),
                Constraint::Length(self.bytes),
                Constraint::Length(RATE),
            ]);
        }
        c.push(Constraint::Fill(1));
        c
    }

    fn header(&self) -> Row<'static> {
        let mut cells = vec![Cell::from("NODE"), Cell::from("STATE")];
        if self.with_bytes {
            if self.bar > 0 {
                cells.push(Cell::from("PROGRESS"));
            }
            cells.push(Cell::from(Line::from("%").right_aligned()));
            let bytes = if self.wide {
                "WRITTEN / TOTAL"
            } else {
                "WRITTEN"
            };
            cells.push(Cell::from(Line::from(bytes).right_aligned()));
            cells.push(Cell::from(Line::from("RATE").right_aligned()));
            cells.push(Cell::from("ETA / MESSAGE"));
        } else {
            cells.push(Cell::from("MESSAGE"));
        }
        Row::new(cells).style(Style::new().add_modifier(Modifier::BOLD))
    }

    fn row(&self, n: &NodeView, ui: &UiState) -> Row<'static> {
        let style = ui.state_style(n.state);
        let mut cells = vec![
            Cell::from(n.name.clone()),
            Cell::from(Span::styled(
                match n.state.label() {
                    long if long.len() > usize::from(self.state) => "wait ssh",
                    label => label,
                },
                style,
            )),
        ];
        let failed = matches!(n.state, NodeState::Failed | NodeState::Timeout);
        let last = match (&n.message, n.eta()) {
            (Some(m), _) => Span::styled(
                m.clone(),
                if failed {
                    ui.fg(Color::Red)
                } else {
                    Style::new()
                },
            ),
            (None, Some(eta)) if self.with_bytes => {
                Span::raw(format!("ETA {}", human_duration(eta)))
            }
            _ => Span::raw(""),
        };
        if self.with_bytes {
            let pct = node_percent(n);
            if self.bar > 0 {
                let fraction = if pct.is_some() { n.fraction() } else { 0.0 };
                cells.push(Cell::from(bar(fraction, self.bar, style, ui)));
            }
            let pct = pct.map(|p| format!("{p}%")).unwrap_or_default();
            cells.push(Cell::from(Line::from(pct).right_aligned()));
            let bytes = match (n.bytes_written, n.total) {
                (0, 0) => String::new(),
                (w, 0) => human_bytes(w),
                (w, t) if self.wide => format!("{} / {}", human_bytes(w), human_bytes(t)),
                (w, _) => human_bytes(w),
            };
            cells.push(Cell::from(Line::from(bytes).right_aligned()));
            let moving = matches!(n.state, NodeState::Transferring | NodeState::Syncing);
            let rate = if moving && n.rate >= 1.0 {
                human_rate(n.rate)
            } else {
                String::new()
            };
            cells.push(Cell::from(Line::from(rate).right_aligned()));
        }
        cells.push(Cell::from(last));
        Row::new(cells)
    }
}

/// A text gauge: eighth blocks for the done part, light shade for the rest.
fn bar(fraction: f64, width: u16, style: Style, ui: &UiState) -> Line<'static> {
    const EIGHTHS: [&str; 8] = ["", "▏", "▎", "▍", "▌", "▋", "▊", "▉"];
    let width = usize::from(width);
    let eighths = (fraction.clamp(0.0, 1.0) * (width * 8) as f64).floor() as usize;
    let (full, part) = (eighths / 8, eighths % 8);
    let mut done = "█".repeat(full);
    done.push_str(EIGHTHS[part]);
    let used = full + usize::from(part > 0);
    Line::from(vec![
        Span::styled(done, style),
        Span::styled("░".repeat(width - used), ui.fg(Color::DarkGray)),
    ])
}

/// The node table; returns the index (among shown rows) of the first row.
fn render_table(
    frame: &mut Frame,
    area: Rect,
    view: &View,
    ui: &UiState,
    shown: &[usize],
) -> usize {
    if area.height == 0 {
        return 0;
    }
    let columns = Columns::new(area.width, view);
    let page = usize::from(area.height - 1);
    let first = ui.scroll.min(shown.len().saturating_sub(page));
    let rows: Vec<Row> = shown
        .iter()
        .skip(first)
        .take(page)
        .map(|&i| columns.row(&view.nodes[i], ui))
        .collect();
    if rows.is_empty() && ui.only_unfinished {
        frame.render_widget(
            Paragraph::new(vec![
                Line::from(""),
                Line::from("  every node succeeded (f shows them all)"),
            ]),
            area,
        );
        return 0;
    }
    let table = Table::new(rows, columns.constraints())
        .header(columns.header())
        .column_spacing(1);
    frame.render_widget(table, area);
    first
}

fn render_log(frame: &mut Frame, area: Rect, view: &View, ui: &UiState) {
    let mut block = Block::new()
        .borders(Borders::TOP)
        .border_style(ui.fg(Color::DarkGray))
        .title(Span::styled(
            " log ",
            Style::new().add_modifier(Modifier::BOLD),
        ));
    if let Some(path) = &view.log_path {
        block = block.title(Line::from(format!(" {path} ")).right_aligned());
    }
    let inner = block.inner(area);
    let lines: Vec<Line> = view
        .log
        .iter()
        .skip(view.log.len().saturating_sub(usize::from(inner.height)))
        .map(|l| {
            let text = if l.is_error {
                Span::styled(l.text.clone(), ui.fg(Color::Red))
            } else {
                Span::raw(l.text.clone())
            };
            Line::from(vec![
                Span::styled(
                    format!("{:>6} ", human_duration(l.at)),
                    ui.fg(Color::DarkGray),
                ),
                text,
            ])
        })
        .collect();
    frame.render_widget(block, area);
    frame.render_widget(Paragraph::new(lines), inner);
}

/// "done: 11 ok, 1 failed"
fn outcome(summary: &Summary, cancelled: bool) -> String {
    let ok = summary
        .nodes
        .iter()
        .filter(|n| n.state.is_success())
        .count();
    let failed = summary
        .nodes
        .iter()
        .filter(|n| matches!(n.state, NodeState::Failed | NodeState::Timeout))
        .count();
    let stopped = summary.nodes.len() - ok - failed;
    let mut text = format!("{}: {ok} ok", if cancelled { "cancelled" } else { "done" });
    if failed > 0 {
        text.push_str(&format!(", {failed} failed"));
    }
    if stopped > 0 {
        text.push_str(&format!(", {stopped} cancelled"));
    }
    text
}

fn render_footer(
    frame: &mut Frame,
    area: Rect,
    view: &View,
    ui: &UiState,
    (first, page, shown): (usize, usize, usize),
) {
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let left = if let Some(summary) = &view.summary {
        let color = if summary.ok { Color::Green } else { Color::Red };
        Line::from(vec![
            Span::styled(outcome(summary, ui.cancelling), ui.fg(color).patch(bold)),
            Span::styled(" — press any key", bold),
        ])
    } else if ui.cancelling {
        Line::from(Span::styled(
            "cancelling… stopping transfers, running after hooks",
            ui.fg(Color::Yellow).patch(bold),
        ))
    } else if ui.confirm_cancel {
        Line::from("y cancel the run · n keep going")
    } else {
        let filter = match (ui.only_unfinished, area.width >= WIDE) {
            (true, _) => "f all nodes",
            (false, true) => "f failed/unfinished",
            (false, false) => "f failed",
        };
        let scroll = if area.width >= WIDE {
            "↑↓ PgUp PgDn Home End scroll"
        } else {
            "↑↓ PgUp PgDn scroll"
        };
        Line::from(format!("q cancel  {scroll}  {filter}  ? help"))
    };
    let right = if shown > page && page > 0 {
        format!("{}-{} of {shown}", first + 1, (first + page).min(shown))
    } else if ui.only_unfinished {
        format!("{shown} of {}", view.nodes.len())
    } else {
        String::new()
    };
    render_split(frame, area, left, Line::from(right));
}

/// A box of `width` x `height` in the middle of `area`, clipped to it.
fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let width = width.min(area.width);
    let height = height.min(area.height);
    Rect::new(
        area.x + (area.width - width) / 2,
        area.y + (area.height - height) / 2,
        width,
        height,
    )
}

const HELP: [(&str, &str); 8] = [
    ("↑ ↓", "scroll one node"),
    ("PgUp PgDn", "scroll one page"),
    ("Home End", "first / last node"),
    ("f", "only failed or unfinished nodes"),
    ("q Esc Ctrl-C", "cancel the run (asks first)"),
    ("", "  transfers stop, after hooks still run"),
    ("?", "this help"),
    ("", "any key closes it"),
];

fn render_help(frame: &mut Frame, area: Rect) {
    let lines: Vec<Line> = HELP
        .iter()
        .map(|(key, what)| {
            Line::from(vec![
                Span::styled(
                    format!(" {key:<13}"),
                    Style::new().add_modifier(Modifier::BOLD),
                ),
                Span::raw(*what),
            ])
        })
        .collect();
    let height = lines.len() as u16 + 2;
    let rect = centered(area, 56, height);
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" keys ")),
        rect,
    );
}

fn render_cancel_prompt(frame: &mut Frame, area: Rect, ui: &UiState) {
    let rect = centered(area, 46, 5);
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let lines = vec![
        Line::from(Span::styled("Cancel the run? y/n", bold)).centered(),
        Line::from("Transfers stop; after hooks still run.").centered(),
        Line::from("y cancel · n or Esc keep going").centered(),
    ];
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().border_style(ui.fg(Color::Yellow))),
        rect,
    );
}

fn draw<B: Backend>(
    terminal: &mut Terminal<B>,
    view: &View,
    ui: &mut UiState,
) -> Result<(), B::Error> {
    terminal.draw(|frame| {
        ui.area = frame.area();
        render(frame, view, ui);
    })?;
    Ok(())
}

/// Fold one engine event into the view (and the run log).
fn fold(feed: &Feed, view: &mut View, log: &mut Option<&mut LogFile>, event: &Event) {
    if matches!(event, Event::Finished(_)) {
        view.sample(&feed.board, feed.started.elapsed());
    }
    view.apply(event);
    if let Some(log) = log {
        log.event(&feed.info, view, event);
    }
}

/// The dashboard's loop on any backend: engine events update the view, a
/// 10 fps tick samples the board and draws, keys act. After the run's
/// [`Event::Finished`], the final screen stays until a key; returns then
/// (or when the events end without one).
pub async fn run_app<B: Backend>(
    terminal: &mut Terminal<B>,
    feed: &mut Feed,
    view: &mut View,
    ui: &mut UiState,
    inputs: &mut UnboundedReceiver<Input>,
    mut log: Option<&mut LogFile>,
) -> Result<(), B::Error> {
    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut inputs_open = true;
    let mut dirty = true;
    loop {
        let running = view.summary.is_none();
        tokio::select! {
            event = feed.events.recv(), if running => {
                let Some(event) = event else {
                    draw(terminal, view, ui)?;
                    return Ok(());
                };
                fold(feed, view, &mut log, &event);
                // Take what else is queued now: one wake-up per burst.
                for _ in 0..EVENT_BATCH {
                    if view.summary.is_some() {
                        break;
                    }
                    match feed.events.try_recv() {
                        Ok(event) => fold(feed, view, &mut log, &event),
                        Err(_) => break,
                    }
                }
                if view.summary.is_some() {
                    ui.confirm_cancel = false;
                    ui.help = false;
                    draw(terminal, view, ui)?;
                    dirty = false;
                    if !inputs_open || feed.info.no_wait {
                        return Ok(());
                    }
                }
            }
            _ = tick.tick() => {
                if running {
                    view.sample(&feed.board, feed.started.elapsed());
                    // A SIGINT from elsewhere (`kill -INT`) cancels too.
                    ui.cancelling |= feed.canceller.is_cancelled();
                    dirty = true;
                }
                if dirty {
                    draw(terminal, view, ui)?;
                    dirty = false;
                }
            }
            input = inputs.recv(), if inputs_open => {
                match input {
                    None => {
                        // No keys any more: nobody can dismiss the final screen.
                        inputs_open = false;
                        if !running {
                            return Ok(());
                        }
                    }
                    Some(Input::Resize) => dirty = true,
                    Some(Input::Key(key)) => {
                        match ui.on_key(key, view) {
                            KeyAction::Cancel => feed.canceller.cancel(),
                            KeyAction::Quit => return Ok(()),
                            KeyAction::None => {}
                        }
                        dirty = true;
                    }
                }
            }
        }
    }
}

/// Whether our terminal state is in force (the panic hook restores it once).
static ACTIVE: AtomicBool = AtomicBool::new(false);
static PANIC_HOOK: Once = Once::new();

fn restore_terminal() {
    let _ = crossterm::terminal::disable_raw_mode();
    let _ = crossterm::execute!(
        io::stdout(),
        crossterm::terminal::LeaveAlternateScreen,
        crossterm::cursor::Show
    );
}

/// The terminal in raw mode on the alternate screen; dropping it gives the
/// terminal back as it was.
struct Screen {
    terminal: Terminal<CrosstermBackend<io::Stdout>>,
}

struct ScreenGuard;

impl Drop for ScreenGuard {
    fn drop(&mut self) {
        if ACTIVE.swap(false, Ordering::SeqCst) {
            restore_terminal();
        }
    }
}

impl Screen {
    fn enter() -> io::Result<(Screen, ScreenGuard)> {
        // Chained in front of color-eyre's hook (installed by main), so a
        // panic report lands on a usable terminal.
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if ACTIVE.swap(false, Ordering::SeqCst) {
                    restore_terminal();
                }
                previous(info);
            }));
        });
        ACTIVE.store(true, Ordering::SeqCst);
        // From here on, any failure restores through the guard.
        let guard = ScreenGuard;
        crossterm::terminal::enable_raw_mode()?;
        crossterm::execute!(
            io::stdout(),
            crossterm::terminal::EnterAlternateScreen,
            crossterm::cursor::Hide
        )?;
        let terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
        Ok((Screen { terminal }, guard))
    }
}

/// Reads keys on its own thread (crossterm's reads block) and forwards
/// them; stops within [`KEY_POLL`] when dropped.
struct KeyReader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KeyReader {
    fn spawn(tx: UnboundedSender<Input>) -> io::Result<KeyReader> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("dashboard-keys".into())
            .spawn(move || {
                use crossterm::event::{Event as Term, poll, read};
                while !flag.load(Ordering::SeqCst) {
                    match poll(KEY_POLL) {
                        Ok(false) => continue,
                        Ok(true) => {}
                        Err(_) => return,
                    }
                    let input = match read() {
                        Ok(Term::Key(key)) => Input::Key(key),
                        Ok(Term::Resize(..)) => Input::Resize,
                        Ok(_) => continue,
                        Err(_) => return,
                    };
                    if tx.send(input).is_err() {
                        return;
                    }
                }
            })?;
        Ok(KeyReader {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for KeyReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The `-c` front end: take over the terminal, show the run until it is
/// over and a key is pressed, give the terminal back, then print the same
/// summary table as the plain lines.
pub async fn run(mut feed: Feed, mut view: View) -> Option<Summary> {
    let mut log = feed.info.log_path.as_deref().and_then(LogFile::open);
    view.log_path = log.as_ref().map(|l| l.path().display().to_string());
    if let Some(log) = &mut log {
        log.start(&feed.info);
    }
    let failure = match Screen::enter() {
        Ok((mut screen, guard)) => {
            let (tx, mut inputs) = unbounded_channel();
            // Without keys the final screen cannot wait for one: the
            // closed channel makes the loop return at the end instead.
            let keys = KeyReader::spawn(tx).ok();
            let mut ui = UiState::new(color_from_env());
            let result = run_app(
                &mut screen.terminal,
                &mut feed,
                &mut view,
                &mut ui,
                &mut inputs,
                log.as_mut(),
            )
            .await;
            drop(keys);
            drop(screen);
            drop(guard);
            result.err()
        }
        Err(e) => Some(e),
    };
    let mut out = io::stdout();
    // The screen is gone: the summary repeats every failure's reason.
    let mut plain = Lines::new(&feed.info).with_reasons();
    if let Some(e) = failure {
        // The run goes on; show it as plain lines.
        eprintln!("imaging: the dashboard failed ({e}); going on with plain lines");
        let mut tick = tokio::time::interval(lines::PROGRESS_EVERY);
        tick.tick().await;
        while view.summary.is_none() {
            tokio::select! {
                event = feed.events.recv() => {
                    let Some(event) = event else { break };
                    fold(&feed, &mut view, &mut log.as_mut(), &event);
                    if !matches!(event, Event::Finished(_)) {
                        let _ = plain.show(&mut out, &view, &event);
                    }
                }
                _ = tick.tick() => {
                    view.sample(&feed.board, feed.started.elapsed());
                    let _ = plain.progress(&mut out, &view);
                }
            }
        }
    }
    let summary = view.summary.clone()?;
    let _ = plain.show(&mut out, &view, &Event::Finished(summary.clone()));
    let _ = out.flush();
    Some(summary)
}
