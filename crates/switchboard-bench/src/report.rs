//! What every report shares: the header (the exact command line and the
//! machine), tallies of named outcomes (`3× join refused, 1× …`), rates, and
//! the closing verdict line.

use std::collections::BTreeMap;

use crate::clock::now_us;
use crate::cpu::cores;

/// Named outcomes (an error text, a close reason) and how often each happened.
pub type Counts = BTreeMap<String, u64>;

pub fn count_into(map: &mut Counts, key: impl Into<String>) {
    *map.entry(key.into()).or_default() += 1;
}

pub fn merge_counts(into: &mut Counts, from: &Counts) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// `2× first reason, 1× second reason`, or `none`.
pub fn fmt_counts(map: &Counts) -> String {
    if map.is_empty() {
        "none".into()
    } else {
        map.iter()
            .map(|(k, v)| format!("{v}× {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `1234 unit/s`, or `n/a` for an empty window.
pub fn per_s(count: u64, seconds: f64, unit: &str) -> String {
    if seconds > 0.0 {
        format!("{:.0} {unit}/s", count as f64 / seconds)
    } else {
        "n/a".into()
    }
}

/// The last line of a report.
pub fn print_result(ok: bool, what_ok_means: &str) {
    println!();
    if ok {
        println!("result:      OK ({what_ok_means})");
    } else {
        println!("result:      PROBLEMS (see above)");
    }
}

/// An argument as it would be typed into a POSIX shell.
pub fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The header every run starts with: version, command line, machine, start
/// time and load.
pub fn print_header() {
    let command: Vec<String> = std::env::args().map(|a| shell_quote(&a)).collect();
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    println!("# switchboard-bench {}", env!("CARGO_PKG_VERSION"));
    println!("command:  {}", command.join(" "));
    println!(
        "machine:  {host}: {} cores ({}), {} RAM, Linux {}",
        cores(),
        cpu_model(&read("/proc/cpuinfo")),
        memory_total(&read("/proc/meminfo")),
        first_line_or_unknown(&read("/proc/sys/kernel/osrelease")),
    );
    println!(
        "started:  {} (unix seconds), load average {}",
        now_us() / 1_000_000,
        load_average(&read("/proc/loadavg"))
    );
    if cfg!(debug_assertions) {
        println!("warning:  this is a debug build of the bench; numbers are not representative");
    }
}

/// `23.5 GiB` from `/proc/meminfo`'s `MemTotal`, or `?`.
fn memory_total(meminfo: &str) -> String {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into())
}

/// The first `model name` of `/proc/cpuinfo`, or `?`.
fn cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "?".into())
}

/// The 1, 5 and 15 minute load averages of `/proc/loadavg`, or `?`.
fn load_average(loadavg: &str) -> String {
    if loadavg.trim().is_empty() {
        return "?".into();
    }
    loadavg
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn first_line_or_unknown(text: &str) -> String {
    match text.trim() {
        "" => "?".into(),
        t => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("--url"), "--url");
        assert_eq!(
            shell_quote("ws://127.0.0.1:8000/ws"),
            "ws://127.0.0.1:8000/ws"
        );
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn counts_are_tallied_merged_and_sorted() {
        let mut a = Counts::new();
        assert_eq!(fmt_counts(&a), "none");
        count_into(&mut a, "timeout");
        count_into(&mut a, "refused");
        count_into(&mut a, "timeout");
        let mut b = Counts::new();
        count_into(&mut b, "refused");
        merge_counts(&mut a, &b);
        assert_eq!(fmt_counts(&a), "2× refused, 2× timeout");
    }

    #[test]
    fn rates_round_and_an_empty_window_is_not_a_rate() {
        assert_eq!(per_s(1000, 0.5, "connects"), "2000 connects/s");
        assert_eq!(per_s(7, 2.0, "msg"), "4 msg/s");
        assert_eq!(per_s(10, 0.0, "msg"), "n/a");
    }

    #[test]
    fn machine_facts_come_from_proc_or_are_unknown() {
        let meminfo = "MemTotal:       24641536 kB\nMemFree:  1 kB\n";
        assert_eq!(memory_total(meminfo), "23.5 GiB");
        assert_eq!(memory_total(""), "?");
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nmodel name\t: other\n";
        assert_eq!(cpu_model(cpuinfo), "AMD EPYC 7B13");
        assert_eq!(cpu_model(""), "?");
        assert_eq!(
            load_average("0.52 0.58 0.59 1/123 4567\n"),
            "0.52 0.58 0.59"
        );
        assert_eq!(load_average(""), "?");
        assert_eq!(first_line_or_unknown("6.8.0-1\n"), "6.8.0-1");
        assert_eq!(first_line_or_unknown(""), "?");
    }
}
