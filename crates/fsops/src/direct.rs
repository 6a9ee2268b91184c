//! Writing large staged files past the page cache (`O_DIRECT`), and reading the sources of local
//! copies past it when they are not cached.
//!
//! Every byte the agent stages must reach the disk before the renames anyway (fsync or
//! syncfs). Written through the page cache, each byte is first copied into a freshly
//! allocated cache page, then written back; the final flush waits for all of it at once, and a
//! large deploy evicts the running server's own cached files. Written with `O_DIRECT`, the
//! bytes go from one reused buffer straight to the device while the transfer goes on, and the
//! final flush has only metadata and a few partial blocks left. On this machine (a VM whose
//! freed memory goes back to the host, so every new cache page is a host page fault) page-cache
//! writes of 1.5 GB ran at about 430 MB/s and direct writes at 1.8 GB/s.
//!
//! `O_DIRECT` needs the file offset, the length and the memory address aligned to the device's
//! block. A [`RunWriter`] takes one contiguous run of a file's bytes, in order, in any pieces
//! (the chunks of a fetch reply): it keeps them in a buffer laid out so that memory and file
//! offsets agree modulo [`ALIGN`], writes whole aligned blocks directly, and writes the partial
//! blocks at the two ends of the run through the page cache (a second, ordinary descriptor of
//! the same file). Several runs of one file may be written at once, by different writers: a
//! block shared by two runs is only ever written in part, through the page cache, so direct and
//! cached writes never touch the same block.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Alignment of direct writes: a page, a multiple of every common logical block size.
pub const ALIGN: usize = 4096;

/// A file open twice: for direct writes of whole blocks and for ordinary writes of the rest.
#[derive(Debug, Clone)]
pub struct DirectFile {
    direct: Arc<File>,
    cached: Arc<File>,
}

impl DirectFile {
    /// Pairs `direct` (opened with `O_DIRECT`) with `cached`, an ordinary descriptor of the
    /// same file.
    pub fn new(direct: File, cached: Arc<File>) -> DirectFile {
        DirectFile {
            direct: Arc::new(direct),
            cached,
        }
    }
}

/// A buffer whose usable part starts at an address aligned to [`ALIGN`].
struct AlignedBuf {
    raw: Vec<u8>,
    /// Index in `raw` of the first aligned byte.
    skew: usize,
    capacity: usize,
}

impl AlignedBuf {
    fn new(capacity: usize) -> AlignedBuf {
        debug_assert!(capacity.is_multiple_of(ALIGN) && capacity > 0);
        let raw = vec![0u8; capacity + ALIGN];
        let skew = raw.as_ptr().align_offset(ALIGN);
        AlignedBuf {
            raw,
            skew,
            capacity,
        }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.skew..self.skew + self.capacity]
    }

    fn as_ref(&self) -> &[u8] {
        &self.raw[self.skew..self.skew + self.capacity]
    }
}

/// Writes contiguous runs of files' bytes, one run at a time (see the module docs); its buffer
/// is reused from run to run.
pub struct RunWriter {
    /// The file of the run being written; `None` between runs.
    file: Option<DirectFile>,
    /// Allocated by the first run (a fetch of small files only never needs it).
    buf: Option<AlignedBuf>,
    capacity: usize,
    /// File offset of the aligned block `buf` starts with.
    block: u64,
    /// The run's bytes held are `buf[from..to]`: `from` is only non-zero before the first write
    /// (a run that starts within a block).
    from: usize,
    to: usize,
    /// Direct writes failed with EINVAL (alignment the device does not take): the rest of the
    /// run goes through the page cache.
    cached_only: bool,
    /// Bytes written with `O_DIRECT` so far.
    direct_bytes: u64,
}

impl std::fmt::Debug for RunWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunWriter")
            .field("next_offset", &self.next_offset())
            .field("held", &(self.to - self.from))
            .field("cached_only", &self.cached_only)
            .finish()
    }
}

impl RunWriter {
    /// A writer buffering up to `capacity` bytes (rounded up to [`ALIGN`]) between writes.
    pub fn new(capacity: usize) -> RunWriter {
        let capacity = capacity.max(2 * ALIGN).next_multiple_of(ALIGN);
        RunWriter {
            file: None,
            buf: None,
            capacity,
            block: 0,
            from: 0,
            to: 0,
            cached_only: false,
            direct_bytes: 0,
        }
    }

    /// Whether the next bytes of the run being written belong at `offset` of `file`.
    pub fn continues(&self, file: &DirectFile, offset: u64) -> bool {
        self.file
            .as_ref()
            .is_some_and(|f| Arc::ptr_eq(&f.cached, &file.cached))
            && self.next_offset() == offset
    }

    /// Ends the run being written, if any (see [`RunWriter::end`]), and starts one at `offset`
    /// of `file`.
    pub fn begin(&mut self, file: DirectFile, offset: u64) -> io::Result<u64> {
        let done = self.end()?;
        if self.buf.is_none() {
            self.buf = Some(AlignedBuf::new(self.capacity));
        }
        let skew = (offset % ALIGN as u64) as usize;
        self.file = Some(file);
        self.block = offset - skew as u64;
        self.from = skew;
        self.to = skew;
        Ok(done)
    }

    /// The buffer (allocated by the first run).
    fn bytes(&self) -> &[u8] {
        self.buf.as_ref().expect("allocated by begin").as_ref()
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.buf.as_mut().expect("allocated by begin").as_mut()
    }

    /// The file offset the next byte of the run belongs at.
    fn next_offset(&self) -> u64 {
        self.block + self.to as u64
    }

    /// Appends `data` to the run begun last, writing whole blocks as the buffer fills.
    pub fn push(&mut self, mut data: &[u8]) -> io::Result<()> {
        assert!(self.file.is_some(), "push before begin");
        while !data.is_empty() {
            let room = self.capacity - self.to;
            let n = room.min(data.len());
            let to = self.to;
            self.bytes_mut()[to..to + n].copy_from_slice(&data[..n]);
            self.to += n;
            data = &data[n..];
            if self.to == self.capacity {
                self.write_blocks()?;
            }
        }
        Ok(())
    }

    /// Whether [`RunWriter::reserve`] takes `n` bytes.
    pub fn fits(&self, n: usize) -> bool {
        n <= self.capacity - ALIGN
    }

    /// Room in the buffer for the run's next `n` bytes, for the caller to fill in place (a read
    /// straight from the network: one copy fewer than [`RunWriter::push`]); they belong to the
    /// run once [`RunWriter::commit`] says so. Writes whole blocks first where the room left is
    /// shorter. `n` is at most the buffer's capacity less one block.
    pub fn reserve(&mut self, n: usize) -> io::Result<&mut [u8]> {
        assert!(self.file.is_some(), "reserve before begin");
        assert!(self.fits(n), "reserve of {n} bytes");
        if self.capacity - self.to < n {
            self.write_blocks()?;
        }
        let to = self.to;
        Ok(&mut self.bytes_mut()[to..to + n])
    }

    /// Adds to the run the first `n` bytes of the room [`RunWriter::reserve`] gave.
    pub fn commit(&mut self, n: usize) -> io::Result<()> {
        assert!(
            self.to + n <= self.capacity,
            "commit past the room reserved"
        );
        self.to += n;
        if self.to == self.capacity {
            self.write_blocks()?;
        }
        Ok(())
    }

    /// Writes what the run being written still holds (it is then complete on its file) and
    /// returns how many of its bytes were written directly (the rest went through the page
    /// cache). Between runs: nothing to do, 0.
    pub fn end(&mut self) -> io::Result<u64> {
        if self.file.is_none() {
            return Ok(0);
        }
        self.write_blocks()?;
        let file = self.file.take().expect("checked above");
        // At most a last partial block remains.
        if self.to > self.from {
            let at = self.block + self.from as u64;
            file.cached
                .write_all_at(&self.bytes()[self.from..self.to], at)?;
        }
        self.from = 0;
        self.to = 0;
        Ok(std::mem::take(&mut self.direct_bytes))
    }

    /// Writes every whole block held, and the part of a first block the run starts within;
    /// keeps a last partial block (moved to the buffer's start, at the same alignment).
    fn write_blocks(&mut self) -> io::Result<()> {
        let file = self.file.as_ref().expect("only called during a run");
        let buf = self.buf.as_ref().expect("allocated by begin").as_ref();
        let (mut from, to) = (self.from, self.to);
        if !from.is_multiple_of(ALIGN) {
            // The run starts within a block: that block's part goes through the page cache.
            let head_end = from.next_multiple_of(ALIGN).min(to);
            file.cached
                .write_all_at(&buf[from..head_end], self.block + from as u64)?;
            from = head_end;
        }
        let whole_end = to - to % ALIGN;
        if whole_end > from {
            let at = self.block + from as u64;
            let bytes = &buf[from..whole_end];
            if self.cached_only {
                file.cached.write_all_at(bytes, at)?;
            } else {
                match file.direct.write_all_at(bytes, at) {
                    Ok(()) => self.direct_bytes += bytes.len() as u64,
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                        // Alignment this device does not take: the rest goes through the page
                        // cache.
                        self.cached_only = true;
                        file.cached.write_all_at(bytes, at)?;
                    }
                    Err(e) => return Err(e),
                }
            }
            from = whole_end;
        }
        // What is left, `from..to`, lies within one block: keep it at its alignment.
        let keep_at = from % ALIGN;
        self.bytes_mut().copy_within(from..to, keep_at);
        self.block += (from - keep_at) as u64;
        self.from = keep_at;
        self.to = keep_at + (to - from);
        Ok(())
    }
}

/// Bytes a [`CopyReader`] reads directly at a time.
pub const READ_WINDOW: usize = 1 << 20;

/// Reads the chunks that local copies take from files on this node (the previous version of a
/// file, mostly read in order): from the page cache when they are there, found by a read that
/// must not wait (`RWF_NOWAIT`); otherwise directly from the device a [`READ_WINDOW`] at a time,
/// in whole aligned blocks, into one reused buffer, and the following chunks from that buffer.
///
/// Files the agent staged itself are written with `O_DIRECT` and so are not cached when their
/// next version copies from them; read through the page cache, each of their pages cost a
/// fresh cache page (a host page fault on this VM) and a copy: the local copy of a 63 MB WAR
/// took 113-138 ms cold against 45-57 ms when cached.
///
/// One reader serves many files, told apart by descriptor: keep each file open while the reader
/// is used with it (a closed descriptor's number may name another file next). It sets
/// `O_DIRECT` on a file's descriptor only for the duration of a window's read, so the descriptor
/// must not be shared with another thread meanwhile.
pub struct CopyReader {
    /// Allocated at the first direct read.
    buf: Option<AlignedBuf>,
    /// (descriptor, offset, bytes) the buffer holds.
    held: Option<(RawFd, u64, usize)>,
    /// Reads that must not wait are supported (cleared at the first EOPNOTSUPP).
    nowait: bool,
    /// Bytes read directly so far.
    direct_bytes: u64,
}

impl std::fmt::Debug for CopyReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyReader")
            .field("held", &self.held)
            .field("direct_bytes", &self.direct_bytes)
            .finish()
    }
}

impl Default for CopyReader {
    fn default() -> Self {
        CopyReader::new()
    }
}

impl CopyReader {
    pub fn new() -> CopyReader {
        CopyReader {
            buf: None,
            held: None,
            nowait: true,
            direct_bytes: 0,
        }
    }

    /// Bytes read directly from the device so far.
    pub fn direct_bytes(&self) -> u64 {
        self.direct_bytes
    }

    /// Reads exactly `out.len()` bytes at `offset` of `file`.
    pub fn read_exact_at(&mut self, file: &File, out: &mut [u8], offset: u64) -> io::Result<()> {
        let id = file.as_raw_fd();
        if self.copy_from_window(id, out, offset) || self.read_cached(file, out, offset)? {
            return Ok(());
        }
        let skew = (offset % ALIGN as u64) as usize;
        if out.len() + skew > READ_WINDOW || !self.fill_window(id, file, offset - skew as u64)? {
            return file.read_exact_at(out, offset);
        }
        if self.copy_from_window(id, out, offset) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read of {} bytes at {offset} past the end", out.len()),
            ))
        }
    }

    /// Copies `out` from the window if it holds all of it.
    fn copy_from_window(&self, id: RawFd, out: &mut [u8], offset: u64) -> bool {
        let Some((held_id, start, len)) = self.held else {
            return false;
        };
        let end = offset + out.len() as u64;
        if held_id != id || offset < start || end > start + len as u64 {
            return false;
        }
        let from = (offset - start) as usize;
        let buf = self
            .buf
            .as_ref()
            .expect("a held window has a buffer")
            .as_ref();
        out.copy_from_slice(&buf[from..from + out.len()]);
        true
    }

    /// Reads `out` from the page cache if all of it is there, without waiting for the device.
    fn read_cached(&mut self, file: &File, out: &mut [u8], offset: u64) -> io::Result<bool> {
        if !self.nowait {
            return Ok(false);
        }
        let mut got = 0;
        while got < out.len() {
            let read = rustix::io::preadv2(
                file,
                &mut [io::IoSliceMut::new(&mut out[got..])],
                offset + got as u64,
                rustix::io::ReadWriteFlags::NOWAIT,
            );
            match read {
                Ok(0) => return Ok(false),
                Ok(n) => got += n,
                Err(rustix::io::Errno::AGAIN) => return Ok(false),
                Err(rustix::io::Errno::OPNOTSUPP) => {
                    self.nowait = false;
                    return Ok(false);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// Reads up to a window of `file` from `start` (aligned) directly; false if the file's
    /// filesystem or device does not take direct reads (the caller reads through the cache).
    fn fill_window(&mut self, id: RawFd, file: &File, start: u64) -> io::Result<bool> {
        use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
        self.held = None;
        let flags = fcntl_getfl(file)?;
        if fcntl_setfl(file, flags | OFlags::DIRECT).is_err() {
            return Ok(false);
        }
        let buf = self
            .buf
            .get_or_insert_with(|| AlignedBuf::new(READ_WINDOW))
            .as_mut();
        let mut got = 0;
        let read = loop {
            match file.read_at(&mut buf[got..], start + got as u64) {
                Ok(0) => break Ok(true),
                // A short read ends at the end of the file (or of what the device gave): the
                // window holds what was read.
                Ok(n) if !n.is_multiple_of(ALIGN) => {
                    got += n;
                    break Ok(true);
                }
                Ok(n) => {
                    got += n;
                    if got == READ_WINDOW {
                        break Ok(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    break Ok(false);
                }
                Err(e) => break Err(e),
            }
        };
        fcntl_setfl(file, flags)?;
        if read? {
            self.held = Some((id, start, got));
            self.direct_bytes += got as u64;
            Ok(true)
        } else {
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes different for each seed (BLAKE3's output stream).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut out);
        out
    }

    /// A file in `dir` of `len` bytes opened as the agent opens a staged file; `None` where
    /// the filesystem refuses `O_DIRECT`.
    fn open(dir: &std::path::Path, len: u64) -> Option<DirectFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join("f");
        let cached = File::create(&path).expect("create");
        cached.set_len(len).expect("set_len");
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&path)
            .ok()?;
        Some(DirectFile::new(direct, Arc::new(cached)))
    }

    /// Writes `data` as runs cut at `cuts`, each run pushed (or reserved and committed, every
    /// other piece) in pieces of `piece` bytes, with
    /// runs interleaved as concurrent fetches interleave them; returns the bytes written
    /// directly.
    fn write_runs(file: &DirectFile, data: &[u8], cuts: &[usize], piece: usize, cap: usize) -> u64 {
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(data.len());
        // One writer per run, as one fetch task per request.
        let mut writers: Vec<(RunWriter, usize, usize)> = bounds
            .windows(2)
            .map(|w| {
                let mut writer = RunWriter::new(cap);
                writer.begin(file.clone(), w[0] as u64).expect("begin");
                (writer, w[0], w[1])
            })
            .collect();
        let mut round = 0;
        loop {
            let mut progressed = false;
            for (w, at, end) in writers.iter_mut() {
                if *at < *end {
                    let n = piece.min(*end - *at);
                    assert!(w.continues(file, *at as u64));
                    let bytes = &data[*at..*at + n];
                    // Every other piece is read in place, as a fetched chunk is.
                    if round % 2 == 1 && n <= cap - ALIGN {
                        w.reserve(n).expect("reserve").copy_from_slice(bytes);
                        w.commit(n).expect("commit");
                    } else {
                        w.push(bytes).expect("push");
                    }
                    *at += n;
                    progressed = true;
                }
            }
            round += 1;
            if !progressed {
                break;
            }
        }
        writers
            .into_iter()
            .map(|(mut w, _, _)| {
                let n = w.end().expect("end");
                assert_eq!(w.end().expect("a second end"), 0, "nothing left to write");
                n
            })
            .sum()
    }

    #[test]
    fn runs_of_any_alignment_write_exactly_their_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cases: &[(usize, &[usize], usize, usize)] = &[
            // (length, run cuts, piece, buffer)
            (1_000_000, &[], 65_536, 1 << 20),
            (1_000_000, &[], 7_777, 3 * ALIGN),
            (3 * ALIGN, &[ALIGN], ALIGN, 2 * ALIGN),
            (10, &[], 3, 2 * ALIGN),
            (2 * ALIGN + 1, &[1, ALIGN + 1], 100, 2 * ALIGN),
            (
                500_000,
                &[4_095, 4_097, 131_072, 300_001],
                9_999,
                16 * ALIGN,
            ),
            (70_000, &[100, 200, 300], 1, 2 * ALIGN),
        ];
        for (i, &(len, cuts, piece, cap)) in cases.iter().enumerate() {
            let data = noise(len, i as u64 + 1);
            let Some(file) = open(dir.path(), len as u64) else {
                eprintln!("O_DIRECT is not supported here; the cached path is tested alone");
                continue;
            };
            let direct = write_runs(&file, &data, cuts, piece, cap);
            drop(file);
            if len >= 4 * cap {
                // Runs of several buffers write most of their bytes directly.
                assert!(direct as usize > len / 2, "case {i}: {direct} bytes direct");
            }
            let got = std::fs::read(dir.path().join("f")).expect("read back");
            assert!(
                got == data,
                "case {i}: the file differs from what was written"
            );
        }
    }

    /// One writer, as one fetch task: runs of two files one after the other, with gaps (chunks
    /// another task or the page cache writes), its buffer reused from run to run.
    #[test]
    fn one_writer_writes_run_after_run_of_several_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sizes = [300_001usize, 123_457];
        let mut files = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let sub = dir.path().join(i.to_string());
            std::fs::create_dir(&sub).expect("mkdir");
            let Some(f) = open(&sub, len as u64) else {
                eprintln!("O_DIRECT is not supported here");
                return;
            };
            files.push((sub, f, noise(len, 40 + i as u64)));
        }
        let mut w = RunWriter::new(8 * ALIGN);
        let mut direct = 0;
        for (_, file, data) in &files {
            // Runs cut at odd places; every third piece written by someone else.
            let mut at = 0;
            for (k, piece) in [5_000, 70_000, 1, 9_999, 100_000, 4_096]
                .iter()
                .cycle()
                .enumerate()
            {
                if at >= data.len() {
                    break;
                }
                let end = (at + piece).min(data.len());
                if k % 3 == 2 {
                    file.cached
                        .write_all_at(&data[at..end], at as u64)
                        .expect("write");
                } else {
                    if !w.continues(file, at as u64) {
                        direct += w.begin(file.clone(), at as u64).expect("begin");
                    }
                    w.push(&data[at..end]).expect("push");
                }
                at = end;
            }
        }
        direct += w.end().expect("end");
        assert!(direct > 0, "whole blocks went directly");
        drop(w);
        for (sub, file, data) in files {
            drop(file);
            let got = std::fs::read(sub.join("f")).expect("read back");
            assert!(got == data, "{} differs", sub.display());
        }
    }

    /// Drops the page cache's copy of `path` (clean after fsync), so that reads must go to the
    /// device.
    fn evict(path: &std::path::Path) {
        let f = File::open(path).expect("open");
        f.sync_all().expect("fsync");
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
    }

    #[test]
    fn the_copy_reader_reads_exactly_the_bytes_asked_for_cached_or_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let len = 3 * READ_WINDOW + 12_345;
        let data = noise(len, 77);
        let path = dir.path().join("source");
        std::fs::write(&path, &data).expect("write");
        // (offset, length) in the order asked: in order, backwards, across window and block
        // bounds, the last bytes of the file, a whole window.
        let mut reads: Vec<(usize, usize)> = Vec::new();
        let mut at = 0;
        for i in 0.. {
            let n = 30_000 + (i * 7_919) % 200_000;
            if at + n > len {
                break;
            }
            reads.push((at, n));
            at += n;
        }
        reads.extend([
            (len - 1, 1),
            (len - 5_000, 5_000),
            (READ_WINDOW - 10, 20),
            (0, 1),
            (ALIGN - 1, 2),
            (2 * READ_WINDOW, READ_WINDOW - ALIGN),
            (100, READ_WINDOW + 1),
        ]);
        for cold in [false, true] {
            if cold {
                evict(&path);
            }
            let file = File::open(&path).expect("open");
            let mut reader = CopyReader::new();
            for &(offset, n) in &reads {
                let mut out = vec![0u8; n];
                reader
                    .read_exact_at(&file, &mut out, offset as u64)
                    .expect("read");
                assert!(out == data[offset..offset + n], "{n} bytes at {offset}");
            }
            if cold {
                use std::os::unix::fs::OpenOptionsExt;
                let supported = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                    .open(&path)
                    .is_ok();
                if supported {
                    assert!(
                        reader.direct_bytes() >= len as u64,
                        "an evicted file is read directly: {}",
                        reader.direct_bytes()
                    );
                } else {
                    eprintln!("O_DIRECT is not supported here; the cached path is tested alone");
                }
            } else {
                assert_eq!(
                    reader.direct_bytes(),
                    0,
                    "a cached file is read from the cache"
                );
            }
            // Past the end: an error, not short bytes.
            let mut out = vec![0u8; 10];
            assert!(
                reader
                    .read_exact_at(&file, &mut out, len as u64 - 5)
                    .is_err()
            );
            // The descriptor is left as it was found.
            let flags = rustix::fs::fcntl_getfl(&file).expect("getfl");
            assert!(!flags.contains(rustix::fs::OFlags::DIRECT));
        }
    }

    #[test]
    fn one_copy_reader_serves_several_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = noise(2 * READ_WINDOW, 1);
        let b = noise(READ_WINDOW + 1, 2);
        std::fs::write(dir.path().join("a"), &a).expect("write");
        std::fs::write(dir.path().join("b"), &b).expect("write");
        evict(&dir.path().join("a"));
        evict(&dir.path().join("b"));
        let fa = File::open(dir.path().join("a")).expect("open");
        let fb = File::open(dir.path().join("b")).expect("open");
        let mut reader = CopyReader::new();
        for i in 0..20u64 {
            let (file, data) = if i % 2 == 0 { (&fa, &a) } else { (&fb, &b) };
            let offset = (i * 50_000) as usize % (data.len() - 70_000);
            let mut out = vec![0u8; 70_000];
            reader
                .read_exact_at(file, &mut out, offset as u64)
                .expect("read");
            assert!(out == data[offset..offset + 70_000], "read {i}");
        }
    }
}
