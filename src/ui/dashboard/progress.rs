//! How far the run and each node are: the figures the gauge, the node
//! rows and the counts share.

use crate::ui::view::{NodeView, View};

/// `wait` moves no bytes: its rows have no gauges.
pub(super) fn has_bytes(view: &View) -> bool {
    view.command != "wait"
}

/// `done` in hundredths of `all`, rounded down: 100 only when complete.
pub(super) fn percent(done: u64, all: u64) -> u64 {
    if all == 0 {
        return 0;
    }
    (u128::from(done.min(all)) * 100 / u128::from(all)) as u64
}

/// A node's percent, if known.
pub(super) fn node_percent(n: &NodeView) -> Option<u64> {
    if n.state.is_success() {
        Some(100)
    } else if n.total == 0 {
        None
    } else {
        Some(percent(n.bytes_written, n.total))
    }
}

/// (done, all) for the overall gauge: bytes written over bytes to write, a
/// succeeded node counting as whole; nodes finished over all nodes while
/// nothing is known about bytes.
pub(super) fn overall_progress(view: &View) -> (u64, u64) {
    let (mut done, mut all) = (0u64, 0u64);
    for n in &view.nodes {
        let size = n.total.max(n.bytes_written);
        all += size;
        done += if n.state.is_success() {
            size
        } else {
            n.bytes_written.min(size)
        };
    }
    if all == 0 || !has_bytes(view) {
        let finished = view.nodes.iter().filter(|n| n.state.is_final()).count();
        return (finished as u64, view.nodes.len() as u64);
    }
    (done, all)
}
