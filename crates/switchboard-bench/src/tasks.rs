//! The `tasks` scenario: async tasks through the hub, measured the way
//! `bench/peers/tasks` measures Celery and BullMQ.
//!
//! `--clients` connections (users `t0`, `t1`, …) submit `task` frames and
//! follow each task to its `done` frame, checking that every result is
//! that task's payload. The phases, all on the same connections:
//!
//! 1. warm-up: `--warmup` tasks, run and waited for, not measured;
//! 2. `--runs` throughput runs: `--tasks` N submitted as fast as the hub
//!    takes them (each connection keeps at most `--window` of its tasks
//!    unfinished); throughput = N / (first submit → last `done` seen);
//! 3. a fixed-rate step per `--rate` / `--rates` R: R × `--duration-s`
//!    tasks on a fixed schedule (task k due at start + k/R, connection
//!    k mod C sends it), latency from each task's *scheduled* time to its
//!    `done`, so a client or hub that falls behind is not hidden.
//!
//! A task is lost when, with tasks unfinished, a connection sees no frame
//! for `--drain-s`; a lost, wrong, failed or refused task fails the run.
//! With `--redis-url`: Redis commands per task (`INFO stats`
//! `total_commands_processed`, which counts the commands Lua scripts run,
//! and `INFO commandstats` for the top commands); with `--server-pid` /
//! `--redis-pid`: their CPU, beside each core's from `/proc/stat`.
//!
//! - [`conn`]: one connection's phases; [`payload`]: payloads and the
//!   result check; [`hist`]: latency histograms; [`measure`]: CPU and
//!   Redis counters; [`summary`]: a phase's numbers and the table.

mod conn;
mod hist;
mod measure;
mod payload;
mod summary;

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use self::conn::{Order, Outcome, Plan};
use self::measure::{commands_between, top_commands, CpuSnapshot, RedisProbe, RedisSnapshot};
use self::payload::Payloads;
use self::summary::{text_table, Kind, PhaseSummary, HEADER};
use crate::client::{connect_and_welcome, mint_token, ws_endpoint, ws_url_with_token};
use crate::report::{count_into, fmt_counts, print_result, shell_quote, Counts};

/// The first fixed-rate task is due this long after the orders go out.
const SCHEDULE_DELAY: Duration = Duration::from_millis(50);
/// Between phases, as the peers' clients pause.
const PAUSE: Duration = Duration::from_millis(500);
/// How often a greedy phase looks whether more tasks have ended.
const CPU_POLL: Duration = Duration::from_millis(20);
/// Connections being opened at the same time.
const CONNECT_CONCURRENCY: usize = 100;
/// Top Redis commands listed.
const TOP_COMMANDS: usize = 10;

#[derive(Args, Debug, Clone)]
pub struct TasksArgs {
    /// Hub address, `ws://HOST:PORT` (the path `/ws` is added when absent).
    #[arg(long, default_value = "ws://127.0.0.1:8000")]
    pub url: String,
    /// HS256 secret to sign tokens with; must be the server's `auth.jwt_secret`.
    #[arg(long, default_value = switchboard::config::DEV_JWT_SECRET)]
    pub secret: String,
    /// Connections, each its own user (`t0`, `t1`, …).
    #[arg(long, default_value_t = 50)]
    pub clients: usize,
    /// The users' names are this followed by the connection's number.
    #[arg(long, default_value = "t")]
    pub user_prefix: String,
    /// The task handler to run (the hub must have it, e.g. `kind = "echo"`:
    /// every result is checked to be its payload).
    #[arg(long, default_value = "echo")]
    pub name: String,
    /// Size of each payload, `{"p":"…"}`, in bytes of JSON.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Tasks per throughput run (0: no throughput runs).
    #[arg(long, default_value_t = 5000)]
    pub tasks: u64,
    /// Throughput runs.
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
    /// In throughput runs: at most this many of a connection's tasks
    /// unfinished (submitted, `done` not yet seen) at a time.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// A fixed-rate step at this many tasks/s in total (before `--rates`).
    #[arg(long)]
    pub rate: Option<f64>,
    /// More fixed-rate steps, tasks/s, comma-separated (`1000,200`).
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// Length of each fixed-rate step, seconds: rate × this many tasks.
    #[arg(long, default_value_t = 5.0)]
    pub duration_s: f64,
    /// Tasks run and waited for before measuring (0: none).
    #[arg(long, default_value_t = 2000)]
    pub warmup: u64,
    /// With tasks unfinished: seconds without a frame before they are lost.
    #[arg(long, default_value_t = 30)]
    pub drain_s: u64,
    /// Upper bound on the whole run, seconds.
    #[arg(long, default_value_t = 900)]
    pub max_run_s: u64,
    /// The hub's Redis: commands per task from `INFO stats` and
    /// `INFO commandstats` over each phase and the whole run.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// The hub's process id: its CPU (share of one core) per phase.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// redis-server's process id: its CPU per phase.
    #[arg(long)]
    pub redis_pid: Option<u32>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Time allowed for one connection's TCP connect, upgrade and welcome.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout_s: u64,
    /// Read buffer per connection in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub read_buffer_bytes: usize,
}

impl TasksArgs {
    /// `--rate` then `--rates`.
    fn rate_steps(&self) -> Vec<f64> {
        self.rate.iter().chain(&self.rates).copied().collect()
    }

    fn check(&self) -> Result<(), String> {
        if self.clients == 0 || self.window == 0 {
            return Err("--clients and --window must be positive".into());
        }
        if self
            .rate_steps()
            .iter()
            .any(|r| !(r.is_finite() && *r > 0.0))
        {
            return Err("--rate and --rates must be positive".into());
        }
        if !(self.duration_s.is_finite() && self.duration_s > 0.0) {
            return Err("--duration-s must be positive".into());
        }
        let measured = self.tasks > 0 && self.runs > 0;
        if !measured && self.rate_steps().is_empty() {
            return Err("nothing to measure: give --tasks and --runs, or --rate/--rates".into());
        }
        Ok(())
    }
}

/// A phase to run.
#[derive(Debug, Clone, PartialEq)]
struct Step {
    kind: Kind,
    label: String,
    total: u64,
    rate: Option<f64>,
}

/// Warm-up, the throughput runs, the fixed-rate steps.
fn steps(args: &TasksArgs) -> Vec<Step> {
    let mut out = Vec::new();
    if args.warmup > 0 {
        out.push(Step {
            kind: Kind::Warmup,
            label: "warm-up".into(),
            total: args.warmup,
            rate: None,
        });
    }
    if args.tasks > 0 {
        for run in 1..=args.runs {
            out.push(Step {
                kind: Kind::Throughput,
                label: format!("throughput {run}"),
                total: args.tasks,
                rate: None,
            });
        }
    }
    for rate in args.rate_steps() {
        out.push(Step {
            kind: Kind::Rate,
            label: format!("{}/s", summary::fmt_rate(rate)),
            total: (rate * args.duration_s).round().max(1.0) as u64,
            rate: Some(rate),
        });
    }
    out
}

/// The whole run, as `--json` writes it.
#[derive(Serialize)]
struct RunJson<'a> {
    command: String,
    url: &'a str,
    name: &'a str,
    clients: usize,
    window: usize,
    payload_bytes: usize,
    tasks: u64,
    runs: usize,
    duration_s: f64,
    warmup: u64,
    connected: usize,
    connect_failures: &'a Counts,
    phases: &'a [PhaseSummary],
    redis: Option<RedisTotals>,
    closed_cleanly: usize,
    ok: bool,
}

/// Redis over the whole run, warm-up included.
#[derive(Serialize, Clone)]
struct RedisTotals {
    commands: u64,
    tasks: u64,
    cmds_per_task: f64,
    /// (command, calls per task), most first.
    top_per_task: Vec<(String, f64)>,
}

/// The Redis counters of a run, and how many `INFO`s the bench sent.
struct RedisCount {
    probe: RedisProbe,
    first: Option<RedisSnapshot>,
    last: Option<RedisSnapshot>,
    snapshots: u64,
}

impl RedisCount {
    async fn snapshot(&mut self) -> Option<RedisSnapshot> {
        match self.probe.snapshot().await {
            Ok(s) => {
                self.snapshots += 1;
                if self.first.is_none() {
                    self.first = Some(s.clone());
                }
                self.last = Some(s.clone());
                Some(s)
            }
            Err(e) => {
                println!("redis:    {e}");
                None
            }
        }
    }

    /// From the first snapshot to the last, without the bench's `INFO`s.
    fn totals(&self, tasks: u64) -> Option<RedisTotals> {
        let (first, last) = (self.first.as_ref()?, self.last.as_ref()?);
        let infos = 2 * self.snapshots.saturating_sub(1);
        let commands = last
            .total_commands
            .saturating_sub(first.total_commands)
            .saturating_sub(infos);
        let per = |n: u64| {
            if tasks > 0 {
                n as f64 / tasks as f64
            } else {
                0.0
            }
        };
        let top = top_commands(&first.calls, &last.calls, TOP_COMMANDS + 1)
            .into_iter()
            .filter(|(name, _)| name != "info")
            .take(TOP_COMMANDS)
            .map(|(name, calls)| (name, (per(calls) * 100.0).round() / 100.0))
            .collect();
        Some(RedisTotals {
            commands,
            tasks,
            cmds_per_task: (per(commands) * 10.0).round() / 10.0,
            top_per_task: top,
        })
    }
}

/// What the phases share.
struct Runner {
    args: TasksArgs,
    links: Vec<mpsc::Sender<Order>>,
    redis: Option<RedisCount>,
    deadline: Instant,
    /// Task numbers used so far (payloads stay distinct across phases).
    base: u64,
}

impl Runner {
    async fn phase(&mut self, step: &Step) -> PhaseSummary {
        let args = &self.args;
        let cpu_before = CpuSnapshot::read(args.server_pid, args.redis_pid);
        let redis_before = match &mut self.redis {
            Some(r) => r.snapshot().await,
            None => None,
        };
        let clients = self.links.len() as u64;
        let next = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicU64::new(0));
        let start = Instant::now() + SCHEDULE_DELAY;
        let mut replies = Vec::with_capacity(self.links.len());
        let mut outcome = Outcome::default();
        for (i, link) in self.links.iter().enumerate() {
            let plan = match step.rate {
                None => Plan::Greedy {
                    next: next.clone(),
                    total: step.total,
                    window: args.window,
                },
                Some(rate) => Plan::Scheduled {
                    start,
                    rate,
                    first: i as u64,
                    stride: clients,
                    total: step.total,
                },
            };
            let (reply, rx) = oneshot::channel();
            let order = Order {
                plan,
                base: self.base,
                drain: Duration::from_secs(args.drain_s),
                deadline: self.deadline,
                finished: finished.clone(),
                reply,
            };
            if link.send(order).await.is_err() {
                count_into(&mut outcome.broken, "connection task ended");
                continue;
            }
            replies.push(rx);
        }
        let mut cpu_after = None;
        if let Some(rate) = step.rate {
            // The submit window: the schedule's span.
            let span = Duration::from_secs_f64(step.total.saturating_sub(1) as f64 / rate);
            tokio::time::sleep_until((start + span).into()).await;
            cpu_after = Some(CpuSnapshot::read(args.server_pid, args.redis_pid));
        }
        // A greedy phase's window ends with its last task (not with the
        // drain time that gives up on lost ones): the counters are read
        // again whenever more tasks have ended.
        let mut all = std::pin::pin!(futures_util::future::join_all(replies));
        let mut seen = 0;
        let mut at_last_end = None;
        let results = loop {
            tokio::select! {
                results = &mut all => break results,
                _ = tokio::time::sleep(CPU_POLL), if cpu_after.is_none() => {
                    let now = finished.load(std::sync::atomic::Ordering::Relaxed);
                    if now != seen {
                        seen = now;
                        at_last_end = Some(CpuSnapshot::read(args.server_pid, args.redis_pid));
                    }
                }
            }
        };
        for r in results {
            match r {
                Ok(o) => outcome.merge(&o),
                Err(_) => count_into(&mut outcome.broken, "connection task ended"),
            }
        }
        let cpu_after = cpu_after
            .or(at_last_end)
            .unwrap_or_else(|| CpuSnapshot::read(args.server_pid, args.redis_pid));
        let redis_after = match &mut self.redis {
            Some(r) => r.snapshot().await,
            None => None,
        };
        self.base += step.total;
        let scheduled_start = step.rate.map(|_| start);
        let mut s = PhaseSummary::of(
            step.kind,
            step.label.clone(),
            step.rate,
            step.total,
            &outcome,
            scheduled_start,
        );
        s.cpu = cpu_before.until(&cpu_after);
        if let (Some(a), Some(b)) = (redis_before, redis_after) {
            let c = commands_between(&a, &b);
            s.redis_commands = Some(c);
            if s.submitted > 0 {
                s.redis_cmds_per_task = Some(c as f64 / s.submitted as f64);
            }
        }
        s
    }
}

/// Connections opened, and why the others were not.
struct Connected {
    handles: Vec<JoinHandle<bool>>,
    links: Vec<mpsc::Sender<Order>>,
    failures: Counts,
    elapsed: Duration,
}

async fn connect_all(args: &TasksArgs) -> Result<Connected, String> {
    let endpoint = ws_endpoint(&args.url);
    let mut urls = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let token = mint_token(&args.secret, &format!("{}{i}", args.user_prefix))?;
        urls.push(ws_url_with_token(&endpoint, &token));
    }
    let limit = Duration::from_secs(args.connect_timeout_s);
    let buffer = args.read_buffer_bytes;
    let started = Instant::now();
    let results: Vec<_> = futures_util::stream::iter(urls)
        .map(|url| async move { connect_and_welcome(&url, limit, buffer).await })
        .buffered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let name_json: Arc<str> = serde_json::to_string(&args.name)
        .map_err(|e| e.to_string())?
        .into();
    let payloads = Payloads::new(args.payload_bytes);
    let mut out = Connected {
        handles: Vec::new(),
        links: Vec::new(),
        failures: Counts::new(),
        elapsed,
    };
    for r in results {
        match r {
            Ok(ws) => {
                let (tx, rx) = mpsc::channel(1);
                let task = conn::connection(ws, name_json.clone(), payloads.clone(), rx);
                out.handles.push(tokio::spawn(task));
                out.links.push(tx);
            }
            Err(e) => count_into(&mut out.failures, e),
        }
    }
    Ok(out)
}

fn print_scenario(args: &TasksArgs) {
    let last = args.clients.saturating_sub(1);
    let rates: Vec<String> = args
        .rate_steps()
        .iter()
        .map(|r| format!("{}/s", summary::fmt_rate(*r)))
        .collect();
    let fixed = if rates.is_empty() {
        "no fixed-rate steps".to_string()
    } else {
        format!(
            "fixed rate {} for {} s each",
            rates.join(", "),
            args.duration_s
        )
    };
    println!(
        "scenario: tasks: {} clients (users {p}0..{p}{last}) on {}, task {:?}, payload {} bytes, \
         warm-up {}, throughput {} × {} tasks (window {} per client), {fixed}, drain {} s",
        args.clients,
        args.url,
        args.name,
        args.payload_bytes,
        args.warmup,
        args.runs,
        args.tasks,
        args.window,
        args.drain_s,
        p = args.user_prefix,
    );
}

/// Run the scenario; whether every task was done with its payload.
pub async fn run(args: TasksArgs) -> Result<bool, String> {
    args.check()?;
    let deadline = Instant::now() + Duration::from_secs(args.max_run_s);
    print_scenario(&args);
    let redis = match &args.redis_url {
        Some(url) => Some(RedisCount {
            probe: RedisProbe::connect(url).await?,
            first: None,
            last: None,
            snapshots: 0,
        }),
        None => None,
    };
    let connected = connect_all(&args).await?;
    println!(
        "connected: {} of {} in {:.2} s{}",
        connected.links.len(),
        args.clients,
        connected.elapsed.as_secs_f64(),
        if connected.failures.is_empty() {
            String::new()
        } else {
            format!("; FAILURES: {}", fmt_counts(&connected.failures))
        }
    );
    let n_connected = connected.links.len();
    let mut runner = Runner {
        args: args.clone(),
        links: connected.links,
        redis,
        deadline,
        base: 0,
    };
    let mut phases = Vec::new();
    if n_connected > 0 {
        for (i, step) in steps(&args).iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(PAUSE).await;
            }
            let s = runner.phase(step).await;
            println!("{}", s.line());
            phases.push(s);
            if Instant::now() >= deadline {
                println!("TIMED OUT: --max-run-s passed; later phases skipped");
                break;
            }
        }
    }
    let tasks: u64 = phases.iter().map(|p| p.submitted).sum();
    let totals = runner.redis.as_ref().and_then(|r| r.totals(tasks));
    drop(runner);
    let mut closed_cleanly = 0;
    for h in connected.handles {
        closed_cleanly += usize::from(h.await.unwrap_or(false));
    }

    println!();
    let rows: Vec<Vec<String>> = phases.iter().map(PhaseSummary::row).collect();
    println!("{}", text_table(&HEADER, &rows));
    println!(
        "  (tasks/s: throughput runs N / (first submit → last done); fixed rate: what was sent. \
         Latency: submit (fixed rate: scheduled time) → done seen. cpu: busy per core, \
         server/redis: share of one core)"
    );
    if let Some(t) = &totals {
        let top: Vec<String> = t
            .top_per_task
            .iter()
            .map(|(n, c)| format!("{n} {c:.2}"))
            .collect();
        println!(
            "redis:       {} commands over {} tasks (warm-up included): {:.1} per task; \
             per task: {}",
            t.commands,
            t.tasks,
            t.cmds_per_task,
            top.join(", ")
        );
    }
    println!("closing:     {closed_cleanly} of {n_connected} connections closed with a completed close handshake");
    let ok = n_connected == args.clients
        && !phases.is_empty()
        && phases.len() == steps(&args).len()
        && phases.iter().all(PhaseSummary::ok);
    if let Some(path) = &args.json {
        let command: Vec<String> = std::env::args().map(|a| shell_quote(&a)).collect();
        let json = RunJson {
            command: command.join(" "),
            url: &args.url,
            name: &args.name,
            clients: args.clients,
            window: args.window,
            payload_bytes: args.payload_bytes,
            tasks: args.tasks,
            runs: args.runs,
            duration_s: args.duration_s,
            warmup: args.warmup,
            connected: n_connected,
            connect_failures: &connected.failures,
            phases: &phases,
            redis: totals,
            closed_cleanly,
            ok,
        };
        let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    print_result(
        ok,
        "every task was done, each with its own payload as result",
    );
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    fn parse(line: &str) -> TasksArgs {
        match Cli::try_parse_from(line.split_whitespace())
            .unwrap_or_else(|e| panic!("{line}: {e}"))
            .command
        {
            Command::Tasks(a) => a,
            _ => panic!("not tasks"),
        }
    }

    #[test]
    fn defaults_match_the_peers_runs() {
        let a = parse("switchboard-bench tasks");
        assert_eq!((a.clients, a.window, a.payload_bytes), (50, 32, 100));
        assert_eq!((a.tasks, a.runs, a.warmup), (5000, 2, 2000));
        assert_eq!(a.name, "echo");
        assert!(a.rate_steps().is_empty());
        assert!(a.check().is_ok());
        let names: Vec<String> = steps(&a).iter().map(|s| s.label.clone()).collect();
        assert_eq!(names, ["warm-up", "throughput 1", "throughput 2"]);
    }

    #[test]
    fn rates_make_fixed_rate_steps_in_order() {
        let a = parse(
            "switchboard-bench tasks --tasks 0 --warmup 0 --rate 1000 --rates 200,50 \
             --duration-s 5 --redis-url redis://127.0.0.1:6395 --server-pid 42 --json out.json",
        );
        assert_eq!(a.rate_steps(), vec![1000.0, 200.0, 50.0]);
        let s = steps(&a);
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[0],
            Step {
                kind: Kind::Rate,
                label: "1,000/s".into(),
                total: 5000,
                rate: Some(1000.0)
            }
        );
        assert_eq!((s[1].total, s[2].total), (1000, 250));
        assert_eq!(a.server_pid, Some(42));
        assert_eq!(a.json, Some(PathBuf::from("out.json")));
    }

    #[test]
    fn nonsense_is_refused() {
        assert!(parse("switchboard-bench tasks --tasks 0").check().is_err());
        assert!(parse("switchboard-bench tasks --runs 0 --rate 0")
            .check()
            .is_err());
        assert!(parse("switchboard-bench tasks --clients 0")
            .check()
            .is_err());
        assert!(parse("switchboard-bench tasks --runs 0 --rate 10")
            .check()
            .is_ok());
    }
}
