//! Chunks as they cross the wire, shared by the fetches under way. When a generation goes to ten
//! agents at once they all ask for the same chunks within milliseconds; without this each fetch
//! read, hashed and probed for compression every chunk again (in a 10-worker fan-out of a 5 MB
//! CAR the manager spent more time re-hashing than encrypting). Entries are keyed by content
//! (chunk hash, and the delta base it was encoded against), so sharing them is safe whatever
//! happened on disk since: an entry's bytes were checked against its hash when read, and a
//! changed file is still caught by the fetch that reads it first.
//!
//! A fetch that finds a chunk being encoded by another waits for it instead of doing the same
//! work. Fetches use the cache only while several agents are connected (one agent has nobody to
//! share with: a 1 GiB file would just pass through it). The cache is bounded in bytes (oldest
//! out first) and emptied once no fetch has been under way for [`IDLE_CLEAR`], so it costs
//! nothing at rest.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use syncd_manifest::ChunkHash;
use syncd_proto::ChunkEncoding;

/// The most wire bytes kept: a 63 MB WAR's changed chunks many times over, or the whole of a new
/// 20 MB CAR while the slowest of its agents catches up with the fastest.
pub(crate) const WIRE_BYTES: usize = 32 << 20;
/// How long after the last fetch ends the cache is emptied.
pub(crate) const IDLE_CLEAR: Duration = Duration::from_secs(2);

/// A chunk encoded for the wire.
pub(crate) type Encoded = (Bytes, ChunkEncoding);

/// The chunk, and the delta base it is encoded against (if any).
type Key = (ChunkHash, Option<ChunkHash>);

/// One chunk's place: filled by the first fetch that needs it, while the others wait.
#[derive(Debug, Default)]
struct Slot(Mutex<Option<Encoded>>);

#[derive(Debug)]
pub(crate) struct WireCache {
    inner: Mutex<Inner>,
    limit: usize,
    /// Fetches under way.
    active: AtomicUsize,
    /// Counts fetches begun, so a clearing scheduled when the last one ended can tell whether
    /// another has come and gone since.
    begun: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<Key, Arc<Slot>>,
    /// Filled keys, oldest first, with their wire length.
    order: VecDeque<(Key, usize)>,
    bytes: usize,
}

impl WireCache {
    pub(crate) fn new(limit: usize) -> WireCache {
        WireCache {
            inner: Mutex::default(),
            limit,
            active: AtomicUsize::new(0),
            begun: AtomicU64::new(0),
        }
    }

    /// The chunk `hash` encoded against `base`: kept, being encoded by another fetch (waited
    /// for), or made by `encode` now and kept. An error is not kept: the next fetch tries again.
    pub(crate) fn get_or_encode(
        &self,
        hash: ChunkHash,
        base: Option<ChunkHash>,
        encode: impl FnOnce() -> Result<Encoded, String>,
    ) -> Result<Encoded, String> {
        let key = (hash, base);
        let slot = Arc::clone(self.lock().map.entry(key).or_default());
        let mut value = slot.0.lock().expect("a slot lock is never poisoned");
        if let Some(v) = value.as_ref() {
            return Ok(v.clone());
        }
        match encode() {
            Ok(v) => {
                *value = Some(v.clone());
                let mut inner = self.lock();
                // Evicted (or cleared) while this was encoding: keep it out of the books.
                if inner.map.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                    inner.bytes += v.0.len();
                    inner.order.push_back((key, v.0.len()));
                    while inner.bytes > self.limit {
                        let Some((old, len)) = inner.order.pop_front() else {
                            break;
                        };
                        inner.map.remove(&old);
                        inner.bytes -= len;
                    }
                }
                Ok(v)
            }
            Err(e) => {
                let mut inner = self.lock();
                if inner.map.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                    inner.map.remove(&key);
                }
                Err(e)
            }
        }
    }

    /// A fetch begins; it ends when the returned guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> FetchUnderWay {
        self.begun.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::AcqRel);
        FetchUnderWay(Arc::clone(self))
    }

    /// A fetch ended: when it was the last, the cache is emptied after [`IDLE_CLEAR`] unless
    /// another fetch has begun by then.
    fn end(self: &Arc<Self>) {
        if self.active.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let begun = self.begun.load(Ordering::Relaxed);
        let cache = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(IDLE_CLEAR).await;
            if cache.active.load(Ordering::Acquire) == 0
                && cache.begun.load(Ordering::Relaxed) == begun
            {
                cache.clear();
                // Give back what the chunks held (see `syncd_fsops::trim_heap`).
                syncd_fsops::trim_heap();
            }
        });
    }

    /// Drops everything kept.
    pub(crate) fn clear(&self) {
        *self.lock() = Inner::default();
    }

    /// Bytes kept.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .expect("the wire cache lock is never poisoned")
    }
}

/// A fetch under way (see [`WireCache::begin`]); dropping it ends the fetch.
#[derive(Debug)]
pub(crate) struct FetchUnderWay(Arc<WireCache>);

impl Drop for FetchUnderWay {
    fn drop(&mut self) {
        self.0.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn chunk(i: u8, len: usize) -> (ChunkHash, Encoded) {
        let data = vec![i; len];
        (
            ChunkHash::of(&data),
            (Bytes::from(data), ChunkEncoding::Raw),
        )
    }

    #[test]
    fn a_chunk_is_encoded_once_and_then_served_from_the_cache() {
        let cache = WireCache::new(1 << 20);
        let (hash, enc) = chunk(1, 1000);
        let calls = AtomicU32::new(0);
        for _ in 0..3 {
            let got = cache
                .get_or_encode(hash, None, || {
                    calls.fetch_add(1, Ordering::Relaxed);
                    Ok(enc.clone())
                })
                .unwrap();
            assert_eq!(got, enc);
        }
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        // The same chunk against a delta base is another entry.
        let base = ChunkHash::of(b"base");
        cache
            .get_or_encode(hash, Some(base), || {
                calls.fetch_add(1, Ordering::Relaxed);
                Ok(enc.clone())
            })
            .unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn an_error_is_not_kept() {
        let cache = WireCache::new(1 << 20);
        let (hash, enc) = chunk(2, 10);
        let err = cache.get_or_encode(hash, None, || Err("changed on disk".into()));
        assert_eq!(err, Err("changed on disk".into()));
        let got = cache.get_or_encode(hash, None, || Ok(enc.clone()));
        assert_eq!(got, Ok(enc));
        assert_eq!(cache.bytes(), 10);
    }

    #[test]
    fn the_oldest_go_when_the_bound_is_reached() {
        let cache = WireCache::new(3000);
        let chunks: Vec<_> = (0..5).map(|i| chunk(i, 1000)).collect();
        for (h, e) in &chunks {
            cache.get_or_encode(*h, None, || Ok(e.clone())).unwrap();
        }
        assert_eq!(cache.bytes(), 3000);
        for (i, (h, e)) in chunks.iter().enumerate().rev() {
            let mut encoded = false;
            cache
                .get_or_encode(*h, None, || {
                    encoded = true;
                    Ok(e.clone())
                })
                .unwrap();
            // 2, 3 and 4 were kept, 0 and 1 dropped (asked for newest first: encoding a
            // dropped one again drops the oldest kept).
            assert_eq!(encoded, i < 2, "chunk {i}");
        }
    }

    #[test]
    fn fetches_asking_at_once_wait_for_the_one_encoding() {
        let cache = Arc::new(WireCache::new(1 << 20));
        let (hash, enc) = chunk(3, 4096);
        let calls = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, calls, enc) = (Arc::clone(&cache), Arc::clone(&calls), enc.clone());
                std::thread::spawn(move || {
                    cache
                        .get_or_encode(hash, None, || {
                            calls.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(50));
                            Ok(enc)
                        })
                        .unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), enc);
        }
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_is_emptied_once_no_fetch_is_under_way() {
        let cache = Arc::new(WireCache::new(1 << 20));
        let (hash, enc) = chunk(4, 100);
        let first = cache.begin();
        cache.get_or_encode(hash, None, || Ok(enc.clone())).unwrap();
        drop(cache.begin());
        tokio::time::sleep(IDLE_CLEAR * 2).await;
        // One fetch is still under way: kept.
        assert_eq!(cache.bytes(), 100);
        drop(first);
        // Another fetch comes and goes before the first clearing is due: that one is skipped,
        // the second clears.
        tokio::time::sleep(IDLE_CLEAR / 2).await;
        drop(cache.begin());
        tokio::time::sleep(IDLE_CLEAR * 3 / 4).await;
        assert_eq!(cache.bytes(), 100);
        tokio::time::sleep(IDLE_CLEAR).await;
        assert_eq!(cache.bytes(), 0);
    }
}
