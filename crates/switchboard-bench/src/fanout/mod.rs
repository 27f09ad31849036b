//! The `fanout` scenario, phase by phase: subscribers connect and join,
//! publishers connect and join, everyone publishes from a common start, the
//! run drains the acks and deliveries, stops, collects every task's result,
//! and [`report`] prints the verdict.
//!
//! - [`subscriber`] and [`publisher`]: the two kinds of room member.
//! - [`recorder`]: what one member saw; [`payload`]: the bench's messages.

mod payload;
mod publisher;
mod recorder;
mod report;
mod subscriber;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use self::publisher::{PublisherLinks, PublisherPlan, PublisherResult};
use self::recorder::Recorder;
use self::subscriber::MemberResult;
use crate::client::{self, mint_token, Joined};
use crate::clock::{collect_outcomes, collect_signals, run_id, wait_until};
use crate::cpu::{cores, CpuMeter};
use crate::server_stats::{Buckets, ServerStats};
use crate::FanoutArgs;

/// The publishers start this long after the go signal, all together.
const START_DELAY: Duration = Duration::from_millis(100);
/// The hub's worker threads publish their buffered delivery metrics once a
/// second: wait for one flush before reading `/metrics` again.
const METRICS_FLUSH: Duration = Duration::from_millis(1100);

/// Everything a member needs; shared by all members.
pub struct Shared {
    pub args: FanoutArgs,
    /// Messages per publisher (`--messages` spread evenly).
    pub per_publisher: Vec<u64>,
    /// Subscribers that received every message.
    pub complete: Arc<AtomicUsize>,
    pub connect_limit: Duration,
}

impl Shared {
    fn new(args: FanoutArgs) -> Self {
        let per_publisher = split_evenly(args.messages, args.publishers);
        Shared {
            connect_limit: Duration::from_secs(args.common.connect_timeout_s),
            args,
            per_publisher,
            complete: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// How many rooms the members are spread over.
    pub fn rooms(&self) -> usize {
        self.args.rooms.max(1)
    }

    /// The room of member `index` (subscriber or publisher).
    pub fn room_of(&self, index: usize) -> usize {
        index % self.rooms()
    }

    pub fn room_name(&self, room: usize) -> String {
        match self.rooms() {
            1 => self.args.room.clone(),
            _ => format!("{}-{room}", self.args.room),
        }
    }

    /// What each publisher sends into `room` (nothing from the others).
    pub fn counts_in(&self, room: usize) -> Vec<u64> {
        let counts = self.per_publisher.iter().enumerate();
        counts
            .map(|(p, &n)| if self.room_of(p) == room { n } else { 0 })
            .collect()
    }

    /// A recorder for a subscriber in `room`, counting towards `complete`.
    fn recorder(&self, room: usize) -> Recorder {
        Recorder::new(room, &self.counts_in(room), self.complete.clone())
    }

    async fn connect_and_join(
        &self,
        url: &str,
        room: usize,
        on_other: impl FnMut(&str),
    ) -> Result<Joined, String> {
        let (room, buffer) = (self.room_name(room), self.args.common.read_buffer_bytes);
        client::connect_and_join(url, &room, self.connect_limit, buffer, on_other).await
    }
}

/// `total` spread over `parts`, the first ones taking the remainder.
fn split_evenly(total: u64, parts: usize) -> Vec<u64> {
    let parts = parts as u64;
    (0..parts)
        .map(|p| total / parts + u64::from(p < total % parts))
        .collect()
}

/// Run the scenario; whether every acked message reached every member once,
/// in order.
/// One run at `--rate`, or a sweep over `--rates`; `--json` gets the steps.
pub async fn run(args: FanoutArgs) -> Result<bool, String> {
    if args.rates.is_empty() {
        let (ok, step) = run_once(args.clone()).await?;
        if let Some(path) = &args.json {
            let json = serde_json::json!({"mode": "fanout", "url": args.common.url, "steps": [step], "ok": ok});
            crate::rss::write_json(path, &json)?;
        }
        return Ok(ok);
    }
    let mut steps = Vec::new();
    let mut best: Option<serde_json::Value> = None;
    for &rate in &args.rates {
        let mut step_args = args.clone();
        step_args.rate = rate;
        step_args.messages = ((rate * args.step_s as f64).round() as u64).max(1);
        println!("\n=== sweep step: {rate} msg/s for {} s ===", args.step_s);
        let (_, step) = run_once(step_args).await?;
        let sustained = sustained(&step, &args);
        println!(
            "=== step {rate} msg/s: {:.0} deliveries/s, ratio {:.4}, p99 {:.2} ms: {} ===",
            step["deliveries_per_s"].as_f64().unwrap_or(0.0),
            step["delivery_ratio"].as_f64().unwrap_or(0.0),
            step["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
            if sustained {
                "sustained"
            } else {
                "NOT SUSTAINED"
            }
        );
        steps.push(step.clone());
        if !sustained {
            break;
        }
        best = Some(step);
    }
    let max = |key: &str| best.as_ref().map(|b| b[key].clone());
    println!(
        "max sustained: {} deliveries/s at {} msg/s",
        max("deliveries_per_s").unwrap_or_default(),
        max("rate").unwrap_or_default()
    );
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "mode": "sweep",
            "url": args.common.url,
            "min_ratio": args.min_ratio,
            "max_p99_ms": args.max_p99_ms,
            "max_deliveries_per_s": max("deliveries_per_s"),
            "max_rate_msgs_per_s": max("rate"),
            "max_step_p99_ms": best.as_ref().map(|b| b["latency_ms"]["p99"].clone()),
            "steps": steps,
        });
        crate::rss::write_json(path, &json)?;
    }
    Ok(best.is_some())
}

/// The harness's rule for a step that holds.
fn sustained(step: &serde_json::Value, args: &FanoutArgs) -> bool {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    f(&step["delivery_ratio"]) >= args.min_ratio
        && f(&step["latency_ms"]["p99"]) <= args.max_p99_ms
        && f(&step["achieved_rate"]) >= 0.98 * f(&step["rate"])
        && step["closes"].as_u64() == Some(0)
}

async fn run_once(args: FanoutArgs) -> Result<(bool, serde_json::Value), String> {
    if args.publishers == 0 || args.messages == 0 || args.rate <= 0.0 {
        return Err("--publishers, --messages and --rate must be positive".into());
    }
    if args.rooms == 0 || args.rooms > args.publishers {
        return Err(
            "--rooms must be between 1 and --publishers (each room needs a publisher)".into(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(args.common.duration_s);
    let stats = ServerStats::new(&args.common.url, args.common.api_key.clone())?;
    let run_id = run_id();
    let users = args.users.unwrap_or(args.subscribers).max(1);
    let shared = Arc::new(Shared::new(args.clone()));
    print_scenario(&args, users);

    let (stop_tx, stop_rx) = watch::channel(false);
    let (go_tx, go_rx) = watch::channel(None::<Instant>);
    let run_cpu = CpuMeter::read();
    let subscribers = start_subscribers(&shared, run_id, users, &stop_rx, deadline).await?;
    let mut publishers = start_publishers(&shared, run_id, &go_rx, &stop_rx, deadline).await?;
    let expected_open = subscribers.joined
        + if args.publish_url.is_some() {
            0
        } else {
            publishers.joined
        };
    stats
        .report_connections("before publishing", expected_open)
        .await;
    let drain = publish_and_drain(
        &shared,
        &stats,
        &go_tx,
        &mut publishers,
        &subscribers,
        deadline,
    )
    .await;
    let _ = stop_tx.send(true);

    let subs = collect("subscriber", subscribers.tasks).await?;
    let pubs = collect("publisher", publishers.tasks).await?;
    let outcome = report::print(report::Run {
        args: &args,
        subs: &subs,
        pubs: &pubs,
        settled: subscribers.settled,
        connect_elapsed: subscribers.elapsed,
        drain: &drain,
        run_cpu: &run_cpu,
        stats: &stats,
    })
    .await;
    Ok(outcome)
}

fn print_scenario(args: &FanoutArgs, users: usize) {
    println!(
        "scenario: fanout: {} subscribers ({} users) on {}, {} publishers on {}, room {:?} ×{}, \
         {} messages at {} msg/s, data ~{} bytes",
        args.subscribers,
        users,
        args.common.url,
        args.publishers,
        args.publish_url.as_deref().unwrap_or(&args.common.url),
        args.room,
        args.rooms,
        args.messages,
        args.rate,
        args.payload_bytes
    );
}

/// Phase 1 as it ended: the subscribers' tasks and how their setup went.
struct Subscribers {
    tasks: Vec<JoinHandle<MemberResult>>,
    /// Setups that ended (joined or failed) before the deadline.
    settled: usize,
    joined: usize,
    elapsed: Duration,
}

/// Phase 1: subscribers connect (a sliding window of
/// `--connect-concurrency`) and join; wait until all have settled.
async fn start_subscribers(
    shared: &Arc<Shared>,
    run_id: u64,
    users: usize,
    stop: &watch::Receiver<bool>,
    deadline: Instant,
) -> Result<Subscribers, String> {
    let args = &shared.args;
    let slots = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let user = format!("bench-sub-{run_id}-{}", i % users);
        let token = mint_token(&args.common.secret, &user)?;
        tasks.push(tokio::spawn(subscriber::subscriber(
            i,
            token,
            shared.clone(),
            slots.clone(),
            ready_tx.clone(),
            stop.clone(),
        )));
    }
    let (settled, joined) = collect_outcomes(&mut ready_rx, args.subscribers, deadline).await;
    let elapsed = started.elapsed();
    if settled < args.subscribers {
        println!(
            "TIMED OUT: only {settled} of {} subscribers finished setting up",
            args.subscribers
        );
    }
    Ok(Subscribers {
        tasks,
        settled,
        joined,
        elapsed,
    })
}

/// Phase 2 as it ended: the publishers, joined and waiting for the start.
struct Publishers {
    tasks: Vec<JoinHandle<PublisherResult>>,
    joined: usize,
    /// One signal per publisher done publishing.
    published: mpsc::UnboundedReceiver<()>,
    acks_outstanding: Arc<AtomicU64>,
}

/// Phase 2: publishers connect and join, then wait for the common start.
async fn start_publishers(
    shared: &Arc<Shared>,
    run_id: u64,
    go: &watch::Receiver<Option<Instant>>,
    stop: &watch::Receiver<bool>,
    deadline: Instant,
) -> Result<Publishers, String> {
    let args = &shared.args;
    let interval = Duration::from_secs_f64(args.publishers as f64 / args.rate);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let (published_tx, published) = mpsc::unbounded_channel();
    let acks_outstanding = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(args.publishers);
    for (p, &count) in shared.per_publisher.iter().enumerate() {
        let token = mint_token(&args.common.secret, &format!("bench-pub-{run_id}-{p}"))?;
        let plan = PublisherPlan {
            index: p,
            count,
            offset: Duration::from_secs_f64(p as f64 / args.rate),
            interval,
        };
        let links = PublisherLinks {
            ready: ready_tx.clone(),
            go: go.clone(),
            published: published_tx.clone(),
            acks_outstanding: acks_outstanding.clone(),
            stop: stop.clone(),
            deadline,
        };
        let task = publisher::publisher(plan, token, shared.clone(), links);
        tasks.push(tokio::spawn(task));
    }
    let (_, joined) = collect_outcomes(&mut ready_rx, args.publishers, deadline).await;
    Ok(Publishers {
        tasks,
        joined,
        published,
        acks_outstanding,
    })
}

/// Phase 3 as it ended.
pub struct Drain {
    /// Every publish was answered within `--drain-s`.
    pub acks_in: bool,
    /// Every subscriber that joined received every message.
    pub all_delivered: bool,
    /// From the last publish to the end of the drain.
    pub drained_after: Duration,
    pub publish_cpu: String,
    /// The server's delivery histogram before and after.
    pub metrics_before: Result<Buckets, String>,
    pub metrics_after: Result<Buckets, String>,
}

/// Phase 3: start the publishers together, wait until they are done, then
/// (at most `--drain-s`) for the acks and the deliveries.
async fn publish_and_drain(
    shared: &Shared,
    stats: &ServerStats,
    go: &watch::Sender<Option<Instant>>,
    publishers: &mut Publishers,
    subscribers: &Subscribers,
    deadline: Instant,
) -> Drain {
    let args = &shared.args;
    let metrics_before = stats.delivery_buckets().await;
    let publish_cpu = CpuMeter::read();
    let _ = go.send(Some(Instant::now() + START_DELAY));
    let published = collect_signals(&mut publishers.published, args.publishers, deadline).await;
    let publish_done = Instant::now();
    if published < args.publishers {
        println!("TIMED OUT: publishing did not finish within --duration-s");
    }
    let drain_limit = (publish_done + Duration::from_secs(args.drain_s)).min(deadline);
    let outstanding = &publishers.acks_outstanding;
    let acks_in = wait_until(drain_limit, || outstanding.load(Ordering::Relaxed) == 0).await;
    // Nothing to wait for when no publisher could publish.
    let complete = &shared.complete;
    let all_delivered = publishers.joined == 0
        || wait_until(drain_limit, || {
            complete.load(Ordering::Relaxed) >= subscribers.joined
        })
        .await;
    let drained_after = publish_done.elapsed();
    let publish_cpu = publish_cpu.since(cores());
    let metrics_after = if metrics_before.is_ok() {
        tokio::time::sleep(METRICS_FLUSH).await;
        stats.delivery_buckets().await
    } else {
        Err("not read".into())
    };
    Drain {
        acks_in,
        all_delivered,
        drained_after,
        publish_cpu,
        metrics_before,
        metrics_after,
    }
}

/// Phase 4: every task's result (each task ends once stop is set).
async fn collect<T>(what: &str, tasks: Vec<JoinHandle<T>>) -> Result<Vec<T>, String> {
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await.map_err(|e| format!("a {what} task failed: {e}"))?);
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_split_evenly_over_the_publishers() {
        assert_eq!(split_evenly(2000, 2), vec![1000, 1000]);
        assert_eq!(split_evenly(10, 3), vec![4, 3, 3]);
        assert_eq!(split_evenly(1, 3), vec![1, 0, 0]);
    }
}
