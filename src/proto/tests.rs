use super::*;

fn samples() -> Vec<Msg> {
    vec![
        Msg::hello(),
        Msg::Error {
            kind: ErrorKind::Target,
            message: "disk full".into(),
        },
        Msg::LoadBegin(LoadBegin {
            target: "/dev/sda".into(),
            size: 1 << 30,
            chunk_size: 4 << 20,
            identity: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
            force: true,
            force_mounted: false,
            verify: true,
            holder: "lab 42 imaging load".into(),
            digests: vec![1, 2, u128::MAX],
            zero: vec![0b101],
            image: "ubuntu.img".into(),
            user: "alice".into(),
            host: "gateway".into(),
        }),
        Msg::Needed {
            up_to_date: false,
            bitmap: vec![0xff, 0x01],
            bytes_written: 7,
            block_digests: 2,
        },
        Msg::BlockDigests {
            index: 9,
            digests: vec![0, 1, u64::MAX],
        },
        Msg::Patch {
            index: 9,
            blocks: vec![0b101],
            codec: Codec::Zstd,
            data: vec![3; 40],
        },
        Msg::Chunk {
            index: 3,
            codec: Codec::Zstd,
            data: vec![9; 100],
        },
        Msg::Written {
            index: 3,
            bytes_written: 1 << 22,
        },
        Msg::Finish,
        Msg::Finished { bytes_written: 99 },
        Msg::SaveBegin {
            target: "/tmp/x".into(),
            chunk_size: 1 << 20,
            level: 3,
            raw: true,
            holder: "lab 42 imaging save".into(),
        },
        Msg::SaveInfo {
            size: 12345,
            held: None,
        },
        Msg::SaveInfo {
            size: 12345,
            held: Some(HeldImage {
                identity: 0xfeed,
                image: "ubuntu.img".into(),
            }),
        },
        Msg::Note {
            text: "MBR partition 1: 10 of 20 blocks free, skipped".into(),
        },
        Msg::SaveChunk {
            index: 1,
            digest: 42,
            zero: false,
            codec: Codec::Raw,
            data: vec![1, 2, 3],
        },
        Msg::SaveEnd,
        Msg::RelayListen {
            secret: vec![7; RELAY_SECRET_LEN],
            bind: "0.0.0.0".into(),
            port_min: 7000,
            port_max: 7099,
        },
        Msg::RelayPort { port: 7001 },
        Msg::RelayConnect {
            secret: (0..32).collect(),
            addr: "192.0.2.7".into(),
            port: 7001,
            lossy: true,
        },
        Msg::RelayStats {
            forwarded: 1 << 40,
            blocked_ms: 7,
        },
        Msg::RelayLinked {
            addr: "192.0.2.7".into(),
            port: 7001,
        },
        Msg::RelayLost {
            peer: "127.0.0.1:7001".into(),
            reason: "successor stalled".into(),
        },
        Msg::RelayRefused {
            peer: "192.0.2.9:40000".into(),
            reason: "bad secret".into(),
        },
        Msg::StreamChunk {
            index: 4,
            codec: Codec::Raw,
            data: vec![8; 50],
        },
        Msg::StreamEnd,
        Msg::StreamPiece {
            index: 4,
            codec: Codec::Zstd,
            offset: 262144,
            total: 300000,
            data: vec![9; 30],
        },
        Msg::Missing {
            bitmap: vec![0, 0b100],
        },
        Msg::Replay {
            bitmap: vec![0b11, 0],
        },
    ]
}

#[test]
fn every_message_round_trips() {
    for m in samples() {
        assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
    }
}

/// `m` as peers that predate some of its optional trailing fields send it.
fn older_forms(m: &Msg) -> Vec<Msg> {
    match m {
        Msg::LoadBegin(begin) => {
            // The same message with its trailing fields as an older peer
            // leaves them: empty.
            let with = |image: &str, user: &str| {
                Msg::LoadBegin(LoadBegin {
                    image: image.into(),
                    user: user.into(),
                    host: String::new(),
                    ..begin.clone()
                })
            };
            let (image, user) = (&begin.image, &begin.user);
            let mut forms = vec![with("", ""), with(image, ""), with(image, user)];
            forms.retain(|f| f != m);
            forms
        }
        Msg::SaveInfo { size, .. } => vec![Msg::SaveInfo {
            size: *size,
            held: None,
        }],
        _ => vec![],
    }
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    for m in samples() {
        let body = m.encode();
        for cut in 0..body.len() {
            match Msg::decode(&body[..cut]) {
                Err(_) => {}
                // Cut exactly before the optional fields: an older peer's message.
                Ok(older) => assert!(
                    older_forms(&m).contains(&older),
                    "{} cut at {cut}",
                    m.name()
                ),
            }
        }
    }
}

#[test]
fn messages_of_older_peers_still_decode() {
    // LoadBegin without an image name, SaveInfo without what the target held.
    let mut begin = vec![10u8];
    put_bytes(&mut begin, b"/t");
    begin.extend_from_slice(&0u64.to_le_bytes());
    begin.extend_from_slice(&(1u32 << 20).to_le_bytes());
    begin.extend_from_slice(&7u128.to_le_bytes());
    // force, force_mounted, verify, then the holder.
    begin.extend_from_slice(&[0, 0, 0]);
    put_bytes(&mut begin, b"lab 42 imaging load");
    begin.extend_from_slice(&0u32.to_le_bytes());
    put_bytes(&mut begin, &[]);
    let Msg::LoadBegin(begin) = Msg::decode(&begin).unwrap() else {
        panic!("not a LoadBegin");
    };
    assert_eq!((begin.image.as_str(), begin.identity), ("", 7));
    let mut info = vec![21u8];
    info.extend_from_slice(&99u64.to_le_bytes());
    assert_eq!(
        Msg::decode(&info).unwrap(),
        Msg::SaveInfo {
            size: 99,
            held: None
        }
    );
}

#[test]
fn trailing_bytes_and_unknown_tags_are_refused() {
    let mut body = Msg::Finish.encode();
    body.push(0);
    assert!(
        Msg::decode(&body)
            .unwrap_err()
            .to_string()
            .contains("trailing")
    );
    assert!(
        Msg::decode(&[200])
            .unwrap_err()
            .to_string()
            .contains("unknown message tag 200")
    );
}

#[test]
fn huge_digest_count_is_refused_without_allocating() {
    let mut body = vec![10u8];
    put_bytes(&mut body, b"/t");
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&0u128.to_le_bytes());
    body.extend_from_slice(&[0, 0, 0]);
    put_bytes(&mut body, b"holder");
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    let err = Msg::decode(&body).unwrap_err().to_string();
    assert!(err.contains("digests"), "{err}");
}

#[test]
fn huge_block_digest_count_is_refused_without_allocating() {
    let mut body = vec![60u8];
    body.extend_from_slice(&3u32.to_le_bytes());
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    body.extend_from_slice(&7u64.to_le_bytes());
    let err = Msg::decode(&body).unwrap_err().to_string();
    assert!(err.contains("BlockDigests announces"), "{err}");
}

#[tokio::test]
async fn borrowed_chunk_frame_equals_the_encoded_message() {
    let data = vec![5u8; 1000];
    let mut a = Vec::new();
    write_chunk(&mut a, 9, Codec::Zstd, &data).await.unwrap();
    let mut b = Vec::new();
    write_msg(
        &mut b,
        &Msg::Chunk {
            index: 9,
            codec: Codec::Zstd,
            data,
        },
    )
    .await
    .unwrap();
    assert_eq!(a, b);
}

#[tokio::test]
async fn borrowed_stream_chunk_frame_equals_the_encoded_message() {
    let data = vec![6u8; 1000];
    let mut a = Vec::new();
    write_stream_chunk(&mut a, 11, Codec::Raw, None, &data)
        .await
        .unwrap();
    let mut b = Vec::new();
    write_msg(
        &mut b,
        &Msg::StreamChunk {
            index: 11,
            codec: Codec::Raw,
            data: data.clone(),
        },
    )
    .await
    .unwrap();
    assert_eq!(a, b);

    // The blocking one, also through a writer that takes a few bytes at a time.
    struct Dribble(Vec<u8>);
    impl io::Write for Dribble {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(7);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut c = Vec::new();
    write_stream_chunk_sync(&mut c, 11, Codec::Raw, None, &data).unwrap();
    assert_eq!(c, b);
    let mut d = Dribble(Vec::new());
    write_stream_chunk_sync(&mut d, 11, Codec::Raw, None, &data).unwrap();
    assert_eq!(d.0, b);

    // A piece of a chunk.
    let piece = Msg::StreamPiece {
        index: 11,
        codec: Codec::Zstd,
        offset: 500,
        total: 1500,
        data: data.clone(),
    };
    let mut e = Vec::new();
    write_msg(&mut e, &piece).await.unwrap();
    let mut f = Vec::new();
    write_stream_chunk(&mut f, 11, Codec::Zstd, Some((500, 1500)), &data)
        .await
        .unwrap();
    assert_eq!(f, e);
    let mut g = Dribble(Vec::new());
    write_stream_chunk_sync(&mut g, 11, Codec::Zstd, Some((500, 1500)), &data).unwrap();
    assert_eq!(g.0, e);
}

#[test]
fn relay_secrets_of_another_length_are_malformed() {
    for len in [0, 31, 33] {
        let listen = Msg::RelayListen {
            secret: vec![1; len],
            bind: String::new(),
            port_min: 0,
            port_max: 0,
        };
        let connect = Msg::RelayConnect {
            secret: vec![1; len],
            addr: "127.0.0.1".into(),
            port: 1,
            lossy: false,
        };
        for m in [listen, connect] {
            let err = Msg::decode(&m.encode()).unwrap_err();
            assert!(matches!(err, ProtocolError::Malformed(_)), "{err}");
            assert!(err.to_string().contains("secret"), "{err}");
        }
    }
}

#[tokio::test]
async fn oversized_frame_length_is_refused() {
    let mut input: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    let err = read_msg(&mut input).await.unwrap_err();
    assert!(matches!(err, ProtocolError::TooLarge(u32::MAX)), "{err}");
}

#[tokio::test]
async fn frames_stream_in_order() {
    let mut buf = Vec::new();
    for m in samples() {
        write_msg(&mut buf, &m).await.unwrap();
    }
    let mut r: &[u8] = &buf;
    for m in samples() {
        assert_eq!(read_msg(&mut r).await.unwrap(), m);
    }
    assert!(matches!(read_msg(&mut r).await, Err(ProtocolError::Closed)));
}

#[test]
fn sync_frames_stream_in_order_like_async_ones() {
    let mut buf = Vec::new();
    for m in samples() {
        write_msg_sync(&mut buf, &m).unwrap();
    }
    let mut r: &[u8] = &buf;
    for m in samples() {
        assert_eq!(read_msg_sync(&mut r).unwrap(), m);
    }
    assert!(matches!(read_msg_sync(&mut r), Err(ProtocolError::Closed)));
}

#[test]
fn sync_reader_refuses_oversized_empty_and_truncated_frames() {
    let mut input: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    let err = read_msg_sync(&mut input).unwrap_err();
    assert!(matches!(err, ProtocolError::TooLarge(u32::MAX)), "{err}");
    let mut input: &[u8] = &[0, 0, 0, 0];
    let err = read_msg_sync(&mut input).unwrap_err();
    assert!(err.to_string().contains("empty frame"), "{err}");
    let mut input: &[u8] = &[10, 0, 0, 0, 14];
    let err = read_msg_sync(&mut input).unwrap_err();
    assert!(err.to_string().contains("truncated frame"), "{err}");
}

proptest::proptest! {
    #[test]
    fn decode_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
        let _ = Msg::decode(&body);
    }
}

// read_msg_sync's path for data-carrying frames.
mod bulk {
    use super::*;
    use proptest::prelude::*;
    use std::io::{self, Read};

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

/// The agent's words for a chunk that failed verification carry its index
/// back to the controller, with or without a reason after them.
#[test]
fn a_failed_chunk_is_read_back_from_the_agents_words() {
    assert_eq!(failed_chunk(&chunk_failed(7)), Some(7));
    assert_eq!(
        failed_chunk(&format!("{}: 12 bytes, expected 64", chunk_failed(3))),
        Some(3)
    );
    assert_eq!(failed_chunk("patch of chunk 3 failed verification"), None);
    assert_eq!(failed_chunk("chunk x failed verification"), None);
    assert_eq!(failed_chunk("chunk 3 written"), None);
}
