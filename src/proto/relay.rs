//! The relay handshake between two agents of a chain: each side proves it
//! holds the run's secret without sending it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Length of the per-run relay secret (a blake3 key).
pub const RELAY_SECRET_LEN: usize = 32;

// Handshake, connector C to listener L, with the 32-byte secret as the key:
//   C→L  "IMGRELAY" ‖ version 1 ‖ nonce_c (16 bytes)
//   L→C  nonce_l (16) ‖ blake3_keyed(secret, "L" ‖ nonce_c ‖ nonce_l)
//   C→L  blake3_keyed(secret, "C" ‖ nonce_l ‖ nonce_c)
// then ordinary frames, StreamChunk and StreamEnd only, from C to L.

/// How long a relay connect may take, a relay handshake as a whole, and one
/// write to the successor without progress.
pub(crate) const RELAY_TIMEOUT: Duration = Duration::from_secs(5);

/// The connector's first bytes: `IMGRELAY`, version, then its nonce.
pub(crate) const RELAY_MAGIC: [u8; 8] = *b"IMGRELAY";
pub(crate) const RELAY_VERSION: u8 = 1;

pub(crate) type Secret = [u8; RELAY_SECRET_LEN];

/// blake3 keyed with the secret over `role ‖ first ‖ second`: what each side
/// shows to prove it holds the secret (`L` the listener, `C` the connector).
pub(crate) fn proof(
    secret: &Secret,
    role: u8,
    first: &[u8; 16],
    second: &[u8; 16],
) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new_keyed(secret);
    hasher.update(&[role]);
    hasher.update(first);
    hasher.update(second);
    hasher.finalize()
}

/// A handshake nonce from the OS's randomness (never a predictable one).
pub(crate) fn nonce() -> Result<[u8; 16], String> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).map_err(|e| format!("no randomness for a nonce: {e}"))?;
    Ok(nonce)
}

/// The listener's side: the connector's magic, version and nonce; ours and
/// our proof; the connector's proof. Err is the reason for RelayRefused.
/// The deadline is the listener's (it gives strangers less time than
/// [`RELAY_TIMEOUT`]).
pub(crate) fn accept_handshake_within(
    stream: &TcpStream,
    secret: &Secret,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut magic = [0u8; 8];
    read_by(stream, &mut magic, deadline).map_err(handshake_error)?;
    if magic != RELAY_MAGIC {
        return Err("not a relay peer".into());
    }
    let mut version = [0u8; 1];
    read_by(stream, &mut version, deadline).map_err(handshake_error)?;
    if version[0] != RELAY_VERSION {
        return Err(format!(
            "relay version {}, this agent speaks {RELAY_VERSION}",
            version[0]
        ));
    }
    let mut nonce_c = [0u8; 16];
    read_by(stream, &mut nonce_c, deadline).map_err(handshake_error)?;
    let nonce_l = nonce()?;
    write_by(stream, &nonce_l, deadline).map_err(handshake_error)?;
    let ours = proof(secret, b'L', &nonce_c, &nonce_l);
    write_by(stream, ours.as_bytes(), deadline).map_err(handshake_error)?;
    let mut theirs = [0u8; 32];
    read_by(stream, &mut theirs, deadline).map_err(|e| {
        if hung_up(&e) {
            "the peer hung up instead of proving it holds the secret (a different secret?)"
                .to_string()
        } else {
            handshake_error(e)
        }
    })?;
    // blake3::Hash compares in constant time.
    if blake3::Hash::from_bytes(theirs) != proof(secret, b'C', &nonce_l, &nonce_c) {
        return Err("bad secret".into());
    }
    Ok(())
}

/// The connector's side of [`accept_handshake_within`].
pub(crate) fn connect_handshake(stream: &TcpStream, secret: &Secret) -> Result<(), String> {
    let deadline = Instant::now() + RELAY_TIMEOUT;
    let nonce_c = nonce()?;
    let mut hello = [0u8; 25];
    hello[..8].copy_from_slice(&RELAY_MAGIC);
    hello[8] = RELAY_VERSION;
    hello[9..].copy_from_slice(&nonce_c);
    write_by(stream, &hello, deadline).map_err(handshake_error)?;
    let mut nonce_l = [0u8; 16];
    let mut theirs = [0u8; 32];
    read_by(stream, &mut nonce_l, deadline)
        .and_then(|()| read_by(stream, &mut theirs, deadline))
        .map_err(|e| {
            if hung_up(&e) {
                "the listener hung up during the handshake (not a relay listener?)".to_string()
            } else {
                handshake_error(e)
            }
        })?;
    if blake3::Hash::from_bytes(theirs) != proof(secret, b'L', &nonce_c, &nonce_l) {
        return Err("bad secret: the listener does not hold this run's secret".into());
    }
    let ours = proof(secret, b'C', &nonce_l, &nonce_c);
    write_by(stream, ours.as_bytes(), deadline).map_err(handshake_error)
}

/// The other side closed (a reset if it left our bytes unread).
pub(crate) fn hung_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

pub(crate) fn handshake_error(e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "handshake timed out".into(),
        _ if hung_up(&e) => "connection closed during the handshake".into(),
        _ => format!("handshake failed: {e}"),
    }
}

pub(crate) fn time_left(deadline: Instant) -> Option<Duration> {
    Some(deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero())
}

pub(crate) fn timed_out() -> io::Error {
    io::ErrorKind::TimedOut.into()
}

/// `read_exact` that gives up at `deadline`, however the bytes trickle in.
pub(crate) fn read_by(stream: &TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        stream.set_read_timeout(Some(time_left(deadline).ok_or_else(timed_out)?))?;
        match (&*stream).read(&mut buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `write_all` that gives up at `deadline`.
pub(crate) fn write_by(stream: &TcpStream, buf: &[u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        stream.set_write_timeout(Some(time_left(deadline).ok_or_else(timed_out)?))?;
        match (&*stream).write(&buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    use super::{Secret, proof};
    /// Length of the per-run relay secret (a blake3 key).
    pub const RELAY_SECRET_LEN: usize = 32;

    const SECRET: Secret = [42; RELAY_SECRET_LEN];

    #[test]
    fn handshake_proofs_bind_the_secret_the_role_and_both_nonces() {
        let (n1, n2) = ([1u8; 16], [2u8; 16]);
        let p = proof(&SECRET, b'L', &n1, &n2);
        let mut input = vec![b'L'];
        input.extend_from_slice(&n1);
        input.extend_from_slice(&n2);
        assert_eq!(p, blake3::keyed_hash(&SECRET, &input));
        assert_ne!(p, proof(&SECRET, b'C', &n1, &n2));
        assert_ne!(p, proof(&SECRET, b'L', &n2, &n1));
        assert_ne!(p, proof(&[0; RELAY_SECRET_LEN], b'L', &n1, &n2));
    }
}
