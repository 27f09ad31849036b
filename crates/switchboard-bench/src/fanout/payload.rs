//! The `data` the bench's publishers put in each message: which publisher,
//! its sequence number, the send time (for end-to-end latency), and padding
//! up to `--payload-bytes`.

use serde::{Deserialize, Serialize};

/// A message's `data` as a publisher writes it.
#[derive(Serialize)]
pub struct BenchData<'a> {
    pub seq: u64,
    #[serde(rename = "pub")]
    pub publisher: usize,
    /// Wall-clock send time, µs since the epoch.
    pub t_us: u64,
    pub pad: &'a str,
}

/// `BenchData` as a member reads it back (the padding skipped).
#[derive(Deserialize)]
pub struct BenchDataIn {
    pub seq: u64,
    #[serde(rename = "pub")]
    pub publisher: usize,
    pub t_us: u64,
}

/// The padding that brings publisher `publisher`'s `data` (with its largest
/// sequence number and a current timestamp) to about `payload_bytes`.
pub fn padding(publisher: usize, max_seq: u64, t_us: u64, payload_bytes: usize) -> String {
    let probe = serde_json::to_string(&BenchData {
        seq: max_seq,
        publisher,
        t_us,
        pad: "",
    })
    .unwrap_or_default();
    "x".repeat(payload_bytes.saturating_sub(probe.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_brings_data_to_the_asked_size() {
        let t_us = 1_732_438_800_123_456;
        let pad = padding(1, 2000, t_us, 100);
        let data = BenchData {
            seq: 2000,
            publisher: 1,
            t_us,
            pad: &pad,
        };
        assert_eq!(serde_json::to_string(&data).unwrap().len(), 100);
        assert_eq!(padding(1, 2000, t_us, 10), "");
    }

    #[test]
    fn data_reads_back_without_the_padding() {
        let text = serde_json::to_string(&BenchData {
            seq: 5,
            publisher: 2,
            t_us: 42,
            pad: "xxxx",
        })
        .unwrap();
        let back: BenchDataIn = serde_json::from_str(&text).unwrap();
        assert_eq!((back.seq, back.publisher, back.t_us), (5, 2, 42));
    }
}
