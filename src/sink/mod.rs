//! Outputs written as JSON lines: alerts, and dead letters (input set
//! aside). A file output knows its length, so a checkpoint can record how
//! much of it belongs to the events applied, and a restart can cut off what
//! a crash left beyond that — no alert is written twice into a file.

mod kafka;

pub use kafka::{AlertProducer, KafkaProducer};

use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

/// A JSON-lines output: a file or standard output.
pub struct JsonLinesSink {
    out: BufWriter<Box<dyn Write + Send>>,
    file: Option<File>,
    len: u64,
}

impl JsonLinesSink {
    /// Appends to `path` (created with its folder if needed). With
    /// `committed_len`, a longer file is first cut back to that length.
    pub fn open_file(path: &Path, committed_len: Option<u64>) -> io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new().create(true).read(true).write(true).truncate(false).open(path)?;
        let mut len = file.metadata()?.len();
        if let Some(keep) = committed_len.filter(|&keep| keep < len) {
            file.set_len(keep)?;
            len = keep;
        }
        file.seek(SeekFrom::End(0))?;
        let writer = file.try_clone()?;
        Ok(Self { out: BufWriter::with_capacity(64 * 1024, Box::new(writer)), file: Some(file), len })
    }

    /// Writes to standard output.
    pub fn stdout() -> Self {
        Self { out: BufWriter::new(Box::new(io::stdout())), file: None, len: 0 }
    }

    /// Writes one record as a line.
    pub fn write<T: Serialize>(&mut self, record: &T) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        self.out.write_all(&line)?;
        self.len += line.len() as u64;
        Ok(())
    }

    /// Makes everything written so far durable; returns the file's length.
    pub fn sync(&mut self) -> io::Result<u64> {
        self.out.flush()?;
        if let Some(f) = &self.file {
            f.sync_data()?;
        }
        Ok(self.len)
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
}
