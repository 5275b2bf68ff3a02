//! The agent's place in a relay chain: its listener, its predecessors'
//! connections and its successor, all feeding the load's one queue.

use std::os::fd::AsRawFd;

use std::io;
use std::io::BufReader;
use std::net::{IpAddr, Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::Scope;
use std::time::{Duration, Instant};

use crate::agent::error::{AgentError, malformed};
pub(super) use crate::agent::links::{Connections, Event, Events, RELAY_TIMEOUT, Secret};
use crate::agent::replies::Replies;
use crate::agent::successor::{Frame, Stats, Successor, Waiting, link_successor, watch_successor};
use crate::proto::relay::accept_handshake_within;
use crate::proto::{
    Msg, ProtocolError, RELAY_SECRET_LEN, read_msg_sync, write_msg_sync, write_stream_chunk_sync,
};

//
// Threads, all scoped to the load and all feeding the one bounded queue the
// main loop reads (so a fast predecessor waits for this node's disk and its
// successor, and the wait travels up the chain):
// - the controller's reader (as without a relay);
// - the listener, once RelayListen came: accepts, polling for the end of
//   the load, one thread per connection (at most MAX_PENDING_HANDSHAKES
//   unauthenticated and MAX_RELAY_CONNECTIONS authenticated);
// - per connection: the handshake (2 s in all; connections in their
//   handshake have their own, larger, limit), then its frames;
// - per RelayConnect: connect and handshake, 5 s each, so the load goes on
//   meanwhile; the main loop installs the link it makes;
// - per successor: a watcher that reports the link's end at once, even
//   while nothing is being forwarded.
// The main loop alone writes to the successor (5 s without progress =
// stalled) and to the controller. At the end of the load every socket is
// shut down, so each of these threads ends.
//

/// Authenticated incoming relay connections open at once; more are refused.
pub(super) const MAX_RELAY_CONNECTIONS: usize = 16;
/// Incoming connections still in their handshake, counted apart from the
/// authenticated ones so that strangers holding connections open cannot
/// take a predecessor's place; more are refused.
pub(super) const MAX_PENDING_HANDSHAKES: usize = 256;
/// How long an incoming connection has to prove it holds the secret.
pub(super) const ACCEPT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the listening thread looks whether the load is over.
pub(super) const ACCEPT_POLL: Duration = Duration::from_millis(100);
/// Read buffer of a predecessor connection.
pub(super) const RELAY_READ_BUFFER: usize = 256 << 10;

pub(super) fn relay_secret(secret: &[u8]) -> Result<Secret, AgentError> {
    Secret::try_from(secret).map_err(|_| {
        malformed(format!(
            "the relay secret has {} bytes, not {RELAY_SECRET_LEN}",
            secret.len()
        ))
    })
}

/// The agent's place in a relay chain: its listener (whose threads feed
/// predecessors' frames into the load's queue) and its successor.
pub(super) struct Relay<'scope, 'env> {
    pub(super) scope: &'scope Scope<'scope, 'env>,
    pub(super) events: Events,
    pub(super) connections: Arc<Connections>,
    pub(super) listening: bool,
    /// RelayConnects so far: only the latest one's outcome counts.
    pub(super) attempt: u64,
    /// Whether the latest RelayConnect asked for a lossy successor.
    pub(super) lossy: bool,
    /// The latest RelayConnect's link is being made.
    pub(super) linking: bool,
    /// The end of the stream went to the successor: when it closes the
    /// link now, it has finished, and nothing was lost.
    pub(super) end_passed: bool,
    pub(super) successor: Option<Successor>,
    /// The newest predecessor connection that sent a frame. After a relink
    /// the old predecessor's last frames may still come: they are dropped,
    /// or their pieces would interleave with the new one's and break the
    /// chunks of both, here and at every node after this one.
    pub(super) predecessor: u64,
    pub(super) stats: Stats,
}

impl<'scope, 'env> Relay<'scope, 'env> {
    pub(super) fn new(scope: &'scope Scope<'scope, 'env>, events: Events) -> Self {
        Relay {
            scope,
            events,
            connections: Arc::default(),
            listening: false,
            attempt: 0,
            lossy: false,
            linking: false,
            end_passed: false,
            successor: None,
            predecessor: 0,
            stats: Stats::new(),
        }
    }

    /// Open the listener; its thread accepts until the load ends.
    pub(super) fn listen(
        &mut self,
        secret: &[u8],
        bind: &str,
        port_min: u16,
        port_max: u16,
    ) -> Result<u16, AgentError> {
        if self.listening {
            return Err(malformed("a second RelayListen in one load".into()));
        }
        let secret = relay_secret(secret)?;
        let listener = bind_relay(bind, port_min, port_max)?;
        let port = listener
            .local_addr()
            .and_then(|a| listener.set_nonblocking(true).map(|()| a.port()))
            .map_err(|e| AgentError::Relay(format!("cannot set up the relay listener: {e}")))?;
        self.listening = true;
        let scope = self.scope;
        let connections = Arc::clone(&self.connections);
        let events = self.events.clone();
        self.scope
            .spawn(move || accept_relays(scope, listener, secret, connections, events));
        Ok(port)
    }

    /// Drop the successor and link to another in the background: the load
    /// goes on meanwhile, and `linked` gets the outcome.
    pub(super) fn connect(
        &mut self,
        secret: &[u8],
        addr: String,
        port: u16,
        lossy: bool,
    ) -> Result<(), AgentError> {
        let secret = relay_secret(secret)?;
        self.successor = None;
        self.end_passed = false;
        self.attempt += 1;
        self.lossy = lossy;
        self.linking = port != 0;
        if port == 0 {
            // No successor any more (this node now ends the chain).
            return Ok(());
        }
        let attempt = self.attempt;
        let connections = Arc::clone(&self.connections);
        let events = self.events.clone();
        self.scope.spawn(move || {
            let result = link_successor(&addr, port, &secret, &connections);
            let _ = events.send(Event::Linked {
                attempt,
                addr,
                port,
                result,
            });
        });
        Ok(())
    }

    /// A RelayConnect's outcome: the reply for the controller, unless a
    /// later RelayConnect superseded it (its link then just closes).
    pub(super) fn linked(
        &mut self,
        attempt: u64,
        addr: String,
        port: u16,
        result: Result<TcpStream, String>,
    ) -> Option<Msg> {
        if attempt != self.attempt {
            return None;
        }
        self.linking = false;
        Some(
            match result.and_then(|stream| self.install(stream, attempt, format!("{addr}:{port}")))
            {
                Ok(()) => Msg::RelayLinked { addr, port },
                Err(reason) => Msg::RelayLost {
                    peer: format!("{addr}:{port}"),
                    reason,
                },
            },
        )
    }

    pub(super) fn install(
        &mut self,
        stream: TcpStream,
        attempt: u64,
        peer: String,
    ) -> Result<(), String> {
        let watched = stream
            .set_write_timeout(Some(RELAY_TIMEOUT))
            .and_then(|()| stream.set_read_timeout(None))
            .and_then(|()| stream.set_nodelay(true))
            .and_then(|()| stream.try_clone())
            .map_err(|e| format!("cannot set up the successor link: {e}"))?;
        let events = self.events.clone();
        self.scope
            .spawn(move || watch_successor(watched, attempt, events));
        self.successor = Some(Successor {
            stream,
            attempt,
            peer,
            lossy: self.lossy,
            pending: Vec::new(),
            passing: None,
        });
        Ok(())
    }

    /// The link of RelayConnect `attempt` broke: the RelayLost to send if it
    /// is still the successor.
    pub(super) fn successor_gone(&mut self, attempt: u64, reason: String) -> Option<Msg> {
        if self.successor.as_ref()?.attempt != attempt {
            return None;
        }
        let peer = self.successor.take()?.peer.clone();
        (!self.end_passed).then_some(Msg::RelayLost { peer, reason })
    }

    /// Whether a frame from predecessor connection `conn` is taken: not
    /// once a newer connection has sent one (see `predecessor`).
    pub(super) fn takes_from(&mut self, conn: u64) -> bool {
        if conn < self.predecessor {
            return false;
        }
        self.predecessor = conn;
        true
    }

    /// Send a frame to the successor, if any, and tell the controller
    /// what it needs to know meanwhile (see [`Waiting`]). On failure the
    /// successor is dropped and the controller told by RelayLost. A lossy
    /// successor is never waited for: a chunk it cannot take at once is
    /// skipped, and at the end of the stream, if it has not taken the one
    /// it was being passed, it is dropped.
    pub(super) fn forward<W: io::Write>(
        &mut self,
        out: &mut Replies<W>,
        frame: Frame<'_>,
    ) -> Result<(), AgentError> {
        let Some(successor) = self.successor.as_mut() else {
            return Ok(());
        };
        let end = matches!(frame, Frame::End);
        let result = if successor.lossy {
            successor.forward_lossy(&frame)
        } else {
            let started = Instant::now();
            crate::agent::throttle::throttle_output(frame.len());
            self.stats.blocked += started.elapsed();
            let mut w = Waiting {
                stream: &successor.stream,
                stats: &mut self.stats,
                out,
                failed: None,
            };
            let sent = match frame {
                Frame::Stream {
                    index,
                    codec,
                    place,
                    data,
                } => write_stream_chunk_sync(&mut w, index, codec, place, data),
                Frame::End => write_msg_sync(&mut w, &Msg::StreamEnd),
            };
            if let Some(e) = w.failed.take() {
                return Err(e);
            }
            sent
        };
        self.end_passed |= end && result.is_ok();
        let Err(e) = result else {
            return Ok(());
        };
        let Some(successor) = self.successor.take() else {
            return Ok(());
        };
        let reason = match e {
            ProtocolError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                "successor stalled".to_string()
            }
            e => format!("successor link failed: {e}"),
        };
        out.reply(&Msg::RelayLost {
            peer: successor.peer.clone(),
            reason,
        })
    }

    /// Whether the successor is fed lossily (see [`Relay::forward`]).
    pub(super) fn lossy(&self) -> bool {
        self.successor.as_ref().is_some_and(|s| s.lossy)
    }

    /// A RelayStats for the controller, if one is due (see [`Stats::due`]).
    pub(super) fn stats_due(&mut self) -> Option<Msg> {
        let waited_for = self
            .successor
            .as_ref()
            .filter(|s| !s.lossy)
            .map(|s| &s.stream);
        self.stats.due(waited_for)
    }
}

impl Drop for Relay<'_, '_> {
    /// The load is over: close the successor link, the listener and every
    /// relay connection, so their threads end.
    fn drop(&mut self) {
        self.successor = None;
        self.connections.close_all();
    }
}

/// Bind `bind` ("" = 0.0.0.0) on the first free port of the range; (0, 0)
/// takes any free port.
pub(super) fn bind_relay(
    bind: &str,
    port_min: u16,
    port_max: u16,
) -> Result<TcpListener, AgentError> {
    let ip: IpAddr = if bind.is_empty() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        bind.parse().map_err(|_| {
            AgentError::Relay(format!(
                "cannot open the relay listener on {bind:?}: not an IP address"
            ))
        })?
    };
    if port_min > port_max {
        return Err(malformed(format!(
            "RelayListen port range {port_min} to {port_max} is empty"
        )));
    }
    let ports = if port_max == 0 {
        0..=0
    } else {
        port_min.max(1)..=port_max
    };
    let mut last = None;
    for port in ports {
        match TcpListener::bind((ip, port)) {
            Ok(listener) => return Ok(listener),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied
                ) =>
            {
                last = Some(e);
            }
            Err(e) => {
                return Err(AgentError::Relay(format!(
                    "cannot open the relay listener on {ip} port {port}: {e}"
                )));
            }
        }
    }
    Err(AgentError::Relay(format!(
        "cannot open the relay listener on {ip}: no free port from {port_min} to {port_max}{}",
        last.map(|e| format!(" ({e})")).unwrap_or_default()
    )))
}

/// The listening thread: accept until the load is over, one thread per
/// connection.
pub(super) fn accept_relays<'scope>(
    scope: &'scope Scope<'scope, '_>,
    listener: TcpListener,
    secret: Secret,
    connections: Arc<Connections>,
    events: Events,
) {
    while !connections.closed() {
        if !wait_readable(&listener, ACCEPT_POLL) {
            continue;
        }
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            // Out of descriptors, say: try again later rather than spin.
            Err(_) => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        let peer = peer.to_string();
        let tracked = stream
            .set_nonblocking(false)
            .map_err(|e| format!("cannot set up the connection: {e}"))
            .and_then(|()| connections.add(&stream, MAX_PENDING_HANDSHAKES));
        match tracked {
            Ok(id) => {
                let connections = Arc::clone(&connections);
                let events = events.clone();
                scope.spawn(move || {
                    relay_predecessor(&stream, &peer, id, &secret, &events, || {
                        connections.authenticated(id, MAX_RELAY_CONNECTIONS)
                    });
                    connections.remove(id);
                });
            }
            Err(reason) => {
                let _ = stream.shutdown(Shutdown::Both);
                if events.send(Event::Refused { peer, reason }).is_err() {
                    return;
                }
            }
        }
    }
}

/// Wait until the listener has a connection to accept, at most `timeout`.
pub(super) fn wait_readable(listener: &TcpListener, timeout: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one pollfd, valid for the call, on a descriptor we own.
    unsafe { libc::poll(&mut fd, 1, millis) > 0 }
}

/// One incoming connection: authenticate it, then pass its StreamChunk,
/// StreamPiece and StreamEnd frames to the main loop until it ends.
pub(super) fn relay_predecessor(
    stream: &TcpStream,
    peer: &str,
    conn: u64,
    secret: &Secret,
    events: &Events,
    authenticated: impl FnOnce() -> Result<(), String>,
) {
    let refuse = |reason: String| {
        let _ = stream.shutdown(Shutdown::Both);
        let _ = events.send(Event::Refused {
            peer: peer.to_string(),
            reason,
        });
    };
    if let Err(reason) = accept_handshake_within(stream, secret, ACCEPT_HANDSHAKE_TIMEOUT) {
        return refuse(reason);
    }
    if let Err(reason) = authenticated() {
        return refuse(reason);
    }
    // A predecessor may be quiet for long (the Missing phase, a slow
    // controller): no read timeout from here on.
    if let Err(e) = stream.set_read_timeout(None) {
        return refuse(format!("cannot set up the connection: {e}"));
    }
    let mut input = BufReader::with_capacity(RELAY_READ_BUFFER, stream);
    loop {
        match read_msg_sync(&mut input) {
            Ok(msg @ (Msg::StreamChunk { .. } | Msg::StreamPiece { .. } | Msg::StreamEnd)) => {
                crate::agent::throttle::throttle_input(&msg);
                let relayed = Event::Relayed {
                    peer: peer.to_string(),
                    conn,
                    msg,
                };
                if events.send(relayed).is_err() {
                    return;
                }
            }
            Ok(other) => {
                return refuse(format!("unexpected {} on a relay connection", other.name()));
            }
            // The predecessor went away, or the load is over: a relink or
            // the end of the chain, nothing to report.
            Err(ProtocolError::Closed | ProtocolError::Io(_)) => return,
            // It hung up mid-frame: relinked elsewhere while forwarding.
            Err(ProtocolError::Malformed(m)) if m.starts_with("truncated frame") => return,
            Err(e) => return refuse(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use std::io::Write;
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    use crate::agent::error::AgentError;

    use super::{RELAY_TIMEOUT, Secret};
    use crate::agent::testkit::*;
    use crate::proto::relay::{RELAY_MAGIC, RELAY_VERSION, proof};
    use crate::proto::write_msg_sync;
    use crate::proto::{Codec, Msg, ProtocolError, RELAY_SECRET_LEN, bitmap_len};

    #[test]
    fn chain_of_three_agents_loads_every_target() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rtzrtrzzttr", 777, 20);
        let data = image.data_chunks();
        let targets = ["a", "b", "c"].map(|n| dir.path().join(format!("{n}.img")));
        std::thread::scope(|s| {
            let (mut a, a_session, _) =
                Driven::start(s, &env, "a", image.begin(&targets[0], false));
            let (mut b, b_session, _) =
                Driven::start(s, &env, "b", image.begin(&targets[1], false));
            let (mut c, c_session, _) =
                Driven::start(s, &env, "c", image.begin(&targets[2], false));
            let b_port = b.listen();
            let c_port = c.listen();
            a.link(b_port);
            b.link(c_port);
            for &i in &data {
                a.send(&streamed(image.chunk(i)));
            }
            a.send(&Msg::StreamEnd);
            for node in [&mut a, &mut b, &mut c] {
                let missing = node.missing();
                assert_eq!(missing.len(), bitmap_len(image.layout().chunks));
                assert!(no_bits(&missing), "{}: {missing:?}", node.name);
                assert_eq!(node.finish(), image.bytes_of(&data), "{}", node.name);
                assert_eq!(node.written(), data, "{} acks its own writes", node.name);
                for quiet in ["RelayLost", "RelayRefused", "Error"] {
                    assert_eq!(node.count(quiet), 0, "{}: {quiet}", node.name);
                }
            }
            for session in [a_session, b_session, c_session] {
                session.join().unwrap().unwrap();
            }
        });
        for target in &targets {
            assert!(std::fs::read(target).unwrap() == image.data, "{target:?}");
        }
        assert_eq!(stamps(&env), 3);
    }

    #[test]
    fn pieces_are_forwarded_as_they_come_and_a_broken_or_bad_chunk_is_caught_up() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rtrtr", 0, 23);
        let data = image.data_chunks();
        let targets = ["a", "b", "c"].map(|n| dir.path().join(format!("{n}.img")));
        std::thread::scope(|s| {
            let mut nodes = targets
                .iter()
                .enumerate()
                .map(|(k, t)| Driven::start(s, &env, ["a", "b", "c"][k], image.begin(t, false)).0)
                .collect::<Vec<_>>();
            let (b_port, c_port) = (nodes[1].listen(), nodes[2].listen());
            nodes[0].link(b_port);
            nodes[1].link(c_port);
            for &i in &data {
                let mut sent = pieces(image.chunk(i), 10_000);
                match i {
                    // A piece lost (as in a relink mid-chunk): no node
                    // writes chunk 1 from the stream.
                    1 => drop(sent.remove(2)),
                    // A bad piece: every node refuses the chunk.
                    3 => {
                        if let Msg::StreamPiece { data, .. } = &mut sent[4] {
                            data[7] ^= 1;
                        }
                    }
                    _ => {}
                }
                for piece in &sent {
                    nodes[0].send(piece);
                }
            }
            nodes[0].send(&Msg::StreamEnd);
            for node in &mut nodes {
                let missing = node.missing();
                assert_eq!(
                    bits(&missing, image.layout().chunks),
                    vec![1, 3],
                    "{}",
                    node.name
                );
                assert!(node.refused().1.contains("chunk 3"), "{}", node.name);
                // The catch-up, directly from the controller.
                node.send(&image.chunk(1));
                node.send(&image.chunk(3));
                assert_eq!(node.finish(), image.bytes_of(&data), "{}", node.name);
                assert_eq!(node.count("RelayLost"), 0, "{}", node.name);
            }
        });
        for target in &targets {
            assert!(std::fs::read(target).unwrap() == image.data, "{target:?}");
        }
    }

    /// After a slow member is moved out, its predecessor passes on again
    /// what the members after it lack: what it holds, from its target, in
    /// pieces, each chunk checked first; what it does not hold yet comes
    /// through the stream as usual.
    #[test]
    fn a_replay_passes_on_held_chunks_from_the_target_and_skips_a_changed_one() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rrrrrr", 0, 31);
        let data = image.data_chunks();
        assert_eq!(data.len(), 6);
        let (a_target, b_target) = (dir.path().join("a.img"), dir.path().join("b.img"));
        std::thread::scope(|s| {
            let (mut a, _, _) = Driven::start(s, &env, "a", image.begin(&a_target, false));
            let (mut b, _, _) = Driven::start(s, &env, "b", image.begin(&b_target, false));
            // Chunks 0 to 2 reach A while it has no successor (B lacks them).
            for &i in &data[..3] {
                for piece in pieces(image.chunk(i), 50_000) {
                    a.send(&piece);
                }
            }
            a.wait_for("chunk 2 written", |m| {
                matches!(m, Msg::Written { index: 2, .. })
            });
            // Chunk 1 changed on A's disk since: A must not pass it on.
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&a_target)
                .unwrap();
            std::os::unix::fs::FileExt::write_all_at(&file, b"changed", image.layout().offset(1))
                .unwrap();
            let b_port = b.listen();
            a.link(b_port);
            let mut bitmap = vec![0u8; bitmap_len(image.layout().chunks)];
            for &i in &data {
                crate::proto::set_bit(&mut bitmap, i);
            }
            a.send(&Msg::Replay { bitmap });
            for &i in &data[3..] {
                for piece in pieces(image.chunk(i), 50_000) {
                    a.send(&piece);
                }
            }
            a.send(&Msg::StreamEnd);
            assert!(no_bits(&a.missing()));
            // B got 0 and 2 from A's target, 3 to 5 from the stream.
            assert_eq!(bits(&b.missing(), image.layout().chunks), vec![1]);
            assert_eq!(b.count("RelayRefused"), 0);
            b.send(&image.chunk(1));
            assert_eq!(b.finish(), image.bytes_of(&data));
        });
        assert!(std::fs::read(&b_target).unwrap() == image.data);
    }

    #[test]
    fn a_node_writes_only_what_it_needs_and_forwards_everything() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rtrtrtr", 100, 21);
        let data = image.data_chunks();
        let (a_target, b_target, c_target) = (
            dir.path().join("a.img"),
            dir.path().join("b.img"),
            dir.path().join("c.img"),
        );
        // B already holds the image but for chunks 1 and 4.
        let mut held = image.data.clone();
        for i in [1, 4] {
            held[image.layout().offset(i) as usize + 9] ^= 0xff;
        }
        std::fs::write(&b_target, &held).unwrap();
        std::thread::scope(|s| {
            let (mut a, _, _) = Driven::start(s, &env, "a", image.begin(&a_target, false));
            let (mut b, _, b_needed) = Driven::start(s, &env, "b", image.begin(&b_target, false));
            let (mut c, _, _) = Driven::start(s, &env, "c", image.begin(&c_target, false));
            assert_eq!(bits(&b_needed, image.layout().chunks), vec![1, 4]);
            let (b_port, c_port) = (b.listen(), c.listen());
            a.link(b_port);
            b.link(c_port);
            for &i in &data {
                a.send(&streamed(image.chunk(i)));
            }
            a.send(&Msg::StreamEnd);
            for node in [&mut a, &mut b, &mut c] {
                assert!(no_bits(&node.missing()), "{}", node.name);
                node.finish();
            }
            assert_eq!(a.written(), data);
            assert_eq!(b.written(), vec![1, 4], "b writes only what it lacked");
            assert_eq!(c.written(), data, "b forwarded what it did not need");
        });
        for target in [&a_target, &b_target, &c_target] {
            assert!(std::fs::read(target).unwrap() == image.data, "{target:?}");
        }
    }

    #[test]
    fn a_dead_middle_node_is_cut_out_and_its_successor_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rtrtrtrt", 0, 22);
        let data = image.data_chunks();
        let (a_target, b_target, c_target) = (
            dir.path().join("a.img"),
            dir.path().join("b.img"),
            dir.path().join("c.img"),
        );
        std::thread::scope(|s| {
            let (mut a, a_session, _) = Driven::start(s, &env, "a", image.begin(&a_target, false));
            let (b, b_session, _) = Driven::start(s, &env, "b", image.begin(&b_target, false));
            let (mut c, c_session, _) = Driven::start(s, &env, "c", image.begin(&c_target, false));
            let mut b = b;
            let (b_port, c_port) = (b.listen(), c.listen());
            a.link(b_port);
            b.link(c_port);
            for i in 0..3 {
                a.send(&streamed(image.chunk(i)));
            }
            c.wait_for("Written 2", |m| matches!(m, Msg::Written { index: 2, .. }));

            // B dies: its controller connection drops and its sockets close.
            b.hang_up();
            // B notices on reading (closed) or on acknowledging (broken pipe).
            let e = err_of(b_session.join().unwrap());
            assert!(
                matches!(
                    e,
                    AgentError::Closed(_) | AgentError::Protocol(ProtocolError::Io(_))
                ),
                "{e:?}"
            );
            let lost = a.wait_for("RelayLost", |m| matches!(m, Msg::RelayLost { .. }));
            assert!(matches!(lost, Msg::RelayLost { .. }));

            // Chunks that pass while A has no successor never reach C…
            for i in 3..5 {
                a.send(&streamed(image.chunk(i)));
            }
            a.wait_for("Written 4", |m| matches!(m, Msg::Written { index: 4, .. }));
            // …and the relink carries the rest.
            a.link(c_port);
            for i in 5..8 {
                a.send(&streamed(image.chunk(i)));
            }
            a.send(&Msg::StreamEnd);
            assert!(no_bits(&a.missing()));
            let missing = c.missing();
            assert_eq!(bits(&missing, image.layout().chunks), vec![3, 4]);
            for i in bits(&missing, image.layout().chunks) {
                c.send(&image.chunk(i));
            }
            a.finish();
            c.finish();
            let mut c_written = c.written();
            c_written.sort_unstable();
            assert_eq!(c_written, data);
            assert_eq!(
                c.count("RelayRefused"),
                0,
                "a predecessor's end is no refusal"
            );
            a_session.join().unwrap().unwrap();
            c_session.join().unwrap().unwrap();
        });
        for target in [&a_target, &c_target] {
            assert!(std::fs::read(target).unwrap() == image.data, "{target:?}");
        }
    }

    #[test]
    fn a_wrong_secret_is_refused_and_the_chain_still_completes() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rtr", 5, 23);
        let data = image.data_chunks();
        let targets = [dir.path().join("a.img"), dir.path().join("b.img")];
        let wrong: Secret = [7; RELAY_SECRET_LEN];
        std::thread::scope(|s| {
            let (mut a, _, _) = Driven::start(s, &env, "a", image.begin(&targets[0], false));
            let (mut b, _, _) = Driven::start(s, &env, "b", image.begin(&targets[1], false));
            let b_port = b.listen();

            // An agent given another secret: both ends say so.
            let Msg::RelayLost { reason, .. } = a.connect(b_port, &wrong) else {
                panic!("a linked with a wrong secret");
            };
            assert!(reason.contains("secret"), "{reason}");
            assert!(b.refused().1.contains("secret"));

            // A stranger that sends a proof made with another secret.
            let stranger = TcpStream::connect((LOCALHOST, b_port)).unwrap();
            let nonce_c = [1u8; 16];
            let mut hello = RELAY_MAGIC.to_vec();
            hello.push(RELAY_VERSION);
            hello.extend_from_slice(&nonce_c);
            (&stranger).write_all(&hello).unwrap();
            let mut nonce_l = [0u8; 16];
            let mut their_proof = [0u8; 32];
            (&stranger).read_exact(&mut nonce_l).unwrap();
            (&stranger).read_exact(&mut their_proof).unwrap();
            (&stranger)
                .write_all(proof(&wrong, b'C', &nonce_l, &nonce_c).as_bytes())
                .unwrap();
            let (peer, reason) = b.refused();
            assert_eq!(peer, stranger.local_addr().unwrap().to_string());
            assert_eq!(reason, "bad secret");
            // Refused: the connection is closed.
            let mut rest = Vec::new();
            let _ = (&stranger).read_to_end(&mut rest);
            assert!(rest.is_empty());

            a.link(b_port);
            for &i in &data {
                a.send(&streamed(image.chunk(i)));
            }
            a.send(&Msg::StreamEnd);
            for node in [&mut a, &mut b] {
                assert!(no_bits(&node.missing()), "{}", node.name);
                node.finish();
                assert_eq!(node.written(), data, "{}", node.name);
            }
        });
        for target in &targets {
            assert!(std::fs::read(target).unwrap() == image.data);
        }
    }

    #[test]
    fn garbage_on_a_relay_port_is_refused_and_the_listener_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rt", 0, 24);
        let targets = [dir.path().join("a.img"), dir.path().join("b.img")];
        std::thread::scope(|s| {
            let (mut a, _, _) = Driven::start(s, &env, "a", image.begin(&targets[0], false));
            let (mut b, b_session, _) =
                Driven::start(s, &env, "b", image.begin(&targets[1], false));
            let port = b.listen();

            let mut noise = vec![0u8; 4096];
            fastrand::Rng::with_seed(24).fill(&mut noise);
            noise[0] = b'X';
            let peer = TcpStream::connect((LOCALHOST, port)).unwrap();
            let _ = (&peer).write_all(&noise);
            assert_eq!(
                b.refused(),
                (
                    peer.local_addr().unwrap().to_string(),
                    "not a relay peer".into()
                )
            );

            let peer = TcpStream::connect((LOCALHOST, port)).unwrap();
            (&peer).write_all(b"IMGRELAY\x02").unwrap();
            assert!(b.refused().1.contains("relay version 2"));

            let peer = TcpStream::connect((LOCALHOST, port)).unwrap();
            (&peer).write_all(b"IMGRE").unwrap();
            peer.shutdown(Shutdown::Write).unwrap();
            assert!(b.refused().1.contains("closed during the handshake"));

            // After a good handshake: a frame longer than any chunk…
            let peer = relay_peer(port, &SECRET);
            (&peer).write_all(&[0xff, 0xff, 0xff, 0x7f, 36]).unwrap();
            let reason = b.refused().1;
            assert!(reason.contains("refused"), "{reason}");
            // …a frame that does not decode…
            let peer = relay_peer(port, &SECRET);
            (&peer).write_all(&[1, 0, 0, 0, 200]).unwrap();
            assert!(b.refused().1.contains("unknown message tag 200"));
            // …anything but the stream.
            let mut peer = relay_peer(port, &SECRET);
            write_msg_sync(&mut peer, &Msg::Finish).unwrap();
            assert_eq!(b.refused().1, "unexpected Finish on a relay connection");
            // A relayed chunk beyond the image.
            write_msg_sync(
                &mut relay_peer(port, &SECRET),
                &streamed(Msg::Chunk {
                    index: 99,
                    codec: Codec::Raw,
                    data: vec![1],
                }),
            )
            .unwrap();
            assert!(b.refused().1.contains("chunk index 99 out of range"));

            // Silence: the handshake has a deadline.
            let silent = TcpStream::connect((LOCALHOST, port)).unwrap();
            let started = Instant::now();
            assert_eq!(b.refused().1, "handshake timed out");
            assert!(started.elapsed() < RELAY_TIMEOUT + Duration::from_secs(5));
            drop(silent);

            // The listener still takes a real predecessor.
            a.link(port);
            for i in image.data_chunks() {
                a.send(&streamed(image.chunk(i)));
            }
            a.send(&Msg::StreamEnd);
            for node in [&mut a, &mut b] {
                assert!(no_bits(&node.missing()), "{}", node.name);
                node.finish();
            }
            b_session.join().unwrap().unwrap();
        });
        assert!(std::fs::read(&targets[1]).unwrap() == image.data);
    }

    #[test]
    fn a_relayed_chunk_that_fails_verification_is_refused_not_written_nor_forwarded() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rtr", 0, 25);
        let targets = [dir.path().join("b.img"), dir.path().join("c.img")];
        std::thread::scope(|s| {
            let (mut b, _, _) = Driven::start(s, &env, "b", image.begin(&targets[0], false));
            let (mut c, _, _) = Driven::start(s, &env, "c", image.begin(&targets[1], false));
            let (b_port, c_port) = (b.listen(), c.listen());
            b.link(c_port);
            let mut predecessor = relay_peer(b_port, &SECRET);
            let mut bad = image.chunk_data(1).to_vec();
            bad[3] ^= 1;
            let corrupt = Msg::StreamChunk {
                index: 1,
                codec: Codec::Raw,
                data: bad,
            };
            for msg in [streamed(image.chunk(0)), corrupt, streamed(image.chunk(2))] {
                write_msg_sync(&mut predecessor, &msg).unwrap();
            }
            write_msg_sync(&mut predecessor, &Msg::StreamEnd).unwrap();
            let (peer, reason) = b.refused();
            assert_eq!(peer, predecessor.local_addr().unwrap().to_string());
            assert_eq!(reason, "chunk 1 failed verification");
            for node in [&mut b, &mut c] {
                assert_eq!(bits(&node.missing(), 3), vec![1], "{}", node.name);
                assert_eq!(node.written(), vec![0, 2], "{}", node.name);
                node.send(&image.chunk(1));
                node.finish();
            }
            assert_eq!(c.count("RelayRefused"), 0, "the bad chunk went no further");
        });
        for target in &targets {
            assert!(std::fs::read(target).unwrap() == image.data);
        }
    }

    #[test]
    fn relay_requests_that_cannot_be_met() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rt", 0, 26);
        let target = dir.path().join("disk.img");
        let taken = TcpListener::bind((LOCALHOST, 0)).unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let listen = |bind: &str, port_min, port_max| Msg::RelayListen {
            secret: SECRET.to_vec(),
            bind: bind.into(),
            port_min,
            port_max,
        };

        // A port range with no free port, a bind that is no address: fatal.
        for (request, needle) in [
            (listen(LOCALHOST, taken_port, taken_port), "no free port"),
            (listen("node-7", 0, 0), "not an IP address"),
        ] {
            let (result, replies) = run(&env, &[image.begin(&target, false), request]);
            let e = err_of(result);
            assert!(matches!(e, AgentError::Relay(_)), "{e:?}");
            assert!(e.to_string().contains(needle), "{e}");
            assert_eq!(e.exit_code(), 3);
            assert!(matches!(replies.last(), Some(Msg::Error { .. })));
        }
        // Controller mistakes: malformed.
        let twice = [
            image.begin(&target, false),
            listen(LOCALHOST, 0, 0),
            listen(LOCALHOST, 0, 0),
        ];
        assert_malformed(
            &env,
            &encode(&[&[Msg::hello()], &twice[..]].concat()),
            "second RelayListen",
        );
        let backwards = [image.begin(&target, false), listen(LOCALHOST, 9, 8)];
        assert_malformed(
            &env,
            &encode(&[&[Msg::hello()], &backwards[..]].concat()),
            "port range",
        );
        let beyond = [
            image.begin(&target, false),
            streamed(Msg::Chunk {
                index: 2,
                codec: Codec::Raw,
                data: vec![],
            }),
        ];
        assert_malformed(
            &env,
            &encode(&[&[Msg::hello()], &beyond[..]].concat()),
            "out of range",
        );

        // Something that is no relay listener: RelayLost, and the load goes
        // on without a successor.
        std::thread::scope(|s| {
            // Accept one connection and hang up on it; bounded, should the test fail first.
            taken.set_nonblocking(true).unwrap();
            s.spawn(|| {
                let deadline = Instant::now() + REPLY_WAIT;
                while Instant::now() < deadline {
                    if taken.accept().is_ok() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            let (mut a, a_session, _) = Driven::start(s, &env, "a", image.begin(&target, false));
            let Msg::RelayLost { reason, .. } = a.connect(taken_port, &SECRET) else {
                panic!("linked to no relay listener");
            };
            assert!(
                reason.starts_with(&format!("cannot link to {LOCALHOST} port {taken_port}: ")),
                "{reason}"
            );
            assert!(reason.contains("hung up"), "{reason}");
            for i in image.data_chunks() {
                a.send(&streamed(image.chunk(i)));
            }
            a.send(&Msg::StreamEnd);
            assert!(no_bits(&a.missing()));
            // StreamEnd again: the same answer.
            a.send(&Msg::StreamEnd);
            assert!(no_bits(&a.missing()));
            a.finish();
            a_session.join().unwrap().unwrap();
        });
        assert!(std::fs::read(&target).unwrap() == image.data);
    }

    /// A RelayConnect takes effect before the relayed chunks queued ahead
    /// of it: behind a slow successor those take long to pass on, and
    /// until the relink the chain waits for that successor.
    #[test]
    fn a_relink_overtakes_the_relayed_chunks_queued_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        // 10 MiB: far more than the stuck successor's socket buffers hold.
        let image = Image::new(&"r".repeat(160), 0, 41);
        let chunks = image.layout().chunks;
        let target = dir.path().join("a.img");
        let ((stuck, stuck_port), (next, next_port)) =
            (small_buffer_listener(), successor_listener());
        // What a successor gets: the chunk indices, in order, each checked.
        let take = |listener: &TcpListener, go: &std::sync::atomic::AtomicBool| {
            let stream = accept_successor(listener, Duration::ZERO);
            let deadline = Instant::now() + REPLY_WAIT;
            while !go.load(std::sync::atomic::Ordering::Relaxed) {
                assert!(Instant::now() < deadline, "never told to read");
                std::thread::sleep(Duration::from_millis(5));
            }
            let mut input = std::io::BufReader::new(&stream);
            let mut got = Vec::new();
            while let Ok(msg) = crate::proto::read_msg_sync(&mut input) {
                match msg {
                    Msg::StreamChunk { index, data, .. } => {
                        let sent = streamed(image.chunk(index as usize));
                        assert!(
                            matches!(sent, Msg::StreamChunk { data: d, .. } if d == data),
                            "chunk {index} differs"
                        );
                        got.push(index as usize);
                    }
                    Msg::StreamEnd => break,
                    other => panic!("{other:?}"),
                }
            }
            got
        };
        let go = std::sync::atomic::AtomicBool::new(false);
        let at_once = std::sync::atomic::AtomicBool::new(true);
        std::thread::scope(|s| {
            let (mut a, a_session, _) = Driven::start(s, &env, "a", image.begin(&target, false));
            let port = a.listen();
            // A successor that reads nothing until told to.
            let stuck_reader = s.spawn(|| take(&stuck, &go));
            a.link(stuck_port);
            let image = &image;
            let predecessor = s.spawn(move || {
                let mut p = relay_peer(port, &SECRET);
                for i in 0..chunks {
                    write_msg_sync(&mut p, &streamed(image.chunk(i))).unwrap();
                }
                write_msg_sync(&mut p, &Msg::StreamEnd).unwrap();
                p
            });
            // The agent is stuck passing chunk k on, having written k - 1,
            // with the chunks after it queued.
            a.settle(Duration::from_millis(300));
            let k = a.written().last().map_or(0, |w| w + 1);
            assert!(k + 10 < chunks, "the stuck successor took {k} chunks");
            let next_reader = s.spawn(|| take(&next, &at_once));
            a.send(&Msg::RelayConnect {
                secret: SECRET.to_vec(),
                addr: LOCALHOST.into(),
                port: next_port,
                lossy: false,
            });
            std::thread::sleep(Duration::from_millis(200));
            go.store(true, std::sync::atomic::Ordering::Relaxed);
            a.wait_for("RelayLinked", |m| matches!(m, Msg::RelayLinked { .. }));
            // Chunk k was on its way; the RelayConnect came next, before
            // the chunks queued behind k, and dropped the old successor.
            assert_eq!(stuck_reader.join().unwrap(), (0..=k).collect::<Vec<_>>());
            let got = next_reader.join().unwrap();
            let first = got[0];
            assert!(first > k, "{first}");
            assert_eq!(got, (first..chunks).collect::<Vec<_>>());
            assert!(no_bits(&a.missing()));
            a.finish();
            a_session.join().unwrap().unwrap();
            drop(predecessor.join().unwrap());
        });
        assert!(std::fs::read(&target).unwrap() == image.data);
    }

    /// After a relink, the old predecessor's last pieces may still come:
    /// once the new one has sent, they are dropped, not interleaved with
    /// its pieces (which would break the chunks of both, here and at every
    /// node after this one).
    #[test]
    fn the_old_predecessors_late_pieces_are_dropped_once_the_new_one_sends() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rr", 0, 43);
        let target = dir.path().join("a.img");
        let (listener, successor_port) = successor_listener();
        let (zero, one) = (
            pieces(image.chunk(0), 16_384),
            pieces(image.chunk(1), 16_384),
        );
        assert!(zero.len() >= 4 && one.len() >= 2);
        let id = |msg: &Msg| match msg {
            Msg::StreamPiece { index, offset, .. } => (*index, *offset),
            other => panic!("{other:?}"),
        };
        std::thread::scope(|s| {
            let (mut a, a_session, _) = Driven::start(s, &env, "a", image.begin(&target, false));
            let port = a.listen();
            let accepted = s.spawn(|| accept_successor(&listener, Duration::ZERO));
            a.link(successor_port);
            let successor = accepted.join().unwrap();
            let mut passed = std::io::BufReader::new(&successor);
            let mut next = || crate::proto::read_msg_sync(&mut passed).unwrap();
            let mut old = relay_peer(port, &SECRET);
            for piece in &zero[..2] {
                write_msg_sync(&mut old, piece).unwrap();
                assert_eq!(id(&next()), id(piece));
            }
            // The relink: the new predecessor starts chunk 1.
            let mut new = relay_peer(port, &SECRET);
            write_msg_sync(&mut new, &one[0]).unwrap();
            assert_eq!(id(&next()), id(&one[0]));
            // The old one's rest of chunk 0 comes late.
            for piece in &zero[2..] {
                write_msg_sync(&mut old, piece).unwrap();
            }
            std::thread::sleep(Duration::from_millis(200));
            for piece in &one[1..] {
                write_msg_sync(&mut new, piece).unwrap();
            }
            write_msg_sync(&mut new, &Msg::StreamEnd).unwrap();
            for piece in &one[1..] {
                assert_eq!(id(&next()), id(piece));
            }
            assert_eq!(next(), Msg::StreamEnd);
            // Chunk 1 came whole from the new predecessor; chunk 0 is left
            // to the catch-up.
            assert_eq!(bits(&a.missing(), 2), vec![0]);
            assert_eq!(a.written(), vec![1]);
            a.send(&image.chunk(0));
            a.finish();
            a_session.join().unwrap().unwrap();
        });
        assert!(std::fs::read(&target).unwrap() == image.data);
    }

    /// The end of the stream that comes while a relink is under way is
    /// passed on through the new link once it is up: the nodes after this
    /// one would otherwise wait for it until the deadline.
    #[test]
    fn the_end_of_the_stream_waits_for_a_relink_under_way() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rr", 0, 47);
        let target = dir.path().join("a.img");
        let (listener, port) = successor_listener();
        std::thread::scope(|s| {
            let (mut a, a_session, _) = Driven::start(s, &env, "a", image.begin(&target, false));
            for i in image.data_chunks() {
                a.send(&streamed(image.chunk(i)));
            }
            // A successor slow to answer the handshake: the end of the
            // stream comes while the link is being made.
            let next = s.spawn(|| {
                let stream = accept_successor(&listener, Duration::from_millis(300));
                let mut input = std::io::BufReader::new(&stream);
                crate::proto::read_msg_sync(&mut input)
            });
            a.send(&Msg::RelayConnect {
                secret: SECRET.to_vec(),
                addr: LOCALHOST.into(),
                port,
                lossy: false,
            });
            a.send(&Msg::StreamEnd);
            assert!(no_bits(&a.missing()));
            assert_eq!(next.join().unwrap().unwrap(), Msg::StreamEnd);
            // Its Missing came once the end had gone on.
            let order: Vec<&str> = a
                .log
                .iter()
                .map(Msg::name)
                .filter(|n| ["RelayLinked", "Missing"].contains(n))
                .collect();
            assert_eq!(order, ["RelayLinked", "Missing"]);
            a.finish();
            a_session.join().unwrap().unwrap();
        });
        assert!(std::fs::read(&target).unwrap() == image.data);
    }

    /// A successor that closes its link after it got the end of the stream
    /// has finished: no RelayLost (the controller would take it out of the
    /// chain and send the end again to every node after it, ahead of data
    /// still on its way to them).
    #[test]
    fn a_successor_that_leaves_after_the_end_of_the_stream_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rr", 0, 53);
        let target = dir.path().join("a.img");
        let (listener, port) = successor_listener();
        std::thread::scope(|s| {
            let (mut a, a_session, _) = Driven::start(s, &env, "a", image.begin(&target, false));
            let next = s.spawn(|| {
                let stream = accept_successor(&listener, Duration::ZERO);
                let mut input = std::io::BufReader::new(&stream);
                while crate::proto::read_msg_sync(&mut input).unwrap() != Msg::StreamEnd {}
                stream
            });
            a.link(port);
            for i in image.data_chunks() {
                a.send(&streamed(image.chunk(i)));
            }
            a.send(&Msg::StreamEnd);
            assert!(no_bits(&a.missing()));
            // The successor finished and left before this node's Finish.
            drop(next.join().unwrap());
            a.settle(Duration::from_millis(300));
            assert_eq!(a.count("RelayLost"), 0, "{:?}", a.log);
            a.finish();
            a_session.join().unwrap().unwrap();
        });
    }
}
