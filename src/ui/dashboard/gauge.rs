//! The overall gauge: percent, bytes, and nodes finished.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Span;
use ratatui::widgets::Gauge;

use crate::engine::events::NodeState;
use crate::ui::fmt::human_bytes;
use crate::ui::view::View;

use super::progress::{has_bytes, overall_progress, percent};
use super::state::UiState;

pub(super) fn render_gauge(frame: &mut Frame, area: Rect, view: &View, ui: &UiState) {
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
