//! Test helpers shared by the agent's modules: a test image, an agent
//! session driven in memory, and a relay chain driven over sockets.

use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::Scope;
use std::time::{Duration, Instant};

use crate::agent::env::AgentEnv;
use crate::agent::error::AgentError;
use crate::agent::session::serve;
use crate::agent::target::Layout;
use crate::image::MIN_CHUNK_SIZE;
use crate::image::digest::{chunk_digest, is_zero};
use crate::proto::relay::Secret;
use crate::proto::relay::connect_handshake;
use crate::proto::{Codec, Msg, ProtocolError, RELAY_SECRET_LEN, bit, bitmap_len, read_msg_sync};
use crate::proto::{LoadBegin, set_bit, write_msg_sync};

pub(super) const CS: u32 = MIN_CHUNK_SIZE;
pub(super) const CSU: usize = CS as usize;

/// A test image: one letter per full chunk (`z` zeros, `r` random,
/// `h` random and zero 4 KiB blocks in turn, `t` compressible text), then
/// `tail` random bytes.
pub(super) struct Image {
    pub(super) data: Vec<u8>,
}

impl Image {
    pub(super) fn new(pattern: &str, tail: usize, seed: u64) -> Image {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut data = Vec::new();
        for (i, c) in pattern.chars().enumerate() {
            let mut chunk = vec![0u8; CSU];
            match c {
                'z' => {}
                'r' => rng.fill(&mut chunk),
                'h' => {
                    for block in chunk.chunks_mut(8192) {
                        rng.fill(&mut block[..4096]);
                    }
                }
                _ => {
                    let text: Vec<u8> = (0..)
                        .flat_map(|n| format!("line {n} of chunk {i} seed {seed}\n").into_bytes())
                        .take(CSU)
                        .collect();
                    chunk.copy_from_slice(&text);
                }
            }
            data.extend(chunk);
        }
        let mut t = vec![0u8; tail];
        rng.fill(&mut t);
        data.extend(t);
        Image { data }
    }

    pub(super) fn layout(&self) -> Layout {
        Layout::new(self.data.len() as u64, CS).unwrap()
    }

    pub(super) fn chunk_data(&self, i: usize) -> &[u8] {
        let l = self.layout();
        let at = l.offset(i) as usize;
        &self.data[at..at + l.chunk_len(i)]
    }

    pub(super) fn digests(&self) -> Vec<u128> {
        (0..self.layout().chunks)
            .map(|i| chunk_digest(self.chunk_data(i)))
            .collect()
    }

    pub(super) fn zero_bitmap(&self) -> Vec<u8> {
        let n = self.layout().chunks;
        let mut b = vec![0; bitmap_len(n)];
        for i in 0..n {
            if is_zero(self.chunk_data(i)) {
                set_bit(&mut b, i);
            }
        }
        b
    }

    pub(super) fn identity(&self) -> u128 {
        let bytes: Vec<u8> = self
            .digests()
            .iter()
            .flat_map(|d| d.to_le_bytes())
            .collect();
        xxhash_rust::xxh3::xxh3_128(&bytes)
    }

    pub(super) fn begin(&self, target: &Path, force: bool) -> Msg {
        Msg::LoadBegin(self.load_begin(target, force))
    }

    /// The LoadBegin of [`Image::begin`], to vary a field of.
    pub(super) fn load_begin(&self, target: &Path, force: bool) -> LoadBegin {
        LoadBegin {
            target: target.to_string_lossy().into_owned(),
            size: self.data.len() as u64,
            chunk_size: CS,
            identity: self.identity(),
            force,
            force_mounted: false,
            verify: false,
            holder: String::new(),
            digests: self.digests(),
            zero: self.zero_bitmap(),
            image: "test.img".into(),
            user: "tester".into(),
            host: "testhost".into(),
        }
    }

    /// Even chunks travel compressed, odd ones raw.
    pub(super) fn chunk(&self, i: usize) -> Msg {
        let raw = self.chunk_data(i);
        let (codec, data) = if i.is_multiple_of(2) {
            (Codec::Zstd, zstd::bulk::compress(raw, 3).unwrap())
        } else {
            (Codec::Raw, raw.to_vec())
        };
        Msg::Chunk {
            index: i as u32,
            codec,
            data,
        }
    }

    pub(super) fn data_chunks(&self) -> Vec<usize> {
        (0..self.layout().chunks)
            .filter(|&i| !is_zero(self.chunk_data(i)))
            .collect()
    }

    pub(super) fn bytes_of(&self, chunks: &[usize]) -> u64 {
        chunks
            .iter()
            .map(|&i| self.layout().chunk_len(i) as u64)
            .sum()
    }

    /// Begin, the given chunks, Finish.
    pub(super) fn load(&self, target: &Path, force: bool, chunks: &[usize]) -> Vec<Msg> {
        let mut msgs = vec![self.begin(target, force)];
        msgs.extend(chunks.iter().map(|&i| self.chunk(i)));
        msgs.push(Msg::Finish);
        msgs
    }
}

pub(super) fn env(dir: &tempfile::TempDir) -> AgentEnv {
    AgentEnv {
        stamp_dir: dir.path().join("stamps"),
    }
}

pub(super) fn encode(msgs: &[Msg]) -> Vec<u8> {
    let mut buf = Vec::new();
    for m in msgs {
        write_msg_sync(&mut buf, m).unwrap();
    }
    buf
}

pub(super) fn decode_all(mut out: &[u8]) -> Vec<Msg> {
    let mut msgs = Vec::new();
    loop {
        match read_msg_sync(&mut out) {
            Ok(m) => msgs.push(m),
            Err(ProtocolError::Closed) => return msgs,
            Err(e) => panic!("the agent sent a bad frame: {e}"),
        }
    }
}

pub(super) fn run_bytes(env: &AgentEnv, input: &[u8]) -> (Result<(), AgentError>, Vec<Msg>) {
    let mut out = Vec::new();
    let result = serve(input, &mut out, env);
    let replies = decode_all(&out);
    assert_eq!(
        replies.first(),
        Some(&Msg::hello()),
        "the agent greets first"
    );
    if let Err(e) = &result
        && !matches!(e, AgentError::Peer(_))
    {
        assert_eq!(
            replies.last(),
            Some(&Msg::Error {
                kind: e.kind(),
                message: e.to_string()
            }),
            "the controller is told why"
        );
    }
    (result, replies)
}

pub(super) fn assert_malformed(env: &AgentEnv, input: &[u8], needle: &str) {
    let (result, _) = run_bytes(env, input);
    let e = err_of(result);
    assert_eq!(e.exit_code(), 2, "{e}");
    assert!(e.to_string().contains(needle), "{e:?} lacks {needle:?}");
}

/// A controller's Hello, then `msgs`, then the end of the stream.
pub(super) fn run(env: &AgentEnv, msgs: &[Msg]) -> (Result<(), AgentError>, Vec<Msg>) {
    let mut all = vec![Msg::hello()];
    all.extend_from_slice(msgs);
    run_bytes(env, &encode(&all))
}

pub(super) fn needed(replies: &[Msg]) -> (bool, Vec<u8>, u64) {
    match &replies[1] {
        Msg::Needed {
            up_to_date,
            bitmap,
            bytes_written,
            ..
        } => (*up_to_date, bitmap.clone(), *bytes_written),
        other => panic!("expected Needed, got {other:?}"),
    }
}

pub(super) fn bits(bitmap: &[u8], n: usize) -> Vec<usize> {
    (0..n).filter(|&i| bit(bitmap, i)).collect()
}

pub(super) fn stamps(env: &AgentEnv) -> usize {
    std::fs::read_dir(&env.stamp_dir).map_or(0, |d| d.count())
}

pub(super) fn err_of(result: Result<(), AgentError>) -> AgentError {
    match result {
        Ok(()) => panic!("expected an error"),
        Err(e) => e,
    }
}

// A relay chain of agents driven over sockets.

pub(super) const SECRET: Secret = [42; RELAY_SECRET_LEN];
pub(super) const LOCALHOST: &str = "127.0.0.1";
/// Longest a test waits for one reply: a hung agent fails the test.
pub(super) const REPLY_WAIT: Duration = Duration::from_secs(30);

/// An agent serving one load in a thread, driven as a controller would:
/// frames in on one end of a socket pair, replies collected by a thread.
pub(super) struct Driven {
    pub(super) name: &'static str,
    pub(super) ctl: UnixStream,
    pub(super) replies: std::sync::mpsc::Receiver<Msg>,
    /// Replies not yet taken by `wait_for`.
    pub(super) pending: std::collections::VecDeque<Msg>,
    /// Every reply, in order.
    pub(super) log: Vec<Msg>,
}

pub(super) type Session<'scope> = std::thread::ScopedJoinHandle<'scope, Result<(), AgentError>>;

impl Driven {
    /// Start an agent, send Hello and `begin`; returns the Needed bitmap.
    pub(super) fn start<'scope>(
        s: &'scope Scope<'scope, '_>,
        env: &'scope AgentEnv,
        name: &'static str,
        begin: Msg,
    ) -> (Driven, Session<'scope>, Vec<u8>) {
        let (ctl, agent) = UnixStream::pair().unwrap();
        ctl.set_write_timeout(Some(REPLY_WAIT)).unwrap();
        let agent_in = agent.try_clone().unwrap();
        let session = s.spawn(move || serve(agent_in, agent, env));
        let mut from_agent = ctl.try_clone().unwrap();
        let (tx, replies) = std::sync::mpsc::channel();
        s.spawn(move || {
            while let Ok(msg) = read_msg_sync(&mut from_agent) {
                if tx.send(msg).is_err() {
                    return;
                }
            }
        });
        let mut node = Driven {
            name,
            ctl,
            replies,
            pending: Default::default(),
            log: Vec::new(),
        };
        node.send(&Msg::hello());
        node.send(&begin);
        node.wait_for("Hello", |m| matches!(m, Msg::Hello { .. }));
        let Msg::Needed {
            up_to_date: false,
            bitmap,
            ..
        } = node.wait_for("Needed", |m| matches!(m, Msg::Needed { .. }))
        else {
            panic!("{name}: expected Needed with up_to_date false");
        };
        (node, session, bitmap)
    }

    pub(super) fn send(&mut self, msg: &Msg) {
        write_msg_sync(&mut self.ctl, msg).unwrap();
    }

    /// The first reply, pending or to come, that `pred` accepts.
    pub(super) fn wait_for(&mut self, what: &str, pred: impl Fn(&Msg) -> bool) -> Msg {
        if let Some(at) = self.pending.iter().position(&pred) {
            return self.pending.remove(at).unwrap();
        }
        let deadline = Instant::now() + REPLY_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = self.replies.recv_timeout(left).unwrap_or_else(|e| {
                panic!(
                    "{}: no {what} ({e}); got {:?}",
                    self.name,
                    self.log.iter().map(Msg::name).collect::<Vec<_>>()
                )
            });
            self.log.push(msg.clone());
            if pred(&msg) {
                return msg;
            }
            self.pending.push_back(msg);
        }
    }

    /// Take replies until none comes for `gap` (within [`REPLY_WAIT`]),
    /// but the RelayStats an agent sends every so often while it waits on
    /// its successor.
    pub(super) fn settle(&mut self, gap: Duration) {
        let deadline = Instant::now() + REPLY_WAIT;
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            let left = gap.saturating_sub(quiet_since.elapsed());
            if left.is_zero() {
                return;
            }
            match self.replies.recv_timeout(left) {
                Ok(msg) => {
                    if !matches!(msg, Msg::RelayStats { .. }) {
                        quiet_since = Instant::now();
                    }
                    self.log.push(msg.clone());
                    self.pending.push_back(msg);
                }
                Err(_) => return,
            }
        }
        panic!("{}: replies did not stop coming", self.name);
    }

    pub(super) fn written(&self) -> Vec<usize> {
        self.log
            .iter()
            .filter_map(|m| match m {
                Msg::Written { index, .. } => Some(*index as usize),
                _ => None,
            })
            .collect()
    }

    pub(super) fn count(&self, name: &str) -> usize {
        self.log.iter().filter(|m| m.name() == name).count()
    }

    pub(super) fn listen(&mut self) -> u16 {
        self.send(&Msg::RelayListen {
            secret: SECRET.to_vec(),
            bind: LOCALHOST.into(),
            port_min: 0,
            port_max: 0,
        });
        match self.wait_for("RelayPort", |m| matches!(m, Msg::RelayPort { .. })) {
            Msg::RelayPort { port } => port,
            _ => unreachable!(),
        }
    }

    /// RelayConnect; the reply, RelayLinked or RelayLost.
    pub(super) fn connect(&mut self, port: u16, secret: &Secret) -> Msg {
        self.connect_fed(port, secret, false)
    }

    /// RelayConnect, the successor fed lossily or not; the reply.
    pub(super) fn connect_fed(&mut self, port: u16, secret: &Secret, lossy: bool) -> Msg {
        self.send(&Msg::RelayConnect {
            secret: secret.to_vec(),
            addr: LOCALHOST.into(),
            port,
            lossy,
        });
        self.wait_for("RelayLinked or RelayLost", |m| {
            matches!(m, Msg::RelayLinked { .. } | Msg::RelayLost { .. })
        })
    }

    pub(super) fn link(&mut self, port: u16) {
        let reply = self.connect(port, &SECRET);
        assert_eq!(
            reply,
            Msg::RelayLinked {
                addr: LOCALHOST.into(),
                port
            },
            "{}",
            self.name
        );
    }

    pub(super) fn missing(&mut self) -> Vec<u8> {
        match self.wait_for("Missing", |m| matches!(m, Msg::Missing { .. })) {
            Msg::Missing { bitmap } => bitmap,
            _ => unreachable!(),
        }
    }

    pub(super) fn refused(&mut self) -> (String, String) {
        match self.wait_for("RelayRefused", |m| matches!(m, Msg::RelayRefused { .. })) {
            Msg::RelayRefused { peer, reason } => (peer, reason),
            _ => unreachable!(),
        }
    }

    /// Finish; the Finished reply's bytes.
    pub(super) fn finish(&mut self) -> u64 {
        self.send(&Msg::Finish);
        match self.wait_for("Finished", |m| {
            matches!(m, Msg::Finished { .. } | Msg::Error { .. })
        }) {
            Msg::Finished { bytes_written } => bytes_written,
            other => panic!("{}: {other:?}", self.name),
        }
    }

    /// What a killed controller connection looks like to the agent.
    pub(super) fn hang_up(&self) {
        let _ = self.ctl.shutdown(Shutdown::Both);
    }
}

impl Drop for Driven {
    /// A failing test must not leave an agent waiting for its controller.
    fn drop(&mut self) {
        self.hang_up();
    }
}

pub(super) fn streamed(chunk: Msg) -> Msg {
    match chunk {
        Msg::Chunk { index, codec, data } => Msg::StreamChunk { index, codec, data },
        other => other,
    }
}

/// A chunk as the controller streams a large one: pieces of `size` bytes.
pub(super) fn pieces(chunk: Msg, size: usize) -> Vec<Msg> {
    let Msg::Chunk { index, codec, data } = chunk else {
        panic!("not a chunk: {chunk:?}")
    };
    let total = data.len() as u32;
    data.chunks(size)
        .enumerate()
        .map(|(k, piece)| Msg::StreamPiece {
            index,
            codec,
            offset: (k * size) as u32,
            total,
            data: piece.to_vec(),
        })
        .collect()
}

pub(super) fn no_bits(bitmap: &[u8]) -> bool {
    bitmap.iter().all(|&b| b == 0)
}

/// A raw successor's listener on loopback, and its port.
pub(super) fn successor_listener() -> (std::net::TcpListener, u16) {
    let listener = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

/// A successor's listener whose connections keep a small receive buffer
/// (64 KiB, not grown by the kernel): a successor that reads nothing then
/// holds little, whatever the machine lets TCP buffers grow to
/// (`net.ipv4.tcp_rmem` allows 32 MiB on recent kernels).
pub(super) fn small_buffer_listener() -> (std::net::TcpListener, u16) {
    let (listener, port) = successor_listener();
    let small: libc::c_int = 64 << 10;
    // SAFETY: one int, on a socket we own; accepted sockets inherit it.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&listener),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            std::ptr::from_ref(&small).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
    (listener, port)
}

/// Accept one relay link on `listener`, answer its handshake after
/// `delay`; its reads time out after [`REPLY_WAIT`].
pub(super) fn accept_successor(listener: &std::net::TcpListener, delay: Duration) -> TcpStream {
    // Within REPLY_WAIT: a test that failed before its agent linked must
    // end, not leave this thread waiting for ever in its scope.
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + REPLY_WAIT;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("no relay link came: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    std::thread::sleep(delay);
    crate::proto::relay::accept_handshake_within(&stream, &SECRET, Duration::from_secs(5)).unwrap();
    stream.set_read_timeout(Some(REPLY_WAIT)).unwrap();
    stream
}

/// A raw relay peer that passed the handshake.
pub(super) fn relay_peer(port: u16, secret: &Secret) -> TcpStream {
    let stream = TcpStream::connect((LOCALHOST, port)).unwrap();
    connect_handshake(&stream, secret).unwrap();
    stream
}
