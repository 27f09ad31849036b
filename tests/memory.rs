//! The memory broker's history stays within `history.max_bytes`: a backend
//! publishing to 60,000 fresh rooms with the default config leaves the
//! process within the budget plus a modest overhead.

mod support;

use futures_util::stream::{self, StreamExt};
use serde_json::json;
use support::*;

const ROOMS: usize = 60_000;
const DATA_BYTES: usize = 4_000;
/// The default `history.max_bytes`.
const BUDGET_MIB: u64 = 64;
/// What the process may hold beyond the history budget (code, buffers,
/// allocator slack).
const OVERHEAD_MIB: u64 = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_60000_fresh_rooms_stays_within_the_history_budget() {
    let hub = Hub::start(Broker::Memory);
    let api = hub.api().await;
    let padding = "x".repeat(DATA_BYTES);
    let failures = stream::iter(0..ROOMS)
        .map(|i| {
            let (api, padding) = (&api, &padding);
            async move {
                let body = json!({"room": format!("fresh-{i}"), "data": {"i": i, "p": padding}});
                api.post("/api/publish", body).await.0
            }
        })
        .buffer_unordered(16)
        .filter(|status| std::future::ready(*status != 200))
        .count()
        .await;
    assert_eq!(failures, 0, "publishes refused");
    let rss = rss_mib(hub.pid());
    let published_mib = (ROOMS * DATA_BYTES) as u64 / (1024 * 1024);
    eprintln!("published {published_mib} MiB of history into {ROOMS} rooms; RSS {rss} MiB");
    assert!(
        rss <= BUDGET_MIB + OVERHEAD_MIB,
        "RSS {rss} MiB, expected at most {} MiB (budget {BUDGET_MIB} + overhead {OVERHEAD_MIB}) after publishing {published_mib} MiB",
        BUDGET_MIB + OVERHEAD_MIB
    );
    // The newest rooms are still served; the oldest were evicted.
    let (_, newest) = api
        .get(&format!("/api/rooms/fresh-{}/history", ROOMS - 1))
        .await;
    assert_eq!(
        newest["messages"].as_array().map(Vec::len),
        Some(1),
        "{newest}"
    );
    let (_, oldest) = api.get("/api/rooms/fresh-0/history").await;
    assert_eq!(oldest["messages"], json!([]));
}
