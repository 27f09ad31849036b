//! Giving freed memory back to the system. glibc's allocator keeps what a
//! wave of connections freed in its arenas, so without this the process's
//! RSS stays at its peak after the connections are gone. Every [`EVERY`],
//! when the open connections have fallen by a quarter of their peak since
//! the last trim (and by at least [`MIN_DROP`]), `malloc_trim(0)` hands the
//! free pages back. It takes a few milliseconds on a large heap and runs
//! on its own thread-pool thread, never on a worker. Not glibc: nothing.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::metrics::metrics;

/// The most connections open at once since the last trim.
static PEAK: AtomicI64 = AtomicI64::new(0);

/// Notes how many connections are open now (after one opened).
pub fn note_open(open: i64) {
    PEAK.fetch_max(open, Ordering::Relaxed);
}

/// How often the connection count is looked at.
const EVERY: Duration = Duration::from_secs(2);
/// The smallest drop worth a trim.
const MIN_DROP: i64 = 1_000;

/// Starts the watcher (once per process, inside the actix system).
pub fn spawn() {
    actix_web::rt::spawn(async {
        loop {
            tokio::time::sleep(EVERY).await;
            let open = metrics().connections_open.get();
            let peak = PEAK.load(Ordering::Relaxed).max(open);
            if peak - open >= MIN_DROP.max(peak / 4) {
                PEAK.store(open, Ordering::Relaxed);
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        }
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks;
    // it has no preconditions.
    let released = unsafe { libc::malloc_trim(0) };
    tracing::debug!(released, "returned freed memory to the system");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// Shrinks a map that has emptied to under a quarter of its capacity (to
/// twice its length), so a wave of connections that has gone leaves no
/// table sized for it; amortized, it costs nothing per removal.
pub fn shrink_map<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
    map: &mut std::collections::HashMap<K, V, S>,
) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_mostly_empty_map_shrinks_and_a_full_one_does_not() {
        let mut map: HashMap<u32, u32> = (0..10_000).map(|i| (i, i)).collect();
        let full = map.capacity();
        shrink_map(&mut map);
        assert_eq!(map.capacity(), full);
        map.retain(|k, _| *k < 100);
        shrink_map(&mut map);
        assert!(map.capacity() < full / 10, "{} of {full}", map.capacity());
        assert_eq!(map.len(), 100);
    }
}
