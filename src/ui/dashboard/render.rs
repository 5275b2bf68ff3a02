//! Drawing: [`render`] is a pure function of the [`View`] and the
//! [`UiState`], one function per pane (header, counts, gauge, node table,
//! log, footer) and the overlays (help, cancel prompt).

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, Gauge, Paragraph, Row, Table};

use crate::engine::events::{NodeState, Summary};
use crate::ui::fmt::human_duration;
use crate::ui::fmt::{human_bytes, human_rate};
use crate::ui::view::{NodeView, View};

use super::{SMALL_HEIGHT, UiState, WIDE};

impl UiState {
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
pub(super) fn shown_nodes(view: &View, ui: &UiState) -> Vec<usize> {
    view.nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| !ui.only_unfinished || !n.state.is_success())
        .map(|(i, _)| i)
        .collect()
}

/// Where each part of the screen goes.
pub(super) struct Areas {
    header: Rect,
    counts: Rect,
    gauge: Rect,
    table: Rect,
    /// Zero height when the node rows need the lines (compact layout).
    log: Rect,
    footer: Rect,
}

impl Areas {
    pub(super) fn new(area: Rect, rows: usize) -> Areas {
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

    pub(super) fn table_rows(&self) -> usize {
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
    left.push(Span::raw(view.scope()));
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
            " · cancelled: {ok}/{} {} succeeded ",
            view.nodes.len(),
            view.rows_word()
        ));
    } else {
        label.push_str(&format!(
            " · {finished}/{} {} finished ",
            view.nodes.len(),
            view.rows_word()
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
