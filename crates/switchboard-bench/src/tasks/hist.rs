//! Latency samples for the tasks scenario: an [`hdrhistogram`] with three
//! significant digits (quantiles within 0.1%), the exact maximum and sum
//! kept beside it. Microseconds in, milliseconds out.

use hdrhistogram::Histogram;

/// 2^40 µs (12 days): far beyond any bounded run.
const MAX_US: u64 = (1 << 40) - 1;

#[derive(Clone)]
pub struct Hist {
    histogram: Histogram<u64>,
    max: u64,
    sum: u128,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            histogram: Histogram::new(3).expect("3 significant digits is a valid precision"),
            max: 0,
            sum: 0,
        }
    }
}

/// p50/p90/p99/max/mean in milliseconds, as reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Quantiles {
    pub samples: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Hist {
    pub fn record(&mut self, us: u64) {
        let us = us.min(MAX_US);
        if self.histogram.record(us).is_err() {
            self.histogram.saturating_record(us);
        }
        self.max = self.max.max(us);
        self.sum += u128::from(us);
    }

    pub fn merge(&mut self, other: &Hist) {
        if other.histogram.is_empty() {
            return;
        }
        self.histogram
            .add(&other.histogram)
            .expect("auto-resizing histograms of bounded values add");
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    /// Samples above `us`.
    pub fn count_above(&self, us: u64) -> u64 {
        if self.histogram.is_empty() || us >= self.max {
            return 0;
        }
        let at_most: u64 = self
            .histogram
            .iter_recorded()
            .filter(|v| self.histogram.highest_equivalent(v.value_iterated_to()) <= us)
            .map(|v| v.count_at_value())
            .sum();
        self.len() - at_most
    }

    pub fn len(&self) -> u64 {
        self.histogram.len()
    }

    /// The value at quantile `q` in µs (the highest value equivalent to it,
    /// never above the exact maximum); 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.histogram.is_empty() {
            return 0;
        }
        self.histogram.value_at_quantile(q).min(self.max)
    }

    pub fn quantiles(&self) -> Option<Quantiles> {
        let n = self.len();
        if n == 0 {
            return None;
        }
        let ms = |us: u64| round2(us as f64 / 1000.0);
        Some(Quantiles {
            samples: n,
            p50_ms: ms(self.quantile_us(0.5)),
            p90_ms: ms(self.quantile_us(0.9)),
            p99_ms: ms(self.quantile_us(0.99)),
            max_ms: ms(self.max),
            mean_ms: round2(self.sum as f64 / n as f64 / 1000.0),
        })
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_has_no_quantiles() {
        assert_eq!(Hist::default().quantiles(), None);
    }

    #[test]
    fn quantiles_are_within_a_tenth_of_a_percent_and_max_is_exact() {
        let mut h = Hist::default();
        for us in 1..=10_000u64 {
            h.record(us * 100);
        }
        let q = h.quantiles().unwrap();
        assert_eq!(q.samples, 10_000);
        for (got, exact) in [(q.p50_ms, 500.0), (q.p90_ms, 900.0), (q.p99_ms, 990.0)] {
            assert!((got - exact).abs() / exact < 0.001, "{got} vs {exact}");
        }
        assert_eq!(q.max_ms, 1000.0);
        assert!((q.mean_ms - 500.05).abs() < 0.01);
    }

    #[test]
    fn merged_histograms_hold_both() {
        let (mut a, mut b) = (Hist::default(), Hist::default());
        a.record(1_000);
        b.record(3_000);
        b.record(u64::MAX);
        a.merge(&b);
        a.merge(&Hist::default());
        assert_eq!(a.len(), 3);
        assert_eq!(a.quantiles().unwrap().p50_ms, 3.0);
        assert_eq!(a.max, MAX_US);
    }

    #[test]
    fn samples_above_a_bound_are_counted() {
        let mut h = Hist::default();
        for us in [500, 1_000, 2_000_000, 61_000_000, 65_000_000] {
            h.record(us);
        }
        assert_eq!(h.count_above(10_000_000), 2);
        assert_eq!(h.count_above(1_000), 3);
        assert_eq!(h.count_above(100_000_000), 0);
        assert_eq!(Hist::default().count_above(0), 0);
    }
}
