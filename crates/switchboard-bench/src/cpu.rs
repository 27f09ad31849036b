//! CPU use over a phase: the whole machine's and the bench's own, read from
//! `/proc` (Linux; elsewhere the numbers are zero), so a report can tell how
//! much of the machine the server had.

use std::time::Instant;

/// USER_HZ: `/proc` counts CPU time in ticks of 1/100 s on Linux.
const TICKS_PER_S: f64 = 100.0;

/// Whole-machine and own CPU time at one instant.
pub struct CpuMeter {
    machine_busy: u64,
    machine_total: u64,
    own: u64,
    at: Instant,
}

impl CpuMeter {
    pub fn read() -> CpuMeter {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let (machine_busy, machine_total) = machine_ticks(&stat);
        let own_stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        CpuMeter {
            machine_busy,
            machine_total,
            own: own_ticks(&own_stat),
            at: Instant::now(),
        }
    }

    /// `over 4.2 s the machine was 93% busy (…); this bench used 4.1 CPU-s, …`.
    pub fn since(&self, cores: usize) -> String {
        let now = CpuMeter::read();
        let wall = self.at.elapsed().as_secs_f64();
        let total = now.machine_total.saturating_sub(self.machine_total).max(1);
        let busy = now.machine_busy.saturating_sub(self.machine_busy);
        let own = now.own.saturating_sub(self.own) as f64 / TICKS_PER_S;
        format!(
            "over {wall:.1} s the machine was {:.0}% busy ({:.1} of {:.1} CPU-s on {cores} cores); \
             this bench used {own:.1} CPU-s, the rest is the server and anything else running",
            100.0 * busy as f64 / total as f64,
            busy as f64 / TICKS_PER_S,
            total as f64 / TICKS_PER_S,
        )
    }
}

/// The cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// (busy, total) ticks from the `cpu` line of `/proc/stat`; idle and iowait
/// are not busy.
fn machine_ticks(proc_stat: &str) -> (u64, u64) {
    let fields: Vec<u64> = proc_stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle.min(total), total)
}

/// utime + stime ticks from `/proc/self/stat`: fields 14 and 15 of the line,
/// counted after the parenthesised command name (which may hold spaces).
fn own_ticks(self_stat: &str) -> u64 {
    self_stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            get(11) + get(12)
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ticks_count_idle_and_iowait_as_not_busy() {
        let stat = "cpu  100 5 50 800 40 1 4 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n";
        assert_eq!(machine_ticks(stat), (160, 1000));
        assert_eq!(machine_ticks(""), (0, 0));
    }

    #[test]
    fn own_ticks_skip_a_command_name_with_spaces() {
        let stat = "4242 (switchboard bench) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0";
        assert_eq!(own_ticks(stat), 325);
        assert_eq!(own_ticks("garbage"), 0);
    }
}
