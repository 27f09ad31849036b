//! A phase's numbers ([`PhaseSummary`], also the `--json` record) and the
//! report's table.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::conn::Outcome;
use super::hist::Quantiles;
use super::measure::CpuUse;
use crate::report::{fmt_counts, Counts};

/// What kind of phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Warmup,
    Throughput,
    Rate,
}

/// One phase, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseSummary {
    pub kind: Kind,
    pub label: String,
    /// The offered rate of a fixed-rate phase, tasks/s.
    pub rate: Option<f64>,
    pub planned: u64,
    pub submitted: u64,
    pub done: u64,
    pub wrong: u64,
    pub failed: Counts,
    pub refused: Counts,
    pub lost: u64,
    /// Status frames (`queued`, `running`) and anything unexpected.
    pub frames: Counts,
    pub done_before_ack: u64,
    /// First submit to the last `done` seen.
    pub secs: Option<f64>,
    /// Done / secs (the throughput of a greedy phase).
    pub tasks_per_s: Option<f64>,
    /// Submitted / (schedule start → last submit) of a fixed-rate phase.
    pub submit_per_s: Option<f64>,
    pub max_lag_ms: f64,
    /// Due time (greedy: submit) to `done`.
    pub latency: Option<Quantiles>,
    /// Tasks whose latency was over `SLOW_MS`.
    pub slow: u64,
    /// The slowest tasks: (latency ms, task id), slowest first.
    pub slowest: Vec<(f64, String)>,
    /// Some of the lost tasks' ids (acked ones).
    pub lost_ids: Vec<String>,
    /// Submit to `ack`.
    pub ack: Option<Quantiles>,
    /// Over the phase (greedy) or its submit window (fixed rate).
    pub cpu: CpuUse,
    pub redis_commands: Option<u64>,
    pub redis_cmds_per_task: Option<f64>,
    pub broken: Counts,
}

/// A task slower than this is counted apart (10 s: far beyond the
/// service time, the scale of a take-over after a visibility timeout).
pub const SLOW_MS: u64 = 10_000;

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

impl PhaseSummary {
    /// The summary of `outcome`, `planned` tasks whose schedule (fixed
    /// rate) began at `scheduled_start`.
    pub fn of(
        kind: Kind,
        label: String,
        rate: Option<f64>,
        planned: u64,
        outcome: &Outcome,
        scheduled_start: Option<Instant>,
    ) -> PhaseSummary {
        let secs = match (outcome.first_submit, outcome.last_done) {
            (Some(a), Some(b)) if b > a => Some(b.duration_since(a).as_secs_f64()),
            _ => None,
        };
        let submit_per_s = match (scheduled_start, outcome.last_submit) {
            (Some(a), Some(b)) if outcome.submitted > 1 => {
                // n tasks span n - 1 intervals of the schedule.
                let span = b.saturating_duration_since(a).as_secs_f64();
                (span > 0.0).then(|| round1((outcome.submitted - 1) as f64 / span))
            }
            _ => None,
        };
        PhaseSummary {
            kind,
            label,
            rate,
            planned,
            submitted: outcome.submitted,
            done: outcome.done,
            wrong: outcome.wrong,
            failed: outcome.failed.clone(),
            refused: outcome.refused.clone(),
            lost: outcome.lost,
            frames: outcome.frames.clone(),
            done_before_ack: outcome.done_before_ack,
            secs: secs.map(|s| (s * 1000.0).round() / 1000.0),
            tasks_per_s: secs.map(|s| round1(outcome.done as f64 / s)),
            submit_per_s,
            max_lag_ms: (Duration::from_micros(outcome.max_lag_us).as_secs_f64() * 1e5).round()
                / 100.0,
            latency: outcome.latency.quantiles(),
            slow: outcome.latency.count_above(SLOW_MS * 1000),
            slowest: outcome
                .slowest
                .iter()
                .map(|(us, id)| ((*us as f64 / 10.0).round() / 100.0, id.clone()))
                .collect(),
            lost_ids: outcome.lost_ids.clone(),
            ack: outcome.ack.quantiles(),
            cpu: CpuUse::default(),
            redis_commands: None,
            redis_cmds_per_task: None,
            broken: outcome.broken.clone(),
        }
    }

    /// Every planned task submitted and done with the right result.
    pub fn ok(&self) -> bool {
        self.submitted == self.planned
            && self.done == self.planned
            && self.wrong == 0
            && self.lost == 0
            && self.failed.is_empty()
            && self.refused.is_empty()
            && self.broken.is_empty()
    }

    /// `wrong 1, failed 2× boom, …` or `none`.
    pub fn problems(&self) -> String {
        let mut p = Vec::new();
        if self.submitted < self.planned {
            p.push(format!("{} not submitted", self.planned - self.submitted));
        }
        if self.wrong > 0 {
            p.push(format!("{} WRONG results", self.wrong));
        }
        if self.lost > 0 {
            let ids = if self.lost_ids.is_empty() {
                String::new()
            } else {
                format!(", e.g. task {}", self.lost_ids.join(", "))
            };
            p.push(format!(
                "{} LOST (no done within the drain time{ids})",
                self.lost
            ));
        }
        if !self.failed.is_empty() {
            p.push(format!("failed: {}", fmt_counts(&self.failed)));
        }
        if !self.refused.is_empty() {
            p.push(format!("refused: {}", fmt_counts(&self.refused)));
        }
        if !self.broken.is_empty() {
            p.push(format!("connections: {}", fmt_counts(&self.broken)));
        }
        if p.is_empty() {
            "none".into()
        } else {
            p.join("; ")
        }
    }

    /// The report's one-line account of the phase.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{}: {} tasks, {} submitted, {} done",
            self.label, self.planned, self.submitted, self.done
        );
        match self.kind {
            Kind::Rate => {
                if let Some(r) = self.submit_per_s {
                    s += &format!(", sent {} tasks/s", fmt_rate(r));
                }
                s += &format!(
                    " (latest send {} ms after its time)",
                    fmt_ms(self.max_lag_ms)
                );
            }
            _ => {
                if let (Some(secs), Some(r)) = (self.secs, self.tasks_per_s) {
                    s += &format!(" in {secs:.2} s: {} tasks/s", fmt_rate(r));
                }
            }
        }
        let lat = match &self.latency {
            Some(q) => format!(
                "p50 {} / p90 {} / p99 {} / max {} ms",
                fmt_ms(q.p50_ms),
                fmt_ms(q.p90_ms),
                fmt_ms(q.p99_ms),
                fmt_ms(q.max_ms)
            ),
            None => "no samples".into(),
        };
        let from = if self.kind == Kind::Rate {
            "scheduled time"
        } else {
            "submit"
        };
        s += &format!("\n  latency ({from} → done): {lat}");
        if let Some(a) = &self.ack {
            s += &format!(
                "; submit → ack p50 {} / p99 {} ms",
                fmt_ms(a.p50_ms),
                fmt_ms(a.p99_ms)
            );
        }
        if self.slow > 0 {
            let ids: Vec<String> = self
                .slowest
                .iter()
                .map(|(ms, id)| format!("{id} {}", fmt_ms(*ms)))
                .collect();
            s += &format!(
                "\n  SLOW: {} tasks over {} s; slowest (task id, ms): {}",
                self.slow,
                SLOW_MS / 1000,
                ids.join(", ")
            );
        }
        s += &format!("\n  frames: {}", fmt_counts(&self.frames));
        if self.done_before_ack > 0 {
            s += &format!(", {} done before their ack", self.done_before_ack);
        }
        let cpu = self.cpu.describe();
        if !cpu.is_empty() {
            s += &format!("\n  cpu: {cpu}");
        }
        if let (Some(c), Some(p)) = (self.redis_commands, self.redis_cmds_per_task) {
            s += &format!("\n  redis: {c} commands, {p:.1} per task");
        }
        s += &format!("\n  problems: {}", self.problems());
        s
    }

    /// The table's row.
    pub fn row(&self) -> Vec<String> {
        let rate = match self.kind {
            Kind::Rate => self
                .submit_per_s
                .map(|r| format!("sent {}", fmt_rate(r)))
                .unwrap_or_else(|| "—".into()),
            _ => self.tasks_per_s.map(fmt_rate).unwrap_or_else(|| "—".into()),
        };
        let q = |f: fn(&Quantiles) -> f64| {
            self.latency
                .as_ref()
                .map(|l| fmt_ms(f(l)))
                .unwrap_or_else(|| "—".into())
        };
        vec![
            self.label.clone(),
            self.planned.to_string(),
            self.done.to_string(),
            (self.planned - self.done.min(self.planned)).to_string(),
            rate,
            q(|l| l.p50_ms),
            q(|l| l.p90_ms),
            q(|l| l.p99_ms),
            q(|l| l.max_ms),
            self.redis_cmds_per_task
                .map(|c| format!("{c:.1}"))
                .unwrap_or_else(|| "—".into()),
            self.cpu.describe(),
        ]
    }
}

/// The table's header.
pub const HEADER: [&str; 11] = [
    "phase",
    "tasks",
    "done",
    "not done",
    "tasks/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "redis cmds/task",
    "cpu",
];

/// Rows as aligned text columns: the first and last left-aligned, the
/// numbers between right-aligned.
pub fn text_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = " ".repeat(width[i].saturating_sub(c.chars().count()));
                if i == 0 || i + 1 == cols {
                    format!("{c}{pad}")
                } else {
                    format!("{pad}{c}")
                }
            })
            .collect();
        parts.join("  ").trim_end().to_string()
    };
    let mut out = vec![line(header.to_vec())];
    for r in rows {
        out.push(line(r.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

/// `4,885` (rates are whole numbers here).
pub fn fmt_rate(x: f64) -> String {
    let n = x.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Milliseconds: `0.85`, `12.3`, `1,234`.
pub fn fmt_ms(x: f64) -> String {
    if x >= 100.0 {
        fmt_rate(x)
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::count_into;

    #[test]
    fn numbers_are_formatted_for_reading() {
        assert_eq!(fmt_rate(4884.6), "4,885");
        assert_eq!(fmt_rate(999.0), "999");
        assert_eq!(fmt_rate(1_234_567.0), "1,234,567");
        assert_eq!(fmt_rate(0.0), "0");
        assert_eq!(fmt_ms(0.853), "0.85");
        assert_eq!(fmt_ms(12.34), "12.3");
        assert_eq!(fmt_ms(5682.0), "5,682");
    }

    #[test]
    fn tables_align_their_columns() {
        let rows = vec![
            vec!["throughput 1".to_string(), "5000".into(), "CPU0 1%".into()],
            vec!["1000/s".to_string(), "12".into(), "".into()],
        ];
        assert_eq!(
            text_table(&["phase", "n", "cpu"], &rows),
            "phase            n  cpu\n\
             throughput 1  5000  CPU0 1%\n\
             1000/s          12"
        );
    }

    fn outcome(planned: u64) -> Outcome {
        let t = Instant::now();
        let mut o = Outcome {
            submitted: planned,
            done: planned,
            first_submit: Some(t),
            last_submit: Some(t + Duration::from_millis(500)),
            last_done: Some(t + Duration::from_secs(2)),
            max_lag_us: 1500,
            ..Outcome::default()
        };
        for us in [1000, 2000, 3000, 4000] {
            o.latency.record(us);
        }
        o
    }

    #[test]
    fn a_throughput_phase_is_done_over_its_span() {
        let s = PhaseSummary::of(
            Kind::Throughput,
            "throughput 1".into(),
            None,
            5000,
            &outcome(5000),
            None,
        );
        assert!(s.ok());
        assert_eq!((s.secs, s.tasks_per_s), (Some(2.0), Some(2500.0)));
        assert_eq!(s.problems(), "none");
        let row = s.row();
        assert_eq!(
            &row[..6],
            ["throughput 1", "5000", "5000", "0", "2,500", "2.00"]
        );
        assert_eq!(row[8], "4.00");
    }

    #[test]
    fn a_rate_phase_reports_what_it_sent() {
        let o = outcome(101);
        let start = o.first_submit;
        let s = PhaseSummary::of(Kind::Rate, "200/s".into(), Some(200.0), 101, &o, start);
        assert_eq!(s.submit_per_s, Some(200.0));
        assert_eq!(s.max_lag_ms, 1.5);
        assert_eq!(s.row()[4], "sent 200");
        assert!(s
            .line()
            .contains("sent 200 tasks/s (latest send 1.50 ms after its time)"));
    }

    #[test]
    fn anything_missing_or_wrong_fails_the_phase() {
        let mut o = outcome(10);
        o.done = 7;
        o.wrong = 1;
        o.lost = 1;
        count_into(&mut o.refused, "limit_exceeded");
        let s = PhaseSummary::of(Kind::Warmup, "warm-up".into(), None, 10, &o, None);
        assert!(!s.ok());
        assert_eq!(
            s.problems(),
            "1 WRONG results; 1 LOST (no done within the drain time); refused: 1× limit_exceeded"
        );
        assert_eq!(s.row()[3], "3");
        let mut o = outcome(10);
        o.lost = 1;
        o.lost_ids = vec!["ab12".into()];
        let s = PhaseSummary::of(Kind::Warmup, "warm-up".into(), None, 10, &o, None);
        assert_eq!(
            s.problems(),
            "1 LOST (no done within the drain time, e.g. task ab12)"
        );
        let mut o = outcome(10);
        o.submitted = 9;
        let s = PhaseSummary::of(Kind::Warmup, "warm-up".into(), None, 10, &o, None);
        assert!(!s.ok());
        assert_eq!(s.problems(), "1 not submitted");
    }
}
