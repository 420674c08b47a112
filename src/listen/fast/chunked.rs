//! Finds where a chunked body ends without decoding it: the bytes are passed on exactly as the
//! backend framed them (RFC 9112 §7.1), and the scanner only tells how many of them belong to
//! the body, so the connection can be reused for the next response. Trailer fields are the
//! one part not passed on ([`Scanner::passed`]).

/// Most hex digits in a chunk size (16 digits: up to 2⁶⁴ − 1).
const MAX_SIZE_DIGITS: u8 = 16;

/// Where in the chunked framing the scanner is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the chunk-size hex digits.
    Size { digits: u8 },
    /// After the size: extensions or whitespace, up to CR.
    Extension,
    /// After the size line's CR.
    SizeLf,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// After chunk data: CR expected.
    DataCr,
    /// After chunk data's CR: LF expected.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer field line, up to CR.
    Trailer,
    /// After a trailer line's CR.
    TrailerLf,
    /// After the final empty line's CR.
    EndLf,
    /// Complete.
    Done,
}

/// The framing is broken: the connection cannot be trusted any more.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Malformed;

/// Scans a chunked body fed in pieces.
#[derive(Debug, Clone)]
pub(crate) struct Scanner {
    state: State,
    size: u64,
    /// A trailer field has begun (then the body is ended by an empty line of our own).
    trailing: bool,
    /// Where in the piece fed last the trailer fields began.
    trailer_at: Option<usize>,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            state: State::Size { digits: 0 },
            size: 0,
            trailing: false,
            trailer_at: None,
        }
    }
}

impl Scanner {
    /// Takes the next bytes of the body; `Some(n)` when the body ends after `data[..n]`.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, Malformed> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            self.state = match self.state {
                State::Size { digits } => match (b as char).to_digit(16) {
                    Some(d) if digits < MAX_SIZE_DIGITS => {
                        self.size = (self.size << 4) | u64::from(d);
                        State::Size { digits: digits + 1 }
                    }
                    Some(_) => return Err(Malformed),
                    None if digits == 0 => return Err(Malformed),
                    None => match b {
                        b'\r' => State::SizeLf,
                        b';' | b' ' | b'\t' => State::Extension,
                        _ => return Err(Malformed),
                    },
                },
                State::Extension => match b {
                    b'\r' => State::SizeLf,
                    b'\n' => return Err(Malformed),
                    _ => State::Extension,
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(Malformed);
                    }
                    let size = std::mem::take(&mut self.size);
                    if size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data(size)
                    }
                }
                State::Data(left) => {
                    // Skip the data in one step.
                    let take = (data.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                    continue;
                }
                State::DataCr if b == b'\r' => State::DataLf,
                State::DataLf if b == b'\n' => State::Size { digits: 0 },
                State::DataCr | State::DataLf => return Err(Malformed),
                State::TrailerStart => match b {
                    b'\r' => State::EndLf,
                    b'\n' => return Err(Malformed),
                    _ => {
                        if !self.trailing {
                            self.trailing = true;
                            self.trailer_at = Some(i);
                        }
                        State::Trailer
                    }
                },
                State::Trailer => match b {
                    b'\r' => State::TrailerLf,
                    b'\n' => return Err(Malformed),
                    _ => State::Trailer,
                },
                State::TrailerLf if b == b'\n' => State::TrailerStart,
                State::EndLf if b == b'\n' => State::Done,
                State::TrailerLf | State::EndLf => return Err(Malformed),
                State::Done => return Ok(Some(i)),
            };
            i += 1;
            if self.state == State::Done {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// How many of the `upto` bytes of the piece fed last go to the client: trailer fields
    /// are dropped, as hyper's server drops them for a client that did not send
    /// `TE: trailers` (which a fast-path request never does). Once the body ended,
    /// [`Scanner::trailing`] says whether the empty line that ends it must be added.
    pub fn passed(&mut self, upto: usize) -> usize {
        match self.trailer_at.take() {
            Some(at) => at.min(upto),
            None if self.trailing => 0,
            None => upto,
        }
    }

    /// Trailer fields were dropped: the body's final empty line was dropped with them.
    pub fn trailing(&self) -> bool {
        self.trailing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(body: &[u8]) -> Result<Option<usize>, Malformed> {
        Scanner::default().feed(body)
    }

    #[test]
    fn finds_the_end_of_bodies_with_extensions_and_trailers() {
        let cases: [&[u8]; 4] = [
            b"0\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\r\n",
            b"a;name=v\r\n0123456789\r\n1 \r\nx\r\n0\r\n\r\n",
            b"3\r\nabc\r\n0\r\nExpires: never\r\nX-Sum: 1\r\n\r\n",
        ];
        for body in cases {
            let mut next = body.to_vec();
            next.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            assert_eq!(whole(&next), Ok(Some(body.len())), "{body:?}");
        }
    }

    #[test]
    fn any_split_gives_the_same_end() {
        let body = b"4\r\nwiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nT: 1\r\n\r\n";
        for a in 0..body.len() {
            for b in a..body.len() {
                let mut s = Scanner::default();
                assert_eq!(s.feed(&body[..a]), Ok(None));
                assert_eq!(s.feed(&body[a..b]), Ok(None), "split {a}/{b}");
                assert_eq!(
                    s.feed(&body[b..]),
                    Ok(Some(body.len() - b)),
                    "split {a}/{b}"
                );
            }
        }
    }

    #[test]
    fn trailer_fields_are_not_passed_on_however_the_body_is_split() {
        let body = b"3\r\nabc\r\n0;x=y\r\nExpires: never\r\nX-Sum: 1\r\n\r\n";
        let kept = b"3\r\nabc\r\n0;x=y\r\n\r\n";
        for a in 0..body.len() {
            let mut s = Scanner::default();
            let mut out = Vec::new();
            assert_eq!(s.feed(&body[..a]), Ok(None));
            let n = s.passed(a);
            out.extend_from_slice(&body[..n]);
            assert_eq!(s.feed(&body[a..]), Ok(Some(body.len() - a)));
            let n = s.passed(body.len() - a);
            out.extend_from_slice(&body[a..a + n]);
            if s.trailing() {
                out.extend_from_slice(b"\r\n");
            }
            assert_eq!(out, kept, "split {a}");
        }
        let mut s = Scanner::default();
        assert_eq!(s.feed(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!((s.passed(5), s.trailing()), (5, false));
    }

    #[test]
    fn broken_framing_is_refused() {
        for body in [
            &b"\r\n"[..],
            b"g\r\n",
            b"5\nhello",
            b"2\r\nabc\r\n",
            b"11111111111111111\r\n",
            b"0\r\n\n",
            b"0\r\nT: 1\n",
        ] {
            assert_eq!(whole(body), Err(Malformed), "{body:?}");
        }
        assert_eq!(whole(b"5\r\nhel"), Ok(None));
    }
}
