//! Drawing: [`render`] is a pure function of the [`View`] and the
//! [`UiState`]; each pane draws itself in its own module (header, counts,
//! gauge, node table, log, footer), and the dialogs (help, cancel prompt)
//! go over them.

use ratatui::Frame;

use crate::ui::view::View;

use super::counts::render_counts;
use super::dialogs::{render_cancel_prompt, render_help};
use super::footer::render_footer;
use super::gauge::render_gauge;
use super::header::render_header;
use super::layout::Areas;
use super::log_pane::render_log;
use super::state::{UiState, shown_nodes};
use super::table::render_table;

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
