//! The pure parts of a measurement: the payload that carries its own send
//! time, and latency percentiles.
//!
//! A payload is `p<client>-<sent_us>-` padded with `x` to the requested
//! size: ASCII without spaces or backslashes, so it crosses the chat
//! protocol's escaping unchanged and can be told apart from reply lines
//! (`OK ...`, `MSG ...`) by its first byte.

use std::io::Write as _;

/// Encodes one payload into `buf` (cleared first), at least `size` bytes
/// long: longer only when the header alone is longer.
pub fn encode_payload(client: u32, sent_us: u64, size: usize, buf: &mut Vec<u8>) {
    buf.clear();
    // Writing into a Vec cannot fail.
    let _ = write!(buf, "p{client}-{sent_us}-");
    if buf.len() < size {
        buf.resize(size, b'x');
    }
}

/// The client and send time of a payload, or `None` for any other line.
/// Takes the payload alone, or a line that starts with it.
pub fn decode_payload(line: &[u8]) -> Option<(u32, u64)> {
    let rest = line.strip_prefix(b"p")?;
    let mut parts = rest.splitn(3, |&b| b == b'-');
    let client = parse_u64(parts.next()?)?;
    let sent = parse_u64(parts.next()?)?;
    // The third part (padding) must exist: a truncated header is not ours.
    parts.next()?;
    Some((u32::try_from(client).ok()?, sent))
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// The nearest-rank percentile `q` (0 < q <= 1) of sorted samples.
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    // Nearest rank: the smallest value with at least q of the samples at
    // or below it.
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorts latencies given in microseconds and summarises them in ms.
pub fn summarise(latencies_us: &mut [u64]) -> Percentiles {
    latencies_us.sort_unstable();
    let ms = |us: u64| us as f64 / 1000.0;
    let sum: u128 = latencies_us.iter().map(|&v| u128::from(v)).sum();
    let mean = if latencies_us.is_empty() {
        0.0
    } else {
        sum as f64 / latencies_us.len() as f64 / 1000.0
    };
    Percentiles {
        p50: ms(percentile(latencies_us, 0.50)),
        p99: ms(percentile(latencies_us, 0.99)),
        p999: ms(percentile(latencies_us, 0.999)),
        max: ms(latencies_us.last().copied().unwrap_or(0)),
        mean,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_pads() {
        let mut buf = Vec::new();
        encode_payload(42, 1_234_567, 64, &mut buf);
        assert_eq!(buf.len(), 64);
        assert!(buf.starts_with(b"p42-1234567-xxx"));
        assert_eq!(decode_payload(&buf), Some((42, 1_234_567)));
        // Shorter than its header: the header is kept whole.
        encode_payload(7, 99, 1, &mut buf);
        assert_eq!(buf, b"p7-99-");
        assert_eq!(decode_payload(&buf), Some((7, 99)));
    }

    #[test]
    fn other_lines_are_not_payloads() {
        for line in [
            &b"OK PUB bench/0"[..],
            b"OK",
            b"p",
            b"p1-",
            b"p1-2",
            b"px-2-",
            b"p1-2x-",
            b"p99999999999-1-",
        ] {
            assert_eq!(decode_payload(line), None, "{line:?}");
        }
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), 500);
        assert_eq!(percentile(&v, 0.99), 990);
        assert_eq!(percentile(&v, 0.999), 999);
        assert_eq!(percentile(&v, 1.0), 1000);
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(percentile(&[7], 0.999), 7);
    }

    #[test]
    fn summary_in_milliseconds() {
        let mut v = vec![3000, 1000, 2000, 4000];
        let p = summarise(&mut v);
        assert_eq!(p.p50, 2.0);
        assert_eq!(p.p99, 4.0);
        assert_eq!(p.max, 4.0);
        assert_eq!(p.mean, 2.5);
        assert_eq!(summarise(&mut []), Percentiles::default());
    }
}
