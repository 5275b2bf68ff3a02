//! The counts line: nodes per state (or per kind of state on a narrow
//! screen), and the rates and ETA.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};

use crate::engine::events::NodeState;
use crate::ui::fmt::{human_duration, human_rate};
use crate::ui::view::View;

use super::layout::render_split;
use super::progress::has_bytes;
use super::state::UiState;

/// What a narrow screen counts nodes by.
fn kind(state: NodeState) -> &'static str {
    match state {
        NodeState::Queued => "queued",
        NodeState::Ok | NodeState::Done | NodeState::UpToDate => "ok",
        NodeState::Failed | NodeState::Timeout => "failed",
        NodeState::Cancelled => "cancelled",
        NodeState::Preparing
        | NodeState::WaitingForSsh
        | NodeState::Connecting
        | NodeState::Checking
        | NodeState::Transferring
        | NodeState::Syncing => "working",
    }
}

/// "3 transferring  1 done  1 failed", each in its state's colour.
fn counts_line(counts: &[(String, usize, Style)]) -> Line<'static> {
    let mut spans = Vec::new();
    for (label, count, style) in counts {
        if !spans.is_empty() {
            spans.push(Span::raw("  "));
        }
        spans.push(Span::styled(format!("{count} {label}"), *style));
    }
    Line::from(spans)
}

/// Nodes per state; when that is too long for `width`, per kind of state
/// (queued, working, ok, failed, cancelled).
pub(super) fn render_counts(frame: &mut Frame, area: Rect, view: &View, ui: &UiState) {
    let counts = view.counts();
    let by_state: Vec<(String, usize, Style)> = counts
        .iter()
        .map(|&(s, c)| (s.label().to_string(), c, ui.state_style(s)))
        .collect();
    let mut right = Vec::new();
    if view.summary.is_none() && has_bytes(view) {
        let (_, _, rate) = view.totals();
        match view.wire_text(true) {
            Some(_) => right.push(Span::raw(format!(
                "write {} · wire {}",
                human_rate(rate),
                human_rate(view.wire_rate)
            ))),
            None => right.push(Span::raw(human_rate(rate))),
        }
        if let Some(eta) = view.eta() {
            right.push(Span::raw(format!("  ETA {}", human_duration(eta))));
        }
    }
    let right = Line::from(right);
    let mut left = counts_line(&by_state);
    if left.width() + right.width() + 1 > usize::from(area.width) {
        // Each kind is shown as (and in the colour of) its first state.
        let kinds = [
            NodeState::Queued,
            NodeState::Transferring,
            NodeState::Done,
            NodeState::Failed,
            NodeState::Cancelled,
        ];
        let by_kind: Vec<(String, usize, Style)> = kinds
            .iter()
            .map(|&like| {
                let count = counts
                    .iter()
                    .filter(|(s, _)| kind(*s) == kind(like))
                    .map(|(_, c)| c)
                    .sum();
                (kind(like).to_string(), count, ui.state_style(like))
            })
            .filter(|(_, count, _)| *count > 0)
            .collect();
        left = counts_line(&by_kind);
    }
    render_split(frame, area, left, right);
}
