//! The agent's successor in a relay chain: the link to it, forwarding
//! that waits for it or (a slow successor at the tail) never does, and what
//! the waiting cost.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::agent::error::AgentError;
use crate::agent::links::{Connections, Event, Events, RELAY_TIMEOUT, Secret};
use crate::agent::replies::Replies;
use crate::proto::relay::{connect_handshake, time_left};
use crate::proto::{
    Codec, Msg, PiecePlace, ProtocolError, write_msg_sync, write_stream_chunk_sync,
};

/// How often at most an agent sends RelayStats while it forwards.
pub(super) const STATS_EVERY: Duration = Duration::from_millis(250);

/// What an agent passed on and how long it waited on its successor.
pub(super) struct Stats {
    /// Bytes handed to successor sockets so far.
    pub(super) forwarded: u64,
    /// Time spent waiting for a successor socket to take more.
    pub(super) blocked: Duration,
    /// What the last RelayStats said (bytes taken, waits), and when it went.
    reported: (u64, Duration),
    last: Instant,
}

impl Stats {
    pub(super) fn new() -> Self {
        Stats {
            forwarded: 0,
            blocked: Duration::ZERO,
            reported: (0, Duration::ZERO),
            last: Instant::now(),
        }
    }

    /// A RelayStats for the controller, at most every [`STATS_EVERY`] and
    /// only if something changed: what the successor has taken (what went
    /// to its socket less what waits there unacknowledged, so the figure
    /// grows at the successor's pace, not in the lumps a full socket takes
    /// more in) and the waits so far. `successor`: the socket fed with
    /// waiting, if any.
    pub(super) fn due(&mut self, successor: Option<&TcpStream>) -> Option<Msg> {
        if self.last.elapsed() < STATS_EVERY {
            return None;
        }
        let queued = successor.map_or(0, unacknowledged);
        let taken = self.forwarded.saturating_sub(queued).max(self.reported.0);
        if (taken, self.blocked) == self.reported {
            return None;
        }
        self.last = Instant::now();
        self.reported = (taken, self.blocked);
        Some(Msg::RelayStats {
            forwarded: taken,
            blocked_ms: u64::try_from(self.blocked.as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// How long a wait may last before a RelayStats may be due.
    fn until_due(&self) -> Duration {
        match STATS_EVERY.checked_sub(self.last.elapsed()) {
            Some(left) if !left.is_zero() => left,
            // Due, but nothing had changed: look again soon.
            _ => STATS_EVERY / 5,
        }
    }
}

/// Bytes in `stream`'s send queue: not sent yet, or not acknowledged by
/// the peer yet (0 if the kernel cannot say).
fn unacknowledged(stream: &TcpStream) -> u64 {
    let mut queued: libc::c_int = 0;
    // SIOCOUTQ, which is TIOCOUTQ on Linux. SAFETY: the call writes one
    // int, on a socket we own.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc == 0 {
        u64::try_from(queued).unwrap_or(0)
    } else {
        0
    }
}

/// What a successor socket is written through when the successor is
/// waited for: the wait is counted as it goes, and a RelayStats goes to
/// the controller whenever one is due, in the middle of a long wait too.
/// A full socket takes more only once half its buffer is free, which on a
/// slow link is most of a second: counted when the write ends, the waits
/// of a member held back would reach the controller in lumps longer than
/// the window it judges by.
pub(super) struct Waiting<'a, W: Write> {
    pub(super) stream: &'a TcpStream,
    pub(super) stats: &'a mut Stats,
    pub(super) out: &'a mut Replies<W>,
    /// The controller could not be told: the load is over.
    pub(super) failed: Option<AgentError>,
}

impl<W: Write> Write for Waiting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// What the socket takes of `bufs`, waiting until it takes something
    /// ([`RELAY_TIMEOUT`] at most).
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        let since = Instant::now();
        loop {
            let sent = send_now(self.stream, bufs)?;
            if sent > 0 {
                self.stats.forwarded += sent as u64;
                return Ok(sent);
            }
            let left = RELAY_TIMEOUT
                .checked_sub(since.elapsed())
                .filter(|left| !left.is_zero())
                .ok_or_else(|| io::Error::from(io::ErrorKind::TimedOut))?;
            let waiting = Instant::now();
            wait_writable(self.stream, left.min(self.stats.until_due()))?;
            self.stats.blocked += waiting.elapsed();
            if let Some(stats) = self.stats.due(Some(self.stream))
                && let Err(e) = self.out.reply(&stats)
            {
                self.failed = Some(e);
                return Err(io::Error::other("the controller link failed"));
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Wait until `stream` takes more, it fails, or `timeout` passes.
fn wait_writable(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // Whole milliseconds, rounded up: a wait of 0 would spin.
    let ms = libc::c_int::try_from(timeout.as_micros().div_ceil(1000).max(1))
        .unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut fd, 1, ms) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
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
            let sent = send_all_now(&self.stream, &self.pending)?;
            self.pending.drain(..sent);
            if !self.pending.is_empty() {
                return Err(ProtocolError::Io(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the slow successor had not taken its chunk at the end of the stream",
                )));
            }
            return write_msg_sync(&mut self.stream, &Msg::StreamEnd);
        };
        let sent = send_all_now(&self.stream, &self.pending)?;
        self.pending.drain(..sent);
        let starts = place.is_none_or(|(offset, _)| offset == 0);
        if starts {
            self.passing = self.pending.is_empty().then_some(index);
        }
        if self.passing != Some(index) {
            return Ok(());
        }
        write_stream_chunk_sync(&mut self.pending, index, codec, place, data)?;
        let sent = send_all_now(&self.stream, &self.pending)?;
        self.pending.drain(..sent);
        Ok(())
    }
}

/// Write what the socket takes of `bufs` without waiting; how much that
/// was.
fn send_now(stream: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr().cast_mut().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: zeroed is a valid msghdr (no address, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    loop {
        // SAFETY: the iovecs point into `bufs`, valid for the call, and
        // the kernel only reads them; a socket we own.
        let n = unsafe {
            libc::sendmsg(
                stream.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(0),
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(e),
                }
            }
        }
    }
}

/// Write what the socket takes of `buf` without waiting; how much that was.
fn send_all_now(stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < buf.len() {
        match send_now(stream, &[IoSlice::new(&buf[sent..])])? {
            0 => break,
            n => sent += n,
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

    use std::io::Read;

    use crate::agent::links::RELAY_TIMEOUT;
    use crate::agent::testkit::*;
    use crate::proto::{Msg, write_msg_sync};

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

    /// A member held back by its successor tells the controller while it
    /// waits, not when the write ends: the controller judges the chain over
    /// half a second, and a full socket may take nothing for longer. What
    /// it reports as forwarded is what the successor took, not what went
    /// into the socket.
    #[test]
    fn a_member_held_back_reports_its_wait_as_it_waits_and_only_what_its_successor_took() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        // 8 MiB: more than the sending socket's buffer grows to.
        let image = Image::new(&"r".repeat(128), 0, 41);
        let target = dir.path().join("a.img");
        // A small receive buffer, so that what the successor took stays
        // apart from what was sent.
        let (listener, port) = small_buffer_listener();
        const PAUSE: Duration = Duration::from_millis(2500);
        std::thread::scope(|s| {
            let next = s.spawn(|| accept_successor(&listener, Duration::ZERO));
            let (mut a, a_session, _) = Driven::start(s, &env, "a", image.begin(&target, false));
            assert!(matches!(
                a.connect_fed(port, &SECRET, false),
                Msg::RelayLinked { .. }
            ));
            let mut stream = next.join().unwrap();
            let mut feed = a.ctl.try_clone().unwrap();
            let image = &image;
            let feeding = s.spawn(move || {
                for i in image.data_chunks() {
                    write_msg_sync(&mut feed, &streamed(image.chunk(i))).unwrap();
                }
                write_msg_sync(&mut feed, &Msg::StreamEnd).unwrap();
            });
            // The successor takes nothing for a while: what the agent says
            // meanwhile.
            let started = Instant::now();
            let mut during = Vec::new();
            while let Some(left) = PAUSE.checked_sub(started.elapsed()) {
                let Ok(msg) = a.replies.recv_timeout(left) else {
                    break;
                };
                a.log.push(msg.clone());
                if let Msg::RelayStats {
                    forwarded,
                    blocked_ms,
                } = msg
                {
                    during.push((started.elapsed(), forwarded, blocked_ms));
                }
            }
            // Then it takes everything.
            let reader = s.spawn(move || {
                let mut sink = vec![0u8; 1 << 20];
                let mut total = 0u64;
                loop {
                    match stream.read(&mut sink) {
                        Ok(0) => return total,
                        Ok(n) => total += n as u64,
                        Err(e) => panic!("{e}"),
                    }
                }
            });
            feeding.join().unwrap();
            assert!(no_bits(&a.missing()));
            a.finish();
            a_session.join().unwrap().unwrap();
            let read = reader.join().unwrap();
            assert!(read > 8 << 20, "{read}");
            // Once the buffers were full (a second at most), the wait
            // was told every quarter second or so, growing each time, and
            // what the successor took stayed at what its buffer holds.
            let late: Vec<_> = during
                .iter()
                .filter(|(at, _, _)| *at > Duration::from_secs(1))
                .collect();
            assert!(late.len() >= 3, "RelayStats during the pause: {during:?}");
            assert!(
                late.windows(2).all(|w| w[1].2 > w[0].2),
                "the wait did not grow: {during:?}"
            );
            assert!(
                late.iter().all(|(_, taken, _)| *taken < 1 << 20),
                "more than the successor took: {during:?}"
            );
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
        let (listener, port) = small_buffer_listener();
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
