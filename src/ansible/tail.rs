//! `EventTail`: follows a task's `events.jsonl` through one open descriptor, in bounded chunks.
//!
//! The file is written by the callback plugin, but also by anything the playbook runs (it is the
//! task's own file): it may hold NUL bytes, invalid UTF-8, lines of megabytes, or end in half a
//! line. Memory stays bounded whatever it holds: at most [`CHUNK`] bytes are read at a time and a
//! line is kept only up to [`MAX_LINE`] bytes; a longer one is skipped (and reported as such)
//! without ever being held whole. A file that shrinks under the reader (truncated by the
//! playbook) is detected and followed from its new end.
//!
//! Blocking: call it from the blocking pool.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;

/// Most bytes read from the file in one call.
pub const CHUNK: usize = 256 * 1024;
/// Longest line kept; the callback plugin's lines stay far below it (it bounds every field).
pub const MAX_LINE: usize = 1024 * 1024;

/// One piece of the file, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A complete line (newline included), at most `MAX_LINE` bytes.
    Line(Vec<u8>),
    /// A line longer than `MAX_LINE`, skipped: its length in bytes.
    TooLong(u64),
    /// What followed the last newline when the writer was gone (a cut-off last line).
    Cut(Vec<u8>),
    /// The file was shorter than what had been read: it was truncated to this length.
    Truncated(u64),
}

/// What one read found.
#[derive(Debug, Default)]
pub struct Chunk {
    /// Each piece with the file offset right after it (where the next line starts).
    pub pieces: Vec<(u64, Piece)>,
    /// A whole chunk was read: more is probably waiting.
    pub more: bool,
}

/// A reader of one events file.
#[derive(Debug)]
pub struct EventTail {
    path: PathBuf,
    file: Option<File>,
    /// File offset up to which every line has been handed out (a line start).
    consumed: u64,
    /// File offset of the next byte to read.
    pos: u64,
    /// Bytes read after `consumed`: the start of a line not complete yet.
    partial: Vec<u8>,
    /// Inside a line longer than `MAX_LINE`: its bytes so far.
    skipping: Option<u64>,
}

impl EventTail {
    /// A reader of `path` from `offset` (a line start: what an earlier reader consumed).
    pub fn new(path: PathBuf, offset: u64) -> EventTail {
        EventTail {
            path,
            file: None,
            consumed: offset,
            pos: offset,
            partial: Vec::new(),
            skipping: None,
        }
    }

    /// Offset up to which the file has been handed out (stored as `tasks.events_offset`).
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    fn open(&mut self) -> io::Result<&mut File> {
        let file = match self.file.take() {
            Some(file) => file,
            None => {
                let mut file = File::open(&self.path)?;
                file.seek(SeekFrom::Start(self.pos))?;
                file
            }
        };
        Ok(self.file.insert(file))
    }

    /// Whether the file changed size since the last read: one `fstat` of the open descriptor,
    /// cheap enough for the actor's thread, so an idle task costs no trip to the blocking pool.
    pub fn changed(&mut self) -> io::Result<bool> {
        let pos = self.pos;
        Ok(self.open()?.metadata()?.len() != pos)
    }

    /// Reads at most one chunk. With `writer_gone`, what follows the last newline is handed out
    /// as [`Piece::Cut`] (nothing will complete it).
    pub fn read(&mut self, writer_gone: bool) -> io::Result<Chunk> {
        self.open()?;
        let Some(file) = self.file.as_mut() else {
            return Ok(Chunk::default());
        };
        let mut chunk = Chunk::default();
        let len = file.metadata()?.len();
        if len < self.pos {
            // Truncated under us: what was partial is gone with it; go on from the new end.
            file.seek(SeekFrom::Start(len))?;
            self.consumed = len;
            self.pos = len;
            self.partial.clear();
            self.skipping = None;
            chunk.pieces.push((len, Piece::Truncated(len)));
        }
        // Only as much as there is (a poll of an idle task allocates nothing).
        let avail = usize::try_from(len.saturating_sub(self.pos)).unwrap_or(CHUNK);
        let mut buf = vec![0u8; avail.min(CHUNK)];
        let n = read_full(file, &mut buf)?;
        buf.truncate(n);
        self.pos += n as u64;
        chunk.more = n == CHUNK;
        let mut start = 0;
        while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + nl + 1;
            let piece = &buf[start..end];
            let whole = match self.skipping.take() {
                Some(skipped) => skipped,
                None => self.partial.len() as u64,
            } + piece.len() as u64;
            self.consumed += whole;
            if whole > MAX_LINE as u64 {
                chunk.pieces.push((self.consumed, Piece::TooLong(whole)));
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(piece);
                chunk.pieces.push((self.consumed, Piece::Line(line)));
            }
            self.partial.clear();
            start = end;
        }
        let rest = &buf[start..];
        if let Some(skipped) = self.skipping.as_mut() {
            *skipped += rest.len() as u64;
        } else if self.partial.len() + rest.len() > MAX_LINE {
            self.skipping = Some((self.partial.len() + rest.len()) as u64);
            self.partial.clear();
        } else {
            self.partial.extend_from_slice(rest);
        }
        if writer_gone && !chunk.more {
            if let Some(skipped) = self.skipping.take() {
                self.consumed = self.pos;
                chunk.pieces.push((self.pos, Piece::TooLong(skipped)));
            } else if !self.partial.is_empty() {
                self.consumed = self.pos;
                let cut = std::mem::take(&mut self.partial);
                chunk.pieces.push((self.pos, Piece::Cut(cut)));
            }
        }
        Ok(chunk)
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dl-tail-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("events.jsonl")
    }

    fn all(tail: &mut EventTail, gone: bool) -> Vec<Piece> {
        let mut out = Vec::new();
        loop {
            let c = tail.read(gone).unwrap();
            out.extend(c.pieces.into_iter().map(|(_, p)| p));
            if !c.more {
                return out;
            }
        }
    }

    #[test]
    fn lines_across_chunks_long_lines_and_a_cut_end() {
        let path = temp("mixed");
        let mut f = File::create(&path).unwrap();
        let long = vec![b'x'; 3 * 1024 * 1024];
        f.write_all(b"{\"a\":1}\n").unwrap();
        f.write_all(&long).unwrap();
        f.write_all(b"\n").unwrap();
        let mid = vec![b'y'; CHUNK + 10];
        f.write_all(&mid).unwrap();
        f.write_all(b"\n{\"half\":").unwrap();
        drop(f);
        let mut tail = EventTail::new(path.clone(), 0);
        let pieces = all(&mut tail, false);
        assert_eq!(pieces.len(), 3, "the half line waits for its writer");
        assert_eq!(pieces[0], Piece::Line(b"{\"a\":1}\n".to_vec()));
        assert_eq!(pieces[1], Piece::TooLong(long.len() as u64 + 1));
        match &pieces[2] {
            Piece::Line(l) => assert_eq!(l.len(), CHUNK + 11),
            other => panic!("{other:?}"),
        }
        let before = tail.consumed();
        let rest = all(&mut tail, true);
        assert_eq!(rest, vec![Piece::Cut(b"{\"half\":".to_vec())]);
        assert_eq!(tail.consumed(), before + 8);
        assert_eq!(tail.consumed(), std::fs::metadata(&path).unwrap().len());
    }

    #[test]
    fn resumes_from_an_offset_and_notices_truncation() {
        let path = temp("trunc");
        std::fs::write(&path, b"one\ntwo\n").unwrap();
        let mut tail = EventTail::new(path.clone(), 4);
        assert_eq!(all(&mut tail, false), vec![Piece::Line(b"two\n".to_vec())]);
        std::fs::write(&path, b"z\n").unwrap();
        let pieces = all(&mut tail, false);
        assert_eq!(pieces, vec![Piece::Truncated(2)]);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"three\n").unwrap();
        assert_eq!(
            all(&mut tail, false),
            vec![Piece::Line(b"three\n".to_vec())]
        );
    }
}
