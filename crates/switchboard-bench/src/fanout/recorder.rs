//! What one room member saw of the run: which of the bench's messages
//! arrived (one bit per publisher and sequence number), duplicates, order by
//! publisher and by message id, latency, and the other frames it got.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use switchboard::protocol::MessageId;

use super::payload::BenchDataIn;
use crate::client::ServerFrame;
use crate::clock::now_us;
use crate::latency::Latency;
use crate::report::{count_into, Counts};

pub struct Recorder {
    /// The member's room (`--rooms`), whose publishers it hears.
    pub room: usize,
    pub latency: Latency,
    /// Per publisher, one bit per sequence number: received at least once.
    seen: Vec<Vec<u64>>,
    highest: Vec<Option<u64>>,
    pub unique: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Message ids that did not strictly increase (docs/protocol.md §7: id order).
    pub id_order_violations: u64,
    last_id: Option<MessageId>,
    /// Messages in the room that were not the bench's (or out of range).
    pub foreign: u64,
    pub last_rx_us: u64,
    pub presence_frames: u64,
    pub errors: Counts,
    pub other_frames: Counts,
    /// Unique messages expected; `complete` counts recorders reaching it.
    target: u64,
    complete: Arc<AtomicUsize>,
}

impl Recorder {
    /// For a member of `room`, where publisher `p` sends `per_publisher[p]`
    /// messages into it.
    pub fn new(room: usize, per_publisher: &[u64], complete: Arc<AtomicUsize>) -> Self {
        Recorder {
            room,
            latency: Latency::new(),
            seen: per_publisher
                .iter()
                .map(|&n| vec![0u64; n.div_ceil(64) as usize])
                .collect(),
            highest: vec![None; per_publisher.len()],
            unique: 0,
            duplicates: 0,
            out_of_order: 0,
            id_order_violations: 0,
            last_id: None,
            foreign: 0,
            last_rx_us: 0,
            presence_frames: 0,
            errors: Counts::new(),
            other_frames: Counts::new(),
            target: per_publisher.iter().sum(),
            complete,
        }
    }

    /// Whether message `seq` of `publisher` arrived.
    pub fn has(&self, publisher: usize, seq: u64) -> bool {
        self.seen
            .get(publisher)
            .and_then(|bits| bits.get((seq / 64) as usize))
            .is_some_and(|word| word & (1 << (seq % 64)) != 0)
    }

    /// One text frame. Acks and errors also go to `on_reply` (publishers
    /// match them to their publishes).
    pub fn frame(&mut self, text: &str, mut on_reply: impl FnMut(&ServerFrame)) {
        let now = now_us();
        let frame = match serde_json::from_str::<ServerFrame>(text) {
            Ok(f) => f,
            Err(_) => {
                count_into(&mut self.other_frames, "unparsable");
                return;
            }
        };
        match frame.kind.as_ref() {
            "message" => self.message(&frame, now),
            "joined" | "left" => self.presence_frames += 1,
            "ack" => on_reply(&frame),
            "error" => {
                count_into(&mut self.errors, frame.code.as_deref().unwrap_or("?"));
                on_reply(&frame);
            }
            other => count_into(&mut self.other_frames, other),
        }
    }

    fn message(&mut self, frame: &ServerFrame, now: u64) {
        if let Some(id) = frame
            .id
            .as_deref()
            .and_then(|id| id.parse::<MessageId>().ok())
        {
            if self.last_id.is_some_and(|last| id <= last) {
                self.id_order_violations += 1;
            }
            self.last_id = Some(id);
        }
        let Some(data) = frame
            .data
            .and_then(|d| serde_json::from_str::<BenchDataIn>(d.get()).ok())
        else {
            self.foreign += 1;
            return;
        };
        let (p, seq) = (data.publisher, data.seq);
        let Some(word) = self
            .seen
            .get_mut(p)
            .and_then(|bits| bits.get_mut((seq / 64) as usize))
        else {
            self.foreign += 1;
            return;
        };
        let bit = 1u64 << (seq % 64);
        if *word & bit != 0 {
            self.duplicates += 1;
            return;
        }
        *word |= bit;
        if self.highest[p].is_some_and(|h| seq < h) {
            self.out_of_order += 1;
        }
        self.highest[p] = Some(self.highest[p].map_or(seq, |h| h.max(seq)));
        self.unique += 1;
        self.latency.record(now.saturating_sub(data.t_us));
        self.last_rx_us = now;
        if self.unique == self.target {
            self.complete.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str, publisher: usize, seq: u64) -> String {
        serde_json::json!({
            "type": "message", "room": "bench", "id": id,
            "data": {"seq": seq, "pub": publisher, "t_us": now_us(), "pad": "xx"},
        })
        .to_string()
    }

    #[test]
    fn a_complete_in_order_run_is_counted_once() {
        let complete = Arc::new(AtomicUsize::new(0));
        let mut r = Recorder::new(0, &[2, 1], complete.clone());
        r.frame(&message("10-0", 0, 0), |_| {});
        r.frame(&message("10-1", 1, 0), |_| {});
        assert_eq!(complete.load(Ordering::Relaxed), 0);
        r.frame(&message("11-0", 0, 1), |_| {});
        assert_eq!(complete.load(Ordering::Relaxed), 1);
        assert_eq!((r.unique, r.duplicates, r.out_of_order), (3, 0, 0));
        assert_eq!(r.id_order_violations, 0);
        assert!(r.has(0, 1) && r.has(1, 0) && !r.has(1, 1) && !r.has(5, 0));
        assert_eq!(r.latency.total(), 3);
    }

    #[test]
    fn duplicates_reordering_and_id_regressions_are_counted() {
        let mut r = Recorder::new(0, &[3], Arc::new(AtomicUsize::new(0)));
        r.frame(&message("10-2", 0, 2), |_| {});
        r.frame(&message("10-10", 0, 0), |_| {}); // 10-10 > 10-2: numeric order
        r.frame(&message("10-3", 0, 0), |_| {});
        assert_eq!((r.unique, r.duplicates, r.out_of_order), (2, 1, 1));
        assert_eq!(r.id_order_violations, 1);
    }

    #[test]
    fn other_frames_are_sorted_into_their_tallies() {
        let mut r = Recorder::new(0, &[1], Arc::new(AtomicUsize::new(0)));
        let mut replies = Vec::new();
        for text in [
            r#"{"type":"joined","room":"bench","user":"u"}"#,
            r#"{"type":"left","room":"bench","user":"u"}"#,
            r#"{"type":"ack","ref":3,"id":"1-0"}"#,
            r#"{"type":"error","ref":4,"code":"rate_limited"}"#,
            r#"{"type":"message","room":"bench","id":"1-1","data":{"hello":1}}"#,
            r#"{"type":"message","room":"bench","data":{"seq":99,"pub":0,"t_us":1}}"#,
            r#"{"type":"pong"}"#,
            "not json",
        ] {
            r.frame(text, |f| replies.push(f.ref_number()));
        }
        assert_eq!(replies, vec![Some(3), Some(4)]);
        assert_eq!((r.presence_frames, r.foreign, r.unique), (2, 2, 0));
        assert_eq!(crate::report::fmt_counts(&r.errors), "1× rate_limited");
        assert_eq!(
            crate::report::fmt_counts(&r.other_frames),
            "1× pong, 1× unparsable"
        );
    }
}
