//! The footer line: the keys (or the run's outcome once it is over) and
//! which rows are shown.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};

use crate::engine::events::{NodeState, Summary};
use crate::ui::view::View;

use super::layout::{WIDE, render_split};
use super::state::UiState;

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

pub(super) fn render_footer(
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
