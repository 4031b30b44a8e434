//! Bytes in: opens a file, undoes gzip (detected by its magic, not the file name), counts the
//! bytes read for the progress bar, sniffs the format, and splits text into capped lines
//! with buffers that are reused line after line.
use std::{
    fs::File,
    io::{self, BufRead as _, BufReader, Cursor, Read},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use flate2::read::MultiGzDecoder;

use super::{Format, ReplayError, formats};

/// Read buffer per file: large enough that a syscall moves a good chunk, small enough that
/// hundreds of files merged at once stay cheap.
const READ_BUF: usize = 256 * 1024;
/// Decompressed input is looked at in chunks of this size to pick a format...
const SNIFF_CHUNK: usize = 64 * 1024;
/// ... until it holds this many whole lines (the sniffer judges at most 32)...
const SNIFF_LINES: usize = 33;
/// ... or this many bytes: a log that starts with a line longer than a chunk (a 300 KB
/// path) is still recognised by the lines after it.
const SNIFF_MAX_BYTES: usize = 16 * SNIFF_CHUNK;

/// Counts bytes as they come off the disk (compressed bytes, for gzip files), shared with
/// the progress bar. Atomic only because the pcap reader wants `Send` inputs.
#[derive(Debug)]
pub(crate) struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

pub(crate) type Input = BufReader<Box<dyn Read + Send>>;

/// An opened input: the decompressed stream (positioned at its start), its format, and
/// whether it was gzip.
pub(crate) struct Opened {
    pub reader: Input,
    pub format: Option<Format>,
    pub gzip: bool,
    pub size: u64,
}

pub(crate) fn open(
    path: &Path,
    forced: Option<Format>,
    bytes_read: Arc<AtomicU64>,
) -> Result<Opened, ReplayError> {
    let open_err = |error| ReplayError::Open {
        path: path.to_owned(),
        error,
    };
    let file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let mut raw = BufReader::with_capacity(
        READ_BUF,
        Counting {
            inner: file,
            count: bytes_read,
        },
    );
    let gzip = raw.fill_buf().map_err(open_err)?.starts_with(&[0x1f, 0x8b]);
    let mut stream: Box<dyn Read + Send> = if gzip {
        // Multi-member: `cat a.gz b.gz` and some log shippers write several members.
        Box::new(MultiGzDecoder::new(raw))
    } else {
        Box::new(raw)
    };
    // Read a sample to sniff, then put it back in front of the rest of the stream.
    // A read error this early (a tiny truncated .gz) is replayed after the sample, so the
    // lines before it are still delivered and the error is reported where it happened.
    let (sample, early_error) = read_sample(&mut stream);
    let detected = sniff(&sample);
    let format = match (forced, detected) {
        (Some(f), Some(Format::Pcap)) if f != Format::Pcap => {
            return Err(ReplayError::FormatMismatch {
                path: path.to_owned(),
                given: f,
                found: Format::Pcap,
            });
        }
        (Some(Format::Pcap), Some(d)) if d != Format::Pcap => {
            return Err(ReplayError::FormatMismatch {
                path: path.to_owned(),
                given: Format::Pcap,
                found: d,
            });
        }
        (Some(f), _) => Some(f),
        (None, Some(d)) => Some(d),
        (None, None) if sample.iter().all(u8::is_ascii_whitespace) => None,
        (None, None) => {
            let first = sample.split(|&b| b == b'\n').next().unwrap_or_default();
            return Err(ReplayError::UnknownFormat {
                path: path.to_owned(),
                start: formats::excerpt(first),
            });
        }
    };
    let tail: Box<dyn Read + Send> = match early_error {
        Some(e) => Box::new(Failing(Some(e))),
        None => stream,
    };
    let reader: Box<dyn Read + Send> = Box::new(Cursor::new(sample).chain(tail));
    Ok(Opened {
        reader: BufReader::with_capacity(READ_BUF, reader),
        format,
        gzip,
        size,
    })
}

/// The start of a stream for [`sniff`], and the read error that cut it short, if any.
fn read_sample(stream: &mut impl Read) -> (Vec<u8>, Option<io::Error>) {
    let mut sample = Vec::with_capacity(SNIFF_CHUNK);
    let mut lines = 0;
    loop {
        let before = sample.len();
        if let Err(e) = stream.take(SNIFF_CHUNK as u64).read_to_end(&mut sample) {
            return (sample, Some(e));
        }
        let at_end = sample.len() - before < SNIFF_CHUNK;
        lines += sample[before..].iter().filter(|&&b| b == b'\n').count();
        if at_end || lines >= SNIFF_LINES || sample.len() >= SNIFF_MAX_BYTES {
            return (sample, None);
        }
    }
}

/// A stream that fails with the error it was given, then ends.
struct Failing(Option<io::Error>);

impl Read for Failing {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        self.0.take().map_or(Ok(0), Err)
    }
}

/// pcap (either byte order, µs or ns) and pcapng by their magic numbers; text otherwise.
pub(crate) fn sniff(sample: &[u8]) -> Option<Format> {
    const MAGICS: [[u8; 4]; 5] = [
        [0xd4, 0xc3, 0xb2, 0xa1],
        [0xa1, 0xb2, 0xc3, 0xd4],
        [0x4d, 0x3c, 0xb2, 0xa1],
        [0xa1, 0xb2, 0x3c, 0x4d],
        [0x0a, 0x0d, 0x0d, 0x0a],
    ];
    if sample.len() >= 4 && MAGICS.iter().any(|m| sample[..4] == m[..]) {
        return Some(Format::Pcap);
    }
    formats::sniff_text(sample)
}

/// One line from [`LineReader::next_line`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// The line is in [`LineReader::line`], line end (`\n`, `\r\n`) removed.
    Text,
    /// Longer than the cap; its bytes were discarded as they streamed by.
    TooLong,
}

/// Splits a stream into lines of at most `max` bytes, reusing one buffer. A longer line is
/// skipped without ever being held whole.
pub(crate) struct LineReader {
    input: Input,
    buf: Vec<u8>,
    max: usize,
    /// 1-based number of the line last returned.
    pub line_no: u64,
}

impl LineReader {
    pub fn new(input: Input, max: usize) -> Self {
        LineReader {
            input,
            buf: Vec::with_capacity(1024),
            max,
            line_no: 0,
        }
    }

    pub fn line(&self) -> &[u8] {
        &self.buf
    }

    /// The next line, `None` at the end. An I/O error (a truncated gzip member, a disk error)
    /// ends the file; lines before it were already returned.
    pub fn next_line(&mut self) -> io::Result<Option<Line>> {
        self.buf.clear();
        let mut too_long = false;
        loop {
            let avail = self.input.fill_buf()?;
            if avail.is_empty() {
                // End of input: a last line without a newline still counts.
                if self.buf.is_empty() && !too_long {
                    return Ok(None);
                }
                self.line_no += 1;
                return Ok(Some(self.finish(too_long)));
            }
            match memchr::memchr(b'\n', avail) {
                Some(i) => {
                    if !too_long && self.buf.len() + i <= self.max + 1 {
                        self.buf.extend_from_slice(&avail[..i]);
                    } else {
                        too_long = true;
                    }
                    self.input.consume(i + 1);
                    self.line_no += 1;
                    return Ok(Some(self.finish(too_long)));
                }
                None => {
                    let n = avail.len();
                    if !too_long && self.buf.len() + n <= self.max + 1 {
                        self.buf.extend_from_slice(avail);
                    } else {
                        too_long = true;
                        self.buf.clear();
                    }
                    self.input.consume(n);
                }
            }
        }
    }

    fn finish(&mut self, too_long: bool) -> Line {
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        // The +1 above leaves room for a `\r` that is not part of the line's length.
        if too_long || self.buf.len() > self.max {
            self.buf.clear();
            Line::TooLong
        } else {
            Line::Text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(bytes: Vec<u8>, max: usize) -> LineReader {
        // A small read buffer so lines span many fill_buf calls.
        let input: Input = BufReader::with_capacity(64, Box::new(Cursor::new(bytes)));
        LineReader::new(input, max)
    }

    fn lines(bytes: &[u8], max: usize) -> Vec<Result<String, Line>> {
        let mut r = reader(bytes.to_vec(), max);
        let mut out = Vec::new();
        while let Some(l) = r.next_line().unwrap() {
            out.push(match l {
                Line::Text => Ok(String::from_utf8_lossy(r.line()).into_owned()),
                Line::TooLong => Err(Line::TooLong),
            });
        }
        out
    }

    #[test]
    fn crlf_and_missing_final_newline_are_handled() {
        assert_eq!(
            lines(b"a\r\nbb\n\nccc", 100),
            vec![
                Ok("a".into()),
                Ok("bb".into()),
                Ok("".into()),
                Ok("ccc".into())
            ]
        );
        assert!(lines(b"", 100).is_empty());
    }

    #[test]
    fn line_over_the_cap_is_skipped_without_being_buffered() {
        let max = 1000;
        let mut input = vec![b'x'; max];
        input.extend_from_slice(b"\r\n");
        input.extend(std::iter::repeat_n(b'y', 5_000_000));
        input.extend_from_slice(b"\nafter\n");
        input.extend(std::iter::repeat_n(b'z', max + 1));
        let mut r = reader(input, max);
        assert_eq!(r.next_line().unwrap(), Some(Line::Text));
        assert_eq!(r.line().len(), max, "a line at the cap (plus \\r) is kept");
        assert_eq!(r.next_line().unwrap(), Some(Line::TooLong));
        assert!(
            r.buf.capacity() < 4 * max,
            "a 5 MB line must not be held: buffer grew to {}",
            r.buf.capacity()
        );
        assert_eq!(r.line_no, 2);
        assert_eq!(r.next_line().unwrap(), Some(Line::Text));
        assert_eq!(r.line(), b"after");
        assert_eq!(
            r.next_line().unwrap(),
            Some(Line::TooLong),
            "unterminated last line too"
        );
        assert_eq!(r.next_line().unwrap(), None);
    }

    #[test]
    fn a_log_starting_with_a_line_longer_than_a_chunk_is_still_recognised() {
        let line = |path: &str| {
            format!(
                "10.0.0.1 - - [10/Oct/2000:13:55:36 -0700] \"GET {path} HTTP/1.1\" 200 5 \"-\" \"curl/8\"\n"
            )
        };
        let mut log = line(&format!("/{}", "a".repeat(3 * SNIFF_CHUNK)));
        for i in 0..2000 {
            log.push_str(&line(&format!("/items/{i}")));
        }
        let (sample, err) = read_sample(&mut Cursor::new(log.as_bytes()));
        assert!(err.is_none());
        assert!(sample.len() < log.len(), "stops once it holds enough lines");
        assert_eq!(sniff(&sample), Some(Format::Combined));
        // The first chunk alone holds no whole line to judge.
        assert_eq!(sniff(&sample[..SNIFF_CHUNK]), None);
    }

    #[test]
    fn a_sample_never_grows_past_its_cap() {
        let junk = vec![b'x'; 3 * SNIFF_MAX_BYTES];
        let (sample, _) = read_sample(&mut Cursor::new(junk));
        assert_eq!(sample.len(), SNIFF_MAX_BYTES);
    }

    #[test]
    fn sniff_recognises_capture_magics_in_both_byte_orders() {
        for magic in [
            [0xd4, 0xc3, 0xb2, 0xa1],
            [0xa1, 0xb2, 0xc3, 0xd4],
            [0x4d, 0x3c, 0xb2, 0xa1],
            [0x0a, 0x0d, 0x0d, 0x0a],
        ] {
            let mut s = magic.to_vec();
            s.extend_from_slice(&[0; 20]);
            assert_eq!(sniff(&s), Some(Format::Pcap));
        }
        assert_eq!(sniff(&[0xd4, 0xc3]), None);
    }
}
