//! Chunk data from the image file into the agent's pipe without passing
//! through the controller's memory: `splice(2)` moves page-cache pages
//! into the pipe, where ssh reads them as it would have read our copy. On
//! two cores shared with both ends' ciphers, the read into a buffer and the
//! write out of it were CPU the transfer did not get.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use tokio::io::AsyncWriteExt;

use crate::node::agent_link::Tx;

/// Write `head`, then `len` bytes of `file` from `offset`, into `tx`. A
/// file that cannot be spliced (a file system without it) is read and
/// written instead; a file that ends early is an `UnexpectedEof` error.
pub async fn write_from_file(
    tx: &mut Tx,
    head: &[u8],
    file: &File,
    mut offset: u64,
    mut len: usize,
) -> io::Result<()> {
    tx.write_all(head).await?;
    // What the buffer holds goes first: the spliced data follows it.
    tx.flush().await?;
    let pipe = tx.get_ref();
    while len > 0 {
        pipe.writable().await?;
        let moved = pipe.try_io(|| {
            let mut off = libc::loff_t::try_from(offset)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
            // SAFETY: both descriptors are open for the call; `off` is ours.
            let n = unsafe {
                libc::splice(
                    file.as_raw_fd(),
                    &mut off,
                    pipe.as_raw_fd(),
                    std::ptr::null_mut(),
                    len,
                    libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MORE,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match moved {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the image ends before byte {}", offset + len as u64),
                ));
            }
            Ok(n) => {
                offset += n as u64;
                len -= n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return copy_rest(tx, file, offset, len).await;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The rest by read and write, for files `splice` does not take.
async fn copy_rest(tx: &mut Tx, file: &File, offset: u64, len: usize) -> io::Result<()> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    tx.write_all(&buf).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, BufWriter};

    fn pipe_pair() -> (Tx, tokio::net::unix::pipe::Receiver) {
        let (w, r) = tokio::net::unix::pipe::pipe().unwrap();
        (BufWriter::new(w), r)
    }

    /// More than a pipe holds, from an offset: the reader gets the head
    /// and exactly those bytes, through every wait for room in the pipe.
    #[tokio::test]
    async fn the_head_then_the_file_range_arrive_in_order() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let (mut tx, mut rx) = pipe_pair();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.unwrap();
            got
        });
        tx.write_all(b"buffered ").await.unwrap();
        write_from_file(&mut tx, b"head", &file, 1000, 2_500_000)
            .await
            .unwrap();
        tx.flush().await.unwrap();
        drop(tx);
        let got = reader.await.unwrap();
        assert_eq!(&got[..13], b"buffered head");
        assert_eq!(got[13..].len(), 2_500_000);
        assert!(got[13..] == data[1000..2_501_000]);
    }

    #[tokio::test]
    async fn a_file_shorter_than_the_range_is_an_error() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[1u8; 1000]).unwrap();
        let (mut tx, rx) = pipe_pair();
        let e = write_from_file(&mut tx, b"", &file, 500, 1000)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        drop(rx);
    }
}
