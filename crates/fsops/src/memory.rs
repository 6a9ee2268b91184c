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

/// Allocations of this size and more get their own mapping, returned to the system when freed.
const MMAP_THRESHOLD: i32 = 8 << 20;
/// Free memory at the top of a heap beyond this is returned to the system at once. Kept high:
/// memory handed back is faulted in again by the next buffer. At 1 MiB the manager returned and
/// faulted in again the buffers of every fetch it served (10-worker fan-out 142 ms instead of
/// 113 ms, BENCHMARKS.md "Session 7"); at glibc's default (twice the mapping threshold) an
/// agent did so with its receive buffers (quinn copies every datagram into a new one): 7,000 to
/// 11,000 page faults in a join of 125 MB, 4,500 with this. What a large piece of work leaves
/// free is handed back by [`trim_heap`] after it instead.
const TRIM_THRESHOLD: i32 = 64 << 20;

/// One arena for every thread. glibc gives threads that contend for the allocator arenas of
/// their own, and returns free memory at the top of those only past the trim threshold (never
/// through `malloc_trim`, which shrinks the main heap alone): the first walk's and the first
/// snapshot's buffers, freed on the blocking threads that made them, stayed resident there.
/// With 100,000 files the manager held 47.5 MB with several arenas and 38.4 MB with one
/// (restart 47.0 / 38.2 MB); an agent that had applied the 1.5 GB tree held 72 MB at rest,
/// 51 MB with one arena and a trim after the apply. Both daemons' threads are few and allocate
/// little while they work (per-thread caches serve most small allocations without the
/// arena's lock).
const ARENA_MAX: i32 = 1;

/// Sets the allocator up for a daemon that keeps a large, long-lived map (the manifests) beside
/// short-lived large buffers (the first walk's lists, a snapshot's encoding, hash tables being
/// grown, chunks and datagrams in flight). glibc by default raises its mapping threshold to the
/// size of the largest buffer freed (up to 32 MiB), so after the first large buffer all of them
/// come from the heap, where the long-lived entries allocated in between pin their pages: with
/// 100,000 files this left the manager holding some 9 MiB it had freed. A fixed threshold keeps
/// buffers of 8 MiB and more out of the heap, a high trim threshold keeps the heap's free top
/// for the next buffers (see [`TRIM_THRESHOLD`]), and one arena (see [`ARENA_MAX`]) lets
/// [`trim_heap`] reach all that was freed. Call once, before starting threads; a no-op where
/// the C library is not glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets the allocator's parameters (under its lock).
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
        }
    }
}
