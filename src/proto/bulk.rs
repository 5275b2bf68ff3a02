//! Reading a frame whose data ends it (a chunk, a piece of one) without
//! copying the data: the head is read and decoded first, then the data
//! straight into a buffer of its own, neither zeroed first nor copied out of
//! a body afterwards. At hundreds of MB/s on two cores, each pass over the
//! data is CPU an SSH cipher on the same cores does not get.

use std::io::{self, Read};

use super::cursor::Truncated;
use super::{
    Msg, ProtocolError, STREAM_CHUNK_TAG, STREAM_PIECE_TAG, body_error, body_len, length_error,
};

/// `Chunk`'s tag.
const CHUNK_TAG: u8 = 12;

/// For the messages whose data ends the frame: the bytes after the tag up
/// to and including the data's length.
fn data_head(tag: u8) -> Option<usize> {
    match tag {
        // index, codec, data length
        CHUNK_TAG | STREAM_CHUNK_TAG => Some(4 + 1 + 4),
        // index, codec, offset, total, data length
        STREAM_PIECE_TAG => Some(4 + 1 + 4 + 4 + 4),
        _ => None,
    }
}

/// [`super::read_msg`] for blocking readers (the agent), with the same
/// framing, limits and errors.
pub fn read_msg_sync<R: Read>(r: &mut R) -> Result<Msg, ProtocolError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(length_error)?;
    let len = body_len(len)?;
    let mut tag = [0u8];
    r.read_exact(&mut tag).map_err(|e| body_error(e, len))?;
    let Some(head) = data_head(tag[0]).filter(|&h| len > h) else {
        let mut body = vec![0u8; len];
        body[0] = tag[0];
        r.read_exact(&mut body[1..])
            .map_err(|e| body_error(e, len))?;
        return Msg::decode(&body);
    };
    let mut h = vec![0u8; 1 + head];
    h[0] = tag[0];
    r.read_exact(&mut h[1..]).map_err(|e| body_error(e, len))?;
    let n_at = h.len() - 4;
    let n = u32::from_le_bytes(h[n_at..].try_into().expect("4 bytes")) as usize;
    // The head as a message with no data; the data is put in below.
    h[n_at..].fill(0);
    let mut msg = Msg::decode(&h)?;
    // What decoding the whole body would say of a length that is not the rest.
    let rest = len - h.len();
    if n > rest {
        return Err(Truncated {
            what: "data".into(),
            need: n,
            left: rest,
        }
        .into());
    }
    if n < rest {
        return Err(ProtocolError::Malformed(format!(
            "{} has {} unexpected trailing bytes",
            msg.name(),
            rest - n
        )));
    }
    let mut data = Vec::with_capacity(n);
    r.take(n as u64)
        .read_to_end(&mut data)
        .map_err(|e| body_error(e, len))?;
    if data.len() != n {
        return Err(body_error(io::ErrorKind::UnexpectedEof.into(), len));
    }
    match &mut msg {
        Msg::Chunk { data: d, .. }
        | Msg::StreamChunk { data: d, .. }
        | Msg::StreamPiece { data: d, .. } => *d = data,
        other => {
            return Err(ProtocolError::Malformed(format!(
                "tag {} decoded as {}",
                tag[0],
                other.name()
            )));
        }
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    /// A reader that hands out one byte per read, as a slow pipe might.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some((&b, rest)) = self.0.split_first() else {
                return Ok(0);
            };
            if buf.is_empty() {
                return Ok(0);
            }
            buf[0] = b;
            self.0 = rest;
            Ok(1)
        }
    }

    /// The same frame read whole: what the reader must agree with.
    fn whole(body: &[u8]) -> Result<Msg, String> {
        Msg::decode(body).map_err(|e| e.to_string())
    }

    proptest! {
        /// A data-carrying frame, its data length right, short or long, and
        /// its codec byte anything: the reader gives what decoding the whole
        /// body gives, message or error, even one byte per read.
        #[test]
        fn agrees_with_decoding_the_whole_body(
            tag in prop::sample::select(vec![CHUNK_TAG, STREAM_CHUNK_TAG, STREAM_PIECE_TAG]),
            fields in prop::collection::vec(any::<u8>(), 13),
            codec in 0u8..3,
            data in prop::collection::vec(any::<u8>(), 0..300),
            skew in -3i64..3,
        ) {
            let fixed = if tag == STREAM_PIECE_TAG { 12 } else { 4 };
            let mut body = vec![tag];
            body.extend_from_slice(&fields[..4]);
            body.push(codec);
            body.extend_from_slice(&fields[4..4 + fixed - 4]);
            let n = (data.len() as i64 + skew).max(0) as u32;
            body.extend_from_slice(&n.to_le_bytes());
            body.extend_from_slice(&data);
            let frame = framed(&body);
            let fast = read_msg_sync(&mut &frame[..]).map_err(|e| e.to_string());
            prop_assert_eq!(&fast, &whole(&body));
            let slow = read_msg_sync(&mut Trickle(&frame)).map_err(|e| e.to_string());
            prop_assert_eq!(&slow, &whole(&body));
        }

        /// Any body at all, framed: never a panic, the same answer.
        #[test]
        fn any_frame_reads_as_it_decodes(body in prop::collection::vec(any::<u8>(), 1..64)) {
            let frame = framed(&body);
            let read = read_msg_sync(&mut &frame[..]).map_err(|e| e.to_string());
            prop_assert_eq!(read, whole(&body));
        }
    }

    #[test]
    fn a_stream_cut_inside_the_data_is_a_truncated_frame() {
        let msg = Msg::StreamPiece {
            index: 3,
            codec: crate::proto::Codec::Raw,
            offset: 0,
            total: 1000,
            data: vec![7; 1000],
        };
        let mut frame = framed(&msg.encode());
        assert_eq!(read_msg_sync(&mut &frame[..]).unwrap(), msg);
        frame.truncate(frame.len() - 1);
        let err = read_msg_sync(&mut &frame[..]).unwrap_err();
        assert!(err.to_string().contains("truncated frame"), "{err}");
    }
}
