//! The `fanout` report: setup, what was published, what was delivered to
//! whom (against what was acked), the publishers' own copies, closing, and
//! the verdict.

use std::time::Duration;

use super::publisher::PublisherResult;
use super::subscriber::MemberResult;
use super::Drain;
use crate::cpu::{cores, CpuMeter};
use crate::latency::{Latency, P50_P90_P99, P50_P99};
use crate::report::{count_into, fmt_counts, merge_counts, per_s, print_result, Counts};
use crate::server_stats::{latency_summary, ServerStats};
use crate::FanoutArgs;

/// Everything the report reads.
pub struct Run<'a> {
    pub args: &'a FanoutArgs,
    pub subs: &'a [MemberResult],
    pub pubs: &'a [PublisherResult],
    /// Subscriber setups that ended before the deadline.
    pub settled: usize,
    pub connect_elapsed: Duration,
    pub drain: &'a Drain,
    pub run_cpu: &'a CpuMeter,
    pub stats: &'a ServerStats,
}

/// Print the report; whether the run was OK, and the run as one step of
/// bench/compare.sh's JSON (`rate`, `delivery_ratio`, `latency_ms`, …).
pub async fn print(run: Run<'_>) -> (bool, serde_json::Value) {
    let args = run.args;
    println!();
    let subs: Vec<&MemberResult> = run.subs.iter().collect();
    setup_summary(&subs, "subscribers", run.connect_elapsed);
    let pubs_ok = print_publishers(run.pubs);
    let published = Published::of(run.pubs);
    published.print(args);
    let delivered = Deliveries::of(run.subs, run.pubs);
    delivered.print(&published, run.drain);
    let own = OwnCopies::of(run.pubs);
    own.print();
    let total_members = delivered.subscribers + pubs_ok;
    println!(
        "closing:     {} of {total_members} connections closed with a completed close handshake",
        delivered.clean + own.clean
    );
    run.stats
        .await_connections(0, Duration::from_secs(10))
        .await;
    println!("cpu (whole run): {}", run.run_cpu.since(cores()));
    let ok = run.settled == args.subscribers
        && delivered.subscribers == args.subscribers
        && pubs_ok == args.publishers
        && published.sent == args.messages
        && published.acked == published.sent
        && delivered.is_perfect()
        && own.is_perfect()
        && run.drain.acks_in;
    print_result(
        ok,
        "every acked message reached every member once, in order",
    );
    (ok, step_json(args, &published, &delivered, ok))
}

/// One step as the harness writes it.
fn step_json(
    args: &FanoutArgs,
    published: &Published,
    delivered: &Deliveries,
    ok: bool,
) -> serde_json::Value {
    let window_s = delivered.last_rx_us.saturating_sub(published.first_send_us) as f64 / 1e6;
    let ratio = if delivered.expected > 0 {
        delivered.received as f64 / delivered.expected as f64
    } else {
        0.0
    };
    let per_s = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    serde_json::json!({
        "rate": args.rate,
        "achieved_rate": per_s(published.sent.saturating_sub(1), published.window_s),
        "sent": published.sent,
        "acked": published.acked,
        "expected": delivered.expected,
        "received": delivered.received,
        "delivery_ratio": ratio,
        "deliveries_per_s": per_s(delivered.received, window_s),
        "latency_ms": delivered.latency.json_ms(),
        "ack_latency_ms": published.ack_latency.json_ms(),
        "errors": delivered.errors.values().sum::<u64>() + published.refused,
        "closes": delivered.server_closes.values().sum::<u64>(),
        "missing": delivered.missing,
        "duplicates": delivered.duplicates,
        "out_of_order": delivered.out_of_order + delivered.id_order_violations,
        "ok": ok,
    })
}

/// `subscribers: N of M connected and joined …` and the setup latencies.
fn setup_summary(results: &[&MemberResult], label: &str, elapsed: Duration) {
    let (mut welcome, mut joined) = (Latency::new(), Latency::new());
    let mut failures = Counts::new();
    for r in results {
        match &r.setup {
            Ok((w, j)) => {
                welcome.record(w.as_micros() as u64);
                joined.record(j.as_micros() as u64);
            }
            Err(e) => count_into(&mut failures, e.clone()),
        }
    }
    println!(
        "{label}: {} of {} connected and joined in {:.2} s ({})",
        welcome.total(),
        results.len(),
        elapsed.as_secs_f64(),
        per_s(welcome.total(), elapsed.as_secs_f64(), "connections")
    );
    println!("  time to welcome:  {}", welcome.summary_ms(&P50_P99));
    println!("  time to join ack: {}", joined.summary_ms(&P50_P99));
    if !failures.is_empty() {
        println!("  FAILURES: {}", fmt_counts(&failures));
    }
}

/// `publishers:  N of M connected and joined` and each failure; how many
/// joined.
fn print_publishers(pubs: &[PublisherResult]) -> usize {
    let joined = pubs.iter().filter(|p| p.member.setup.is_ok()).count();
    println!(
        "publishers:  {joined} of {} connected and joined",
        pubs.len()
    );
    for p in pubs {
        if let Err(e) = &p.member.setup {
            println!("  FAILURE: {e}");
        }
    }
    joined
}

/// What the publishers sent and how it was answered.
struct Published {
    sent: u64,
    acked: u64,
    refused: u64,
    late: u64,
    /// The earliest send, µs since the epoch (0: none).
    first_send_us: u64,
    window_s: f64,
    ack_latency: Latency,
}

impl Published {
    fn of(pubs: &[PublisherResult]) -> Self {
        let first_send_us = pubs
            .iter()
            .map(|p| p.first_send_us)
            .filter(|&t| t > 0)
            .min()
            .unwrap_or(0);
        let last_send_us = pubs.iter().map(|p| p.last_send_us).max().unwrap_or(0);
        let mut ack_latency = Latency::new();
        for p in pubs {
            ack_latency.merge(&p.ack_latency);
        }
        Published {
            sent: pubs.iter().map(|p| p.sent).sum(),
            acked: pubs.iter().map(|p| p.acked).sum(),
            refused: pubs.iter().map(|p| p.refused).sum(),
            late: pubs.iter().map(|p| p.late_sends).sum(),
            first_send_us,
            window_s: last_send_us.saturating_sub(first_send_us) as f64 / 1e6,
            ack_latency,
        }
    }

    fn print(&self, args: &FanoutArgs) {
        println!();
        println!(
            "published:   {} of {} sent in {:.2} s ({} achieved, {} msg/s asked), {} acked with an id, \
             {} refused with an error, {} unanswered",
            self.sent,
            args.messages,
            self.window_s,
            per_s(self.sent.saturating_sub(1), self.window_s, "msg"),
            args.rate,
            self.acked,
            self.refused,
            self.sent.saturating_sub(self.acked + self.refused),
        );
        if self.sent < args.messages {
            println!(
                "  CUT SHORT: {} messages not sent (--duration-s {} ended the run, or a publisher failed)",
                args.messages - self.sent,
                args.common.duration_s
            );
        }
        if self.late > 0 {
            println!(
                "  note: {} sends started >10 ms behind schedule (the bench could not keep the rate)",
                self.late
            );
        }
        println!(
            "  publish ack latency: {}",
            self.ack_latency.summary_ms(&P50_P99)
        );
    }
}

/// What the subscribers that joined received, against what was acked.
#[derive(Default)]
struct Deliveries {
    /// Subscribers that joined.
    subscribers: usize,
    expected: u64,
    received: u64,
    missing: u64,
    unacked_received: u64,
    subs_missing: usize,
    worst_missing: u64,
    duplicates: u64,
    out_of_order: u64,
    id_order_violations: u64,
    foreign: u64,
    presence: u64,
    /// The last delivery, µs since the epoch.
    last_rx_us: u64,
    latency: Latency,
    errors: Counts,
    other: Counts,
    server_closes: Counts,
    stream_errors: Counts,
    clean: usize,
}

impl Deliveries {
    fn of(subs: &[MemberResult], pubs: &[PublisherResult]) -> Self {
        let mut d = Deliveries::default();
        for s in subs.iter().filter(|s| s.setup.is_ok()) {
            d.add(s, &acked_in(pubs, s.recorder.room));
        }
        d
    }

    fn add(&mut self, s: &MemberResult, acked_sets: &[&[bool]]) {
        let r = &s.recorder;
        self.subscribers += 1;
        self.expected += acked_count(acked_sets);
        self.latency.merge(&r.latency);
        self.received += r.unique;
        let (missing, unacked) = compare_with_acked(acked_sets, |p, seq| r.has(p, seq));
        self.missing += missing;
        self.unacked_received += unacked;
        if missing > 0 {
            self.subs_missing += 1;
            self.worst_missing = self.worst_missing.max(missing);
        }
        self.duplicates += r.duplicates;
        self.out_of_order += r.out_of_order;
        self.id_order_violations += r.id_order_violations;
        self.foreign += r.foreign;
        self.presence += r.presence_frames;
        if r.unique > 0 {
            self.last_rx_us = self.last_rx_us.max(r.last_rx_us);
        }
        merge_counts(&mut self.errors, &r.errors);
        merge_counts(&mut self.other, &r.other_frames);
        if let Some(c) = &s.server_close {
            count_into(&mut self.server_closes, c.clone());
        }
        if let Some(e) = &s.stream_error {
            count_into(&mut self.stream_errors, e.clone());
        }
        self.clean += usize::from(s.closed_cleanly);
    }

    fn is_perfect(&self) -> bool {
        self.missing == 0
            && self.duplicates == 0
            && self.out_of_order == 0
            && self.id_order_violations == 0
            && self.server_closes.is_empty()
            && self.stream_errors.is_empty()
            && self.errors.is_empty()
    }

    fn print(&self, published: &Published, drain: &Drain) {
        let window_s = self.last_rx_us.saturating_sub(published.first_send_us) as f64 / 1e6;
        println!();
        println!(
            "deliveries:  {} received of {} expected ({} subscribers × the acked messages of \
             their room, {} in all); drained {:.2} s after the last publish{}",
            self.received,
            self.expected,
            self.subscribers,
            published.acked,
            drain.drained_after.as_secs_f64(),
            if drain.all_delivered {
                ""
            } else {
                " (drain limit reached)"
            },
        );
        println!(
            "  missing {} (on {} subscribers, worst {}), duplicates {}, \
             out of order {} (by publisher seq), id order violations {}",
            self.missing,
            self.subs_missing,
            self.worst_missing,
            self.duplicates,
            self.out_of_order,
            self.id_order_violations
        );
        if self.unacked_received > 0 || self.foreign > 0 {
            println!(
                "  also received: {} deliveries of messages never acked, \
                 {} messages not from this run",
                self.unacked_received, self.foreign
            );
        }
        println!(
            "  throughput: {} (first publish → last delivery, {window_s:.2} s)",
            per_s(self.received, window_s, "deliveries"),
        );
        println!(
            "  latency (publisher clock → subscriber): {}",
            self.latency.summary_ms(&P50_P90_P99)
        );
        print_server_latency(drain);
        println!("  cpu while publishing and draining: {}", drain.publish_cpu);
        println!(
            "  presence frames (joined/left) received: {}",
            self.presence
        );
        self.print_problems();
    }

    fn print_problems(&self) {
        if !self.errors.is_empty() {
            println!("  ERROR frames: {}", fmt_counts(&self.errors));
        }
        if !self.other.is_empty() {
            println!("  other frames: {}", fmt_counts(&self.other));
        }
        if !self.server_closes.is_empty() {
            println!(
                "  CLOSED BY SERVER during the run: {}",
                fmt_counts(&self.server_closes)
            );
        }
        if !self.stream_errors.is_empty() {
            println!("  STREAM ERRORS: {}", fmt_counts(&self.stream_errors));
        }
    }
}

/// One member against the acked messages (`acked_sets[publisher][seq]`):
/// (acked but not received, received but never acked).
/// Per publisher, what it had acked into `room` (nothing from the
/// publishers of other rooms).
fn acked_in(pubs: &[PublisherResult], room: usize) -> Vec<&[bool]> {
    pubs.iter()
        .map(|p| match p.member.recorder.room == room {
            true => p.acked_seqs.as_slice(),
            false => &[],
        })
        .collect()
}

/// How many messages `sets` (from [`acked_in`]) say were acked.
fn acked_count(sets: &[&[bool]]) -> u64 {
    sets.iter()
        .map(|set| set.iter().filter(|&&a| a).count() as u64)
        .sum()
}

fn compare_with_acked(acked_sets: &[&[bool]], has: impl Fn(usize, u64) -> bool) -> (u64, u64) {
    let (mut missing, mut unacked) = (0, 0);
    for (p, set) in acked_sets.iter().enumerate() {
        for (seq, &was_acked) in set.iter().enumerate() {
            match (was_acked, has(p, seq as u64)) {
                (true, false) => missing += 1,
                (false, true) => unacked += 1,
                _ => {}
            }
        }
    }
    (missing, unacked)
}

fn print_server_latency(drain: &Drain) {
    match (&drain.metrics_before, &drain.metrics_after) {
        (Ok(before), Ok(after)) => println!(
            "  server-side latency (publish → written to the socket, from its /metrics): {}",
            latency_summary(before, after)
        ),
        (Err(e), _) | (_, Err(e)) => println!("  server-side latency: unavailable ({e})"),
    }
}

/// The copies the publishers received of the room's messages (they are
/// members of the room too).
#[derive(Default)]
struct OwnCopies {
    /// What the publishers that joined should have received: every acked
    /// message of their room.
    expected: u64,
    received: u64,
    duplicates: u64,
    out_of_order: u64,
    id_order_violations: u64,
    errors: Counts,
    latency: Latency,
    /// Publishers the server closed during the run.
    server_closes: usize,
    clean: usize,
}

impl OwnCopies {
    /// Tallies the publishers, printing each one the server closed or whose
    /// connection failed.
    fn of(pubs: &[PublisherResult]) -> Self {
        let mut own = OwnCopies::default();
        for p in pubs {
            let r = &p.member.recorder;
            if p.member.setup.is_ok() {
                own.expected += acked_count(&acked_in(pubs, r.room));
            }
            own.latency.merge(&r.latency);
            own.received += r.unique;
            own.duplicates += r.duplicates;
            own.out_of_order += r.out_of_order;
            own.id_order_violations += r.id_order_violations;
            merge_counts(&mut own.errors, &r.errors);
            if let Some(c) = &p.member.server_close {
                own.server_closes += 1;
                println!("  PUBLISHER CLOSED BY SERVER: {c}");
            }
            if let Some(e) = &p.member.stream_error {
                println!("  PUBLISHER STREAM ERROR: {e}");
            }
            own.clean += usize::from(p.member.closed_cleanly);
        }
        own
    }

    fn is_perfect(&self) -> bool {
        self.received == self.expected
            && self.duplicates + self.out_of_order + self.id_order_violations == 0
            && self.server_closes == 0
    }

    fn print(&self) {
        let expected = self.expected;
        println!(
            "  publishers' own copies: {} received of {expected} expected, duplicates {}, \
             out of order {}, id order violations {}{}",
            self.received,
            self.duplicates,
            self.out_of_order,
            self.id_order_violations,
            if self.errors.is_empty() {
                String::new()
            } else {
                format!(", errors: {}", fmt_counts(&self.errors))
            }
        );
        println!(
            "  publishers' own copies latency: {}",
            self.latency.summary_ms(&P50_P99)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_compared_with_what_was_acked() {
        let p0 = [true, true, false];
        let p1 = [true];
        let acked: Vec<&[bool]> = vec![&p0, &p1];
        // Received: p0 seq 0 and 2 (2 was never acked), nothing from p1.
        let got = |p: usize, seq: u64| p == 0 && seq != 1;
        assert_eq!(compare_with_acked(&acked, got), (2, 1));
        assert_eq!(compare_with_acked(&acked, |_, _| false), (3, 0));
    }
}
