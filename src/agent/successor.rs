//! The agent's successor in a relay chain: the link to it, forwarding
//! that waits for it or (a slow successor at the tail) never does, and what
//! the waiting cost.

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::agent::links::{Connections, Event, Events, RELAY_TIMEOUT, Secret};
use crate::proto::relay::{connect_handshake, time_left};
use crate::proto::{
    Codec, Msg, PiecePlace, ProtocolError, write_msg_sync, write_stream_chunk_sync,
};

/// How often at most an agent sends RelayStats while it forwards.
pub(super) const STATS_EVERY: Duration = Duration::from_millis(250);

/// What an agent forwarded and how long it waited on its successor.
pub(super) struct Stats {
    pub(super) forwarded: u64,
    pub(super) blocked: Duration,
    /// `forwarded` in the last RelayStats, and when it went.
    pub(super) reported: u64,
    pub(super) last: Instant,
}

/// One frame of the stream, for the successor.
pub(super) enum Frame<'a> {
    Stream {
        index: u32,
        codec: Codec,
        place: PiecePlace,
        data: &'a [u8],
    },
    End,
}

impl Frame<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            Frame::Stream { data, .. } => data.len(),
            Frame::End => 0,
        }
    }
}

/// The link to the next node of the chain.
pub(super) struct Successor {
    pub(super) stream: TcpStream,
    pub(super) attempt: u64,
    /// `addr:port`, named in RelayLost.
    pub(super) peer: String,
    /// Fed without waiting (see [`Relay::forward`]).
    pub(super) lossy: bool,
    /// What a lossy successor has still to take of the chunk being passed
    /// on: it goes before anything else.
    pub(super) pending: Vec<u8>,
    /// The chunk a lossy successor is being passed: all of it goes (a
    /// chunk in part would be wasted on a slow link), the next chunk only
    /// if nothing is pending when it starts.
    pub(super) passing: Option<u32>,
}

impl Successor {
    /// Forward without waiting: whatever the socket takes now of what is
    /// pending, then this frame: queued if it belongs to the chunk being
    /// passed on, skipped if it starts a chunk while something is still
    /// pending (that whole chunk is skipped then). At the end of the stream
    /// a successor that still has something pending is dropped.
    pub(super) fn forward_lossy(&mut self, frame: &Frame<'_>) -> Result<(), ProtocolError> {
        let Frame::Stream {
            index,
            codec,
            place,
            data,
        } = *frame
        else {
            // The end does not wait for a slow successor either: if it has
            // not taken the chunk it was being passed, the link goes (the
            // controller, told by RelayLost, sends it the end and what it
            // lacks directly), rather than this node staying busy for the
            // seconds that chunk takes on a slow link.
            let sent = send_now(&self.stream, &self.pending)?;
            self.pending.drain(..sent);
            if !self.pending.is_empty() {
                return Err(ProtocolError::Io(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the slow successor had not taken its chunk at the end of the stream",
                )));
            }
            return write_msg_sync(&mut self.stream, &Msg::StreamEnd);
        };
        let sent = send_now(&self.stream, &self.pending)?;
        self.pending.drain(..sent);
        let starts = place.is_none_or(|(offset, _)| offset == 0);
        if starts {
            self.passing = self.pending.is_empty().then_some(index);
        }
        if self.passing != Some(index) {
            return Ok(());
        }
        write_stream_chunk_sync(&mut self.pending, index, codec, place, data)?;
        let sent = send_now(&self.stream, &self.pending)?;
        self.pending.drain(..sent);
        Ok(())
    }
}

/// Write what the socket takes without waiting; how much that was.
fn send_now(stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < buf.len() {
        let rest = &buf[sent..];
        // SAFETY: a valid buffer for the call, on a socket we own.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        match usize::try_from(n) {
            Ok(n) => sent += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(sent)
}

impl Drop for Successor {
    /// Shut down, not just close: the watching thread holds a clone.
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Watch the successor link for its end: a successor never sends anything.
pub(super) fn watch_successor(stream: TcpStream, attempt: u64, events: Events) {
    let mut byte = [0u8; 1];
    let reason = loop {
        match (&stream).read(&mut byte) {
            Ok(0) => break "the successor closed the connection".to_string(),
            Ok(_) => break "the successor sent data on the relay link".to_string(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break format!("successor link failed: {e}"),
        }
    };
    let _ = stream.shutdown(Shutdown::Both);
    let _ = events.send(Event::SuccessorGone { attempt, reason });
}

/// Connect to the next node and authenticate, within [`RELAY_TIMEOUT`]
/// each. The socket is tracked meanwhile so the end of the load cuts it.
pub(super) fn link_successor(
    addr: &str,
    port: u16,
    secret: &Secret,
    connections: &Connections,
) -> Result<TcpStream, String> {
    let fail = |what: String| format!("cannot link to {addr} port {port}: {what}");
    let candidates: Vec<SocketAddr> = (addr, port)
        .to_socket_addrs()
        .map_err(|e| fail(e.to_string()))?
        .collect();
    let deadline = Instant::now() + RELAY_TIMEOUT;
    let mut error = fail("no address".into());
    let mut connected = None;
    for candidate in candidates {
        let Some(left) = time_left(deadline) else {
            error = fail("connection timed out".into());
            break;
        };
        match TcpStream::connect_timeout(&candidate, left) {
            Ok(stream) => {
                connected = Some(stream);
                break;
            }
            Err(e) => error = fail(e.to_string()),
        }
    }
    let stream = connected.ok_or(error)?;
    let id = connections.add(&stream, usize::MAX).map_err(fail)?;
    let shaken = connect_handshake(&stream, secret);
    connections.remove(id);
    shaken.map_err(fail)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::agent::links::RELAY_TIMEOUT;
    use crate::agent::testkit::*;
    use crate::proto::Msg;

    /// A successor linked in the middle of a chunk gets none of that
    /// chunk's other pieces (useless without its start), and the next
    /// chunk from its start.
    #[test]
    fn a_successor_linked_mid_chunk_gets_nothing_of_that_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rr", 0, 37);
        let target = dir.path().join("a.img");
        let (listener, port) = successor_listener();
        std::thread::scope(|s| {
            let (mut a, a_session, _) = Driven::start(s, &env, "a", image.begin(&target, false));
            let first = pieces(image.chunk(0), 10_000);
            assert!(first.len() > 4);
            for piece in &first[..3] {
                a.send(piece);
            }
            let next = s.spawn(|| accept_successor(&listener, Duration::ZERO));
            assert!(matches!(
                a.connect_fed(port, &SECRET, false),
                Msg::RelayLinked { .. }
            ));
            let stream = next.join().unwrap();
            for piece in first[3..].iter().chain(&pieces(image.chunk(1), 10_000)) {
                a.send(piece);
            }
            a.send(&Msg::StreamEnd);
            assert!(no_bits(&a.missing()));
            stream.set_read_timeout(Some(REPLY_WAIT)).unwrap();
            let mut input = std::io::BufReader::new(&stream);
            let mut chunk1 = Vec::new();
            loop {
                match crate::proto::read_msg_sync(&mut input).unwrap() {
                    Msg::StreamPiece {
                        index,
                        offset,
                        data,
                        ..
                    } => {
                        assert_eq!(index, 1, "a piece of chunk 0 at {offset} went on");
                        assert_eq!(offset as usize, chunk1.len());
                        chunk1.extend(data);
                    }
                    Msg::StreamEnd => break,
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(chunk1, image.chunk_data(1));
            a.finish();
            a_session.join().unwrap().unwrap();
        });
        assert!(std::fs::read(&target).unwrap() == image.data);
    }

    #[test]
    fn a_lossy_successor_is_never_waited_for_gets_whole_chunks_and_is_dropped_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        // 16 MiB of random chunks: more than the socket buffers hold.
        let image = Image::new(&"r".repeat(256), 0, 27);
        let data = image.data_chunks();
        let target = dir.path().join("a.img");
        // A successor that authenticates, then reads nothing for a while.
        let (listener, port) = successor_listener();
        std::thread::scope(|s| {
            let slow = s.spawn(|| accept_successor(&listener, Duration::ZERO));
            let (mut a, a_session, _) = Driven::start(s, &env, "a", image.begin(&target, false));
            assert!(matches!(
                a.connect_fed(port, &SECRET, true),
                Msg::RelayLinked { .. }
            ));
            let stream = slow.join().unwrap();
            let started = Instant::now();
            for &i in &data {
                for piece in pieces(image.chunk(i), 20_000) {
                    a.send(&piece);
                }
            }
            a.send(&Msg::StreamEnd);
            // Its own load does not wait for the successor, not even at the
            // end: the successor had not taken the chunk it was being
            // passed, so the link goes, and the controller is told.
            assert!(no_bits(&a.missing()));
            let lost = a.wait_for("RelayLost", |m| matches!(m, Msg::RelayLost { .. }));
            assert!(started.elapsed() < RELAY_TIMEOUT, "{:?}", started.elapsed());
            let Msg::RelayLost { reason, .. } = lost else {
                unreachable!()
            };
            assert!(reason.contains("stalled"), "{reason}");
            assert_eq!(a.written(), data);
            // What went through: whole chunks only, then the cut link (the
            // last chunk in part at most; never the end of the stream).
            stream.set_read_timeout(Some(REPLY_WAIT)).unwrap();
            let mut input = std::io::BufReader::new(&stream);
            let mut got: Vec<(u32, Vec<u8>)> = Vec::new();
            while let Ok(msg) = crate::proto::read_msg_sync(&mut input) {
                match msg {
                    Msg::StreamPiece {
                        index,
                        offset,
                        data,
                        ..
                    } => match got.last_mut() {
                        Some((i, bytes)) if *i == index && offset as usize == bytes.len() => {
                            bytes.extend(data)
                        }
                        _ => {
                            assert_eq!(offset, 0, "chunk {index} starts mid-way");
                            got.push((index, data));
                        }
                    },
                    other => panic!("{other:?} went through with a chunk pending"),
                }
            }
            let wire = |i: u32| match image.chunk(i as usize) {
                Msg::Chunk { data, .. } => data,
                _ => unreachable!(),
            };
            let whole = got.iter().filter(|(i, bytes)| *bytes == wire(*i)).count();
            assert!(whole > 0 && whole < data.len(), "{whole} of {}", data.len());
            // A chunk that starts going out goes whole: a chunk in part
            // would be wasted on a slow link. Only the cut may end one.
            assert!(whole + 1 >= got.len(), "chunks that went out in part");
            a.finish();
            a_session.join().unwrap().unwrap();
        });
        assert!(std::fs::read(&target).unwrap() == image.data);
    }
}
