//! Where each pane goes: the screen's areas at a given size, and the two
//! ways text and boxes are placed in an area.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::Line;
use ratatui::widgets::Paragraph;

/// Below this height, a run with more nodes than rows gives the log pane's
/// lines to the node table.
pub(super) const SMALL_HEIGHT: u16 = 40;
/// From this width on, columns are long (full state labels, written / total).
pub(super) const WIDE: u16 = 110;

/// Where each part of the screen goes.
pub(super) struct Areas {
    pub(super) header: Rect,
    pub(super) counts: Rect,
    pub(super) gauge: Rect,
    pub(super) table: Rect,
    /// Zero height when the node rows need the lines (compact layout).
    pub(super) log: Rect,
    pub(super) footer: Rect,
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

/// `left` at the left edge, `right` at the right edge when both fit.
pub(super) fn render_split(frame: &mut Frame, area: Rect, left: Line, right: Line) {
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

/// A box of `width` x `height` in the middle of `area`, clipped to it.
pub(super) fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let width = width.min(area.width);
    let height = height.min(area.height);
    Rect::new(
        area.x + (area.width - width) / 2,
        area.y + (area.height - height) / 2,
        width,
        height,
    )
}
