//! Latency histograms (an [`hdrhistogram`] per connection, merged for the
//! report): microseconds in, `p50 1.23, …, max …, mean … ms (N samples)` out.

use hdrhistogram::Histogram;

/// Two significant digits: 128 linear sub-buckets per power of two, so a
/// quantile is known to within 0.8%. The histogram grows with the largest
/// value recorded (~15 KiB per connection for latencies up to seconds).
const SIGNIFICANT_DIGITS: u8 = 2;
/// Values are capped at 2^40 µs (12 days), far beyond any bounded run; a
/// foreign timestamp cannot make a histogram grow without bound.
const MAX_US: u64 = (1 << 40) - 1;

/// Latencies in microseconds; the exact maximum and sum are kept beside the
/// histogram, so `max` and `mean` are not rounded to a bucket.
#[derive(Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
    max: u64,
    sum: u128,
}

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        Latency {
            histogram: Histogram::new(SIGNIFICANT_DIGITS)
                .expect("2 significant digits is a valid hdrhistogram precision"),
            max: 0,
            sum: 0,
        }
    }

    pub fn record(&mut self, us: u64) {
        let us = us.min(MAX_US);
        // `record` grows the histogram to fit (`saturating_record` would clamp
        // to its current range instead); growing only fails when the counts
        // would not fit in memory's address space.
        if self.histogram.record(us).is_err() {
            self.histogram.saturating_record(us);
        }
        self.max = self.max.max(us);
        self.sum += u128::from(us);
    }

    pub fn merge(&mut self, other: &Latency) {
        if other.histogram.is_empty() {
            return;
        }
        // Both histograms resize themselves and hold only values up to
        // MAX_US, so adding cannot run out of range.
        self.histogram
            .add(&other.histogram)
            .expect("auto-resizing histograms of bounded values add");
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    /// Samples recorded.
    pub fn total(&self) -> u64 {
        self.histogram.len()
    }

    /// The value at quantile `q` (the top of its bucket, never above the
    /// exact maximum); 0 when empty.
    fn quantile(&self, q: f64) -> u64 {
        if self.histogram.is_empty() {
            return 0;
        }
        self.histogram.value_at_quantile(q).min(self.max)
    }

    fn mean(&self) -> f64 {
        match self.total() {
            0 => 0.0,
            n => self.sum as f64 / n as f64,
        }
    }

    /// `p50 1.23 ms, p90 …, p99 …, max …` (micros in, milliseconds out).
    pub fn summary_ms(&self, quantiles: &[(&str, f64)]) -> String {
        if self.total() == 0 {
            return "no samples".into();
        }
        let mut parts: Vec<String> = quantiles
            .iter()
            .map(|(name, q)| format!("{name} {:.2}", self.quantile(*q) as f64 / 1000.0))
            .collect();
        parts.push(format!("max {:.2}", self.max as f64 / 1000.0));
        parts.push(format!("mean {:.2}", self.mean() / 1000.0));
        format!("{} ms ({} samples)", parts.join(", "), self.total())
    }
}

impl Latency {
    /// `{"p50": …, "p90", "p99", "p999", "max", "mean"}` in milliseconds:
    /// the shape of bench/compare.sh's `latency_ms`.
    pub fn json_ms(&self) -> serde_json::Value {
        let ms = |us: u64| us as f64 / 1000.0;
        serde_json::json!({
            "p50": ms(self.quantile(0.5)),
            "p90": ms(self.quantile(0.9)),
            "p99": ms(self.quantile(0.99)),
            "p999": ms(self.quantile(0.999)),
            "max": ms(self.max),
            "mean": self.mean() / 1000.0,
        })
    }
}

/// The quantiles most lines report.
pub const P50_P90_P99: [(&str, f64); 3] = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)];
/// The quantiles of the shorter lines.
pub const P50_P99: [(&str, f64); 2] = [("p50", 0.5), ("p99", 0.99)];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_histogram_has_no_samples() {
        assert_eq!(Latency::new().summary_ms(&P50_P90_P99), "no samples");
    }

    #[test]
    fn small_values_are_exact() {
        let mut l = Latency::new();
        for us in 1..=100 {
            l.record(us);
        }
        assert_eq!(
            l.summary_ms(&P50_P90_P99),
            "p50 0.05, p90 0.09, p99 0.10, max 0.10, mean 0.05 ms (100 samples)"
        );
    }

    #[test]
    fn one_sample_is_every_quantile_and_the_max() {
        let mut l = Latency::new();
        l.record(23_700);
        assert_eq!(
            l.summary_ms(&P50_P99),
            "p50 23.70, p99 23.70, max 23.70, mean 23.70 ms (1 samples)"
        );
    }

    #[test]
    fn large_values_are_within_one_percent_and_max_is_exact() {
        let mut l = Latency::new();
        for us in 1..=100_000u64 {
            l.record(us * 10);
        }
        for (q, exact) in [(0.5, 500_000.0), (0.9, 900_000.0), (0.99, 990_000.0)] {
            let got = l.quantile(q) as f64;
            assert!((got - exact).abs() / exact < 0.01, "q{q}: {got} vs {exact}");
        }
        assert_eq!(l.max, 1_000_000);
        assert!((l.mean() - 500_005.0).abs() < 1e-6);
    }

    #[test]
    fn merging_adds_samples_and_keeps_the_larger_max() {
        let (mut a, mut b) = (Latency::new(), Latency::new());
        a.record(100);
        b.record(300);
        b.record(500);
        a.merge(&b);
        a.merge(&Latency::new());
        assert_eq!(a.total(), 3);
        assert_eq!(
            a.summary_ms(&P50_P99),
            "p50 0.30, p99 0.50, max 0.50, mean 0.30 ms (3 samples)"
        );
    }

    #[test]
    fn absurd_values_are_capped() {
        let mut l = Latency::new();
        l.record(u64::MAX);
        assert_eq!(l.max, MAX_US);
        assert_eq!(l.total(), 1);
    }
}
