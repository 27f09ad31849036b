//! Time: the wall clock latencies are measured with, and the bounded waits a
//! scenario uses to follow its tasks (every wait ends at a deadline).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

/// Wall-clock microseconds since the epoch; the latency clock shared by
/// publishers and subscribers (same machine, or NTP-synced machines).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A number that keeps this run's user ids apart from an earlier run's.
pub fn run_id() -> u64 {
    now_us() % 1_000_000_000
}

/// Wait until `done()` or `limit` passes (polling every 20 ms); whether it
/// became true.
pub async fn wait_until(limit: Instant, mut done: impl FnMut() -> bool) -> bool {
    while Instant::now() < limit {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

/// Collect `n` signals from `rx` until `limit`; how many arrived.
pub async fn collect_signals(
    rx: &mut mpsc::UnboundedReceiver<()>,
    n: usize,
    limit: Instant,
) -> usize {
    let mut got = 0;
    while got < n {
        match tokio::time::timeout_at(limit.into(), rx.recv()).await {
            Ok(Some(())) => got += 1,
            _ => break,
        }
    }
    got
}

/// Collect `n` setup outcomes from `rx` until `limit`: (settled, succeeded).
pub async fn collect_outcomes(
    rx: &mut mpsc::UnboundedReceiver<bool>,
    n: usize,
    limit: Instant,
) -> (usize, usize) {
    let (mut settled, mut ok) = (0, 0);
    while settled < n {
        match tokio::time::timeout_at(limit.into(), rx.recv()).await {
            Ok(Some(success)) => {
                settled += 1;
                ok += usize::from(success);
            }
            _ => break,
        }
    }
    (settled, ok)
}
