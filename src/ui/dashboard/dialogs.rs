//! The boxes drawn over the screen: the key help and the cancel prompt.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph};

use super::layout::centered;
use super::state::UiState;

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

pub(super) fn render_help(frame: &mut Frame, area: Rect) {
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

pub(super) fn render_cancel_prompt(frame: &mut Frame, area: Rect, ui: &UiState) {
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
