//! The run log: every event of every run, appended with a timestamp, one
//! JSON object per line, in the user's state dir (or `--log FILE`).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::feed::RunInfo;
use super::view::View;
use crate::engine::events::Event;

pub struct LogFile {
    path: PathBuf,
    file: std::fs::File,
    run: String,
}

/// `~/.local/state/imaging/imaging.log` on Linux.
pub fn default_path() -> Option<PathBuf> {
    let dirs = directories::ProjectDirs::from("", "", "imaging")?;
    let dir = dirs.state_dir().unwrap_or_else(|| dirs.data_local_dir());
    Some(dir.join("imaging.log"))
}

impl LogFile {
    /// None (and a warning) if the file cannot be opened: a run is never
    /// refused because its log cannot be written.
    pub fn open(path: &Path) -> Option<Self> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(file) => Some(LogFile {
                path: path.to_path_buf(),
                file,
                run: format!(
                    "{}-{}",
                    chrono::Local::now().format("%Y%m%dT%H%M%S"),
                    std::process::id()
                ),
            }),
            Err(e) => {
                eprintln!(
                    "imaging: warning: cannot write the log {}: {e}",
                    path.display()
                );
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, mut value: serde_json::Value) {
        if let Some(obj) = value.as_object_mut() {
            let mut line = serde_json::Map::new();
            line.insert("ts".into(), super::fmt::timestamp().into());
            line.insert("run".into(), self.run.clone().into());
            line.extend(std::mem::take(obj));
            *obj = line;
        }
        let _ = writeln!(self.file, "{value}");
    }

    pub fn start(&mut self, info: &RunInfo) {
        let args: Vec<String> = std::env::args().collect();
        let mut start = serde_json::json!({
            "event": "start", "command": info.command, "nodes": info.names, "argv": args,
            "image": info.image.as_ref().map(|i| &i.name),
        });
        if !info.row_images.is_empty() {
            // A row per node and image: each node and each image once.
            let mut nodes = info.names.clone();
            nodes.dedup();
            let mut images: Vec<String> = Vec::new();
            for image in &info.row_images {
                if !images.contains(image) {
                    images.push(image.clone());
                }
            }
            start["nodes"] = nodes.into();
            start["images"] = images.into();
        }
        self.write(start);
    }

    /// One JSON object of a run that prints its own output (`imaging on`).
    pub fn record(&mut self, value: serde_json::Value) {
        self.write(value);
    }

    pub fn event(&mut self, info: &RunInfo, _view: &View, event: &Event) {
        self.write(super::json::to_value(info, event));
    }
}
