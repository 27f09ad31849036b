//! A publisher: connect and join (a publisher is a room member too), wait
//! for the common start, publish on its schedule while reading acks,
//! refusals and its own copies, then close cleanly.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

use super::payload::{padding, BenchData};
use super::recorder::Recorder;
use super::subscriber::MemberResult;
use super::Shared;
use crate::client::{self, Joined, ServerFrame, WsSink};
use crate::clock::now_us;
use crate::latency::Latency;

/// A send that starts later than this after its scheduled time is late.
const LATE: Duration = Duration::from_millis(10);

/// When one publisher sends what.
pub struct PublisherPlan {
    pub index: usize,
    pub count: u64,
    /// Message k of this publisher is sent at `offset + k * interval` after
    /// the common start, interleaving the publishers evenly.
    pub offset: Duration,
    pub interval: Duration,
}

/// What ties a publisher to the run.
pub struct PublisherLinks {
    /// One outcome of connecting and joining.
    pub ready: mpsc::UnboundedSender<bool>,
    /// The common start, once the run sets it.
    pub go: watch::Receiver<Option<Instant>>,
    /// One signal when this publisher is done publishing.
    pub published: mpsc::UnboundedSender<()>,
    /// Publishes not yet answered, over all publishers.
    pub acks_outstanding: Arc<AtomicU64>,
    pub stop: watch::Receiver<bool>,
    pub deadline: Instant,
}

/// What one publisher did.
pub struct PublisherResult {
    pub member: MemberResult,
    pub sent: u64,
    pub acked: u64,
    pub refused: u64,
    /// Per sequence number: acked with an id (expected to be delivered).
    pub acked_seqs: Vec<bool>,
    pub ack_latency: Latency,
    pub first_send_us: u64,
    pub last_send_us: u64,
    /// Sends that started more than 10 ms after their scheduled time.
    pub late_sends: u64,
}

/// One publisher, from connecting to closing.
pub async fn publisher(
    plan: PublisherPlan,
    token: String,
    shared: Arc<Shared>,
    mut links: PublisherLinks,
) -> PublisherResult {
    let args = &shared.args;
    let base = args.publish_url.as_deref().unwrap_or(&args.common.url);
    let url = client::ws_url_with_token(&client::ws_endpoint(base), &token);
    // Publishers are members too; their own completion is not counted.
    let room = shared.room_of(plan.index);
    let counts = shared.counts_in(room);
    let mut recorder = Recorder::new(room, &counts, Arc::new(AtomicUsize::new(0)));
    let setup = shared
        .connect_and_join(&url, room, |text| recorder.frame(text, |_| {}))
        .await;
    let _ = links.ready.send(setup.is_ok());
    let Joined {
        ws,
        welcomed,
        joined,
    } = match setup {
        Ok(joined) => joined,
        Err(e) => {
            let _ = links.published.send(());
            return PublisherResult::new(&plan, MemberResult::failed(e, recorder));
        }
    };
    let start = wait_for_start(&mut links.go, links.deadline).await;
    let (mut sink, mut stream) = ws.split();
    // Send times by sequence number (µs since epoch), read by the reader.
    let send_times: Vec<AtomicU64> = (0..plan.count).map(|_| AtomicU64::new(0)).collect();
    let pad = padding(plan.index, plan.count, now_us(), args.payload_bytes);
    let room_name = shared.room_name(room);
    let outbox = Outbox {
        room: &room_name,
        pad: &pad,
        send_times: &send_times,
        acks_outstanding: &links.acks_outstanding,
    };
    let mut book = AckBook::new(&send_times, &links.acks_outstanding);
    let mut stop = links.stop.clone();
    // The reader and the writer share the connection until stop.
    let reader = client::read_until_stop(&mut stream, &mut stop, |text| {
        recorder.frame(text, |f| book.on_reply(f))
    });
    let writer = async {
        let stats = write_messages(&mut sink, &plan, start, links.deadline, &outbox).await;
        let _ = links.published.send(());
        stats
    };
    let (end, stats) = tokio::join!(reader, writer);
    let closed_cleanly = client::close_after(&end, &mut sink, &mut stream).await;
    let member = MemberResult::ended((welcomed, joined), recorder, &end, closed_cleanly);
    let mut result = PublisherResult::new(&plan, member);
    result.sent = stats.sent;
    result.first_send_us = stats.first_us;
    result.last_send_us = stats.last_us;
    result.late_sends = stats.late;
    result.acked = book.acked;
    result.refused = book.refused;
    result.acked_seqs = book.acked_seqs;
    result.ack_latency = book.latency;
    result
}

impl PublisherResult {
    /// Nothing sent yet.
    fn new(plan: &PublisherPlan, member: MemberResult) -> Self {
        PublisherResult {
            member,
            sent: 0,
            acked: 0,
            refused: 0,
            acked_seqs: vec![false; plan.count as usize],
            ack_latency: Latency::new(),
            first_send_us: 0,
            last_send_us: 0,
            late_sends: 0,
        }
    }
}

/// Wait for the common start (bounded by the run's deadline); `None` when
/// the deadline came first.
async fn wait_for_start(
    go: &mut watch::Receiver<Option<Instant>>,
    deadline: Instant,
) -> Option<Instant> {
    loop {
        if let Some(start) = *go.borrow() {
            return Some(start);
        }
        if Instant::now() >= deadline
            || timeout(deadline - Instant::now(), go.changed())
                .await
                .is_err()
        {
            return None;
        }
    }
}

/// The answers to one publisher's publishes: acks (with their latency) and
/// refusals, matched by `ref` (message k has ref k + 2).
struct AckBook<'a> {
    send_times: &'a [AtomicU64],
    acks_outstanding: &'a AtomicU64,
    acked_seqs: Vec<bool>,
    latency: Latency,
    acked: u64,
    refused: u64,
}

impl<'a> AckBook<'a> {
    fn new(send_times: &'a [AtomicU64], acks_outstanding: &'a AtomicU64) -> Self {
        AckBook {
            send_times,
            acks_outstanding,
            acked_seqs: vec![false; send_times.len()],
            latency: Latency::new(),
            acked: 0,
            refused: 0,
        }
    }

    fn on_reply(&mut self, f: &ServerFrame) {
        let Some(seq) = f.ref_number().and_then(|r| r.checked_sub(2)) else {
            return;
        };
        let Some(sent_at) = self.send_times.get(seq as usize) else {
            return;
        };
        let sent_at = sent_at.load(Ordering::Relaxed);
        if sent_at == 0 {
            return;
        }
        if f.kind == "ack" && f.id.is_some() {
            if !self.acked_seqs[seq as usize] {
                self.acked_seqs[seq as usize] = true;
                self.acked += 1;
                self.latency.record(now_us().saturating_sub(sent_at));
                self.acks_outstanding.fetch_sub(1, Ordering::Relaxed);
            }
        } else if f.kind == "error" {
            self.refused += 1;
            self.acks_outstanding.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What a publisher's writer needs for each publish.
struct Outbox<'a> {
    room: &'a str,
    pad: &'a str,
    send_times: &'a [AtomicU64],
    acks_outstanding: &'a AtomicU64,
}

/// What the writer did.
#[derive(Default)]
struct SendStats {
    sent: u64,
    first_us: u64,
    last_us: u64,
    late: u64,
}

/// Publish message after message on `plan`'s schedule from `start`, until
/// all are sent, the deadline, or a send fails.
async fn write_messages(
    sink: &mut WsSink,
    plan: &PublisherPlan,
    start: Option<Instant>,
    deadline: Instant,
    outbox: &Outbox<'_>,
) -> SendStats {
    let mut stats = SendStats::default();
    let Some(start) = start else {
        return stats;
    };
    for k in 0..plan.count {
        let due = start + plan.offset + plan.interval.mul_f64(k as f64);
        if due >= deadline {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        if Instant::now() > due + LATE {
            stats.late += 1;
        }
        let t_us = now_us();
        let data = BenchData {
            seq: k,
            publisher: plan.index,
            t_us,
            pad: outbox.pad,
        };
        let frame = serde_json::json!({
            "type": "publish", "room": outbox.room, "data": data, "ref": k + 2,
        })
        .to_string();
        outbox.send_times[k as usize].store(t_us, Ordering::Relaxed);
        outbox.acks_outstanding.fetch_add(1, Ordering::Relaxed);
        if sink.send(Message::text(frame)).await.is_err() {
            outbox.acks_outstanding.fetch_sub(1, Ordering::Relaxed);
            break;
        }
        if stats.sent == 0 {
            stats.first_us = t_us;
        }
        stats.sent += 1;
        stats.last_us = t_us;
    }
    stats
}
