//! `--json`: one object per line, each with an `"event"` field; the last
//! line is the summary of the contract.

use std::io::Write;
use std::time::Duration;

use serde_json::json;

use super::feed::RunInfo;
use super::view::View;
use crate::engine::events::Event;

/// How often progress objects are printed (one per node that moved).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// One event as a JSON object: `"event"` first, then `"ts"` (RFC 3339).
pub fn to_value(info: &RunInfo, event: &Event) -> serde_json::Value {
    let mut v = event_value(info, event);
    if let Some(obj) = v.as_object_mut() {
        let mut line = serde_json::Map::new();
        if let Some(kind) = obj.remove("event") {
            line.insert("event".into(), kind);
        }
        line.insert("ts".into(), super::fmt::timestamp().into());
        line.extend(std::mem::take(obj));
        *obj = line;
    }
    v
}

fn event_value(info: &RunInfo, event: &Event) -> serde_json::Value {
    let mut v = node_event_value(info, event);
    // A load of several images: which image a node's event is about.
    let row = match event {
        Event::State { node, .. } | Event::Progress { node, .. } => Some(*node),
        Event::Log { node, .. } => *node,
        Event::Finished(_) => None,
    };
    if let Some(image) = row.and_then(|i| info.row_image(i))
        && let Some(obj) = v.as_object_mut()
    {
        obj.insert("image".into(), image.into());
    }
    v
}

fn node_event_value(info: &RunInfo, event: &Event) -> serde_json::Value {
    let name = |i: &usize| info.names.get(*i).cloned().unwrap_or_default();
    match event {
        Event::State {
            node,
            state,
            message,
        } => json!({"event": "state", "node": name(node), "state": state, "message": message}),
        Event::Progress {
            node,
            bytes_sent,
            bytes_written,
            total,
        } => json!({
            "event": "progress", "node": name(node), "bytes_sent": bytes_sent,
            "bytes_written": bytes_written, "total": total
        }),
        Event::Log { node, text } => {
            json!({"event": "log", "node": node.as_ref().map(name), "text": text})
        }
        Event::Finished(summary) => {
            let mut v = serde_json::to_value(summary).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                // "event" first, like every other line.
                let mut with_event = serde_json::Map::new();
                with_event.insert("event".into(), "summary".into());
                with_event.extend(std::mem::take(obj));
                *obj = with_event;
            }
            v
        }
    }
}

pub fn show(out: &mut impl Write, info: &RunInfo, event: &Event) -> std::io::Result<()> {
    writeln!(out, "{}", to_value(info, event))?;
    out.flush()
}

/// One `progress` object per node still moving.
pub fn progress(out: &mut impl Write, info: &RunInfo, view: &View) -> std::io::Result<()> {
    for (i, n) in view.nodes.iter().enumerate() {
        if n.state.is_final() || n.total == 0 {
            continue;
        }
        let event = Event::Progress {
            node: i,
            bytes_sent: n.bytes_sent,
            bytes_written: n.bytes_written,
            total: n.total,
        };
        writeln!(out, "{}", to_value(info, &event))?;
    }
    out.flush()
}
