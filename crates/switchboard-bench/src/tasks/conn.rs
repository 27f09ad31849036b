//! One client connection of the tasks scenario: between phases it only
//! reads (answering pings); given an [`Order`] it submits its share of the
//! phase's tasks, follows each from `ack` to `done`, checks each result,
//! and answers with an [`Outcome`].
//!
//! Submissions are pipelined: every task due is written, then the socket is
//! flushed once. The server answers a connection's requests in order
//! (`ack`, then `task` `queued`); `running` and `done` come later through
//! the user's channel, so a `done` is matched by `task_id`, which the ack
//! named. A `done` seen before its ack (the server promises it cannot be)
//! is kept until the ack and counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use super::hist::Hist;
use super::payload::{result_matches, task_frame, Payloads};
use crate::client::{close_cleanly, close_description, Ws, WsSink, WsStream};
use crate::report::{count_into, merge_counts, Counts};

/// Which tasks a connection submits in a phase, and when.
#[derive(Clone)]
pub enum Plan {
    /// Task numbers from the shared `next` below `total`, as fast as the
    /// server takes them, with at most `window` of this connection's tasks
    /// unfinished (submitted, `done` not seen) at a time.
    Greedy {
        next: Arc<AtomicU64>,
        total: u64,
        window: usize,
    },
    /// Tasks `first`, `first + stride`, … below `total`; task `k` is due at
    /// `start + k / rate` and sent then (at once when late).
    Scheduled {
        start: Instant,
        rate: f64,
        first: u64,
        stride: u64,
        total: u64,
    },
}

impl Plan {
    fn due(&self, k: u64) -> Option<Instant> {
        match self {
            Plan::Scheduled { start, rate, .. } => {
                Some(*start + Duration::from_secs_f64(k as f64 / rate))
            }
            Plan::Greedy { .. } => None,
        }
    }
}

/// A phase for one connection.
pub struct Order {
    pub plan: Plan,
    /// Added to the phase's task numbers in payloads: every payload of the
    /// run is distinct.
    pub base: u64,
    /// With tasks unfinished: how long without any frame or submit before
    /// they are given up as lost.
    pub drain: Duration,
    /// The end of the whole run.
    pub deadline: Instant,
    /// Counts this phase's tasks that ended (done, failed or refused), over
    /// all connections.
    pub finished: Arc<AtomicU64>,
    pub reply: oneshot::Sender<Outcome>,
}

/// What one connection (or, merged, a phase) saw.
#[derive(Default)]
pub struct Outcome {
    pub submitted: u64,
    /// `done` with the right result.
    pub done: u64,
    /// `done` with another result.
    pub wrong: u64,
    /// `failed`, by error.
    pub failed: Counts,
    /// `error` frames answering a submission, by code.
    pub refused: Counts,
    /// Submitted, neither finished nor refused within the drain time.
    pub lost: u64,
    /// `queued`, `running`, … frames by status, and frames about tasks
    /// this phase did not submit (`unknown …`).
    pub frames: Counts,
    /// A `done` before the ack naming its task.
    pub done_before_ack: u64,
    pub first_submit: Option<Instant>,
    pub last_submit: Option<Instant>,
    pub last_done: Option<Instant>,
    /// Due time (greedy: submit time) to `done`.
    pub latency: Hist,
    /// Submit to `ack`.
    pub ack: Hist,
    /// The latest a task was sent after it was due, µs.
    pub max_lag_us: u64,
    /// Connections whose socket failed or was closed, and why.
    pub broken: Counts,
    /// The slowest tasks: (latency µs, task id), slowest first.
    pub slowest: Vec<(u64, String)>,
    /// Some of the lost tasks' ids (those acked; sorted).
    pub lost_ids: Vec<String>,
}

/// Slowest tasks kept per phase.
const SLOWEST_KEPT: usize = 5;

/// Keeps the `SLOWEST_KEPT` largest of `list` plus `more`, largest first.
pub fn keep_slowest(list: &mut Vec<(u64, String)>, more: impl IntoIterator<Item = (u64, String)>) {
    list.extend(more);
    list.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    list.truncate(SLOWEST_KEPT);
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn latest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

impl Outcome {
    pub fn merge(&mut self, o: &Outcome) {
        self.submitted += o.submitted;
        self.done += o.done;
        self.wrong += o.wrong;
        merge_counts(&mut self.failed, &o.failed);
        merge_counts(&mut self.refused, &o.refused);
        self.lost += o.lost;
        merge_counts(&mut self.frames, &o.frames);
        self.done_before_ack += o.done_before_ack;
        self.first_submit = earliest(self.first_submit, o.first_submit);
        self.last_submit = latest(self.last_submit, o.last_submit);
        self.last_done = latest(self.last_done, o.last_done);
        self.latency.merge(&o.latency);
        self.ack.merge(&o.ack);
        self.max_lag_us = self.max_lag_us.max(o.max_lag_us);
        merge_counts(&mut self.broken, &o.broken);
        keep_slowest(&mut self.slowest, o.slowest.iter().cloned());
        self.lost_ids.extend(o.lost_ids.iter().cloned());
        self.lost_ids.sort();
        self.lost_ids.truncate(SLOWEST_KEPT);
    }
}

/// The fields of a server frame this scenario reads.
#[derive(Deserialize)]
pub struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, rename = "ref", borrow)]
    reference: Option<&'a RawValue>,
    #[serde(default, borrow)]
    task_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    status: Option<&'a str>,
    #[serde(default, borrow)]
    result: Option<&'a RawValue>,
    #[serde(default, borrow)]
    error: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    code: Option<&'a str>,
}

/// A submitted task.
struct Slot {
    k: u64,
    due: Instant,
    sent: Instant,
}

/// How a task ended, seen before its ack.
enum Early {
    Done(Instant, Option<String>),
    Failed(String),
}

/// The frames that matter, classified.
#[derive(Debug, PartialEq)]
pub enum Event<'a> {
    Ack {
        reference: u64,
        task_id: &'a str,
    },
    Refused {
        reference: Option<u64>,
        code: &'a str,
    },
    Done {
        task_id: &'a str,
        result: Option<&'a str>,
    },
    Failed {
        task_id: &'a str,
        error: &'a str,
    },
    Status {
        status: &'a str,
    },
    Other,
}

/// What a parsed frame means.
pub fn classify<'a>(f: &'a Incoming<'a>) -> Event<'a> {
    let reference = f.reference.and_then(|r| r.get().parse::<u64>().ok());
    let task_id = f.task_id.as_deref();
    match (f.kind, task_id) {
        ("ack", Some(task_id)) => match reference {
            Some(reference) => Event::Ack { reference, task_id },
            None => Event::Other,
        },
        ("error", _) => Event::Refused {
            reference,
            code: f.code.unwrap_or("?"),
        },
        ("task", Some(task_id)) => match f.status {
            Some("done") => Event::Done {
                task_id,
                result: f.result.map(RawValue::get),
            },
            Some("failed") => Event::Failed {
                task_id,
                error: f.error.as_deref().unwrap_or("?"),
            },
            Some(status) => Event::Status { status },
            None => Event::Other,
        },
        _ => Event::Other,
    }
}

/// A connection: waits for orders, runs each, closes when the orders end;
/// whether the close handshake completed.
pub async fn connection(
    ws: Ws,
    name_json: Arc<str>,
    payloads: Payloads,
    mut orders: mpsc::Receiver<Order>,
) -> bool {
    let (mut sink, mut stream) = ws.split();
    let mut conn = Conn {
        name_json,
        payloads,
        next_ref: 1,
        stray: Counts::new(),
        broken: None,
    };
    loop {
        let order = tokio::select! {
            order = orders.recv() => match order {
                Some(order) => order,
                None => break,
            },
            frame = stream.next(), if conn.broken.is_none() => {
                conn.idle_frame(frame);
                continue;
            }
        };
        let reply = order.reply;
        let order = PhaseOrder {
            plan: order.plan,
            base: order.base,
            drain: order.drain,
            deadline: order.deadline,
            finished: order.finished,
        };
        let outcome = conn.phase(&mut sink, &mut stream, order).await;
        let _ = reply.send(outcome);
    }
    conn.broken.is_none() && close_cleanly(&mut sink, &mut stream).await
}

struct PhaseOrder {
    plan: Plan,
    base: u64,
    drain: Duration,
    deadline: Instant,
    finished: Arc<AtomicU64>,
}

struct Conn {
    name_json: Arc<str>,
    payloads: Payloads,
    next_ref: u64,
    /// Frames between phases, counted into the next phase's.
    stray: Counts,
    broken: Option<String>,
}

/// A phase in progress on one connection.
#[derive(Default)]
struct Flight {
    by_ref: HashMap<u64, Slot>,
    by_id: HashMap<String, Slot>,
    early: HashMap<String, Early>,
}

impl Flight {
    fn unfinished(&self) -> usize {
        self.by_ref.len() + self.by_id.len()
    }
}

impl Conn {
    fn idle_frame(
        &mut self,
        frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) {
        match frame {
            Some(Ok(Message::Text(_))) => count_into(&mut self.stray, "unknown (between phases)"),
            Some(Ok(Message::Close(f))) => {
                self.broken = Some(format!(
                    "closed by server: {}",
                    close_description(f.as_ref())
                ))
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => self.broken = Some(format!("stream error: {e}")),
            None => self.broken = Some("stream ended".into()),
        }
    }

    async fn phase(
        &mut self,
        sink: &mut WsSink,
        stream: &mut WsStream,
        order: PhaseOrder,
    ) -> Outcome {
        let mut out = Outcome {
            frames: std::mem::take(&mut self.stray),
            ..Outcome::default()
        };
        let mut flight = Flight::default();
        let (mut next_k, mut exhausted) = match &order.plan {
            Plan::Scheduled { first, total, .. } => (*first, *first >= *total),
            Plan::Greedy { .. } => (0, false),
        };
        let mut last_activity = Instant::now();
        while self.broken.is_none() {
            // Everything due now, written, then one flush.
            let now = Instant::now();
            let mut batch = 0usize;
            match &order.plan {
                Plan::Greedy {
                    next,
                    total,
                    window,
                } => {
                    while !exhausted && flight.unfinished() < *window && self.broken.is_none() {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= *total {
                            exhausted = true;
                            break;
                        }
                        self.submit(sink, &mut flight, &mut out, order.base + k, now, now)
                            .await;
                        batch += 1;
                    }
                }
                Plan::Scheduled { stride, total, .. } => {
                    while !exhausted && self.broken.is_none() {
                        let due = order.plan.due(next_k).expect("scheduled");
                        if due > now {
                            break;
                        }
                        self.submit(sink, &mut flight, &mut out, order.base + next_k, due, now)
                            .await;
                        batch += 1;
                        next_k += stride;
                        exhausted = next_k >= *total;
                    }
                }
            }
            if batch > 0 {
                if let Err(e) = sink.flush().await {
                    self.broken = Some(format!("sending: {e}"));
                    break;
                }
                last_activity = Instant::now();
            }
            if exhausted && flight.unfinished() == 0 {
                break;
            }
            // Wait for a frame, the next due task, or the drain limit.
            let stall_at = last_activity + order.drain;
            let next_due = if exhausted {
                None
            } else {
                order.plan.due(next_k)
            };
            let mut wake = order.deadline;
            if flight.unfinished() > 0 {
                wake = wake.min(stall_at);
            }
            if let Some(d) = next_due {
                wake = wake.min(d);
            }
            tokio::select! {
                frame = stream.next() => {
                    match frame {
                        Some(Ok(Message::Text(text))) => {
                            // Only frames count as progress (not the server's pings).
                            last_activity = Instant::now();
                            let unfinished = flight.unfinished();
                            self.on_text(text.as_str(), &mut flight, &mut out);
                            let ended = unfinished.saturating_sub(flight.unfinished());
                            if ended > 0 {
                                order.finished.fetch_add(ended as u64, Ordering::Relaxed);
                            }
                        }
                        Some(Ok(Message::Close(f))) => {
                            self.broken = Some(format!("closed by server: {}", close_description(f.as_ref())));
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => self.broken = Some(format!("stream error: {e}")),
                        None => self.broken = Some("stream ended".into()),
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    if now >= order.deadline || (flight.unfinished() > 0 && now >= stall_at) {
                        break;
                    }
                }
            }
        }
        out.lost += flight.unfinished() as u64;
        out.lost_ids = flight.by_id.keys().cloned().collect();
        out.lost_ids.sort();
        out.lost_ids.truncate(SLOWEST_KEPT);
        if !flight.early.is_empty() {
            *out.frames
                .entry("unknown task (done/failed)".into())
                .or_default() += flight.early.len() as u64;
        }
        if let Some(why) = &self.broken {
            count_into(&mut out.broken, why.clone());
        }
        out
    }

    async fn submit(
        &mut self,
        sink: &mut WsSink,
        flight: &mut Flight,
        out: &mut Outcome,
        k: u64,
        due: Instant,
        now: Instant,
    ) {
        let reference = self.next_ref;
        self.next_ref += 1;
        let frame = task_frame(&self.name_json, &self.payloads.text(k), reference);
        if let Err(e) = sink.feed(Message::text(frame)).await {
            self.broken = Some(format!("sending: {e}"));
            return;
        }
        let sent = Instant::now();
        flight.by_ref.insert(reference, Slot { k, due, sent });
        out.submitted += 1;
        out.first_submit = earliest(out.first_submit, Some(sent));
        out.last_submit = Some(sent);
        out.max_lag_us = out
            .max_lag_us
            .max(now.saturating_duration_since(due).as_micros() as u64);
    }

    fn on_text(&mut self, text: &str, flight: &mut Flight, out: &mut Outcome) {
        let Ok(frame) = serde_json::from_str::<Incoming>(text) else {
            count_into(&mut out.frames, "unparsable");
            return;
        };
        let event = classify(&frame);
        let now = Instant::now();
        match event {
            Event::Ack { reference, task_id } => {
                let Some(slot) = flight.by_ref.remove(&reference) else {
                    count_into(&mut out.frames, "unknown ack");
                    return;
                };
                out.ack
                    .record(now.saturating_duration_since(slot.sent).as_micros() as u64);
                match flight.early.remove(task_id) {
                    Some(Early::Done(at, result)) => {
                        out.done_before_ack += 1;
                        self.finish_done(&slot, task_id, at, result.as_deref(), out);
                    }
                    Some(Early::Failed(error)) => {
                        out.done_before_ack += 1;
                        count_into(&mut out.failed, error);
                    }
                    None => {
                        flight.by_id.insert(task_id.to_string(), slot);
                    }
                }
            }
            Event::Refused { reference, code } => {
                match reference.and_then(|r| flight.by_ref.remove(&r)) {
                    Some(_) => count_into(&mut out.refused, code),
                    None => count_into(
                        &mut out.frames,
                        format!("error {code} (not a submission's)"),
                    ),
                }
            }
            Event::Done { task_id, result } => match flight.by_id.remove(task_id) {
                Some(slot) => self.finish_done(&slot, task_id, now, result, out),
                None => {
                    let early = Early::Done(now, result.map(str::to_string));
                    flight.early.insert(task_id.to_string(), early);
                }
            },
            Event::Failed { task_id, error } => match flight.by_id.remove(task_id) {
                Some(_) => count_into(&mut out.failed, error),
                None => {
                    flight
                        .early
                        .insert(task_id.to_string(), Early::Failed(error.to_string()));
                }
            },
            Event::Status { status } => count_into(&mut out.frames, status),
            Event::Other => {}
        }
    }

    fn finish_done(
        &self,
        slot: &Slot,
        task_id: &str,
        at: Instant,
        result: Option<&str>,
        out: &mut Outcome,
    ) {
        if result_matches(result, &self.payloads.text(slot.k)) {
            out.done += 1;
            let us = at.saturating_duration_since(slot.due).as_micros() as u64;
            out.latency.record(us);
            if out.slowest.len() < SLOWEST_KEPT || us > out.slowest[out.slowest.len() - 1].0 {
                keep_slowest(&mut out.slowest, [(us, task_id.to_string())]);
            }
            out.last_done = latest(out.last_done, Some(at));
        } else {
            out.wrong += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(text: &str) -> String {
        match serde_json::from_str::<Incoming>(text) {
            Ok(f) => format!("Ok({:?})", classify(&f)),
            Err(_) => "Err".into(),
        }
    }

    #[test]
    fn frames_are_classified() {
        assert_eq!(
            event(r#"{"type":"ack","ref":3,"task_id":"ab"}"#),
            r#"Ok(Ack { reference: 3, task_id: "ab" })"#
        );
        assert_eq!(
            event(r#"{"type":"error","ref":4,"code":"limit_exceeded","message":"x"}"#),
            r#"Ok(Refused { reference: Some(4), code: "limit_exceeded" })"#
        );
        assert_eq!(
            event(r#"{"type":"task","task_id":"ab","status":"done","result":{"p":"1-x"}}"#),
            r#"Ok(Done { task_id: "ab", result: Some("{\"p\":\"1-x\"}") })"#
        );
        assert_eq!(
            event(r#"{"type":"task","task_id":"ab","status":"done"}"#),
            r#"Ok(Done { task_id: "ab", result: None })"#
        );
        assert_eq!(
            event(r#"{"type":"task","task_id":"ab","status":"failed","error":"boom \"x\""}"#),
            r#"Ok(Failed { task_id: "ab", error: "boom \"x\"" })"#
        );
        assert_eq!(
            event(r#"{"type":"task","task_id":"ab","status":"running"}"#),
            r#"Ok(Status { status: "running" })"#
        );
        assert_eq!(event(r#"{"type":"pong"}"#), "Ok(Other)");
        assert_eq!(event(r#"{"type":"ack","ref":1}"#), "Ok(Other)");
        assert_eq!(event("nope"), "Err");
    }

    #[test]
    fn outcomes_merge() {
        let t = Instant::now();
        let mut a = Outcome {
            submitted: 2,
            done: 2,
            first_submit: Some(t + Duration::from_millis(5)),
            last_done: Some(t + Duration::from_millis(10)),
            ..Outcome::default()
        };
        let mut b = Outcome {
            submitted: 1,
            lost: 1,
            first_submit: Some(t),
            max_lag_us: 7,
            ..Outcome::default()
        };
        count_into(&mut b.refused, "limit_exceeded");
        b.latency.record(1000);
        a.merge(&b);
        assert_eq!((a.submitted, a.done, a.lost, a.max_lag_us), (3, 2, 1, 7));
        assert_eq!(a.first_submit, Some(t));
        assert_eq!(a.last_done, Some(t + Duration::from_millis(10)));
        assert_eq!(a.refused["limit_exceeded"], 1);
        assert_eq!(a.latency.len(), 1);
    }

    #[test]
    fn the_slowest_are_kept() {
        let mut list = Vec::new();
        keep_slowest(&mut list, (1..=8).map(|i| (i * 10, format!("t{i}"))));
        assert_eq!(list.len(), SLOWEST_KEPT);
        assert_eq!(list[0], (80, "t8".to_string()));
        assert_eq!(list[4], (40, "t4".to_string()));
        keep_slowest(&mut list, [(45, "x".to_string())]);
        assert_eq!(list[4], (45, "x".to_string()));
    }

    #[test]
    fn scheduled_tasks_are_due_on_the_rate() {
        let start = Instant::now();
        let plan = Plan::Scheduled {
            start,
            rate: 200.0,
            first: 0,
            stride: 1,
            total: 10,
        };
        assert_eq!(plan.due(0), Some(start));
        assert_eq!(plan.due(3), Some(start + Duration::from_millis(15)));
        let greedy = Plan::Greedy {
            next: Arc::new(AtomicU64::new(0)),
            total: 1,
            window: 1,
        };
        assert_eq!(greedy.due(0), None);
    }
}
