//! Colours: each state's, and none at all when `NO_COLOR` is set.

use ratatui::style::{Color, Style};

use crate::engine::events::NodeState;

use super::state::UiState;

impl UiState {
    pub(super) fn fg(&self, color: Color) -> Style {
        if self.color {
            Style::new().fg(color)
        } else {
            Style::new()
        }
    }

    pub(super) fn state_style(&self, state: NodeState) -> Style {
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
