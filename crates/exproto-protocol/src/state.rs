//! Saved connection state: a small, versioned binary format.
//!
//! A connection's state leaves its process when an adapter hands its
//! sessions to a successor, or writes them to a journal to restore after a
//! crash. The reader may be a newer build than the writer, so every record
//! starts with a format version, and a protocol's own part carries a
//! version of its own: a reader keeps decoding every version it ever
//! wrote. The encoding is hand-written (fixed-width big-endian integers,
//! length-prefixed bytes) because it is a few dozen lines, stays stable
//! without a serialisation library's own format changes, and costs a
//! protocol author no dependency.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why saved state cannot be read, or a session cannot be saved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("saved state ends early")]
    Truncated,
    #[error("saved state is not valid: {0}")]
    Invalid(&'static str),
    #[error("saved state of format version {found}; this build reads up to {supported}")]
    Version { found: u16, supported: u16 },
    #[error("saved state is of protocol {found:?}, not {expected:?}")]
    OtherProtocol { found: String, expected: String },
    #[error("this protocol's sessions cannot be saved")]
    Unsupported,
    #[error("the connection is busy (output or a request waits); save it once idle")]
    Busy,
}

/// Appends values to a byte buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    /// Bytes with a 32-bit length in front.
    pub fn bytes(&mut self, v: &[u8]) {
        // Nothing a connection holds comes near 4 GiB (lines are bounded).
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.buf.extend_from_slice(v);
    }

    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }

    pub fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            Some(v) => {
                self.bool(true);
                self.u64(v);
            }
            None => self.bool(false),
        }
    }

    pub fn ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => {
                self.u8(4);
                self.buf.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                self.u8(6);
                self.buf.extend_from_slice(&a.octets());
            }
        }
    }
}

/// Reads values back in the order they were written.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if self.buf.len() < n {
            return Err(StateError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.take(1)?[0])
    }

    pub fn bool(&mut self) -> Result<bool, StateError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(StateError::Invalid("a flag is neither 0 nor 1")),
        }
    }

    pub fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], StateError> {
        let n = usize::try_from(self.u32()?).map_err(|_| StateError::Truncated)?;
        self.take(n)
    }

    pub fn str(&mut self) -> Result<&'a str, StateError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| StateError::Invalid("text is not UTF-8"))
    }

    pub fn opt_u64(&mut self) -> Result<Option<u64>, StateError> {
        Ok(if self.bool()? {
            Some(self.u64()?)
        } else {
            None
        })
    }

    pub fn ip(&mut self) -> Result<IpAddr, StateError> {
        match self.u8()? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.array::<4>()?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(self.array::<16>()?))),
            _ => Err(StateError::Invalid("an address is neither IPv4 nor IPv6")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back_as_written() {
        let mut w = Writer::new();
        w.u8(7);
        w.bool(true);
        w.u16(0xBEEF);
        w.u32(1 << 31);
        w.u64(u64::MAX - 1);
        w.bytes(b"\x00\xff");
        w.str("ü");
        w.opt_u64(None);
        w.opt_u64(Some(3));
        w.ip("10.0.0.1".parse().unwrap());
        w.ip("::1".parse().unwrap());
        let bytes = w.into_bytes();
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8(), Ok(7));
        assert_eq!(r.bool(), Ok(true));
        assert_eq!(r.u16(), Ok(0xBEEF));
        assert_eq!(r.u32(), Ok(1 << 31));
        assert_eq!(r.u64(), Ok(u64::MAX - 1));
        assert_eq!(r.bytes(), Ok(&b"\x00\xff"[..]));
        assert_eq!(r.str(), Ok("ü"));
        assert_eq!(r.opt_u64(), Ok(None));
        assert_eq!(r.opt_u64(), Ok(Some(3)));
        assert_eq!(r.ip(), Ok("10.0.0.1".parse().unwrap()));
        assert_eq!(r.ip(), Ok("::1".parse().unwrap()));
        assert!(r.is_empty());
    }

    #[test]
    fn short_or_bad_input_is_an_error_not_a_panic() {
        assert_eq!(Reader::new(&[0, 0]).u32(), Err(StateError::Truncated));
        assert_eq!(
            Reader::new(&[0, 0, 0, 9, 1]).bytes(),
            Err(StateError::Truncated)
        );
        assert!(matches!(
            Reader::new(&[2]).bool(),
            Err(StateError::Invalid(_))
        ));
        assert!(matches!(
            Reader::new(&[5]).ip(),
            Err(StateError::Invalid(_))
        ));
        assert!(matches!(
            Reader::new(&[0, 0, 0, 1, 0xff]).str(),
            Err(StateError::Invalid(_))
        ));
    }
}
