//! Where a saved image came from: a `.NAME.info` JSON sidecar beside the
//! image (next to its `.NAME.manifest`), written by `save`, shown by `list`
//! and logged by `load`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The provenance of one saved image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The node the image was read from.
    pub node: String,
    /// Its target (block device or file).
    pub target: String,
    /// When the save started, RFC 3339 with the controller's UTC offset.
    pub saved_at: String,
    /// Who ran the save, and on which controller host.
    pub user: String,
    pub host: String,
    /// What the node's target was last loaded with (its stamp); None when
    /// unknown (never loaded by imaging, or a block device).
    pub held: Option<Held>,
    /// The `save -m` comment.
    pub comment: Option<String>,
    /// The saved image's identity (hex) and size.
    pub identity: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The image's file name; None if the load that stamped it did not say.
    pub image: Option<String>,
    /// Its identity (hex).
    pub identity: String,
}

/// `.NAME.info` beside the image a path names (a symlink is followed, as
/// for manifests: an alias shares its image's provenance).
pub fn info_path(image: &Path) -> PathBuf {
    let is_link = fs::symlink_metadata(image).is_ok_and(|m| m.file_type().is_symlink());
    let real = match fs::canonicalize(image) {
        Ok(real) if is_link => real,
        _ => image.to_path_buf(),
    };
    sidecar(&real, "info")
}

/// `.NAME.<ext>` beside `image` (no symlink following).
pub fn sidecar(image: &Path, ext: &str) -> PathBuf {
    let name = image.file_name().unwrap_or(image.as_os_str());
    let mut hidden = std::ffi::OsString::from(".");
    hidden.push(name);
    hidden.push(".");
    hidden.push(ext);
    image.with_file_name(hidden)
}

/// The provenance of an image; None if it has none or it cannot be read
/// (a sidecar is informative, never a reason to refuse an image).
pub fn read(image: &Path) -> Option<Provenance> {
    let text = fs::read(info_path(image)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Write the provenance of `image` (atomically, replacing any).
pub fn write(image: &Path, provenance: &Provenance) -> io::Result<()> {
    let mut text = serde_json::to_vec_pretty(provenance).map_err(io::Error::other)?;
    text.push(b'\n');
    crate::image::manifest::write_atomic(&sidecar(image, "info"), &text)
}

impl Provenance {
    /// "saved from fit01 on 2026-11-28 10:03 by root@ctl, held ubuntu.img, comment: with nginx"
    pub fn describe(&self) -> String {
        let when = chrono::DateTime::parse_from_rfc3339(&self.saved_at)
            .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_else(|_| self.saved_at.clone());
        let held = match &self.held {
            None => "held no image known to imaging".to_string(),
            Some(Held {
                image: Some(name), ..
            }) => format!("held {name}"),
            Some(Held {
                image: None,
                identity,
            }) => format!("held an image of identity {identity}"),
        };
        let mut text = format!(
            "saved from {} on {when} by {}@{}, {held}",
            self.node, self.user, self.host
        );
        if let Some(comment) = &self.comment {
            text.push_str(&format!(", comment: {comment}"));
        }
        text
    }
}

/// The user running this process: `$USER`, `$LOGNAME`, else the uid.
pub fn current_user() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        // SAFETY: getuid cannot fail and has no preconditions.
        .unwrap_or_else(|| format!("uid {}", unsafe { libc::getuid() }))
}

/// This host's name.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it on success (and truncation is handled below).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Provenance {
        Provenance {
            node: "fit01".into(),
            target: "/dev/sda".into(),
            saved_at: "2026-11-28T10:03:41+01:00".into(),
            user: "alice".into(),
            host: "faraday".into(),
            held: Some(Held {
                image: Some("ubuntu.img".into()),
                identity: "00ff".into(),
            }),
            comment: Some("with nginx".into()),
            identity: "abcd".into(),
            size: 4096,
        }
    }

    #[test]
    fn sidecar_round_trips_beside_the_image_and_is_shared_by_aliases() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("gold.img");
        fs::write(&image, b"x").unwrap();
        assert_eq!(read(&image), None);
        write(&image, &sample()).unwrap();
        assert!(dir.path().join(".gold.img.info").is_file());
        assert_eq!(read(&image), Some(sample()));
        std::os::unix::fs::symlink("gold.img", dir.path().join("latest.img")).unwrap();
        assert_eq!(read(&dir.path().join("latest.img")), Some(sample()));
        // Garbage is no provenance, not an error.
        fs::write(dir.path().join(".gold.img.info"), b"{not json").unwrap();
        assert_eq!(read(&image), None);
    }

    #[test]
    fn description_names_node_date_who_held_and_comment() {
        let p = sample();
        assert_eq!(
            p.describe(),
            "saved from fit01 on 2026-11-28 10:03 by alice@faraday, held ubuntu.img, comment: with nginx"
        );
        let bare = Provenance {
            held: None,
            comment: None,
            ..sample()
        };
        assert_eq!(
            bare.describe(),
            "saved from fit01 on 2026-11-28 10:03 by alice@faraday, held no image known to imaging"
        );
        let unnamed = Provenance {
            held: Some(Held {
                image: None,
                identity: "00ff".into(),
            }),
            ..bare
        };
        assert!(
            unnamed
                .describe()
                .ends_with("held an image of identity 00ff")
        );
    }

    #[test]
    fn user_and_host_are_never_empty() {
        assert!(!current_user().is_empty());
        assert!(!host_name().is_empty());
    }
}
