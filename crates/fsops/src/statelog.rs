//! A node's persisted state as a snapshot plus an append-only log of what changed since it, so
//! recording a generation costs in proportion to the generation, not to the folders.
//!
//! Layout, in the state directory, for a state named `N`:
//!
//! - `N`: the snapshot, replaced atomically ([`write_atomic`]); its bytes are the caller's.
//! - `N.log`: a header (`SYNCDLG1` and the first 16 bytes of BLAKE3 of the snapshot it extends),
//!   then records, each a little-endian `u32` length, the first 8 bytes of BLAKE3 of the payload,
//!   and the payload.
//!
//! An append is durable when [`StateLog::append`] returns (`fdatasync`). A record cut short by a
//! crash fails its length or checksum; it and anything after it are dropped at the next open
//! (it was never acknowledged). A log whose header names another snapshot is stale: a crash came
//! between writing a new snapshot and starting its log, and every record in it is already in
//! the snapshot, so it is ignored.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::durable::write_atomic;

const LOG_MAGIC: &[u8; 8] = b"SYNCDLG1";
const HEADER_LEN: usize = 8 + 16;
const RECORD_HEADER_LEN: usize = 4 + 8;
/// A log is folded into a new snapshot once it outgrows the snapshot or this many bytes,
/// whichever is larger: appends stay small, and a load never replays more than about the
/// snapshot's size again.
const MIN_LOG_BUDGET: u64 = 1 << 20;
/// Longest record accepted when reading a log back.
const MAX_RECORD: usize = 1 << 30;

/// What [`StateLog::open`] found.
#[derive(Debug, Default)]
pub struct LoadedState {
    /// The snapshot's bytes, if there is one.
    pub snapshot: Option<Vec<u8>>,
    /// Records appended since that snapshot, oldest first.
    pub records: Vec<Vec<u8>>,
    /// Bytes of a torn or damaged tail that were dropped (0 normally).
    pub dropped_bytes: u64,
}

/// An open state: where the next record goes and when to write a snapshot instead.
#[derive(Debug)]
pub struct StateLog {
    snapshot_path: PathBuf,
    log_path: PathBuf,
    mode: u32,
    /// The open log, positioned at its end; `None` until the first append after a snapshot.
    log: Option<File>,
    /// Header of the log that extends the current snapshot.
    header: [u8; HEADER_LEN],
    log_bytes: u64,
    snapshot_bytes: u64,
}

impl StateLog {
    /// Opens the state named `name` in `dir`: reads the snapshot and the records that extend
    /// it, and cuts off a torn tail so later appends follow the last good record. A read error
    /// is returned as is; damaged content is the caller's to judge (it gets the bytes).
    pub fn open(dir: &Path, name: &str, mode: u32) -> io::Result<(StateLog, LoadedState)> {
        let snapshot_path = dir.join(name);
        let log_path = dir.join(format!("{name}.log"));
        let snapshot = match std::fs::read(&snapshot_path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let header = header_for(snapshot.as_deref().unwrap_or_default());
        let mut state = StateLog {
            snapshot_bytes: snapshot.as_ref().map_or(0, |s| s.len() as u64),
            snapshot_path,
            log_path,
            mode,
            log: None,
            header,
            log_bytes: 0,
        };
        let mut loaded = LoadedState {
            snapshot,
            ..LoadedState::default()
        };
        let mut file = match OpenOptions::new()
            .read(true)
            .write(true)
            .open(&state.log_path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((state, loaded)),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        if bytes.len() < HEADER_LEN || bytes[..HEADER_LEN] != header {
            // Stale (it extends an older snapshot) or unreadable: nothing in it counts.
            drop(file);
            std::fs::remove_file(&state.log_path)?;
            return Ok((state, loaded));
        }
        let mut at = HEADER_LEN;
        while let Some((payload, next)) = record_at(&bytes, at) {
            loaded.records.push(payload.to_vec());
            at = next;
        }
        if at < bytes.len() {
            loaded.dropped_bytes = (bytes.len() - at) as u64;
            file.set_len(at as u64)?;
            file.sync_data()?;
        }
        file.seek(SeekFrom::Start(at as u64))?;
        state.log_bytes = at as u64;
        state.log = Some(file);
        Ok((state, loaded))
    }

    /// Records a change durably: appends `record` to the log, or, when the log has grown past
    /// its budget, writes `snapshot()` (the whole state, this change included) and starts an
    /// empty log.
    pub fn commit(
        &mut self,
        record: &[u8],
        snapshot: impl FnOnce() -> io::Result<Vec<u8>>,
    ) -> io::Result<()> {
        let budget = self.snapshot_bytes.max(MIN_LOG_BUDGET);
        if self.log_bytes + (RECORD_HEADER_LEN + record.len()) as u64 > budget {
            self.rewrite(&snapshot()?)
        } else {
            self.append(record)
        }
    }

    /// Appends one record and makes it durable.
    pub fn append(&mut self, record: &[u8]) -> io::Result<()> {
        let len = u32::try_from(record.len())
            .ok()
            .filter(|&l| l as usize <= MAX_RECORD)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "state record too large"))?;
        if self.log.is_none() {
            // A fresh log: its header first, made durable with the directory entry, so a
            // record is never appended to a file that may not survive a crash.
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(self.mode)
                .open(&self.log_path)?;
            file.write_all(&self.header)?;
            file.sync_all()?;
            sync_dir(&self.log_path)?;
            self.log_bytes = HEADER_LEN as u64;
            self.log = Some(file);
        }
        let file = self.log.as_mut().expect("opened above");
        let mut buf = Vec::with_capacity(RECORD_HEADER_LEN + record.len());
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&blake3::hash(record).as_bytes()[..8]);
        buf.extend_from_slice(record);
        if let Err(e) = file.write_all(&buf).and_then(|()| file.sync_data()) {
            // Whatever part of it reached the file is cut off at the next open; until then,
            // do not append after it.
            self.log = None;
            let _ = std::fs::remove_file(&self.log_path);
            return Err(e);
        }
        self.log_bytes += buf.len() as u64;
        Ok(())
    }

    /// Replaces the snapshot with `snapshot` and empties the log.
    pub fn rewrite(&mut self, snapshot: &[u8]) -> io::Result<()> {
        write_atomic(&self.snapshot_path, snapshot, self.mode)?;
        self.snapshot_bytes = snapshot.len() as u64;
        self.header = header_for(snapshot);
        self.log = None;
        self.log_bytes = 0;
        // The old log names the old snapshot, so a crash before this removal leaves it stale,
        // never replayed twice; removing it only saves the next open a read.
        match std::fs::remove_file(&self.log_path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Bytes in the log now (header included).
    pub fn log_len(&self) -> u64 {
        self.log_bytes
    }
}

/// A node's state file as its role uses it: rebuilt once at start, then changed by appended
/// records or rewritten whole. The log is opened again lazily when it could not be at start.
#[derive(Debug)]
pub struct StateFile {
    dir: PathBuf,
    name: String,
    mode: u32,
    log: Option<StateLog>,
}

/// What [`StateFile::restore`] made of the state on disk.
#[derive(Debug)]
pub struct Restored<S> {
    /// The state rebuilt from the snapshot and the records after it (the default state on a
    /// first start), or why it could not be: the files are then set aside as `*.damaged` (when
    /// they could be read at all) and the caller starts afresh.
    pub state: Result<S, String>,
    /// Bytes of a torn log tail that were dropped (a record being written when the node
    /// stopped; never acknowledged).
    pub dropped_bytes: u64,
}

impl StateFile {
    /// Opens and rebuilds the state named `name` in `dir`: `decode` reads the snapshot, and
    /// `replay` applies each record after it in order. Records may extend no snapshot (the first
    /// ones, before the log was first folded): they extend `S::default()`.
    pub fn restore<S: Default, E: std::fmt::Display>(
        dir: &Path,
        name: &str,
        mode: u32,
        decode: impl Fn(&[u8]) -> Result<S, E>,
        mut replay: impl FnMut(&mut S, &[u8]) -> Result<(), E>,
    ) -> (StateFile, Restored<S>) {
        let mut file = StateFile {
            dir: dir.to_owned(),
            name: name.to_owned(),
            mode,
            log: None,
        };
        let loaded = match StateLog::open(dir, name, mode) {
            Ok((log, loaded)) => {
                file.log = Some(log);
                loaded
            }
            Err(e) => {
                let state = Err(format!("cannot read {}: {e}", dir.join(name).display()));
                return (
                    file,
                    Restored {
                        state,
                        dropped_bytes: 0,
                    },
                );
            }
        };
        let mut rebuild = || -> Result<S, E> {
            let mut state = match &loaded.snapshot {
                Some(snapshot) => decode(snapshot)?,
                None => S::default(),
            };
            for record in &loaded.records {
                replay(&mut state, record)?;
            }
            Ok(state)
        };
        let state = rebuild().map_err(|e| {
            for n in [name.to_owned(), format!("{name}.log")] {
                let _ = std::fs::rename(dir.join(&n), dir.join(format!("{n}.damaged")));
            }
            // A fresh log: the damaged files are out of the way.
            file.log = StateLog::open(dir, name, mode).map(|(log, _)| log).ok();
            format!(
                "{} does not decode ({e}); set aside as {name}.damaged",
                dir.join(name).display()
            )
        });
        let dropped_bytes = loaded.dropped_bytes;
        (
            file,
            Restored {
                state,
                dropped_bytes,
            },
        )
    }

    fn log(&mut self) -> io::Result<&mut StateLog> {
        if self.log.is_none() {
            self.log = Some(StateLog::open(&self.dir, &self.name, self.mode)?.0);
        }
        Ok(self.log.as_mut().expect("opened above"))
    }

    /// See [`StateLog::commit`].
    pub fn commit(
        &mut self,
        record: &[u8],
        snapshot: impl FnOnce() -> io::Result<Vec<u8>>,
    ) -> io::Result<()> {
        self.log()?.commit(record, snapshot)
    }

    /// See [`StateLog::rewrite`].
    pub fn rewrite(&mut self, snapshot: &[u8]) -> io::Result<()> {
        self.log()?.rewrite(snapshot)
    }
}

fn header_for(snapshot: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(LOG_MAGIC);
    h[8..].copy_from_slice(&blake3::hash(snapshot).as_bytes()[..16]);
    h
}

/// The record starting at `at`, and where the next one starts; `None` at the end or at a torn
/// or damaged record.
fn record_at(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let head = bytes.get(at..at + RECORD_HEADER_LEN)?;
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_RECORD {
        return None;
    }
    let start = at + RECORD_HEADER_LEN;
    let payload = bytes.get(start..start.checked_add(len)?)?;
    (blake3::hash(payload).as_bytes()[..8] == head[4..12]).then_some((payload, start + len))
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> (StateLog, LoadedState) {
        StateLog::open(dir, "s.state", 0o600).unwrap()
    }

    #[test]
    fn records_come_back_after_their_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, loaded) = open(dir.path());
        assert!(loaded.snapshot.is_none() && loaded.records.is_empty());
        s.rewrite(b"base").unwrap();
        s.append(b"one").unwrap();
        s.append(b"").unwrap();
        s.append(b"three").unwrap();
        drop(s);
        let (_, loaded) = open(dir.path());
        assert_eq!(loaded.snapshot.as_deref(), Some(&b"base"[..]));
        assert_eq!(loaded.records, [&b"one"[..], b"", b"three"]);
        assert_eq!(loaded.dropped_bytes, 0);
    }

    #[test]
    fn a_torn_tail_is_dropped_and_appends_continue_after_the_last_good_record() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = open(dir.path());
        s.rewrite(b"base").unwrap();
        s.append(b"one").unwrap();
        s.append(b"two").unwrap();
        drop(s);
        let log = dir.path().join("s.state.log");
        let full = std::fs::metadata(&log).unwrap().len();
        // Every cut inside the last record loses exactly that record.
        for cut in 1..(RECORD_HEADER_LEN as u64 + 3) {
            let f = OpenOptions::new().write(true).open(&log).unwrap();
            f.set_len(full - cut).unwrap();
            drop(f);
            let (_, loaded) = open(dir.path());
            assert_eq!(loaded.records, [&b"one"[..]], "cut {cut}");
            // Restore for the next cut.
            let (mut s, _) = open(dir.path());
            s.append(b"two").unwrap();
        }
        // A flipped byte in a payload ends the log there.
        let mut bytes = std::fs::read(&log).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&log, &bytes).unwrap();
        let (mut s, loaded) = open(dir.path());
        assert_eq!(loaded.records, [&b"one"[..]]);
        assert_eq!(loaded.dropped_bytes, (RECORD_HEADER_LEN + 3) as u64);
        s.append(b"four").unwrap();
        let (_, loaded) = open(dir.path());
        assert_eq!(loaded.records, [&b"one"[..], b"four"]);
    }

    #[test]
    fn a_log_left_from_an_older_snapshot_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = open(dir.path());
        s.rewrite(b"base").unwrap();
        s.append(b"one").unwrap();
        let stale = std::fs::read(dir.path().join("s.state.log")).unwrap();
        s.rewrite(b"base+one").unwrap();
        drop(s);
        // As if the crash came between the new snapshot and the old log's removal.
        std::fs::write(dir.path().join("s.state.log"), stale).unwrap();
        let (_, loaded) = open(dir.path());
        assert_eq!(loaded.snapshot.as_deref(), Some(&b"base+one"[..]));
        assert!(loaded.records.is_empty());
        assert!(!dir.path().join("s.state.log").exists());
    }

    #[test]
    fn commit_writes_a_snapshot_once_the_log_outgrows_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = open(dir.path());
        let record = vec![7u8; 100 * 1024];
        let mut snapshots = 0;
        for i in 0..25 {
            s.commit(&record, || {
                snapshots += 1;
                Ok(format!("snapshot {i}").into_bytes())
            })
            .unwrap();
        }
        // 1 MiB of budget holds 10 records of 100 KiB: two snapshots in 25 commits.
        assert_eq!(snapshots, 2);
        let (_, loaded) = open(dir.path());
        assert_eq!(loaded.snapshot.as_deref(), Some(&b"snapshot 21"[..]));
        assert_eq!(loaded.records.len(), 3);
    }
}
