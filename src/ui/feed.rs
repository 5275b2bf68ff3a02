//! What a front end gets: the run's description ([`RunInfo`]) and its
//! events, board and canceller ([`Feed`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::cancel::Canceller;
use crate::engine::events::Event;
use crate::engine::report::Board;

use super::view::ImageHeader;

/// What a front end knows about the run besides the events.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub command: String,
    /// The node of each row (a row per node, or per node and image).
    pub names: Vec<String>,
    /// `load` of several images: the image of each row (a row per node and
    /// image); empty otherwise.
    pub row_images: Vec<String>,
    pub verbose: bool,
    pub image: Option<ImageHeader>,
    /// Where every event is also appended.
    pub log_path: Option<PathBuf>,
    /// `--no-wait`: the dashboard leaves when the run ends, without a key.
    pub no_wait: bool,
}

impl RunInfo {
    /// The image of row `i`, when rows are per node and image.
    pub fn row_image(&self, i: usize) -> Option<&str> {
        self.row_images.get(i).map(String::as_str)
    }

    /// What names row `i` on screen: `fit01`, or `fit01:base.qcow2` when
    /// rows are per node and image.
    pub fn label(&self, i: usize) -> String {
        let name = self.names.get(i).map(String::as_str).unwrap_or_default();
        match self.row_image(i) {
            Some(image) => format!("{name}:{image}"),
            None => name.to_string(),
        }
    }

    /// How many images the rows are about: 0 unless a row per node and image.
    pub fn image_count(&self) -> usize {
        let mut images: Vec<&String> = self.row_images.iter().collect();
        images.sort();
        images.dedup();
        images.len()
    }

    pub fn labels(&self) -> Vec<String> {
        (0..self.names.len()).map(|i| self.label(i)).collect()
    }
}

/// Everything a front end gets.
pub struct Feed {
    pub info: RunInfo,
    pub board: Arc<Board>,
    pub events: UnboundedReceiver<Event>,
    pub canceller: Canceller,
    pub started: Instant,
}
