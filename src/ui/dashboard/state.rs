//! Everything the dashboard shows that is not in the view: scroll, filter,
//! dialogs, colours, and the size drawn last.

use ratatui::layout::Rect;

use crate::ui::view::View;

use super::layout::Areas;

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

    pub(super) fn max_scroll(&self, view: &View) -> usize {
        shown_nodes(view, self)
            .len()
            .saturating_sub(self.page(view))
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
