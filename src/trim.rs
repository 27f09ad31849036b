//! Giving freed memory back to the system. glibc's allocator keeps what a
//! wave of connections freed in its arenas, so without this the process's
//! RSS stays at its peak after the connections are gone. Once the open
//! connections have fallen by a quarter of their peak since the last trim
//! (and by at least [`MIN_DROP`]), or to none after at least [`MIN_WAVE`],
//! and no connection has opened for [`QUIET`], `malloc_trim(0)` hands the
//! free pages back. It runs on a blocking-pool thread, never on a worker,
//! one at a time, and takes a few milliseconds on a large heap. While
//! connections keep coming there is no trim: the memory is being reused.
//! Not glibc: nothing.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::now_ms;
use crate::metrics::metrics;

/// The smallest drop worth a trim while connections remain.
const MIN_DROP: i64 = 1_000;
/// The smallest peak worth a trim when the last connection has gone.
const MIN_WAVE: i64 = 100;
/// How long no connection may have opened before a trim.
const QUIET: Duration = Duration::from_secs(5);

/// The most connections open at once since the last trim.
static PEAK: AtomicI64 = AtomicI64::new(0);
/// When a connection last opened (ms since the epoch).
static LAST_OPEN_MS: AtomicU64 = AtomicU64::new(0);
/// A trim is waiting or running.
static TRIMMING: AtomicBool = AtomicBool::new(false);

/// Notes how many connections are open now (after one opened).
pub fn note_open(open: i64) {
    PEAK.fetch_max(open, Ordering::Relaxed);
    LAST_OPEN_MS.store(now_ms(), Ordering::Relaxed);
}

fn worth_it(peak: i64, open: i64) -> bool {
    (open <= 0 && peak >= MIN_WAVE) || peak - open >= MIN_DROP.max(peak / 4)
}

fn due() -> bool {
    worth_it(
        PEAK.load(Ordering::Relaxed),
        metrics().connections_open.get(),
    )
}

/// Called after a session ended: once enough of them have and things are
/// quiet, trims.
pub fn note_closed() {
    if !due() || TRIMMING.swap(true, Ordering::AcqRel) {
        return;
    }
    actix_web::rt::spawn(async {
        let quiet_ms = QUIET.as_millis() as u64;
        loop {
            tokio::time::sleep(QUIET).await;
            if !due() {
                break;
            }
            let since_open = now_ms().saturating_sub(LAST_OPEN_MS.load(Ordering::Relaxed));
            if since_open < quiet_ms {
                continue;
            }
            PEAK.store(metrics().connections_open.get(), Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(trim).await;
            break;
        }
        TRIMMING.store(false, Ordering::Release);
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
    fn a_trim_is_due_after_a_quarter_of_the_peak_or_the_whole_wave() {
        assert!(!worth_it(10_000, 9_000));
        assert!(worth_it(10_000, 7_500));
        assert!(!worth_it(2_000, 1_500), "a drop under MIN_DROP waits");
        assert!(worth_it(150, 0), "the last of a wave");
        assert!(!worth_it(20, 0), "a handful is not a wave");
    }

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
