//! The header line: the command, the image, the nodes, the wire cap, and
//! the elapsed time.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};

use crate::ui::fmt::{human_bytes, human_duration, human_rate};
use crate::ui::view::View;

use super::layout::render_split;
use super::state::UiState;

pub(super) fn render_header(frame: &mut Frame, area: Rect, view: &View, ui: &UiState) {
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
