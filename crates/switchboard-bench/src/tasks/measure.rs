//! What a phase cost, measured the way `bench/peers/tasks` measures its
//! systems: each core's busy and stolen share from `/proc/stat` (busy is
//! user + nice + system + irq + softirq; idle, iowait and steal are not),
//! a process's share of one core from `/proc/PID/stat` (utime + stime, all
//! its threads), and Redis's `INFO stats` / `INFO commandstats`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// USER_HZ: `/proc` counts CPU time in ticks of 1/100 s on Linux.
const TICKS_PER_S: f64 = 100.0;
/// A Redis `INFO` must answer within this.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// (busy, steal, total) ticks of one core.
type CoreTicks = (u64, u64, u64);

/// Per-core ticks (`cpu0`, `cpu1`, …) from `/proc/stat`.
pub fn core_ticks(proc_stat: &str) -> BTreeMap<String, CoreTicks> {
    let mut out = BTreeMap::new();
    for line in proc_stat.lines() {
        let mut fields = line.split_whitespace();
        let Some(name) = fields.next() else { continue };
        if !name.starts_with("cpu") || name.len() == 3 {
            continue;
        }
        // user nice system idle iowait irq softirq steal
        let v: Vec<u64> = fields.take(8).filter_map(|f| f.parse().ok()).collect();
        if v.len() < 8 {
            continue;
        }
        let busy = v[0] + v[1] + v[2] + v[5] + v[6];
        out.insert(name.to_string(), (busy, v[7], v.iter().sum()));
    }
    out
}

/// utime + stime ticks of a `/proc/PID/stat` line (fields 14 and 15,
/// counted after the parenthesised command name, which may hold spaces).
pub fn proc_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(get(11)? + get(12)?)
}

fn read_proc_ticks(pid: u32) -> Option<u64> {
    proc_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The CPU counters at one instant.
pub struct CpuSnapshot {
    cores: BTreeMap<String, CoreTicks>,
    server: Option<u64>,
    redis: Option<u64>,
    at: Instant,
}

/// CPU use over a window, in percent (per core: of that core; a process:
/// of one core).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CpuUse {
    pub cpu_busy: BTreeMap<String, f64>,
    pub cpu_steal: BTreeMap<String, f64>,
    pub server: Option<f64>,
    pub redis: Option<f64>,
}

impl CpuSnapshot {
    pub fn read(server_pid: Option<u32>, redis_pid: Option<u32>) -> CpuSnapshot {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        CpuSnapshot {
            cores: core_ticks(&stat),
            server: server_pid.and_then(read_proc_ticks),
            redis: redis_pid.and_then(read_proc_ticks),
            at: Instant::now(),
        }
    }

    /// Use from `self` to `later`.
    pub fn until(&self, later: &CpuSnapshot) -> CpuUse {
        let secs = later.at.duration_since(self.at).as_secs_f64();
        let mut out = CpuUse::default();
        for (name, &(busy, steal, total)) in &later.cores {
            let Some(&(b0, s0, t0)) = self.cores.get(name) else {
                continue;
            };
            let dt = total.saturating_sub(t0);
            if dt == 0 {
                continue;
            }
            let pct = |a: u64, b: u64| round1(100.0 * a.saturating_sub(b) as f64 / dt as f64);
            out.cpu_busy.insert(name.clone(), pct(busy, b0));
            out.cpu_steal.insert(name.clone(), pct(steal, s0));
        }
        let share = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) if secs > 0.0 => Some(round1(
                100.0 * b.saturating_sub(a) as f64 / TICKS_PER_S / secs,
            )),
            _ => None,
        };
        out.server = share(self.server, later.server);
        out.redis = share(self.redis, later.redis);
        out
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

impl CpuUse {
    /// `CPU0 45%, CPU1 98% (redis 41%), server 44%` (what is known).
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .cpu_busy
            .iter()
            .map(|(k, v)| format!("{} {v:.0}%", k.to_uppercase()))
            .collect();
        if let Some(r) = self.redis {
            parts.push(format!("redis {r:.0}%"));
        }
        if let Some(s) = self.server {
            parts.push(format!("server {s:.0}%"));
        }
        let steal = self.max_steal();
        if steal >= 1.0 {
            parts.push(format!("steal up to {steal:.0}%"));
        }
        parts.join(", ")
    }

    pub fn max_steal(&self) -> f64 {
        self.cpu_steal.values().copied().fold(0.0, f64::max)
    }
}

/// One `INFO` section's `key:value` lines.
pub fn info_fields(info: &str) -> BTreeMap<String, String> {
    info.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.trim_end_matches('\r').split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Calls per command from `INFO commandstats`
/// (`cmdstat_evalsha:calls=3,usec=…`), the `cmdstat_` prefix dropped.
pub fn command_calls(info: &str) -> BTreeMap<String, u64> {
    info_fields(info)
        .into_iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("cmdstat_")?.to_string();
            let calls = v
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name, calls))
        })
        .collect()
}

/// The commands that grew most from `before` to `after`, with how many
/// calls each made, most first (ties by name).
pub fn top_commands(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    n: usize,
) -> Vec<(String, u64)> {
    let mut grew: Vec<(String, u64)> = after
        .iter()
        .map(|(k, &v)| (k.clone(), v.saturating_sub(*before.get(k).unwrap_or(&0))))
        .filter(|(_, d)| *d > 0)
        .collect();
    grew.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    grew.truncate(n);
    grew
}

/// Redis's counters at one instant.
#[derive(Debug, Clone, Default)]
pub struct RedisSnapshot {
    pub total_commands: u64,
    pub calls: BTreeMap<String, u64>,
}

/// The Redis whose commands a run counts.
pub struct RedisProbe {
    conn: redis::aio::MultiplexedConnection,
}

impl RedisProbe {
    pub async fn connect(url: &str) -> Result<RedisProbe, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis url {url}: {e}"))?;
        let conn = tokio::time::timeout(REDIS_TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| format!("redis {url}: no connection within 5 s"))?
            .map_err(|e| format!("redis {url}: {e}"))?;
        Ok(RedisProbe { conn })
    }

    async fn info(&mut self, section: &str) -> Result<String, String> {
        let cmd = redis::cmd("INFO").arg(section).clone();
        tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async::<String>(&mut self.conn))
            .await
            .map_err(|_| format!("INFO {section}: no answer within 5 s"))?
            .map_err(|e| format!("INFO {section}: {e}"))
    }

    /// `total_commands_processed` and the calls per command. The two
    /// `INFO`s are themselves counted, as two commands.
    pub async fn snapshot(&mut self) -> Result<RedisSnapshot, String> {
        let stats = self.info("stats").await?;
        let total_commands = info_fields(&stats)
            .get("total_commands_processed")
            .and_then(|v| v.trim().parse().ok())
            .ok_or("INFO stats has no total_commands_processed")?;
        let calls = command_calls(&self.info("commandstats").await?);
        Ok(RedisSnapshot {
            total_commands,
            calls,
        })
    }
}

/// Commands per task from `before` to `after`, not counting the two
/// `INFO`s of each snapshot.
pub fn commands_between(before: &RedisSnapshot, after: &RedisSnapshot) -> u64 {
    after
        .total_commands
        .saturating_sub(before.total_commands)
        .saturating_sub(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_count_idle_iowait_and_steal_as_not_busy() {
        let stat = "cpu  9 9 9 9 9 9 9 9 0 0\n\
                    cpu0 100 5 50 800 40 1 4 0 0 0\n\
                    cpu1 10 0 10 70 0 0 0 10 0 0\n\
                    intr 1 2 3\n";
        let c = core_ticks(stat);
        assert_eq!(c.len(), 2);
        assert_eq!(c["cpu0"], (160, 0, 1000));
        assert_eq!(c["cpu1"], (20, 10, 100));
        assert!(core_ticks("").is_empty());
    }

    #[test]
    fn process_ticks_skip_a_name_with_spaces() {
        let stat = "42 (redis-server *:6) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0";
        assert_eq!(proc_ticks(stat), Some(325));
        assert_eq!(proc_ticks("garbage"), None);
    }

    #[test]
    fn use_over_a_window_is_a_share_per_core() {
        let at = Instant::now();
        let snap = |busy: u64, steal: u64, total: u64, server: u64, at: Instant| CpuSnapshot {
            cores: BTreeMap::from([("cpu0".to_string(), (busy, steal, total))]),
            server: Some(server),
            redis: None,
            at,
        };
        let a = snap(100, 0, 1000, 10, at);
        let b = snap(150, 5, 1100, 60, at + Duration::from_secs(1));
        let u = a.until(&b);
        assert_eq!(u.cpu_busy["cpu0"], 50.0);
        assert_eq!(u.cpu_steal["cpu0"], 5.0);
        assert_eq!(u.server, Some(50.0));
        assert_eq!(u.redis, None);
        assert_eq!(u.describe(), "CPU0 50%, server 50%, steal up to 5%");
    }

    #[test]
    fn redis_info_is_parsed() {
        let stats = "# Stats\r\ntotal_connections_received:3\r\ntotal_commands_processed:1234\r\n";
        assert_eq!(info_fields(stats)["total_commands_processed"], "1234");
        let cs = "# Commandstats\r\n\
                  cmdstat_evalsha:calls=30,usec=500,usec_per_call=16.67,rejected_calls=0,failed_calls=0\r\n\
                  cmdstat_xack:calls=10,usec=20,usec_per_call=2.00\r\n\
                  cmdstat_info:calls=2,usec=1\r\n";
        let after = command_calls(cs);
        assert_eq!(after["evalsha"], 30);
        let before = BTreeMap::from([("evalsha".to_string(), 10), ("info".to_string(), 2)]);
        assert_eq!(
            top_commands(&before, &after, 5),
            vec![("evalsha".to_string(), 20), ("xack".to_string(), 10)]
        );
        assert_eq!(top_commands(&before, &after, 1).len(), 1);
        let s = |n| RedisSnapshot {
            total_commands: n,
            calls: BTreeMap::new(),
        };
        assert_eq!(commands_between(&s(100), &s(150)), 48);
        assert_eq!(commands_between(&s(100), &s(101)), 0);
    }
}
