//! Append-only item journals for long nodes.
//!
//! One JSON object per line, each with at least `{"item": "<id>"}`. A batch of records goes out
//! in one write followed by `fdatasync`, so a kill -9 loses at most the batch being written. A
//! crash can leave a torn tail (half a line, or zero bytes from a filesystem that extended the
//! file before writing the data); opening drops and truncates it. Damage followed by valid
//! records is not a torn tail and is reported instead of silently dropping work.
//!
//! A node must make an item's outputs durable before appending its record, so a record never
//! points at output that a crash could lose.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::error::CacheError;
use super::fsync_dir;

#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Bytes of the file that hold complete, valid records.
    valid_len: u64,
    records: Vec<Value>,
    done: HashSet<String>,
}

fn item_of(record: &Value) -> Option<&str> {
    record.as_object()?.get("item")?.as_str()
}

/// Splits journal bytes into valid records and the length they cover. Errors when an invalid
/// line is followed by a valid one.
fn parse(bytes: &[u8], path: &Path) -> Result<(Vec<Value>, u64), CacheError> {
    let mut records = Vec::new();
    let mut valid_len = 0usize;
    let mut first_bad: Option<(u64, String)> = None;
    let mut start = 0usize;
    let mut line_no = 0u64;
    while let Some(newline) = bytes[start..].iter().position(|&b| b == b'\n') {
        let line = &bytes[start..start + newline];
        line_no += 1;
        let parsed = serde_json::from_slice::<Value>(line)
            .map_err(|e| e.to_string())
            .and_then(|v| match item_of(&v) {
                Some(_) => Ok(v),
                None => Err("no string \"item\" field".to_string()),
            });
        match (parsed, &first_bad) {
            (Ok(record), None) => {
                records.push(record);
                valid_len = start + newline + 1;
            }
            (Ok(_), Some((bad_line, reason))) => {
                return Err(CacheError::CorruptJournal {
                    path: path.to_path_buf(),
                    partial_dir: path.parent().unwrap_or(Path::new("")).to_path_buf(),
                    line: *bad_line,
                    reason: reason.clone(),
                });
            }
            (Err(reason), None) => first_bad = Some((line_no, reason)),
            (Err(_), Some(_)) => {}
        }
        start += newline + 1;
    }
    Ok((records, valid_len as u64))
}

impl Journal {
    /// Opens (creating) the journal and reads its records; a torn tail is dropped and truncated
    /// away before anything can be appended after it.
    pub fn open(path: &Path) -> Result<Journal, CacheError> {
        let created = match fs::symlink_metadata(path) {
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(CacheError::io("stat journal", path, e)),
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| CacheError::io("open journal", path, e))?;
        if created {
            // Make the new directory entry durable, or a crash could lose the synced records
            // together with the file's name.
            if let Some(parent) = path.parent() {
                fsync_dir(parent)?;
            }
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| CacheError::io("read journal", path, e))?;
        let (records, valid_len) = parse(&bytes, path)?;
        if valid_len < bytes.len() as u64 {
            tracing::info!(
                "journal {}: dropping a torn tail of {} bytes left by an interrupted write",
                path.display(),
                bytes.len() as u64 - valid_len
            );
            file.set_len(valid_len)
                .and_then(|()| file.sync_data())
                .map_err(|e| CacheError::io("truncate torn tail of journal", path, e))?;
        }
        let done = records
            .iter()
            .filter_map(|r| item_of(r).map(str::to_string))
            .collect();
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            valid_len,
            records,
            done,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn records(&self) -> &[Value] {
        &self.records
    }

    /// The ids of the items recorded so far.
    pub fn done(&self) -> HashSet<String> {
        self.done.clone()
    }

    pub fn is_done(&self, item: &str) -> bool {
        self.done.contains(item)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Appends the batch in one write, then flushes and syncs it.
    pub fn append_batch(&mut self, records: &[Value]) -> Result<(), CacheError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for record in records {
            if item_of(record).is_none() {
                return Err(CacheError::InvalidJournalRecord {
                    path: self.path.clone(),
                    record: record.to_string(),
                });
            }
            // Compact serialization escapes newlines inside strings: one record, one line.
            serde_json::to_writer(&mut buf, record).expect("a JSON value always serializes");
            buf.push(b'\n');
        }
        let written = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // A partial write must not stay in front of the next batch.
            let _ = self.file.set_len(self.valid_len);
            return Err(CacheError::io("append to journal", &self.path, e));
        }
        self.valid_len += buf.len() as u64;
        for record in records {
            if let Some(item) = item_of(record) {
                self.done.insert(item.to_string());
            }
        }
        self.records.extend_from_slice(records);
        Ok(())
    }
}

/// The valid records of a journal without opening it for writing: another process may be
/// appending to it. A torn tail (an append in progress, or a crash) is left out; a missing file
/// has no records.
pub(crate) fn read_records(path: &Path) -> Result<Vec<Value>, CacheError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CacheError::io("read journal", path, e)),
    };
    Ok(parse(&bytes, path)?.0)
}

/// Number of complete lines in a journal file, without parsing: for `cip plan`.
pub(crate) fn count_lines(path: &Path) -> u64 {
    let Ok(mut file) = File::open(path) else {
        return 0;
    };
    let mut buf = vec![0u8; 1 << 16];
    let mut lines = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => return lines,
            Ok(n) => lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return lines,
        }
    }
}
