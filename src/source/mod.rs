//! Event sources. [`JsonLines`] reads JSON lines from a file or stdin, with line
//! numbers and byte offsets (the checkpoint position), and a bound on line
//! length that holds even for a line with no end; [`decode`] makes events
//! of lines and Kafka messages.

mod decode;

pub use decode::{decode, decode_message, Decoded, Decoder};

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// One line of input.
#[derive(Debug, PartialEq, Eq)]
pub struct LineInfo {
    /// 1-based line number.
    pub line: u64,
    /// Byte offset just past the line (and its newline): where to resume.
    pub end_offset: u64,
    /// Whole length of the line, newline excluded.
    pub len: usize,
    /// The line was longer than the limit; only its first bytes were kept.
    pub too_large: bool,
}

/// Reads lines of at most `max_line_bytes`, keeping count of where it is.
pub struct JsonLines {
    inner: Input,
    max: usize,
    offset: u64,
    line: u64,
    /// A read failed part-way through a line: where that line starts and
    /// how long it is so far (its first bytes are in the caller's buffer).
    partial: Option<(u64, usize)>,
}

enum Input {
    /// A file: it can be followed (see [`JsonLines::next_line`]).
    File(BufReader<File>),
    Other(BufReader<Box<dyn Read + Send>>),
}

impl Input {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        match self {
            Input::File(r) => r.fill_buf(),
            Input::Other(r) => r.fill_buf(),
        }
    }
    fn consume(&mut self, n: usize) {
        match self {
            Input::File(r) => r.consume(n),
            Input::Other(r) => r.consume(n),
        }
    }
}

impl JsonLines {
    /// Reads `path` from byte `offset`, the line after line `line`.
    pub fn open_file(path: &Path, offset: u64, line: u64, max_line_bytes: usize) -> io::Result<Self> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        if offset > len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the state's checkpoint is at byte {offset}, past the end of the {len}-byte input: this is not the input the state was built from"),
            ));
        }
        file.seek(SeekFrom::Start(offset))?;
        Ok(Self::new(Input::File(BufReader::with_capacity(256 * 1024, file)), offset, line, max_line_bytes))
    }

    /// Reads standard input.
    pub fn stdin(max_line_bytes: usize) -> Self {
        Self::from_reader(io::stdin(), max_line_bytes)
    }

    /// Reads any reader (tests, benchmarks).
    pub fn from_reader(r: impl Read + Send + 'static, max_line_bytes: usize) -> Self {
        let r: Box<dyn Read + Send> = Box::new(r);
        Self::new(Input::Other(BufReader::with_capacity(256 * 1024, r)), 0, 0, max_line_bytes)
    }

    fn new(inner: Input, offset: u64, line: u64, max: usize) -> Self {
        Self { inner, max, offset, line, partial: None }
    }

    /// Whether reading another line may wait for a writer: nothing is
    /// buffered from a pipe or stdin. A file never waits (at its end the
    /// next read finds no line).
    pub fn may_wait(&self) -> bool {
        match &self.inner {
            Input::File(_) => false,
            Input::Other(r) => r.buffer().is_empty(),
        }
    }

    /// Reads the next line into `buf` (cleared first, newline and a trailing
    /// `\r` removed); `None` at the end of input. A last line without a
    /// newline counts as a line. After an error, calling again with the
    /// same `buf` goes on with the line where the failed read left it, so
    /// a failing read can be retried without losing or repeating a byte.
    pub fn next_line(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<LineInfo>> {
        self.read_line(buf, false)
    }

    /// As [`next_line`](Self::next_line), for a file still being written: a
    /// last line without its newline is left for a later call (the file is
    /// read again from its start), since the writer may be in the middle of it.
    pub fn next_complete_line(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<LineInfo>> {
        self.read_line(buf, true)
    }

    fn read_line(&mut self, buf: &mut Vec<u8>, complete_only: bool) -> io::Result<Option<LineInfo>> {
        let (start, mut len) = self.partial.take().unwrap_or_else(|| {
            buf.clear();
            (self.offset, 0)
        });
        let mut consumed_any = self.offset > start;
        loop {
            let avail = match self.inner.fill_buf() {
                Ok(avail) => avail,
                Err(e) => {
                    if consumed_any {
                        self.partial = Some((start, len));
                    }
                    return Err(e);
                }
            };
            if avail.is_empty() {
                if !consumed_any {
                    return Ok(None);
                }
                if complete_only {
                    if let Input::File(r) = &mut self.inner {
                        if let Err(e) = r.seek(SeekFrom::Start(start)) {
                            self.partial = Some((start, len));
                            return Err(e);
                        }
                        self.offset = start;
                        buf.clear();
                        return Ok(None);
                    }
                }
                break;
            }
            consumed_any = true;
            let (chunk, newline) = match memchr::memchr(b'\n', avail) {
                Some(i) => (&avail[..i], true),
                None => (avail, false),
            };
            let room = (self.max + 1).saturating_sub(buf.len());
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            len += chunk.len();
            let used = chunk.len() + usize::from(newline);
            self.inner.consume(used);
            self.offset += used as u64;
            if newline {
                break;
            }
        }
        if buf.last() == Some(&b'\r') && len <= self.max + 1 {
            buf.pop();
            len -= 1;
        }
        self.line += 1;
        let too_large = len > self.max;
        if too_large {
            buf.truncate(self.max);
        }
        Ok(Some(LineInfo { line: self.line, end_offset: self.offset, len, too_large }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &'static str, max: usize) -> Vec<(String, LineInfo)> {
        let mut r = JsonLines::from_reader(text.as_bytes(), max);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while let Some(info) = r.next_line(&mut buf).unwrap() {
            out.push((String::from_utf8_lossy(&buf).into_owned(), info));
        }
        out
    }

    #[test]
    fn lines_offsets_and_limits() {
        let got = lines("ab\r\n0123456789\n\nlast", 5);
        assert_eq!(got[0], ("ab".into(), LineInfo { line: 1, end_offset: 4, len: 2, too_large: false }));
        assert_eq!(got[1], ("01234".into(), LineInfo { line: 2, end_offset: 15, len: 10, too_large: true }));
        assert_eq!(got[2], ("".into(), LineInfo { line: 3, end_offset: 16, len: 0, too_large: false }));
        assert_eq!(got[3], ("last".into(), LineInfo { line: 4, end_offset: 20, len: 4, too_large: false }));
        assert_eq!(got.len(), 4);
    }

    /// Hands out `text` a few bytes at a time, failing once before each
    /// of the offsets in `fail_at`.
    struct Flaky {
        text: &'static [u8],
        at: usize,
        fail_at: Vec<usize>,
    }

    impl Read for Flaky {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.fail_at.first() == Some(&self.at) {
                self.fail_at.remove(0);
                return Err(io::Error::other("EIO, say"));
            }
            let next = self.fail_at.first().copied().unwrap_or(usize::MAX).min(self.at + 3).min(self.text.len());
            let n = (next - self.at).min(out.len());
            out[..n].copy_from_slice(&self.text[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn a_failed_read_is_retried_without_losing_or_repeating_a_byte() {
        let text = b"first line\nsecond\n\nthird";
        let mut r = JsonLines::from_reader(Flaky { text, at: 0, fail_at: vec![0, 4, 11, 15, 19] }, 100);
        let (mut buf, mut got, mut errors) = (Vec::new(), Vec::new(), 0);
        loop {
            match r.next_line(&mut buf) {
                Ok(Some(info)) => got.push((String::from_utf8_lossy(&buf).into_owned(), info.line, info.end_offset)),
                Ok(None) => break,
                Err(_) => errors += 1,
            }
        }
        assert_eq!(errors, 5);
        let want = [("first line", 1, 11), ("second", 2, 18), ("", 3, 19), ("third", 4, 24)];
        assert_eq!(got, want.map(|(l, n, o)| (l.to_string(), n, o)));
    }

    #[test]
    fn resumes_from_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(&p, "one\ntwo\nthree\n").unwrap();
        let mut r = JsonLines::open_file(&p, 4, 1, 100).unwrap();
        let mut buf = Vec::new();
        let info = r.next_line(&mut buf).unwrap().unwrap();
        assert_eq!((buf.as_slice(), info.line), (&b"two"[..], 2));
        assert!(JsonLines::open_file(&p, 999, 0, 100).is_err());
    }
}

#[cfg(test)]
mod follow_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_line_being_written_is_read_once_complete() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(&p, "one\ntw").unwrap();
        let mut r = JsonLines::open_file(&p, 0, 0, 100).unwrap();
        let mut buf = Vec::new();
        assert_eq!(r.next_complete_line(&mut buf).unwrap().map(|i| i.line), Some(1));
        assert_eq!(r.next_complete_line(&mut buf).unwrap(), None, "half a line is not a line yet");
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"o\nthree\n").unwrap();
        let info = r.next_complete_line(&mut buf).unwrap().unwrap();
        assert_eq!((buf.as_slice(), info.line, info.end_offset), (&b"two"[..], 2, 8));
        assert_eq!(r.next_complete_line(&mut buf).unwrap().map(|i| i.line), Some(3));
    }
}
