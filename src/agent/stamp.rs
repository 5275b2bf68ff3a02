//! Load stamps: what a complete load leaves behind so the next load of the
//! same image can answer "up to date" without reading the target.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;

use std::fs::Metadata;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::agent::env::AgentEnv;
use crate::agent::error::AgentError;
use crate::agent::origin::Origin;
use crate::agent::target::{LoadRequest, Target};
use crate::proto::HeldImage;

/// What a complete load leaves behind, so the next load of the same image
/// onto an unchanged file can answer "up to date" without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Stamp {
    pub(super) identity: u128,
    pub(super) size: u64,
    pub(super) mtime_ns: i128,
    pub(super) inode: u64,
    pub(super) dev: u64,
    pub(super) target: String,
    /// The loaded image's name; "" if unknown. Not part of what makes a
    /// stamp match: the same identity under another name is the same data.
    pub(super) image: String,
    /// Where the load came from, for `status`; each "" if unknown (stamps
    /// written before these fields existed). None is part of what makes a
    /// stamp match.
    pub(super) origin: Origin,
    /// The chunk size the identity was computed with (0: not recorded):
    /// `status` compares it with the repository's image at that size.
    pub(super) chunk_size: u64,
}

/// The optional `key value` lines after `target`, in this order.
const OPTIONAL: [&str; 6] = ["image", "loaded_at", "host", "user", "tool", "chunk_size"];

/// One line per field: a value that cannot be one line is not kept.
fn one_line(value: &str) -> String {
    if value.contains(['\n', '\r']) {
        String::new()
    } else {
        value.to_string()
    }
}

impl Stamp {
    pub(super) fn of(meta: &Metadata, identity: u128, target: &str, image: &str) -> Stamp {
        Stamp {
            identity,
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            inode: meta.ino(),
            dev: meta.dev(),
            target: target.to_string(),
            image: one_line(image),
            origin: Origin::default(),
            chunk_size: 0,
        }
    }

    /// The same file state and image identity: what lets a load trust the
    /// target without reading it (names and provenance aside).
    pub(super) fn same_state(&self, other: &Stamp) -> bool {
        (
            self.identity,
            self.size,
            self.mtime_ns,
            self.inode,
            self.dev,
            &self.target,
        ) == (
            other.identity,
            other.size,
            other.mtime_ns,
            other.inode,
            other.dev,
            &other.target,
        )
    }

    /// Whether the file `meta` describes is still what this stamp saw
    /// (size, mtime, inode, device), known without reading it.
    pub(super) fn intact(&self, meta: &Metadata) -> bool {
        self.same_state(&Stamp::of(meta, self.identity, &self.target, ""))
    }

    fn optional(&self) -> [String; 6] {
        let o = &self.origin;
        let chunk_size = if self.chunk_size == 0 {
            String::new()
        } else {
            self.chunk_size.to_string()
        };
        [
            self.image.clone(),
            o.loaded_at.clone(),
            o.host.clone(),
            o.user.clone(),
            o.tool.clone(),
            chunk_size,
        ]
    }

    pub(super) fn encode(&self) -> String {
        let mut text = format!(
            "imaging-stamp 1\nidentity {:032x}\nsize {}\nmtime_ns {}\ninode {}\ndev {}\ntarget {}\n",
            self.identity, self.size, self.mtime_ns, self.inode, self.dev, self.target
        );
        for (key, value) in OPTIONAL.iter().zip(self.optional()) {
            if !value.is_empty() {
                text.push_str(&format!("{key} {value}\n"));
            }
        }
        text.push_str("end\n");
        text
    }

    /// Anything unexpected is no stamp.
    pub(super) fn decode(text: &str) -> Option<Stamp> {
        let mut lines = text.lines();
        if lines.next()? != "imaging-stamp 1" {
            return None;
        }
        let mut field = |name: &str| {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' '))
        };
        let mut stamp = Stamp {
            identity: u128::from_str_radix(field("identity")?, 16).ok()?,
            size: field("size")?.parse().ok()?,
            mtime_ns: field("mtime_ns")?.parse().ok()?,
            inode: field("inode")?.parse().ok()?,
            dev: field("dev")?.parse().ok()?,
            target: field("target")?.to_string(),
            image: String::new(),
            origin: Origin::default(),
            chunk_size: 0,
        };
        // Optional, in order (stamps written before they existed lack them).
        let mut values: [String; 6] = Default::default();
        let mut next = 0;
        let mut last = lines.next()?;
        while last != "end" {
            let (key, value) = last.split_once(' ')?;
            let k = next + OPTIONAL[next..].iter().position(|o| *o == key)?;
            values[k] = value.to_string();
            next = k + 1;
            last = lines.next()?;
        }
        let [image, loaded_at, host, user, tool, chunk_size] = values;
        if !chunk_size.is_empty() {
            stamp.chunk_size = chunk_size.parse().ok().filter(|&c| c > 0)?;
        }
        stamp.image = image;
        stamp.origin = Origin {
            loaded_at,
            host,
            user,
            tool,
        };
        lines.next().is_none().then_some(stamp)
    }
}

/// The stamp of one target file: `<stamp_dir>/<xxh3-128 of its path>.stamp`.
pub(super) struct StampFile {
    pub(super) path: PathBuf,
    /// The target's canonical path, recorded in the stamp.
    pub(super) key: String,
}

impl StampFile {
    pub(super) fn new(env: &AgentEnv, target: &Target) -> StampFile {
        StampFile::for_path(env, &target.name)
    }

    /// The stamp of the file at `name` (which need not exist).
    pub(super) fn for_path(env: &AgentEnv, name: &str) -> StampFile {
        let key = std::fs::canonicalize(name)
            .unwrap_or_else(|_| PathBuf::from(name))
            .to_string_lossy()
            .into_owned();
        let hash = xxhash_rust::xxh3::xxh3_128(Path::new(&key).as_os_str().as_bytes());
        StampFile {
            path: env.stamp_dir.join(format!("{hash:032x}.stamp")),
            key,
        }
    }

    pub(super) fn matches(&self, target: &Target, req: &LoadRequest) -> bool {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return false;
        };
        let Some(stamp) = Stamp::decode(&text) else {
            return false;
        };
        let Ok(meta) = target.file.metadata() else {
            return false;
        };
        stamp.size == req.layout.size
            && stamp.same_state(&Stamp::of(&meta, req.identity, &self.key, ""))
    }

    /// The stamp, if there is a readable one.
    pub(super) fn read(&self) -> Option<Stamp> {
        Stamp::decode(&std::fs::read_to_string(&self.path).ok()?)
    }

    /// What the stamp says was last loaded, whether or not the target
    /// changed since (a save records it as the image the node held).
    pub(super) fn held(&self) -> Option<HeldImage> {
        let stamp = Stamp::decode(&std::fs::read_to_string(&self.path).ok()?)?;
        Some(HeldImage {
            identity: stamp.identity,
            image: stamp.image,
        })
    }

    pub(super) fn remove(&self) -> Result<(), AgentError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AgentError::Target(format!(
                "cannot remove the load stamp {}: {e}",
                self.path.display()
            ))),
        }
    }

    /// Best effort: without a stamp the next load only reads more.
    pub(super) fn write(&self, target: &Target, req: &LoadRequest) {
        if let Err(e) = self.try_write(target, req) {
            eprintln!(
                "imaging agent: warning: cannot write the load stamp {}: {e}",
                self.path.display()
            );
        }
    }

    pub(super) fn try_write(&self, target: &Target, req: &LoadRequest) -> io::Result<()> {
        // Read after every write and the sync, so the stamp sees the final mtime.
        let meta = target.file.metadata()?;
        settle_past(&meta);
        let mut stamp = Stamp::of(&meta, req.identity, &self.key, &req.image);
        stamp.origin = Origin {
            loaded_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            host: one_line(&req.origin.host),
            user: one_line(&req.origin.user),
            tool: one_line(&req.origin.tool),
        };
        stamp.chunk_size = req.layout.chunk_size;
        crate::image::fileio::replace_atomically(&self.path, stamp.encode().as_bytes(), true)
    }
}

/// File times come from a clock that may lag by a tick: a write in the
/// same tick as the last load write could leave the mtime unchanged and the
/// stamp wrongly valid. Wait until any later write must get a later mtime
/// (git's "racy clean" problem). Loads end with an fsync, so this rarely waits.
pub(super) fn settle_past(meta: &Metadata) {
    const TICK_MARGIN: Duration = Duration::from_millis(25);
    const LONGEST_WAIT: Duration = Duration::from_millis(100);
    let Ok(mtime) = meta.modified() else {
        return;
    };
    if let Ok(ahead) = (mtime + TICK_MARGIN).duration_since(SystemTime::now()) {
        std::thread::sleep(ahead.min(LONGEST_WAIT));
    }
}

#[cfg(test)]
mod tests {

    use super::Stamp;
    use crate::agent::testkit::*;

    #[test]
    fn stamps_round_trip_and_garbage_is_no_stamp() {
        let stamp = Stamp {
            identity: u128::MAX - 5,
            size: 1 << 40,
            mtime_ns: -1_500_000_000,
            inode: 42,
            dev: 2049,
            target: "/var/lib/images/a b.img".into(),
            image: "ubuntu 24.04.img".into(),
            origin: super::Origin {
                loaded_at: "2026-12-02T18:13:44Z".into(),
                host: "gateway".into(),
                user: "alice smith".into(),
                tool: "imaging 0.1.0".into(),
            },
            chunk_size: 1 << 22,
        };
        assert_eq!(Stamp::decode(&stamp.encode()), Some(stamp.clone()));
        let text = stamp.encode();
        for cut in 0..text.len() - 1 {
            assert_eq!(Stamp::decode(&text[..cut]), None, "cut at {cut}");
        }
        assert_eq!(Stamp::decode(&format!("{text}extra\n")), None);
        assert_eq!(Stamp::decode(&text.replace("size", "SIZE")), None);
        // Stamps written before the optional lines existed still count.
        let older = text
            .lines()
            .filter(|l| {
                ![
                    "image ",
                    "loaded_at ",
                    "host ",
                    "user ",
                    "tool ",
                    "chunk_size ",
                ]
                .iter()
                .any(|k| l.starts_with(k))
            })
            .map(|l| format!("{l}\n"))
            .collect::<String>();
        assert_eq!(
            older,
            "imaging-stamp 1\nidentity fffffffffffffffffffffffffffffffa\nsize 1099511627776\n\
             mtime_ns -1500000000\ninode 42\ndev 2049\ntarget /var/lib/images/a b.img\nend\n"
        );
        let decoded = Stamp::decode(&older).unwrap();
        assert_eq!(
            (decoded.identity, decoded.image.as_str()),
            (stamp.identity, "")
        );
        assert_eq!(decoded.origin, super::Origin::default());
        assert!(decoded.same_state(&stamp));
        // One with the image line only (the previous format).
        let image_only = older.replace("end\n", "image x.img\nend\n");
        let decoded = Stamp::decode(&image_only).unwrap();
        assert_eq!(
            (decoded.image.as_str(), decoded.origin.host.as_str()),
            ("x.img", "")
        );
        // Out of order, repeated or unknown optional lines are no stamp.
        for bad in [
            text.replace("image ubuntu 24.04.img\n", "")
                .replace("end\n", "image x\nend\n"),
            text.replace("host gateway\n", "host gateway\nhost again\n"),
            text.replace("host gateway\n", "colour blue\n"),
            text.replace("chunk_size 4194304", "chunk_size many"),
        ] {
            assert_eq!(Stamp::decode(&bad), None, "{bad}");
        }
    }

    #[test]
    fn garbage_stamp_is_no_stamp_and_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rt", 0, 16);
        run(&env, &image.load(&target, false, &image.data_chunks()))
            .0
            .unwrap();
        let stamp = std::fs::read_dir(&env.stamp_dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::write(&stamp, b"\xff\xfe garbage").unwrap();
        let (result, replies) = run(&env, &image.load(&target, false, &[]));
        result.unwrap();
        assert_eq!(needed(&replies), (false, vec![0], 0));
        assert!(Stamp::decode(&std::fs::read_to_string(&stamp).unwrap()).is_some());
    }
}
