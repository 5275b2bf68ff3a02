//! A bounds-checked little-endian reader over a byte slice: the one the
//! wire decoder and the manifest cache decoder share.

use std::fmt;
use std::io;

/// Reading `what` needed `need` bytes; only `left` were there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncated {
    pub what: String,
    pub need: usize,
    pub left: usize,
}

impl fmt::Display for Truncated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "truncated: {} needs {} bytes, {} left",
            self.what, self.need, self.left
        )
    }
}

impl From<Truncated> for io::Error {
    fn from(t: Truncated) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, t.to_string())
    }
}

pub struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf, at: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    pub fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Truncated> {
        if n > self.remaining() {
            return Err(Truncated {
                what: what.to_string(),
                need: n,
                left: self.remaining(),
            });
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    pub fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Truncated> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    pub fn u8(&mut self, what: &str) -> Result<u8, Truncated> {
        Ok(self.array::<1>(what)?[0])
    }
    pub fn u16(&mut self, what: &str) -> Result<u16, Truncated> {
        self.array(what).map(u16::from_le_bytes)
    }
    pub fn u32(&mut self, what: &str) -> Result<u32, Truncated> {
        self.array(what).map(u32::from_le_bytes)
    }
    pub fn i32(&mut self, what: &str) -> Result<i32, Truncated> {
        self.array(what).map(i32::from_le_bytes)
    }
    pub fn u64(&mut self, what: &str) -> Result<u64, Truncated> {
        self.array(what).map(u64::from_le_bytes)
    }
    pub fn u128(&mut self, what: &str) -> Result<u128, Truncated> {
        self.array(what).map(u128::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_little_endian_and_stops_at_the_end() {
        let mut c = Cursor::new(&[1, 2, 0, 3, 0, 0, 0, 9]);
        assert_eq!(c.u8("a"), Ok(1));
        assert_eq!(c.u16("b"), Ok(2));
        assert_eq!(c.u32("c"), Ok(3));
        assert_eq!(c.remaining(), 1);
        let e = c.u32("d").unwrap_err();
        assert_eq!(e.to_string(), "truncated: d needs 4 bytes, 1 left");
        assert_eq!(c.u8("e"), Ok(9));
    }
}
