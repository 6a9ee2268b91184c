//! Handing memory freed after a large piece of work back to the system.
//!
//! glibc's allocator keeps what a process freed in its arenas for reuse: after the first scan of
//! 100,000 files the manager's transient buffers (the whole first snapshot's encoding, the first
//! generation's list of changes, the copies of the manifest being compared) stay resident as
//! free fragments between live ones, and the resident size never comes down from that peak.
//! `malloc_trim` returns those free pages (`madvise(MADV_DONTNEED)` on each free run of pages,
//! not only the top of the heap): with 100,000 files the manager's RSS went from 187 to 128 MiB
//! (BENCHMARKS.md, `bench-memory`).

/// Returns free heap pages to the system, after a piece of work that allocated a lot and freed
/// most of it. Cheap when there is little to return; a no-op where the C library is not glibc.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists under its locks; it
        // takes a pad size and touches no memory of ours.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
