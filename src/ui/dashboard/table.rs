//! The node table: its columns at a given width, one row per node, each
//! with its own text gauge.

use ratatui::Frame;
use ratatui::layout::{Constraint, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table};

use crate::engine::events::NodeState;
use crate::ui::fmt::{human_bytes, human_duration, human_rate};
use crate::ui::view::{NodeView, View};

use super::layout::WIDE;
use super::progress::{has_bytes, node_percent};
use super::state::UiState;

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
pub(super) fn render_table(
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
