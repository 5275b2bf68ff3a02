//! The bodies of the status messages (`imaging status`): what a target
//! holds according to its stamp and its metadata, and a verify's result;
//! and of `imaging clean`'s request and report.

use crate::proto::cursor::{Cursor, Truncated};

/// A body that does not decode (the protocol module makes it a malformed
/// frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl From<Truncated> for Malformed {
    fn from(t: Truncated) -> Malformed {
        Malformed(t.to_string())
    }
}

fn put_bytes(b: &mut Vec<u8>, data: &[u8]) {
    b.extend_from_slice(&(data.len() as u32).to_le_bytes());
    b.extend_from_slice(data);
}

fn bool(r: &mut Cursor<'_>, what: &str) -> Result<bool, Malformed> {
    match r.u8(what)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(Malformed(format!("{what} is {v}, not 0 or 1"))),
    }
}

fn bytes(r: &mut Cursor<'_>, what: &str) -> Result<Vec<u8>, Malformed> {
    let n = r.u32(what)? as usize;
    Ok(r.take(n, what)?.to_vec())
}

fn string(r: &mut Cursor<'_>, what: &str) -> Result<String, Malformed> {
    String::from_utf8(bytes(r, what)?).map_err(|_| Malformed(format!("{what} is not UTF-8")))
}

/// What kind of file a target is, from `stat` (never opened).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Missing = 0,
    File = 1,
    Block = 2,
    /// A directory, a FIFO, …: not a usable target.
    Other = 3,
}

impl FileKind {
    fn from_u8(v: u8) -> Result<FileKind, Malformed> {
        Ok(match v {
            0 => FileKind::Missing,
            1 => FileKind::File,
            2 => FileKind::Block,
            3 => FileKind::Other,
            v => {
                return Err(Malformed(format!("unknown file kind {v}")));
            }
        })
    }
}

/// A target's stamp, every field of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StampInfo {
    pub identity: u128,
    /// "" in stamps that did not record it (older ones).
    pub image: String,
    pub loaded_at: String,
    pub host: String,
    pub user: String,
    pub tool: String,
    /// The file as the stamp saw it.
    pub size: u64,
    pub mtime_ns: i128,
    pub inode: u64,
    pub dev: u64,
    /// The canonical path the stamp was written for.
    pub target: String,
    /// The chunk size of `identity` (0: not recorded).
    pub chunk_size: u64,
}

/// One target in a StatusReport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetStatus {
    /// Which of StatusBegin's targets this answers (a pattern may give
    /// several, or none).
    pub query: u32,
    pub path: String,
    pub kind: FileKind,
    /// The file's length now (0 if missing; a block device's is not read).
    pub size: u64,
    pub stamp: Option<StampInfo>,
    /// The stamp's size, mtime, inode and device still match the file.
    pub intact: bool,
    /// Why the target could not be looked at ("" if it could).
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub targets: Vec<TargetStatus>,
    /// The agent's own read counter (`rchar` of `/proc/self/io`: bytes it
    /// read through read calls, any file or pipe) when it sent this, if the
    /// kernel tells it: lets a caller check that no target was read.
    pub rchar: Option<u64>,
}

/// Read one target and compare its chunks with an image's manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyBegin {
    pub target: String,
    pub size: u64,
    pub chunk_size: u32,
    pub identity: u128,
    /// Who asks, for the target's lock record.
    pub holder: String,
    pub digests: Vec<u128>,
    /// Bit i set: chunk i of the image is all zeros.
    pub zero: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyResult {
    pub chunks: u64,
    /// Chunks whose content differs from the image's.
    pub mismatched: u64,
    /// As in StatusReport, after the verify.
    pub rchar: Option<u64>,
    /// Bit i set: chunk i differs (`mismatched` bits in all), so that the
    /// controller can tell what a load would send (`load -n --verify`).
    pub differing: Vec<u8>,
}

/// Remove, from the directory of `pattern` (a target holding `{image}`),
/// the files imaging stamped whose image is not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanBegin {
    pub pattern: String,
    /// Image names to keep (matched against the file's `{image}` part and
    /// the stamp's image name, with or without `.img`).
    pub keep: Vec<String>,
    /// Report what would go, touch nothing.
    pub dry_run: bool,
    /// Who asks, for the lock record.
    pub holder: String,
}

/// What clean did (or would do) with one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CleanAction {
    Removed = 0,
    WouldRemove = 1,
    Kept = 2,
    /// Not removed although not kept: imaging did not write it, or it is
    /// in use, or removing it failed (the reason says which).
    Skipped = 3,
}

impl CleanAction {
    pub fn label(self) -> &'static str {
        match self {
            CleanAction::Removed => "removed",
            CleanAction::WouldRemove => "would remove",
            CleanAction::Kept => "kept",
            CleanAction::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanEntry {
    pub path: String,
    /// The stamp's image name ("" without a stamp, or an older one).
    pub image: String,
    pub action: CleanAction,
    /// Disk space the file takes (what removing it frees).
    pub bytes: u64,
    /// Why it was skipped ("" otherwise).
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanReport {
    pub entries: Vec<CleanEntry>,
}

impl CleanBegin {
    pub(super) fn encode(&self, b: &mut Vec<u8>) {
        put_bytes(b, self.pattern.as_bytes());
        b.extend_from_slice(&(self.keep.len() as u32).to_le_bytes());
        for k in &self.keep {
            put_bytes(b, k.as_bytes());
        }
        b.push(self.dry_run as u8);
        put_bytes(b, self.holder.as_bytes());
    }

    pub(super) fn decode(r: &mut Cursor<'_>) -> Result<CleanBegin, Malformed> {
        let pattern = string(r, "pattern")?;
        let n = r.u32("keep count")? as usize;
        if n > r.remaining() / 4 {
            return Err(Malformed(format!(
                "CleanBegin announces {n} kept images but the frame holds fewer"
            )));
        }
        let mut keep = Vec::with_capacity(n);
        for _ in 0..n {
            keep.push(string(r, "kept image")?);
        }
        Ok(CleanBegin {
            pattern,
            keep,
            dry_run: bool(r, "dry_run")?,
            holder: string(r, "holder")?,
        })
    }
}

impl CleanReport {
    pub(super) fn encode(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            put_bytes(b, e.path.as_bytes());
            put_bytes(b, e.image.as_bytes());
            b.push(e.action as u8);
            put_u64(b, e.bytes);
            put_bytes(b, e.reason.as_bytes());
        }
    }

    pub(super) fn decode(r: &mut Cursor<'_>) -> Result<CleanReport, Malformed> {
        let n = r.u32("entry count")? as usize;
        // Each entry takes at least 21 bytes.
        if n > r.remaining() / 21 {
            return Err(Malformed(format!(
                "CleanReport announces {n} entries but the frame holds fewer"
            )));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            entries.push(CleanEntry {
                path: string(r, "path")?,
                image: string(r, "image")?,
                action: match r.u8("action")? {
                    0 => CleanAction::Removed,
                    1 => CleanAction::WouldRemove,
                    2 => CleanAction::Kept,
                    3 => CleanAction::Skipped,
                    v => {
                        return Err(Malformed(format!("unknown clean action {v}")));
                    }
                },
                bytes: r.u64("bytes")?,
                reason: string(r, "reason")?,
            });
        }
        Ok(CleanReport { entries })
    }
}

fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_opt_u64(b: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => b.push(0),
        Some(v) => {
            b.push(1);
            put_u64(b, v);
        }
    }
}

fn opt_u64(r: &mut Cursor<'_>, what: &str) -> Result<Option<u64>, Malformed> {
    Ok(if bool(r, what)? {
        Some(r.u64(what)?)
    } else {
        None
    })
}

impl StatusReport {
    pub(super) fn encode(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&(self.targets.len() as u32).to_le_bytes());
        for t in &self.targets {
            b.extend_from_slice(&t.query.to_le_bytes());
            put_bytes(b, t.path.as_bytes());
            b.push(t.kind as u8);
            put_u64(b, t.size);
            match &t.stamp {
                None => b.push(0),
                Some(s) => {
                    b.push(1);
                    b.extend_from_slice(&s.identity.to_le_bytes());
                    for text in [&s.image, &s.loaded_at, &s.host, &s.user, &s.tool] {
                        put_bytes(b, text.as_bytes());
                    }
                    put_u64(b, s.size);
                    b.extend_from_slice(&s.mtime_ns.to_le_bytes());
                    put_u64(b, s.inode);
                    put_u64(b, s.dev);
                    put_bytes(b, s.target.as_bytes());
                    put_u64(b, s.chunk_size);
                }
            }
            b.push(t.intact as u8);
            put_bytes(b, t.error.as_bytes());
        }
        put_opt_u64(b, self.rchar);
    }

    pub(super) fn decode(r: &mut Cursor<'_>) -> Result<StatusReport, Malformed> {
        let n = r.u32("target count")? as usize;
        // Each entry takes at least 23 bytes.
        if n > r.remaining() / 23 {
            return Err(Malformed(format!(
                "StatusReport announces {n} targets but the frame holds fewer"
            )));
        }
        let mut targets = Vec::with_capacity(n);
        for _ in 0..n {
            let query = r.u32("query")?;
            let path = string(r, "path")?;
            let kind = FileKind::from_u8(r.u8("kind")?)?;
            let size = r.u64("size")?;
            let stamp = if bool(r, "stamp")? {
                Some(StampInfo {
                    identity: r.u128("identity")?,
                    image: string(r, "image")?,
                    loaded_at: string(r, "loaded_at")?,
                    host: string(r, "host")?,
                    user: string(r, "user")?,
                    tool: string(r, "tool")?,
                    size: r.u64("stamp size")?,
                    mtime_ns: r.u128("mtime_ns")? as i128,
                    inode: r.u64("inode")?,
                    dev: r.u64("dev")?,
                    target: string(r, "stamp target")?,
                    chunk_size: r.u64("chunk_size")?,
                })
            } else {
                None
            };
            targets.push(TargetStatus {
                query,
                path,
                kind,
                size,
                stamp,
                intact: bool(r, "intact")?,
                error: string(r, "error")?,
            });
        }
        Ok(StatusReport {
            targets,
            rchar: opt_u64(r, "rchar")?,
        })
    }
}

impl VerifyBegin {
    pub(super) fn encode(&self, b: &mut Vec<u8>) {
        put_bytes(b, self.target.as_bytes());
        put_u64(b, self.size);
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.extend_from_slice(&self.identity.to_le_bytes());
        put_bytes(b, self.holder.as_bytes());
        b.extend_from_slice(&(self.digests.len() as u32).to_le_bytes());
        for d in &self.digests {
            b.extend_from_slice(&d.to_le_bytes());
        }
        put_bytes(b, &self.zero);
    }

    pub(super) fn decode(r: &mut Cursor<'_>) -> Result<VerifyBegin, Malformed> {
        let target = string(r, "target")?;
        let size = r.u64("size")?;
        let chunk_size = r.u32("chunk_size")?;
        let identity = r.u128("identity")?;
        let holder = string(r, "holder")?;
        let n = r.u32("digest count")? as usize;
        if n > r.remaining() / 16 {
            return Err(Malformed(format!(
                "VerifyBegin announces {n} digests but the frame holds fewer"
            )));
        }
        let mut digests = Vec::with_capacity(n);
        for _ in 0..n {
            digests.push(r.u128("digest")?);
        }
        Ok(VerifyBegin {
            target,
            size,
            chunk_size,
            identity,
            holder,
            digests,
            zero: bytes(r, "zero bitmap")?,
        })
    }
}

impl VerifyResult {
    pub(super) fn encode(&self, b: &mut Vec<u8>) {
        put_u64(b, self.chunks);
        put_u64(b, self.mismatched);
        put_opt_u64(b, self.rchar);
        put_bytes(b, &self.differing);
    }

    pub(super) fn decode(r: &mut Cursor<'_>) -> Result<VerifyResult, Malformed> {
        Ok(VerifyResult {
            chunks: r.u64("chunks")?,
            mismatched: r.u64("mismatched")?,
            rchar: opt_u64(r, "rchar")?,
            differing: bytes(r, "differing bitmap")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Msg;

    fn samples() -> Vec<Msg> {
        let stamp = StampInfo {
            identity: u128::MAX - 1,
            image: "a.img".into(),
            loaded_at: "2026-12-02T18:13:44Z".into(),
            host: "gw".into(),
            user: "alice".into(),
            tool: "imaging 0.1.0".into(),
            size: 1 << 30,
            mtime_ns: -5,
            inode: 7,
            dev: 2049,
            target: "/t/a.img".into(),
            chunk_size: 1 << 20,
        };
        vec![
            Msg::StatusBegin {
                targets: vec!["/t/a.img".into(), "/t/{image}".into()],
            },
            Msg::StatusBegin { targets: vec![] },
            Msg::StatusReport(StatusReport {
                targets: vec![
                    TargetStatus {
                        query: 0,
                        path: "/t/a.img".into(),
                        kind: FileKind::File,
                        size: 1 << 30,
                        stamp: Some(stamp),
                        intact: true,
                        error: String::new(),
                    },
                    TargetStatus {
                        query: 1,
                        path: "/dev/sdz".into(),
                        kind: FileKind::Missing,
                        size: 0,
                        stamp: None,
                        intact: false,
                        error: "cannot stat: denied".into(),
                    },
                ],
                rchar: Some(1234),
            }),
            Msg::StatusReport(StatusReport {
                targets: vec![],
                rchar: None,
            }),
            Msg::VerifyBegin(VerifyBegin {
                target: "/t/a.img".into(),
                size: 3 << 20,
                chunk_size: 1 << 20,
                identity: 9,
                holder: "controller x".into(),
                digests: vec![1, 2, 3],
                zero: vec![0b010],
            }),
            Msg::VerifyProgress { bytes_checked: 77 },
            Msg::VerifyResult(VerifyResult {
                chunks: 3,
                mismatched: 1,
                rchar: Some(3 << 20),
                differing: vec![0b100],
            }),
            Msg::CleanBegin(CleanBegin {
                pattern: "/var/lib/libvirt/images/{image}".into(),
                keep: vec!["base.qcow2".into(), "web".into()],
                dry_run: true,
                holder: "controller x".into(),
            }),
            Msg::CleanReport(CleanReport {
                entries: vec![
                    CleanEntry {
                        path: "/i/old.img".into(),
                        image: "old.img".into(),
                        action: CleanAction::Removed,
                        bytes: 4096,
                        reason: String::new(),
                    },
                    CleanEntry {
                        path: "/i/other.img".into(),
                        image: String::new(),
                        action: CleanAction::Skipped,
                        bytes: 0,
                        reason: "not written by imaging".into(),
                    },
                ],
            }),
        ]
    }

    #[test]
    fn status_messages_round_trip_and_every_cut_is_an_error() {
        for msg in samples() {
            let body = msg.encode();
            assert_eq!(Msg::decode(&body).unwrap(), msg);
            for cut in 1..body.len() {
                assert!(Msg::decode(&body[..cut]).is_err(), "{msg:?} cut at {cut}");
            }
            let mut longer = body.clone();
            longer.push(0);
            assert!(Msg::decode(&longer).is_err());
        }
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        for tag in [50u8, 51, 56] {
            let body = [vec![tag], u32::MAX.to_le_bytes().to_vec()].concat();
            let e = Msg::decode(&body).unwrap_err().to_string();
            assert!(e.contains("announces"), "{e}");
        }
    }
}
