//! Outputs written as JSON lines: alerts, and dead letters (input set
//! aside). A file output knows its length, so a checkpoint can record how
//! much of it belongs to the events applied, and a restart can cut off what
//! a crash left beyond that — no alert is written twice into a file.
//!
//! Lines are kept in memory until [`JsonLinesSink::sync`] makes them
//! durable, so writing a line never fails, and a sync that fails part-way
//! (disk full, an I/O error, a file made read-only) can be tried again: the
//! file is first cut back to its length at the last successful sync and
//! the lines are written again. After a failed `fsync` the kernel may have
//! dropped the pages it could not write while marking them clean; writing
//! them again from memory is what makes the next `fsync` mean something.

mod kafka;

pub use kafka::{AlertProducer, KafkaProducer};

use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;

/// A JSON-lines output: a file or standard output.
pub struct JsonLinesSink {
    target: Target,
    /// Lines written since the last successful sync: not yet durable.
    pending: Vec<u8>,
    /// The file's length at the last successful sync (standard output:
    /// the bytes it has taken).
    synced: u64,
}

enum Target {
    File {
        file: File,
        /// A sync failed after it started writing: the file may hold bytes
        /// past `synced`, which the next try cuts off first.
        torn: bool,
    },
    Stdout {
        /// Of `pending`, the bytes standard output has already taken (it
        /// cannot be cut back, so they are never written again).
        sent: usize,
    },
}

impl JsonLinesSink {
    /// Appends to `path` (created with its folder if needed). With
    /// `committed_len`, a longer file is first cut back to that length.
    /// Fails on a path that is not a regular file.
    pub fn open_file(path: &Path, committed_len: Option<u64>) -> io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).read(true).write(true).truncate(false).open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
        }
        let mut len = meta.len();
        if let Some(keep) = committed_len.filter(|&keep| keep < len) {
            file.set_len(keep)?;
            len = keep;
        }
        Ok(Self { target: Target::File { file, torn: false }, pending: Vec::new(), synced: len })
    }

    /// Writes to standard output.
    pub fn stdout() -> Self {
        Self { target: Target::Stdout { sent: 0 }, pending: Vec::new(), synced: 0 }
    }

    /// Adds one record as a line, in memory until the next [`sync`](Self::sync).
    pub fn write<T: Serialize>(&mut self, record: &T) -> serde_json::Result<()> {
        let mark = self.pending.len();
        if let Err(e) = serde_json::to_writer(&mut self.pending, record) {
            self.pending.truncate(mark);
            return Err(e);
        }
        self.pending.push(b'\n');
        Ok(())
    }

    /// Bytes written since the last successful sync (held in memory).
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    /// Makes everything written so far durable; returns the file's length.
    /// On failure nothing is lost: the next call tries again from the
    /// length of the last successful sync.
    pub fn sync(&mut self) -> io::Result<u64> {
        match &mut self.target {
            Target::File { file, torn } => {
                if *torn {
                    file.set_len(self.synced)?;
                    *torn = false;
                }
                if self.pending.is_empty() {
                    return Ok(self.synced);
                }
                *torn = true;
                file.seek(SeekFrom::Start(self.synced))?;
                file.write_all(&self.pending)?;
                file.sync_data()?;
                *torn = false;
            }
            Target::Stdout { sent } => {
                let mut out = io::stdout().lock();
                while *sent < self.pending.len() {
                    match out.write(&self.pending[*sent..]) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => *sent += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                out.flush()?;
                *sent = 0;
            }
        }
        self.synced += self.pending.len() as u64;
        self.pending.clear();
        Ok(self.synced)
    }
}

/// A line set aside, as written to the dead-letter file.
#[derive(Debug, Serialize)]
pub struct DeadLetter<'a> {
    /// Input it came from.
    pub source: &'a str,
    /// Its line number there.
    pub line: u64,
    /// Why it was set aside: `invalid_json`, `not_object`, `too_large`, `incomplete`.
    pub reason: &'static str,
    /// Details (the parser's message, the rule and field).
    pub detail: String,
    /// The line itself (for a line over the limit, its first bytes only).
    pub raw: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_back_to_committed_length() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/out.jsonl");
        let mut s = JsonLinesSink::open_file(&p, None).unwrap();
        s.write(&serde_json::json!({"n": 1})).unwrap();
        let committed = s.sync().unwrap();
        s.write(&serde_json::json!({"n": 2})).unwrap();
        s.sync().unwrap();
        drop(s);
        let mut s = JsonLinesSink::open_file(&p, Some(committed)).unwrap();
        s.write(&serde_json::json!({"n": 3})).unwrap();
        s.sync().unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"n\":1}\n{\"n\":3}\n");
    }

    #[test]
    fn a_failed_sync_is_cut_back_and_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.jsonl");
        let mut s = JsonLinesSink::open_file(&p, None).unwrap();
        s.write(&serde_json::json!({"n": 1})).unwrap();
        assert_eq!(s.sync().unwrap(), 8);
        s.write(&serde_json::json!({"n": 2})).unwrap();
        // As a try that failed after writing would leave it (here: the line
        // and half of it again past the synced length), the sync marked torn.
        let Target::File { file, torn } = &mut s.target else { unreachable!() };
        file.seek(SeekFrom::Start(8)).unwrap();
        file.write_all(b"{\"n\":2}\n{\"n\"").unwrap();
        *torn = true;
        assert_eq!(s.pending_bytes(), 8);
        assert_eq!(s.sync().unwrap(), 16);
        assert_eq!(s.pending_bytes(), 0);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"n\":1}\n{\"n\":2}\n");
    }

    #[test]
    fn a_path_that_is_not_a_regular_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(JsonLinesSink::open_file(dir.path(), None).is_err(), "a folder");
        assert!(JsonLinesSink::open_file(Path::new("/dev/null"), None).is_err(), "a device");
    }
}
