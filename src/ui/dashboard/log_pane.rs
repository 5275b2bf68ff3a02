//! The log pane: the latest log lines, errors in red, under the path of
//! the run's log file.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};

use crate::ui::fmt::human_duration;
use crate::ui::view::View;

use super::state::UiState;

pub(super) fn render_log(frame: &mut Frame, area: Rect, view: &View, ui: &UiState) {
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
