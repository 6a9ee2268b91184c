//! `FolderRoot`: a synced folder opened once, and every operation that reads or changes it,
//! performed relative to directory descriptors with symbolic links refused at every step.
//!
//! Resolution uses `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`: the kernel refuses a
//! path that would leave the folder or pass through a link, so a link planted by a peer or a
//! local user can never redirect a write.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use syncd_manifest::{Mtime, RelPath, SymlinkTarget};

use crate::excludes::STAGING_DIR;
use crate::scan::StatKey;

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// An open synced folder.
#[derive(Debug)]
pub struct FolderRoot {
    path: PathBuf,
    fd: OwnedFd,
}

impl FolderRoot {
    /// Opens the folder at `path`, which must be a directory.
    pub fn open(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(FolderRoot {
            path: path.to_owned(),
            fd,
        })
    }

    /// Whether the folder's path still leads to the directory this holds open: `false` once it
    /// was moved away or replaced (a new directory, or nothing, at the path), when every write
    /// through this would land in a directory the operator no longer looks at.
    pub fn still_at_path(&self) -> io::Result<bool> {
        let held = rustix::fs::fstat(&self.fd)?;
        match rustix::fs::stat(&self.path) {
            Ok(now) => Ok(now.st_dev == held.st_dev && now.st_ino == held.st_ino),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The folder's path as configured.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The absolute path of `rel`, for messages and for read-only helpers.
    pub fn abs(&self, rel: &RelPath) -> PathBuf {
        self.path.join(rel.as_str())
    }

    /// Opens the directory that holds `rel` (the root for a top-level path).
    pub fn parent_dir(&self, rel: &RelPath) -> io::Result<OwnedFd> {
        self.open_dir(rel.parent().as_ref())
    }

    /// Opens directory `rel` (the root for `None`) without following any link.
    pub fn open_dir(&self, rel: Option<&RelPath>) -> io::Result<OwnedFd> {
        Ok(rustix::fs::openat2(
            &self.fd,
            rel.map_or(".", RelPath::as_str),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        )?)
    }

    /// Opens regular file `rel` for reading without following any link.
    pub fn open_file(&self, rel: &RelPath) -> io::Result<File> {
        let fd = rustix::fs::openat2(
            &self.fd,
            rel.as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            RESOLVE,
        )?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", self.abs(rel).display()),
            ));
        }
        Ok(file)
    }

    /// What is at `rel`, without following a link there; `None` if nothing is.
    pub fn lstat(&self, rel: &RelPath) -> io::Result<Option<rustix::fs::Stat>> {
        let parent = match self.parent_dir(rel) {
            Ok(fd) => fd,
            Err(e) if is_absent(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&parent, rel.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes `rel` a directory. An existing directory is kept; anything else there is removed.
    /// The new directory is owner-writable until [`FolderRoot::set_dir_meta`] sets its mode.
    pub fn ensure_dir(&self, rel: &RelPath) -> io::Result<()> {
        let parent = self.parent_dir(rel)?;
        let name = rel.file_name();
        match rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => return Ok(()),
            Ok(_) => remove_at(&parent, name)?,
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o755))?;
        Ok(())
    }

    /// Removes whatever is at `rel` (a directory with everything beneath it); nothing there is
    /// not an error. Links are removed, never followed.
    pub fn remove(&self, rel: &RelPath) -> io::Result<()> {
        let parent = match self.parent_dir(rel) {
            Ok(fd) => fd,
            Err(e) if is_absent(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        remove_at(&parent, rel.file_name())
    }

    /// Removes the file, link or *empty* directory at `rel`; nothing there is not an error.
    ///
    /// A directory that still holds something (a file syncd does not manage: excluded, or made
    /// by hand since the last scan) is left in place with an error, never emptied by force.
    pub fn remove_entry(&self, rel: &RelPath) -> io::Result<()> {
        self.remove_entry_retiring(rel, &mut Retired::default())
    }

    /// [`FolderRoot::remove_entry`] that keeps a large file's inode in `retired`, so that its
    /// blocks are freed when `retired` is dropped rather than inside the `unlink`.
    pub fn remove_entry_retiring(&self, rel: &RelPath, retired: &mut Retired) -> io::Result<()> {
        let parent = match self.parent_dir(rel) {
            Ok(fd) => fd,
            Err(e) if is_absent(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        retired.hold(&parent, rel.file_name());
        match rustix::fs::unlinkat(&parent, rel.file_name(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(rustix::io::Errno::ISDIR) => {
                match rustix::fs::unlinkat(&parent, rel.file_name(), AtFlags::REMOVEDIR) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sets an existing regular file's mode and mtime, without following a link.
    pub fn set_file_meta(&self, rel: &RelPath, mode: u32, mtime: Mtime) -> io::Result<()> {
        let file = self.open_file(rel)?;
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode & 0o7777))?;
        rustix::fs::futimens(&file, &timestamps(mtime))?;
        Ok(())
    }

    /// Creates or replaces `rel` with a symbolic link to `target`, atomically (a link under a
    /// temporary name renamed over it), with the given mtime.
    pub fn put_symlink(
        &self,
        rel: &RelPath,
        target: &SymlinkTarget,
        mtime: Mtime,
    ) -> io::Result<()> {
        let parent = self.parent_dir(rel)?;
        let tmp = unique_name(".syncd-link");
        rustix::fs::symlinkat(target.as_str(), &parent, tmp.as_str())?;
        let times = timestamps(mtime);
        let result =
            rustix::fs::utimensat(&parent, tmp.as_str(), &times, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io::Error::from)
                .and_then(|()| self.replace_at(&parent, &tmp, &parent, rel.file_name()));
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&parent, tmp.as_str(), AtFlags::empty());
        }
        result
    }

    /// Sets a directory's mode and mtime (after everything inside it has changed).
    pub fn set_dir_meta(&self, rel: &RelPath, mode: u32, mtime: Mtime) -> io::Result<()> {
        let fd = self.open_dir(Some(rel))?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode & 0o7777))?;
        rustix::fs::futimens(&fd, &timestamps(mtime))?;
        Ok(())
    }

    /// Flushes the whole filesystem holding the folder (`syncfs`): one call makes every staged
    /// file durable, much cheaper than an fsync per file.
    pub fn sync_filesystem(&self) -> io::Result<()> {
        Ok(rustix::fs::syncfs(&self.fd)?)
    }

    /// Makes directory `rel`'s entries durable (fsync of the directory).
    pub fn sync_dir(&self, rel: Option<&RelPath>) -> io::Result<()> {
        match self.open_dir(rel) {
            Ok(fd) => Ok(rustix::fs::fsync(&fd)?),
            // A directory removed by the same generation has nothing left to sync.
            Err(e) if is_absent(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Opens (creating if needed) the staging directory at the folder's root.
    pub fn staging(self: &Arc<Self>) -> io::Result<Staging> {
        match rustix::fs::mkdirat(&self.fd, STAGING_DIR, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = rustix::fs::openat2(
            &self.fd,
            STAGING_DIR,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        )?;
        Ok(Staging {
            root: Arc::clone(self),
            fd,
        })
    }

    /// Files an interrupted apply left in the staging directory: (name, key given to
    /// [`Staging::create_for`]). Their content is partial: every chunk read from them must be
    /// checked.
    pub fn staged_leftovers(&self) -> io::Result<Vec<(String, String)>> {
        let fd = match rustix::fs::openat2(
            &self.fd,
            STAGING_DIR,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        Ok(list_names(&fd)?
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .filter_map(|name| {
                let key = name.strip_prefix("f.")?.split('.').next()?.to_owned();
                Some((name, key))
            })
            .collect())
    }

    /// Removes the staging directory and everything in it (left by an interrupted apply).
    /// Returns how many entries it held.
    pub fn clear_staging(&self) -> io::Result<usize> {
        let fd = match rustix::fs::openat2(
            &self.fd,
            STAGING_DIR,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let count = list_names(&fd)?.len();
        drop(fd);
        remove_at(&self.fd, STAGING_DIR)?;
        Ok(count)
    }

    fn replace_at(
        &self,
        from_dir: &OwnedFd,
        from: &str,
        to_dir: &OwnedFd,
        to: &str,
    ) -> io::Result<()> {
        match rustix::fs::renameat(from_dir, from, to_dir, to) {
            Ok(()) => Ok(()),
            // A directory is in the way: it is being replaced by a file or a link, and the
            // caller has removed its contents. A directory that still holds something stays,
            // and the rename fails.
            Err(
                rustix::io::Errno::ISDIR | rustix::io::Errno::NOTEMPTY | rustix::io::Errno::EXIST,
            ) => {
                rustix::fs::unlinkat(to_dir, to, AtFlags::REMOVEDIR)?;
                Ok(rustix::fs::renameat(from_dir, from, to_dir, to)?)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The staging directory of a folder, where files are written before they are renamed into place.
#[derive(Debug)]
pub struct Staging {
    root: Arc<FolderRoot>,
    fd: OwnedFd,
}

/// Renames staged files into place one after another, opening each directory once for the
/// files committed into it in a row (a commit goes in path order: a folder of 1,000 XMLs costs
/// one `openat2` instead of 1,000).
#[derive(Debug)]
pub struct Committer<'a> {
    staging: &'a Staging,
    /// The directory of the last file committed, open.
    dir: Option<(Option<RelPath>, OwnedFd)>,
    /// Large files replaced so far.
    retired: Retired,
}

/// Files replaced or removed by a commit, still open, so that their blocks are freed when this
/// is dropped instead of inside the `rename` or `unlink` that took their name.
///
/// The last reference to a large file costs the call that drops it the freeing of every block:
/// some 20 ms for a 63 MB WAR on ext4 here, 130 ms at worst; a commit that renames several large
/// files in a row would pay each before the next one shows. Only regular files of
/// [`Retired::FROM`] bytes or more are held (an `O_PATH` descriptor each), so a commit of
/// thousands of small files holds no more descriptors than it has large ones.
#[derive(Debug, Default)]
pub struct Retired(Vec<OwnedFd>);

impl Retired {
    /// Smaller files are freed in their own `rename` or `unlink`: it costs them next to nothing.
    pub const FROM: u64 = 1 << 20;

    /// Holds the file `name` in `dir`, if it is a regular file of [`Retired::FROM`] bytes or
    /// more. Best effort: whatever cannot be opened is left to be freed where it goes.
    fn hold(&mut self, dir: &OwnedFd, name: &str) {
        let Ok(fd) = rustix::fs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            return;
        };
        let large = rustix::fs::fstat(&fd).is_ok_and(|st| {
            FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
                && st.st_size as u64 >= Self::FROM
        });
        if large {
            self.0.push(fd);
        }
    }

    /// How many files are held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds what `other` holds.
    pub fn append(&mut self, other: Retired) {
        self.0.extend(other.0);
    }
}

impl Committer<'_> {
    /// Renames staged file `name` to `rel` (as [`Staging::commit`]) and returns the committed
    /// file's stat key (taken after the rename, which changes its ctime).
    pub fn commit(&mut self, name: &str, rel: &RelPath) -> io::Result<StatKey> {
        let parent = rel.parent();
        let dir = match &mut self.dir {
            Some((open, fd)) if *open == parent => fd,
            slot => {
                let fd = self.staging.root.open_dir(parent.as_ref())?;
                &mut slot.insert((parent, fd)).1
            }
        };
        self.retired.hold(dir, rel.file_name());
        let root = &self.staging.root;
        root.replace_at(&self.staging.fd, name, dir, rel.file_name())?;
        let st = rustix::fs::statat(&*dir, rel.file_name(), AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(StatKey {
            size: st.st_size as u64,
            mtime: mtime_of(&st),
            ctime: Mtime {
                secs: st.st_ctime,
                nanos: st.st_ctime_nsec as u32,
            },
            ino: st.st_ino,
        })
    }

    /// The large files this committer replaced (see [`Retired`]): their space is freed when the
    /// result is dropped.
    pub fn finish(self) -> Retired {
        self.retired
    }
}

/// A file being written in the staging directory.
#[derive(Debug)]
pub struct StagedFile {
    /// The open file, write-only until it is committed.
    pub file: File,
    name: String,
}

impl Staging {
    /// Creates a new empty file in the staging directory, readable and writable by the owner only.
    pub fn create(&self) -> io::Result<StagedFile> {
        self.create_for("x")
    }

    /// Like [`Staging::create`], naming the file after `key` (the hex of the content it will
    /// hold), so that after an interruption [`FolderRoot::staged_leftovers`] can offer it again.
    pub fn create_for(&self, key: &str) -> io::Result<StagedFile> {
        let name = unique_name(&format!("f.{key}"));
        let fd = rustix::fs::openat(
            &self.fd,
            name.as_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o600),
        )?;
        Ok(StagedFile {
            file: File::from(fd),
            name,
        })
    }

    /// Renames a finished staged file (by its name) to `rel`, replacing a file or link there,
    /// or an empty directory.
    pub fn commit(&self, name: &str, rel: &RelPath) -> io::Result<()> {
        self.committer().commit(name, rel).map(drop)
    }

    /// A [`Committer`]: for many files, in path order.
    pub fn committer(&self) -> Committer<'_> {
        Committer {
            staging: self,
            dir: None,
            retired: Retired::default(),
        }
    }

    /// Opens staged file `name` a second time, for direct writes ([`crate::RunWriter`]);
    /// `None` where the filesystem does not take `O_DIRECT` (tmpfs before Linux 6.6, some
    /// network and FUSE filesystems), whose files are then written through the page cache.
    pub fn open_direct(&self, name: &str) -> io::Result<Option<File>> {
        match rustix::fs::openat(
            &self.fd,
            name,
            OFlags::WRONLY | OFlags::DIRECT | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(rustix::io::Errno::INVAL) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens a finished staged file for reading (a chunk source for later files).
    pub fn open_staged(&self, name: &str) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }

    /// Deletes a staged file that will not be committed.
    pub fn discard(&self, staged: StagedFile) -> io::Result<()> {
        drop(staged.file);
        match rustix::fs::unlinkat(&self.fd, staged.name.as_str(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the (now empty, or abandoned) staging directory.
    pub fn remove(self) -> io::Result<()> {
        drop(self.fd);
        remove_at(&self.root.fd, STAGING_DIR)
    }
}

impl StagedFile {
    /// The file's name in the staging directory.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the final mode and mtime before the rename, so the file appears complete.
    pub fn finish(&self, mode: u32, mtime: Mtime) -> io::Result<()> {
        rustix::fs::fchmod(&self.file, Mode::from_raw_mode(mode & 0o7777))?;
        rustix::fs::futimens(&self.file, &timestamps(mtime))?;
        Ok(())
    }
}

/// Converts a manifest mtime into a `SystemTime`.
pub fn to_system_time(m: Mtime) -> SystemTime {
    if m.secs >= 0 {
        UNIX_EPOCH + Duration::new(m.secs as u64, m.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(m.secs.unsigned_abs())
            + Duration::from_nanos(m.nanos as u64)
    }
}

/// The mtime recorded in a stat result.
pub fn mtime_of(st: &rustix::fs::Stat) -> Mtime {
    Mtime {
        secs: st.st_mtime,
        nanos: st.st_mtime_nsec as u32,
    }
}

fn timestamps(m: Mtime) -> Timestamps {
    let mtime = Timespec {
        tv_sec: m.secs,
        tv_nsec: m.nanos as _,
    };
    Timestamps {
        last_access: mtime,
        last_modification: mtime,
    }
}

fn is_absent(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::NOENT.raw_os_error() || code == rustix::io::Errno::NOTDIR.raw_os_error())
}

/// A name no other writer in this process or another will pick: a counter and the process id,
/// salted with the clock so a restarted agent does not reuse its predecessor's names.
fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let salt = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}.{}.{salt:08x}.{n}", std::process::id())
}

fn list_names(dir: &OwnedFd) -> io::Result<Vec<std::ffi::CString>> {
    let mut names = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Removes `name` in `dir`: unlinks a file or link, removes a directory with its contents,
/// descending only through directories opened without following links.
fn remove_at(dir: &impl AsFd, name: &str) -> io::Result<()> {
    remove_at_c(
        dir,
        &std::ffi::CString::new(name).map_err(io::Error::other)?,
    )
}

fn remove_at_c(dir: &impl AsFd, name: &std::ffi::CStr) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(rustix::io::Errno::ISDIR) => {}
        Err(e) => return Err(e.into()),
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )?;
    // A read-only directory (mode 0555 synced from the manager) must become writable to be emptied.
    let _ = rustix::fs::fchmod(&sub, Mode::from_raw_mode(0o700));
    for child in list_names(&sub)? {
        remove_at_c(&sub, &child)?;
    }
    drop(sub);
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::symlink;

    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn writes_never_pass_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = dir.path().join("folder");
        std::fs::create_dir(&root).unwrap();
        symlink(outside.path(), root.join("evil")).unwrap();
        let folder = Arc::new(FolderRoot::open(&root).unwrap());

        assert!(folder.ensure_dir(&p("evil/sub")).is_err());
        let staging = folder.staging().unwrap();
        let mut f = staging.create().unwrap();
        f.file.write_all(b"payload").unwrap();
        assert!(staging.commit(f.name(), &p("evil/x")).is_err());
        assert!(staging.committer().commit(f.name(), &p("evil/x")).is_err());
        assert!(folder.open_file(&p("evil/x")).is_err());
        assert!(
            folder
                .put_symlink(
                    &p("evil/l"),
                    &SymlinkTarget::new("y").unwrap(),
                    Mtime { secs: 0, nanos: 0 }
                )
                .is_err()
        );
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            0,
            "nothing written outside"
        );

        // Removing the link removes the link, not what it points to.
        std::fs::write(outside.path().join("keep"), b"k").unwrap();
        folder.remove(&p("evil")).unwrap();
        assert!(outside.path().join("keep").exists());
        staging.discard(f).unwrap();
        staging.remove().unwrap();
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    }

    #[test]
    fn a_file_replaces_an_emptied_directory_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let folder = Arc::new(FolderRoot::open(dir.path()).unwrap());
        folder.ensure_dir(&p("a")).unwrap();
        folder.ensure_dir(&p("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/c"), b"c").unwrap();
        let staging = folder.staging().unwrap();
        let f = staging.create().unwrap();
        f.finish(
            0o640,
            Mtime {
                secs: 1000,
                nanos: 5,
            },
        )
        .unwrap();
        // A directory holding something is never emptied by force.
        assert!(staging.commit(f.name(), &p("a")).is_err());
        assert!(folder.remove_entry(&p("a")).is_err());
        folder.remove_entry(&p("a/b/c")).unwrap();
        folder.remove_entry(&p("a/b")).unwrap();
        staging.commit(f.name(), &p("a")).unwrap();
        let meta = std::fs::symlink_metadata(dir.path().join("a")).unwrap();
        assert!(meta.is_file());
        folder.ensure_dir(&p("a")).unwrap();
        assert!(
            std::fs::symlink_metadata(dir.path().join("a"))
                .unwrap()
                .is_dir()
        );
        staging.remove().unwrap();
    }

    #[test]
    fn a_committer_renames_into_each_directory_and_returns_the_stat_after_the_rename() {
        let dir = tempfile::tempdir().unwrap();
        let folder = Arc::new(FolderRoot::open(dir.path()).unwrap());
        for d in ["a", "b"] {
            folder.ensure_dir(&p(d)).unwrap();
        }
        let staging = folder.staging().unwrap();
        let mut committer = staging.committer();
        // a, a, b, a: the open directory changes, and changes back.
        for (i, rel) in ["a/1", "a/2", "b/1", "a/3", "top"].iter().enumerate() {
            let mut f = staging.create().unwrap();
            f.file.write_all(&vec![b'x'; i + 1]).unwrap();
            let key = committer.commit(f.name(), &p(rel)).unwrap();
            let meta = std::fs::symlink_metadata(dir.path().join(rel)).unwrap();
            assert_eq!(key, crate::stat_key(&meta), "{rel}");
            assert_eq!(meta.len(), i as u64 + 1, "{rel}");
        }
    }

    #[test]
    fn large_files_replaced_or_removed_are_freed_only_when_retired_is_dropped() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let folder = Arc::new(FolderRoot::open(dir.path()).unwrap());
        let large = vec![7u8; Retired::FROM as usize];
        for (name, bytes) in [
            ("big", &large[..]),
            ("small", b"<api/>"),
            ("gone", &large[..]),
        ] {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let inode = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().ino();
        let (big, gone) = (inode("big"), inode("gone"));
        let staging = folder.staging().unwrap();
        let mut committer = staging.committer();
        for rel in ["big", "small", "new"] {
            let mut f = staging.create().unwrap();
            f.file.write_all(b"new").unwrap();
            committer.commit(f.name(), &p(rel)).unwrap();
        }
        let mut retired = committer.finish();
        folder
            .remove_entry_retiring(&p("gone"), &mut retired)
            .unwrap();
        assert!(!dir.path().join("gone").exists());
        assert_eq!(std::fs::read(dir.path().join("big")).unwrap(), b"new");
        // Only the two large ones are held: unlinked, their inodes still there.
        let held: Vec<(u64, u64)> = retired
            .0
            .iter()
            .map(|fd| {
                let st = rustix::fs::fstat(fd).unwrap();
                (st.st_ino, st.st_nlink)
            })
            .collect();
        assert_eq!(held, [(big, 0), (gone, 0)]);
    }

    #[test]
    fn clear_staging_removes_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let folder = Arc::new(FolderRoot::open(dir.path()).unwrap());
        let staging = folder.staging().unwrap();
        let _a = staging.create().unwrap();
        let _b = staging.create().unwrap();
        drop(staging);
        assert_eq!(folder.clear_staging().unwrap(), 2);
        assert!(!dir.path().join(STAGING_DIR).exists());
        assert_eq!(folder.clear_staging().unwrap(), 0);
    }

    #[test]
    fn mtimes_before_the_epoch_round_trip() {
        let m = Mtime {
            secs: -5,
            nanos: 250,
        };
        let t = to_system_time(m);
        assert_eq!(
            UNIX_EPOCH.duration_since(t).unwrap(),
            Duration::new(4, 999_999_750)
        );
    }
}
