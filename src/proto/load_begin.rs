//! `LoadBegin`: what a load asks of the agent, as one struct, so that the
//! controller, the agent and the tests name its fields once.

use super::{ProtocolError, Reader, put_bytes};

/// A load's request: the target, the image's manifest and how to load it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadBegin {
    pub target: String,
    pub size: u64,
    pub chunk_size: u32,
    pub identity: u128,
    /// Rewrite everything: no stamp shortcut, every chunk needed.
    pub force: bool,
    /// Write to a block device even if it is mounted.
    pub force_mounted: bool,
    /// Ignore the stamp: check every chunk's digest (zero chunks too).
    pub verify: bool,
    /// Who asks, for the target's lock record: controller host, pid and
    /// command line.
    pub holder: String,
    pub digests: Vec<u128>,
    /// Bit i set: chunk i of the image is all zeros (never sent).
    pub zero: Vec<u8>,
    /// The image's file name, recorded in the target's stamp (provenance
    /// of later saves). Optional on the wire: absent decodes as "".
    pub image: String,
    /// The controller's user and host, recorded in the stamp. Optional
    /// on the wire, after `image`: absent decodes as "".
    pub user: String,
    pub host: String,
}

impl LoadBegin {
    pub(super) fn encode(&self, b: &mut Vec<u8>) {
        put_bytes(b, self.target.as_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.extend_from_slice(&self.identity.to_le_bytes());
        b.push(self.force as u8);
        b.push(self.force_mounted as u8);
        b.push(self.verify as u8);
        put_bytes(b, self.holder.as_bytes());
        b.extend_from_slice(&(self.digests.len() as u32).to_le_bytes());
        for d in &self.digests {
            b.extend_from_slice(&d.to_le_bytes());
        }
        put_bytes(b, &self.zero);
        put_bytes(b, self.image.as_bytes());
        put_bytes(b, self.user.as_bytes());
        put_bytes(b, self.host.as_bytes());
    }

    pub(super) fn decode(r: &mut Reader<'_>) -> Result<LoadBegin, ProtocolError> {
        let target = r.string("target")?;
        let size = r.u64("size")?;
        let chunk_size = r.u32("chunk_size")?;
        let identity = r.u128("identity")?;
        let force = r.bool("force")?;
        let force_mounted = r.bool("force_mounted")?;
        let verify = r.bool("verify")?;
        let holder = r.string("holder")?;
        let n = r.u32("digest count")? as usize;
        if n > r.remaining() / 16 {
            return Err(ProtocolError::Malformed(format!(
                "LoadBegin announces {n} digests but the frame holds fewer"
            )));
        }
        let mut digests = Vec::with_capacity(n);
        for _ in 0..n {
            digests.push(r.u128("digest")?);
        }
        Ok(LoadBegin {
            target,
            size,
            chunk_size,
            identity,
            force,
            force_mounted,
            verify,
            holder,
            digests,
            zero: r.bytes("zero bitmap")?,
            image: r.optional_string("image")?,
            user: r.optional_string("user")?,
            host: r.optional_string("host")?,
        })
    }
}
