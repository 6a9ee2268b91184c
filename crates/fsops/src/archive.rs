//! Is an archive complete? A ZIP file (`.car`, `.war`, `.jar`, `.aar`) is complete when its end
//! of central directory record is at its end and the central directory it points to parses,
//! entry by entry. A file still being written, or cut short, fails this check.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Extensions of the archives WSO2 deploys.
const ARCHIVE_EXTENSIONS: [&str; 4] = ["car", "war", "jar", "aar"];
/// End of central directory record: fixed part and largest comment.
const EOCD_LEN: usize = 22;
const MAX_COMMENT: usize = 0xFFFF;
/// The most central directory bytes read to check one archive.
const MAX_CENTRAL_DIRECTORY: u64 = 256 << 20;

/// Why an archive is not (yet) complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    /// No end of central directory record at the end of the file.
    #[error("no ZIP end-of-central-directory record (incomplete or not a ZIP)")]
    NoEnd,
    /// The record points outside the file.
    #[error("ZIP central directory lies outside the file (truncated?)")]
    OutOfBounds,
    /// An entry of the central directory does not parse.
    #[error("ZIP central directory entry {index} is malformed")]
    BadEntry {
        /// Which entry.
        index: u64,
    },
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Io(String),
}

/// Whether `name` is an archive whose completeness is checked before it is published.
pub fn is_archive(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(_, ext)| {
        ARCHIVE_EXTENSIONS
            .iter()
            .any(|a| ext.eq_ignore_ascii_case(a))
    })
}

/// Where the central directory is, as the end record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CentralDirectory {
    /// Offset from the start of the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Number of entries.
    pub entries: u64,
}

/// Finds the end record in `tail`, the last bytes of a file of `size` bytes, and returns where
/// the central directory is. Handles ZIP64.
pub fn locate_central_directory(tail: &[u8], size: u64) -> Result<CentralDirectory, ArchiveError> {
    if tail.len() < EOCD_LEN {
        return Err(ArchiveError::NoEnd);
    }
    let tail_start = size - tail.len() as u64;
    // Scan backwards for the signature whose comment length reaches exactly the end of file.
    let mut pos = tail.len() - EOCD_LEN;
    loop {
        if tail[pos..pos + 4] == [0x50, 0x4b, 0x05, 0x06] {
            let comment = u16::from_le_bytes([tail[pos + 20], tail[pos + 21]]) as usize;
            if pos + EOCD_LEN + comment == tail.len() {
                let le16 = |i: usize| u16::from_le_bytes([tail[pos + i], tail[pos + i + 1]]) as u64;
                let le32 = |i: usize| {
                    u32::from_le_bytes(tail[pos + i..pos + i + 4].try_into().expect("4 bytes"))
                        as u64
                };
                let mut cd = CentralDirectory {
                    entries: le16(10),
                    len: le32(12),
                    offset: le32(16),
                };
                let eocd_at = tail_start + pos as u64;
                if cd.entries == 0xFFFF || cd.len == 0xFFFF_FFFF || cd.offset == 0xFFFF_FFFF {
                    cd = zip64(tail, pos, tail_start)?;
                }
                if cd
                    .offset
                    .checked_add(cd.len)
                    .is_none_or(|end| end > eocd_at)
                {
                    return Err(ArchiveError::OutOfBounds);
                }
                return Ok(cd);
            }
        }
        if pos == 0 {
            return Err(ArchiveError::NoEnd);
        }
        pos -= 1;
    }
}

/// Reads the ZIP64 end record through its locator, just before the classic end record.
fn zip64(tail: &[u8], eocd_pos: usize, tail_start: u64) -> Result<CentralDirectory, ArchiveError> {
    let loc = eocd_pos.checked_sub(20).ok_or(ArchiveError::NoEnd)?;
    if tail[loc..loc + 4] != [0x50, 0x4b, 0x06, 0x07] {
        return Err(ArchiveError::NoEnd);
    }
    let rec_offset = u64::from_le_bytes(tail[loc + 8..loc + 16].try_into().expect("8 bytes"));
    let rec = rec_offset
        .checked_sub(tail_start)
        .ok_or(ArchiveError::OutOfBounds)? as usize;
    if rec + 56 > loc || tail[rec..rec + 4] != [0x50, 0x4b, 0x06, 0x06] {
        return Err(ArchiveError::OutOfBounds);
    }
    let le64 =
        |i: usize| u64::from_le_bytes(tail[rec + i..rec + i + 8].try_into().expect("8 bytes"));
    Ok(CentralDirectory {
        entries: le64(32),
        len: le64(40),
        offset: le64(48),
    })
}

/// Checks that `cd` holds exactly `entries` well-formed central directory headers.
pub fn check_entries(cd: &[u8], entries: u64) -> Result<(), ArchiveError> {
    let mut pos = 0usize;
    for index in 0..entries {
        let bad = ArchiveError::BadEntry { index };
        let header = cd.get(pos..pos + 46).ok_or(bad.clone())?;
        if header[..4] != [0x50, 0x4b, 0x01, 0x02] {
            return Err(bad);
        }
        let le16 = |i: usize| u16::from_le_bytes([header[i], header[i + 1]]) as usize;
        pos += 46 + le16(28) + le16(30) + le16(32);
        if pos > cd.len() {
            return Err(bad);
        }
    }
    Ok(())
}

/// Checks that the archive in `file` (of `size` bytes) is complete.
pub fn check_archive(file: &File, size: u64) -> Result<(), ArchiveError> {
    let io = |e: io::Error| ArchiveError::Io(e.to_string());
    let tail_len = size.min((EOCD_LEN + MAX_COMMENT + 20 + 56) as u64) as usize;
    let mut tail = vec![0u8; tail_len];
    file.read_exact_at(&mut tail, size - tail_len as u64)
        .map_err(io)?;
    let cd = locate_central_directory(&tail, size)?;
    if cd.len > MAX_CENTRAL_DIRECTORY {
        return Err(ArchiveError::OutOfBounds);
    }
    let mut buf = vec![0u8; cd.len as usize];
    file.read_exact_at(&mut buf, cd.offset).map_err(io)?;
    check_entries(&buf, cd.entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid ZIP with stored entries, built by hand.
    pub(crate) fn zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in entries {
            let offset = out.len() as u32;
            let crc = 0u32; // not checked by the completeness test
            out.extend_from_slice(&[0x50, 0x4b, 0x03, 0x04, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);
            central
                .extend_from_slice(&[0x50, 0x4b, 0x01, 0x02, 20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            central.extend_from_slice(&crc.to_le_bytes());
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 12]);
            central.extend_from_slice(&offset.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
        }
        let cd_offset = out.len() as u32;
        out.extend_from_slice(&central);
        out.extend_from_slice(&[0x50, 0x4b, 0x05, 0x06, 0, 0, 0, 0]);
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(central.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    fn check_bytes(bytes: &[u8]) -> Result<(), ArchiveError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.car");
        std::fs::write(&p, bytes).unwrap();
        check_archive(&File::open(&p).unwrap(), bytes.len() as u64)
    }

    #[test]
    fn a_complete_archive_passes_and_every_prefix_fails() {
        let z = zip(&[
            ("META-INF/MANIFEST.MF", b"Manifest-Version: 1.0\n"),
            ("a.xml", b"<a/>"),
        ]);
        check_bytes(&z).unwrap();
        for cut in 0..z.len() {
            assert!(
                check_bytes(&z[..cut]).is_err(),
                "prefix of {cut} bytes passed"
            );
        }
    }

    #[test]
    fn random_bytes_are_not_an_archive() {
        assert_eq!(check_bytes(&[7u8; 5000]), Err(ArchiveError::NoEnd));
        assert!(check_bytes(b"").is_err());
    }

    #[test]
    fn archive_names() {
        for yes in ["a.car", "x/B.WAR", "lib.jar", "m.aar"] {
            assert!(is_archive(yes), "{yes}");
        }
        for no in ["a.xml", "car", "a.cars", "war.txt"] {
            assert!(!is_archive(no), "{no}");
        }
    }
}
