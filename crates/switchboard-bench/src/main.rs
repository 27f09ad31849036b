//! `switchboard-bench`: the load generator for a running Switchboard hub.
//!
//! Two scenarios, each a subcommand:
//!
//! - `fanout`: many subscribers join one room, a few publishers publish into
//!   it at a fixed aggregate rate; every subscriber checks that it received
//!   every message exactly once and in order (per publisher and by message
//!   id), and measures end-to-end latency from the publisher's wall clock.
//!   With `--publish-url` the publishers talk to another instance, which
//!   measures cross-instance (Redis) latency.
//! - `connections`: open N authenticated connections with bounded
//!   concurrency, measure time to `welcome`, hold them, close them cleanly.
//! - `tasks`: async tasks (`task` frames to a handler such as `echo`):
//!   throughput of N tasks, latency at fixed offered rates from each
//!   task's scheduled time to its `done`, every result checked; Redis
//!   commands per task and CPU when told where to look.
//!
//! Every run prints a header naming the exact command line and the machine,
//! then the numbers. Every phase is bounded by a count and by time
//! (`--duration-s`), so a run always ends by itself.
//!
//! Tokens are minted here (HS256, `--secret`, with `switchboard::auth::mint`),
//! so the server must use the same secret; `config/bench.toml` keeps the
//! development default and raises the per-connection limits the bench would
//! otherwise hit.
//!
//! This file is the command line only; the modules:
//!
//! - [`fanout`] and [`connections`]: the two scenarios, phase by phase;
//!   [`tasks`]: the async-task scenario, with its own modules.
//! - [`client`]: one WebSocket client: URL, token, welcome, join, close.
//! - [`server_stats`]: the hub's own numbers, `/api/stats` and `/metrics`.
//! - [`report`]: the header and the formatting of counts and rates;
//!   [`latency`]: latency histograms; [`cpu`]: CPU use from `/proc`;
//!   [`clock`]: the wall clock and bounded waits.

mod client;
mod clock;
mod connections;
mod cpu;
mod fanout;
mod latency;
mod report;
mod rss;
mod server_stats;
mod tasks;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "switchboard-bench",
    version,
    about = "Load generator for a Switchboard hub: room fan-out latency and connection rate.",
    after_help = "Start a hub with limits raised for benchmarking first:\n  \
                  target/release/switchboard serve --config config/bench.toml &\n\
                  then e.g.\n  \
                  switchboard-bench fanout --subscribers 1000 --publishers 2 --messages 2000 --rate 1000\n  \
                  switchboard-bench connections --count 5000 --concurrency 200\n  \
                  switchboard-bench tasks --tasks 5000 --rates 1000,200 (hub with a [tasks.handlers.echo])"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Subscribers in one room, publishers at a fixed rate: delivery, order, latency.
    Fanout(FanoutArgs),
    /// Open many authenticated connections: connect rate and time to welcome.
    Connections(ConnectionsArgs),
    /// Async tasks: throughput, latency at fixed rates, results checked.
    Tasks(tasks::TasksArgs),
}

#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Hub address, `ws://HOST:PORT` (the path `/ws` is added when absent).
    #[arg(long, default_value = "ws://127.0.0.1:8000")]
    pub url: String,
    /// HS256 secret to sign tokens with; must be the server's `auth.jwt_secret`.
    #[arg(long, default_value = switchboard::config::DEV_JWT_SECRET)]
    pub secret: String,
    /// Admin API key; when given, the server's own connection count is read
    /// from `GET /api/stats` at each phase (a cross-check of its registry).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Upper bound on the whole run, in seconds; phases still running then are
    /// cut short and reported as such.
    #[arg(long, default_value_t = 300)]
    pub duration_s: u64,
    /// Time allowed for one connection's TCP connect, upgrade and welcome.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout_s: u64,
    /// Read buffer per connection in bytes (allocated up front by
    /// tungstenite, whose default of 128 KiB would cost 640 MiB for 5000
    /// connections).
    #[arg(long, default_value_t = 16 * 1024)]
    pub read_buffer_bytes: usize,
}

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Where the publishers connect (another instance, for cross-instance
    /// latency); default: `--url`.
    #[arg(long)]
    pub publish_url: Option<String>,
    /// Subscriber connections, joined to `--room` (or spread over `--rooms`).
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Distinct user ids among the subscribers (subscriber i is user i mod
    /// this); default: one user per subscriber. Fewer users means fewer
    /// `joined`/`left` presence frames.
    #[arg(long)]
    pub users: Option<usize>,
    /// Publisher connections (each its own user, also a room member).
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,
    /// Messages in total, spread evenly over the publishers.
    #[arg(long, default_value_t = 2000)]
    pub messages: u64,
    /// Aggregate publish rate, messages per second, over all publishers.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Approximate size of each message's `data` object in bytes (padded).
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// The room everyone joins (with `--rooms`, the rooms' common prefix).
    #[arg(long, default_value = "bench")]
    pub room: String,
    /// Rooms, as bench/compare.sh spreads its members: subscriber i and
    /// publisher p join `<room>-<i mod rooms>` and `<room>-<p mod rooms>`
    /// (so at most `--publishers`); 1: everyone in `--room`.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Subscribers connecting at the same time (connections are opened in a
    /// sliding window of this size so the connect storm stays bounded).
    #[arg(long, default_value_t = 100)]
    pub connect_concurrency: usize,
    /// After the last publish: seconds to wait for outstanding deliveries.
    #[arg(long, default_value_t = 10)]
    pub drain_s: u64,
    /// A sweep: one run per rate (msg/s, comma-separated), each sending
    /// `--step-s` seconds' worth of messages, stopping after the first step
    /// not sustained (delivery ratio below `--min-ratio`, p99 above
    /// `--max-p99-ms`, a close, or under 98% of the rate achieved). Its
    /// result is the last sustained step: max deliveries/s, as the shared
    /// harness reports it.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    #[arg(long, default_value_t = 4)]
    pub step_s: u64,
    #[arg(long, default_value_t = 100.0)]
    pub max_p99_ms: f64,
    #[arg(long, default_value_t = 0.99)]
    pub min_ratio: f64,
    /// Also write the run (every step) as JSON, the harness's key names.
    #[arg(long)]
    pub json: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connections to open, each for a distinct user.
    #[arg(long, default_value_t = 5000)]
    pub count: usize,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Seconds to hold all connections open (answering pings) before closing.
    #[arg(long, default_value_t = 2)]
    pub hold_s: u64,
    /// Each connection joins one of this many rooms (`bench-<i mod rooms>`)
    /// once welcomed; 0: none.
    #[arg(long, default_value_t = 0)]
    pub rooms: usize,
    /// The server's PID: its RSS is read before connecting, with every
    /// connection open (KB per idle connection, as the harness reports it)
    /// and `--settle-s` after they closed (does the memory come back?).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Seconds to wait after closing before the last RSS reading.
    #[arg(long, default_value_t = 15)]
    pub settle_s: u64,
    /// Churn: connect, hold, close this many times with the same users,
    /// checking each time that the server let go of every connection
    /// (`/api/stats`, with `--api-key`) and, with `--server-pid`, its RSS
    /// after each cycle (growth from cycle 2 to the last, as the harness's
    /// soak reports it).
    #[arg(long, default_value_t = 1)]
    pub cycles: u32,
    /// Also write the figures as JSON (the harness's key names).
    #[arg(long)]
    pub json: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    report::print_header();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Fanout(args) => fanout::run(args).await,
            Command::Connections(args) => connections::run(args).await,
            Command::Tasks(args) => tasks::run(args).await,
        }
    });
    // Tasks still blocked on a dead server must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(line: &str) -> Command {
        Cli::try_parse_from(line.split_whitespace())
            .unwrap_or_else(|e| panic!("{line}: {e}"))
            .command
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn readme_fanout_commands_parse() {
        let Command::Fanout(a) = parse(
            "switchboard-bench fanout --subscribers 1000 --publishers 2 --messages 2000 \
             --rate 200 --api-key bench-key",
        ) else {
            panic!("not fanout");
        };
        assert_eq!(
            (a.subscribers, a.publishers, a.messages, a.rate),
            (1000, 2, 2000, 200.0)
        );
        assert_eq!(a.common.api_key.as_deref(), Some("bench-key"));
        assert_eq!(a.common.url, "ws://127.0.0.1:8000");
        assert_eq!(a.common.secret, switchboard::config::DEV_JWT_SECRET);
        assert_eq!(
            (a.room.as_str(), a.users, a.publish_url),
            ("bench", None, None)
        );

        let Command::Fanout(a) = parse(
            "switchboard-bench fanout --url ws://127.0.0.1:8001 --publish-url ws://127.0.0.1:8002 \
             --subscribers 500 --messages 2000 --rate 200 --users 10",
        ) else {
            panic!("not fanout");
        };
        assert_eq!(a.common.url, "ws://127.0.0.1:8001");
        assert_eq!(a.publish_url.as_deref(), Some("ws://127.0.0.1:8002"));
        assert_eq!((a.subscribers, a.users), (500, Some(10)));
    }

    #[test]
    fn readme_connections_command_parses_with_defaults() {
        let Command::Connections(a) = parse(
            "switchboard-bench connections --count 5000 --concurrency 200 --api-key bench-key",
        ) else {
            panic!("not connections");
        };
        assert_eq!((a.count, a.concurrency, a.hold_s), (5000, 200, 2));
        assert_eq!((a.common.duration_s, a.common.connect_timeout_s), (300, 10));
        assert_eq!(a.common.read_buffer_bytes, 16 * 1024);
    }
}
