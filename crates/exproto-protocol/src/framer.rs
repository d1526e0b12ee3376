//! Splits a byte stream into LF-terminated lines with a hard maximum length.
//!
//! Framing comes before parsing so that the parser only ever sees one
//! complete line, and so that a client that never sends an LF cannot make a
//! connection buffer without bound. As with tokio-util's
//! `LinesCodec::new_with_max_length`, an over-long line is reported as soon
//! as the limit is passed (a client that streams one endless line hears
//! about it at once) and skipped up to its LF, and the stream goes on.
//! Unlike it, lines come out as bytes, not `String`s: a line that is not
//! UTF-8 is the session's to answer (`ERR 400`), not an error that ends the
//! stream, and lines that lie within one pushed chunk are handed out as
//! zero-copy slices of that chunk; only a line that spans chunks is copied.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

use crate::Action;

/// Hands the lines written to `lines` so far to the driver: one
/// [`Action::Send`] for a stream, one per line over a datagram transport
/// (the driver packs them into datagrams of whole lines).
pub fn send_lines(lines: &mut BytesMut, datagram: bool, out: &mut Vec<Action>) {
    if lines.is_empty() {
        return;
    }
    let mut lines = lines.split().freeze();
    if datagram {
        while let Some(lf) = memchr::memchr(b'\n', &lines) {
            out.push(Action::Send(lines.split_to(lf + 1)));
        }
    }
    if !lines.is_empty() {
        out.push(Action::Send(lines));
    }
}

/// One unit the framer hands out, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A line without its LF, and without a CR right before that LF.
    /// May be empty.
    Line(Bytes),
    /// A line grew past the maximum. Reported once per line, as soon as it
    /// is passed; the rest of that line, up to and including its LF, is
    /// dropped.
    TooLong,
}

/// A line framer with a mandatory maximum line length.
///
/// Push chunks as they arrive with [`push`](Self::push), then take frames
/// with [`next_frame`](Self::next_frame) until it returns `None`, which
/// means "need more bytes". Chunks may be pushed at any time; frames come
/// out in order regardless.
#[derive(Debug)]
pub struct LineFramer {
    /// Longest line in bytes: every byte before the LF, a CR included, so
    /// that a CRLF client and an LF client hit the same wall one byte apart
    /// and the buffered bytes bound is exact.
    max: usize,
    /// Chunks pushed but not framed yet, oldest first. Kept whole rather
    /// than framed eagerly so that a session that pauses (waiting for a
    /// call's outcome) costs nothing per queued line.
    chunks: VecDeque<Bytes>,
    /// The start of a line whose LF has not arrived yet, copied out of
    /// chunks already released. Never longer than `max`.
    partial: BytesMut,
    /// Skipping the remainder of an over-long line, up to its LF.
    discarding: bool,
    /// Each pushed chunk is a whole datagram: its last line ends with it.
    datagram: bool,
}

impl LineFramer {
    /// A framer for lines of at most `max` bytes (LF excluded, CR included).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            chunks: VecDeque::new(),
            partial: BytesMut::new(),
            discarding: false,
            datagram: false,
        }
    }

    /// Frames datagrams (`true`) rather than a byte stream: each pushed
    /// chunk then holds whole lines, the last one ending with the chunk,
    /// LF or not, and nothing carries over into the next chunk, so a lost
    /// datagram costs only its own lines (the chat protocol in the README, datagram
    /// transports).
    pub fn set_datagram(&mut self, datagram: bool) {
        self.datagram = datagram;
    }

    /// The maximum line length this framer enforces.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Queues a chunk of the stream (a datagram, with
    /// [`set_datagram`](Self::set_datagram)).
    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        let unterminated = self.datagram && chunk.last() != Some(&b'\n');
        self.chunks.push_back(chunk);
        if unterminated {
            // The datagram's end ends its last line.
            self.chunks.push_back(Bytes::from_static(b"\n"));
        }
    }

    /// Bytes held that have not come out as frames yet (queued chunks and
    /// the partial line).
    pub fn buffered(&self) -> usize {
        self.partial.len() + self.chunks.iter().map(Bytes::len).sum::<usize>()
    }

    /// Writes what the framer holds, for [`LineFramer::restore`].
    pub fn save(&self, w: &mut crate::state::Writer) {
        w.bool(self.discarding);
        w.bytes(&self.partial);
        let mut unframed = Vec::with_capacity(self.buffered() - self.partial.len());
        for c in &self.chunks {
            unframed.extend_from_slice(c);
        }
        w.bytes(&unframed);
    }

    /// A framer for lines of at most `max` bytes holding what
    /// [`LineFramer::save`] wrote: it goes on where that one stopped.
    ///
    /// # Errors
    /// Saved state that does not read, or a partial line over `max`.
    pub fn restore(
        max: usize,
        r: &mut crate::state::Reader<'_>,
    ) -> Result<Self, crate::state::StateError> {
        let discarding = r.bool()?;
        let partial = r.bytes()?;
        if partial.len() > max {
            return Err(crate::state::StateError::Invalid(
                "a partial line longer than the line limit",
            ));
        }
        let mut framer = Self::new(max);
        framer.discarding = discarding;
        framer.partial.extend_from_slice(partial);
        framer.push(Bytes::copy_from_slice(r.bytes()?));
        Ok(framer)
    }

    /// Drops everything buffered, e.g. once the connection is closing.
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.partial = BytesMut::new();
        self.discarding = false;
    }

    /// The next frame, or `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Frame> {
        while let Some(chunk) = self.chunks.front_mut() {
            let lf = memchr::memchr(b'\n', chunk);

            if self.discarding {
                match lf {
                    Some(i) => {
                        chunk.advance(i + 1);
                        self.discarding = false;
                        if chunk.is_empty() {
                            self.chunks.pop_front();
                        }
                    }
                    None => {
                        self.chunks.pop_front();
                    }
                }
                continue;
            }

            let Some(i) = lf else {
                // No LF in this chunk: the line goes on in a later one.
                if self.partial.len() + chunk.len() > self.max {
                    self.chunks.pop_front();
                    self.start_discarding();
                    return Some(Frame::TooLong);
                }
                self.partial.extend_from_slice(chunk);
                self.chunks.pop_front();
                continue;
            };

            if self.partial.len() + i > self.max {
                chunk.advance(i + 1);
                if chunk.is_empty() {
                    self.chunks.pop_front();
                }
                // The LF is already consumed: nothing left to discard.
                self.partial = BytesMut::new();
                return Some(Frame::TooLong);
            }

            let line = if self.partial.is_empty() {
                let line = chunk.split_to(i);
                chunk.advance(1);
                line
            } else {
                self.partial.extend_from_slice(&chunk[..i]);
                chunk.advance(i + 1);
                // Taking the buffer hands its allocation to the line, so an
                // idle connection does not keep a large buffer alive.
                std::mem::take(&mut self.partial).freeze()
            };
            if chunk.is_empty() {
                self.chunks.pop_front();
            }
            return Some(Frame::Line(strip_cr(line)));
        }
        // Nothing queued: give the queue's buffer back, so an idle
        // connection (most of them, most of the time) holds no allocation.
        if self.chunks.capacity() > 0 {
            self.chunks = VecDeque::new();
        }
        None
    }

    fn start_discarding(&mut self) {
        self.partial = BytesMut::new();
        self.discarding = true;
    }
}

impl Iterator for LineFramer {
    type Item = Frame;

    fn next(&mut self) -> Option<Frame> {
        self.next_frame()
    }
}

fn strip_cr(mut line: Bytes) -> Bytes {
    if line.last() == Some(&b'\r') {
        line.truncate(line.len() - 1);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn line(s: &str) -> Frame {
        Frame::Line(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn frames_whole(max: usize, input: &[u8]) -> Vec<Frame> {
        let mut f = LineFramer::new(max);
        f.push(Bytes::copy_from_slice(input));
        f.by_ref().collect()
    }

    /// Frames `input` pushed in the given pieces, draining after each push.
    fn frames_split(max: usize, pieces: &[&[u8]]) -> Vec<Frame> {
        let mut f = LineFramer::new(max);
        let mut out = Vec::new();
        for p in pieces {
            f.push(Bytes::copy_from_slice(p));
            out.extend(f.by_ref());
            assert!(f.partial.len() <= max, "partial line over the maximum");
        }
        out
    }

    fn datagrams(max: usize, datagrams: &[&[u8]]) -> Vec<Frame> {
        let mut f = LineFramer::new(max);
        f.set_datagram(true);
        let mut out = Vec::new();
        for d in datagrams {
            f.push(Bytes::copy_from_slice(d));
            out.extend(f.by_ref());
            assert_eq!(f.buffered(), 0, "nothing carries over a datagram");
        }
        out
    }

    #[test]
    fn a_datagram_ends_its_last_line_and_carries_nothing_over() {
        assert_eq!(
            datagrams(16, &[b"PING", b"A\nB", b"C\n", b"D\r", b"\n"]),
            [
                line("PING"),
                line("A"),
                line("B"),
                line("C"),
                line("D"),
                line("")
            ]
        );
        // Over the limit: reported, the rest of the datagram's line
        // skipped, and the next datagram starts clean.
        assert_eq!(
            datagrams(4, &[b"TOOLONG", b"abcdefgh\nok", b"PING"]),
            [Frame::TooLong, Frame::TooLong, line("ok"), line("PING")]
        );
        // A stream keeps the line open across chunks.
        assert_eq!(frames_split(16, &[b"PI", b"NG\n"]), [line("PING")]);
    }

    #[test]
    fn a_restored_framer_goes_on_where_the_saved_one_stopped() {
        let input: &[u8] = b"one\ntw";
        let mut a = LineFramer::new(8);
        a.push(Bytes::from_static(input));
        assert_eq!(a.next_frame(), Some(line("one")));
        assert_eq!(a.next_frame(), None);
        a.push(Bytes::from_static(b"o\nthr"));
        let mut w = crate::state::Writer::new();
        a.save(&mut w);
        let bytes = w.into_bytes();
        let mut b = LineFramer::restore(8, &mut crate::state::Reader::new(&bytes)).unwrap();
        b.push(Bytes::from_static(b"ee\nfourfourfour\nfive\n"));
        let got: Vec<Frame> = std::iter::from_fn(|| b.next_frame()).collect();
        assert_eq!(
            got,
            vec![line("two"), line("three"), Frame::TooLong, line("five")]
        );
        // Mid-discard: the rest of the long line is still skipped.
        let mut c = LineFramer::new(4);
        c.push(Bytes::from_static(b"toolong"));
        assert_eq!(c.next_frame(), Some(Frame::TooLong));
        let mut w = crate::state::Writer::new();
        c.save(&mut w);
        let bytes = w.into_bytes();
        let mut d = LineFramer::restore(4, &mut crate::state::Reader::new(&bytes)).unwrap();
        d.push(Bytes::from_static(b"er\nok\n"));
        assert_eq!(d.next_frame(), Some(line("ok")));
    }

    #[test]
    fn known_answers() {
        use Frame::TooLong;
        let cases: &[(usize, &str, &[Frame])] = &[
            (10, "", &[]),
            (10, "abc", &[]),
            (10, "abc\n", &[line("abc")]),
            (10, "abc\r\n", &[line("abc")]),
            (10, "\n", &[line("")]),
            (10, "\r\n", &[line("")]),
            (10, "a\rb\n", &[line("a\rb")]),
            (10, "a\r\r\n", &[line("a\r")]),
            (10, "a\nb\n\nc", &[line("a"), line("b"), line("")]),
            // Exactly the maximum is fine, one more is not.
            (3, "abc\n", &[line("abc")]),
            (3, "abcd\n", &[TooLong]),
            // The CR counts.
            (3, "abc\r\n", &[TooLong]),
            (3, "ab\r\n", &[line("ab")]),
            // Reported before the LF, and the rest of the line is skipped.
            (3, "abcdefg", &[TooLong]),
            (3, "abcdefg\nxy\n", &[TooLong, line("xy")]),
            (3, "abcd\nabcd\nok\n", &[TooLong, TooLong, line("ok")]),
            (0, "\n\r\nx\n\n", &[line(""), TooLong, TooLong, line("")]),
        ];
        for (max, input, want) in cases {
            assert_eq!(
                frames_whole(*max, input.as_bytes()),
                *want,
                "max {max} input {input:?}"
            );
        }
    }

    #[test]
    fn split_at_every_byte_matches_whole() {
        let inputs: &[&[u8]] = &[
            b"PING\r\nSUB a/b 1\nPUB t :hello world\r\n\r\n",
            b"abcdefghij\nab\r\nabcdefghijklmnopqrstuvwxyz\nend\n",
            b"abcdefgh\r\nabcdefghi\r\n\n\n",
        ];
        for &input in inputs {
            for max in [0, 1, 2, 8, 9, 10, 64] {
                let whole = frames_whole(max, input);
                for cut in 0..=input.len() {
                    let (a, b) = input.split_at(cut);
                    assert_eq!(frames_split(max, &[a, b]), whole, "cut {cut} max {max}");
                }
                let bytes: Vec<&[u8]> = input.chunks(1).collect();
                assert_eq!(frames_split(max, &bytes), whole, "bytewise max {max}");
            }
        }
    }

    #[test]
    fn too_long_comes_before_the_lf() {
        let mut f = LineFramer::new(4);
        f.push(Bytes::from_static(b"abcd"));
        assert_eq!(f.next_frame(), None);
        f.push(Bytes::from_static(b"e"));
        assert_eq!(f.next_frame(), Some(Frame::TooLong));
        assert_eq!(f.buffered(), 0);
        // An endless line costs nothing and is reported once.
        for _ in 0..100 {
            f.push(Bytes::from_static(b"xxxxxxxx"));
            assert_eq!(f.next_frame(), None);
            assert_eq!(f.buffered(), 0);
        }
        f.push(Bytes::from_static(b"x\nok\n"));
        assert_eq!(f.next_frame(), Some(line("ok")));
        assert_eq!(f.next_frame(), None);
    }

    #[test]
    fn lines_within_a_chunk_are_not_copied() {
        let chunk = Bytes::from_static(b"one\ntwo\r\nthr");
        let range = chunk.as_ptr_range();
        let mut f = LineFramer::new(100);
        f.push(chunk.clone());
        for want in ["one", "two"] {
            let Some(Frame::Line(l)) = f.next_frame() else {
                panic!("expected a line")
            };
            assert_eq!(&l[..], want.as_bytes());
            assert!(range.contains(&l.as_ptr()), "{want} was copied");
        }
        assert_eq!(f.next_frame(), None);
        assert_eq!(f.buffered(), 3);
        f.push(Bytes::from_static(b"ee\n"));
        assert_eq!(f.next_frame(), Some(line("three")));
    }

    #[test]
    fn frames_pushed_while_paused_keep_their_order() {
        let mut f = LineFramer::new(10);
        f.push(Bytes::from_static(b"a\nb"));
        assert_eq!(f.next_frame(), Some(line("a")));
        f.push(Bytes::from_static(b"c\nd\n"));
        f.push(Bytes::from_static(b"e\n"));
        let rest: Vec<_> = f.collect();
        assert_eq!(rest, vec![line("bc"), line("d"), line("e")]);
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_frames(
            input in proptest::collection::vec(
                prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'a'), any::<u8>()], 0..200),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
            max in 0usize..20,
        ) {
            let whole = frames_whole(max, &input);
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
            points.sort_unstable();
            let mut pieces = Vec::new();
            let mut at = 0;
            for p in points {
                pieces.push(&input[at..p]);
                at = p;
            }
            pieces.push(&input[at..]);
            prop_assert_eq!(frames_split(max, &pieces), whole.clone());
            for frame in whole {
                if let Frame::Line(l) = frame {
                    prop_assert!(l.len() <= max);
                    prop_assert!(!l.contains(&b'\n'));
                }
            }
        }
    }
}
