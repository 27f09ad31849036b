//! The `connections` scenario: open `--count` authenticated connections
//! (distinct users, `--concurrency` at a time), measure the time to
//! `welcome`, hold them all for `--hold-s`, close them cleanly, and report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::client::{self, mint_token, ReadEnd};
use crate::clock::{collect_outcomes, run_id};
use crate::cpu::{cores, CpuMeter};
use crate::latency::{Latency, P50_P90_P99, P50_P99};
use crate::report::{count_into, fmt_counts, per_s, print_result, Counts};
use crate::rss::{rss_kb, write_json};
use crate::server_stats::ServerStats;
use crate::ConnectionsArgs;

/// How one connection went.
struct ConnectionResult {
    welcome: Result<Duration, String>,
    welcomed_at: Option<Instant>,
    server_close: Option<String>,
    stream_error: Option<String>,
    closed_cleanly: bool,
    close_took: Option<Duration>,
}

impl ConnectionResult {
    fn failed(error: String) -> Self {
        ConnectionResult {
            welcome: Err(error),
            welcomed_at: None,
            server_close: None,
            stream_error: None,
            closed_cleanly: false,
            close_took: None,
        }
    }
}

/// What every connection task shares.
struct Shared {
    limit: Duration,
    read_buffer_bytes: usize,
    slots: Semaphore,
}

/// One connection: connect in a free slot, wait for welcome, read (which
/// answers pings) until stop, close cleanly.
async fn hold_connection(
    url: String,
    room: Option<String>,
    shared: Arc<Shared>,
    ready: mpsc::UnboundedSender<bool>,
    mut stop: watch::Receiver<bool>,
) -> ConnectionResult {
    let Ok(slot) = shared.slots.acquire().await else {
        let _ = ready.send(false);
        return ConnectionResult::failed("not started".into());
    };
    let started = Instant::now();
    let ws = client::connect_and_welcome(&url, shared.limit, shared.read_buffer_bytes).await;
    drop(slot);
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            let _ = ready.send(false);
            return ConnectionResult::failed(e);
        }
    };
    let welcome = Ok(started.elapsed());
    let welcomed_at = Some(Instant::now());
    let _ = ready.send(true);
    let (mut sink, mut stream) = ws.split();
    if let Some(room) = room {
        let join = serde_json::json!({"type": "join", "room": room}).to_string();
        let _ = futures_util::SinkExt::send(
            &mut sink,
            tokio_tungstenite::tungstenite::Message::text(join),
        )
        .await;
    }
    let end = client::read_until_stop(&mut stream, &mut stop, |_| {}).await;
    let (mut closed_cleanly, mut close_took) = (false, None);
    if let ReadEnd::Stopped = end {
        let started = Instant::now();
        closed_cleanly = client::close_cleanly(&mut sink, &mut stream).await;
        close_took = Some(started.elapsed());
    }
    ConnectionResult {
        welcome,
        welcomed_at,
        server_close: end.server_close(),
        stream_error: end.stream_error(),
        closed_cleanly,
        close_took,
    }
}

/// Run the scenario; whether every connection was welcomed and closed
/// cleanly.
pub async fn run(args: ConnectionsArgs) -> Result<bool, String> {
    let common = &args.common;
    let deadline = Instant::now() + Duration::from_secs(common.duration_s);
    let stats = ServerStats::new(&common.url, common.api_key.clone())?;
    println!(
        "scenario: connections: {} connections (distinct users) to {}, {} at a time, held {} s, {} cycle(s)",
        args.count, common.url, args.concurrency, args.hold_s, args.cycles
    );
    // The same users every cycle: a per-user count that leaks shows up as
    // `connection limit` refusals.
    let urls = connection_urls(&args)?;
    let mut cycles = Vec::new();
    let mut all_ok = true;
    for cycle in 1..=args.cycles.max(1) {
        if args.cycles > 1 {
            println!("\n=== cycle {cycle}/{} ===", args.cycles);
        }
        let (ok, json) = run_cycle(&args, &stats, urls.clone(), deadline).await?;
        all_ok &= ok;
        cycles.push(json);
    }
    if let Some(path) = &args.json {
        let json = if cycles.len() == 1 {
            cycles.remove(0)
        } else {
            churn_json(&cycles, all_ok)
        };
        write_json(path, &json)?;
    }
    if args.cycles > 1 {
        let mut summary = churn_json(&cycles, all_ok);
        summary["per_cycle"] = serde_json::Value::Null;
        println!("\nchurn: {summary}");
    }
    print_result(
        all_ok,
        "every connection welcomed and closed cleanly, none left on the server",
    );
    Ok(all_ok)
}

/// The cycles together: the RSS after the last against after the second
/// (the first is warm-up), as the harness's soak compares them.
fn churn_json(cycles: &[serde_json::Value], ok: bool) -> serde_json::Value {
    let closed = |c: &serde_json::Value| c["rss_closed_kb"].as_f64();
    let growth = match (
        cycles.get(1).and_then(closed),
        cycles.last().and_then(closed),
    ) {
        (Some(second), Some(last)) if second > 0.0 && cycles.len() > 2 => {
            Some((last - second) / second * 100.0)
        }
        _ => None,
    };
    serde_json::json!({
        "mode": "churn",
        "cycles": cycles.len(),
        "leaked_max": cycles.iter().filter_map(|c| c["leaked"].as_u64()).max(),
        "rss_growth_pct": growth,
        "ok": ok,
        "per_cycle": cycles,
    })
}

/// Connect all, hold, close all, check the server let go of every one.
async fn run_cycle(
    args: &ConnectionsArgs,
    stats: &ServerStats,
    urls: Vec<String>,
    deadline: Instant,
) -> Result<(bool, serde_json::Value), String> {
    stats.report_connections("before connecting", 0).await;
    let rss_before = args.server_pid.and_then(rss_kb);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut opened = open_all(args, urls, stop_rx, deadline).await;
    stats
        .report_connections("with all connections open", opened.opened)
        .await;
    // The server may still be finishing the last handshakes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_open = args.server_pid.and_then(rss_kb);
    let hold_until = (Instant::now() + Duration::from_secs(args.hold_s)).min(deadline);
    tokio::time::sleep_until(hold_until.into()).await;
    let close_started = Instant::now();
    let _ = stop_tx.send(true);
    let mut results = Vec::with_capacity(args.count);
    for t in std::mem::take(&mut opened.tasks) {
        results.push(
            t.await
                .map_err(|e| format!("a connection task failed: {e}"))?,
        );
    }
    let tally = Tally::of(&results, opened.started);
    tally.print(args, &opened, close_started.elapsed());
    let left = stats.await_connections(0, Duration::from_secs(10)).await;
    let ok = tally.welcome.total() as usize == args.count
        && tally.clean == args.count
        && tally.server_closes.is_empty()
        && tally.stream_errors.is_empty()
        && left.unwrap_or(0) == 0;
    let rss = match args.server_pid {
        Some(pid) => {
            tokio::time::sleep(Duration::from_secs(args.settle_s)).await;
            let rss = Rss {
                before: rss_before,
                open: rss_open,
                closed: rss_kb(pid),
            };
            rss.print(opened.opened, args.settle_s);
            Some(rss)
        }
        None => None,
    };
    let mut json = json_of(args, &opened, &tally, rss.as_ref(), ok);
    json["leaked"] = serde_json::json!(left);
    Ok((ok, json))
}

/// The server's RSS (KiB) before, with every connection open, and after.
struct Rss {
    before: Option<u64>,
    open: Option<u64>,
    closed: Option<u64>,
}

impl Rss {
    /// KB (1,000 bytes, as the harness counts) per open connection.
    fn kb_per_conn(&self, open: usize) -> Option<f64> {
        let grown = self.open?.checked_sub(self.before?)?;
        (open > 0).then(|| grown as f64 * 1024.0 / 1000.0 / open as f64)
    }

    fn print(&self, open: usize, settle_s: u64) {
        let show = |kb: Option<u64>| kb.map_or("?".into(), |kb| format!("{kb} KiB"));
        println!(
            "server rss:  {} before, {} with {open} open ({} KB per connection), {} {settle_s} s after closing",
            show(self.before),
            show(self.open),
            self.kb_per_conn(open).map_or("?".into(), |kb| format!("{kb:.1}")),
            show(self.closed),
        );
    }
}

/// The run as JSON, with bench/compare.sh's key names where it has one.
fn json_of(
    args: &ConnectionsArgs,
    opened: &Opened,
    tally: &Tally,
    rss: Option<&Rss>,
    ok: bool,
) -> serde_json::Value {
    let elapsed = opened.elapsed.as_secs_f64();
    serde_json::json!({
        "mode": "connect",
        "url": args.common.url,
        "clients": args.count,
        "clients_connected": opened.opened,
        "clients_failed": args.count.saturating_sub(opened.opened),
        "connect_time_s": elapsed,
        "connect_rate_per_s": if elapsed > 0.0 { opened.opened as f64 / elapsed } else { 0.0 },
        "connect_latency_ms": tally.welcome.json_ms(),
        "idle_connections": opened.opened,
        "kb_per_conn": rss.and_then(|r| r.kb_per_conn(opened.opened)),
        "rss_before_kb": rss.and_then(|r| r.before),
        "rss_after_kb": rss.and_then(|r| r.open),
        "rss_closed_kb": rss.and_then(|r| r.closed),
        "settle_s": args.settle_s,
        "ok": ok,
    })
}

/// One URL with its own token per connection, each for a distinct user.
fn connection_urls(args: &ConnectionsArgs) -> Result<Vec<String>, String> {
    let run_id = run_id();
    let endpoint = client::ws_endpoint(&args.common.url);
    (0..args.count)
        .map(|i| {
            let token = mint_token(&args.common.secret, &format!("bench-conn-{run_id}-{i}"))?;
            Ok(client::ws_url_with_token(&endpoint, &token))
        })
        .collect()
}

/// The connecting phase as it ended.
struct Opened {
    tasks: Vec<JoinHandle<ConnectionResult>>,
    started: Instant,
    /// Until every attempt settled (or the deadline).
    elapsed: Duration,
    cpu: String,
    opened: usize,
}

/// Start every connection and wait (until the deadline) for every attempt
/// to settle.
async fn open_all(
    args: &ConnectionsArgs,
    urls: Vec<String>,
    stop: watch::Receiver<bool>,
    deadline: Instant,
) -> Opened {
    let shared = Arc::new(Shared {
        limit: Duration::from_secs(args.common.connect_timeout_s),
        read_buffer_bytes: args.common.read_buffer_bytes,
        slots: Semaphore::new(args.concurrency.max(1)),
    });
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let cpu = CpuMeter::read();
    let started = Instant::now();
    let tasks: Vec<_> = urls
        .into_iter()
        .enumerate()
        .map(|(i, url)| {
            let room = (args.rooms > 0).then(|| format!("bench-{}", i % args.rooms));
            let task = hold_connection(url, room, shared.clone(), ready_tx.clone(), stop.clone());
            tokio::spawn(task)
        })
        .collect();
    let (settled, opened) = collect_outcomes(&mut ready_rx, args.count, deadline).await;
    let elapsed = started.elapsed();
    let cpu = cpu.since(cores());
    if settled < args.count {
        println!(
            "TIMED OUT: only {settled} of {} attempts settled",
            args.count
        );
    }
    Opened {
        tasks,
        started,
        elapsed,
        cpu,
        opened,
    }
}

/// Every connection's result, added up.
struct Tally {
    welcome: Latency,
    close: Latency,
    failures: Counts,
    server_closes: Counts,
    stream_errors: Counts,
    /// From the start to the last welcome.
    window_s: f64,
    clean: usize,
}

impl Tally {
    fn of(results: &[ConnectionResult], started: Instant) -> Self {
        let mut t = Tally {
            welcome: Latency::new(),
            close: Latency::new(),
            failures: Counts::new(),
            server_closes: Counts::new(),
            stream_errors: Counts::new(),
            window_s: 0.0,
            clean: 0,
        };
        let mut last_welcome = started;
        for r in results {
            match &r.welcome {
                Ok(d) => t.welcome.record(d.as_micros() as u64),
                Err(e) => count_into(&mut t.failures, e.clone()),
            }
            if let Some(at) = r.welcomed_at {
                last_welcome = last_welcome.max(at);
            }
            if let Some(c) = &r.server_close {
                count_into(&mut t.server_closes, c.clone());
            }
            if let Some(e) = &r.stream_error {
                count_into(&mut t.stream_errors, e.clone());
            }
            if let Some(d) = r.close_took {
                t.close.record(d.as_micros() as u64);
            }
            t.clean += usize::from(r.closed_cleanly);
        }
        t.window_s = last_welcome.duration_since(started).as_secs_f64();
        t
    }

    fn print(&self, args: &ConnectionsArgs, opened: &Opened, close_elapsed: Duration) {
        let welcomed = self.welcome.total();
        println!();
        println!(
            "connected:   {welcomed} of {} welcomed in {:.2} s: {} (all attempts settled after {:.2} s)",
            args.count,
            self.window_s,
            per_s(welcomed, self.window_s, "connects"),
            opened.elapsed.as_secs_f64()
        );
        println!(
            "  time to welcome (TCP connect + upgrade + welcome): {}",
            self.welcome.summary_ms(&P50_P90_P99)
        );
        println!("  cpu while connecting: {}", opened.cpu);
        if !self.failures.is_empty() {
            println!("  FAILURES: {}", fmt_counts(&self.failures));
        }
        if !self.server_closes.is_empty() {
            println!(
                "  CLOSED BY SERVER while held: {}",
                fmt_counts(&self.server_closes)
            );
        }
        if !self.stream_errors.is_empty() {
            println!(
                "  STREAM ERRORS while held: {}",
                fmt_counts(&self.stream_errors)
            );
        }
        println!(
            "closed:      {} of {welcomed} with a completed close handshake in {:.2} s; per connection {}",
            self.clean,
            close_elapsed.as_secs_f64(),
            self.close.summary_ms(&P50_P99)
        );
    }
}
