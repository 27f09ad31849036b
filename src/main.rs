//! The `switchboard` command line (docs/protocol.md §12): `serve` (the
//! default), `token`, `check-config`, `worker`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use switchboard::config::{BrokerKind, Config};
use switchboard::server::{self, ServerError};

#[derive(Parser)]
#[command(name = "switchboard", version, about = "A real-time WebSocket hub")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (default: $SWITCHBOARD_CONFIG, else config/default.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub (the default).
    Serve,
    /// Print a JWT signed with the configured key (development and tests).
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        user: String,
        /// Glob patterns of rooms the token may join.
        #[arg(long, num_args = 1..)]
        rooms: Option<Vec<String>>,
        /// Glob patterns of rooms the token may publish to (default: --rooms).
        #[arg(long, num_args = 1..)]
        publish: Option<Vec<String>>,
        /// Lifetime: 30s, 15m, 2h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// PEM private key, for RS256 / ES256 (the config holds only the public key).
        #[arg(long)]
        private_key: Option<PathBuf>,
    },
    /// Validate the config and print the effective values (secrets masked).
    CheckConfig,
    /// Publish a metric series into a room through the HTTP API (for the demo dashboard).
    DemoFeed {
        /// The hub's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        url: String,
        /// An admin API key (default: the config's first auth.api_keys).
        #[arg(long, env = "SWITCHBOARD_API_KEY")]
        api_key: Option<String>,
        /// The room to publish to.
        #[arg(long, default_value = "metrics")]
        room: String,
        /// Milliseconds between points.
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
    /// Run task workers only (cluster mode): health and metrics on server.host:server.port.
    Worker {
        /// Tasks run at once (default: tasks.workers, or 4 when that is 0).
        #[arg(long)]
        workers: Option<usize>,
    },
}

/// The config (a bad one prints its error and exits 2).
fn load(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

/// jemalloc, because it gives memory back: a background thread returns
/// pages unused for 0.2 s (`dirty_decay_ms`) to the system outright
/// (`muzzy_decay_ms:0`: no lazy `MADV_FREE`, which would stay in RSS), so
/// after a wave of connections has gone, so has their memory; pages in
/// use again sooner (any steady traffic) are never given back. It also
/// packs an idle connection's small allocations tighter than glibc (4.1
/// against 5.4 KB each in `bench/compare.sh`'s idle scenario). See
/// `docs/benchmarks.md`.
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (read once at start; `_RJEM_MALLOC_CONF` in the
/// environment overrides them).
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:200,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            init_tracing();
            finish("switchboard", serve(config))
        }
        Command::Token {
            user,
            rooms,
            publish,
            ttl,
            private_key,
        } => token(&config, &user, rooms, publish, ttl, private_key.as_deref()),
        Command::DemoFeed {
            url,
            api_key,
            room,
            interval_ms,
        } => demo_feed(&config, &url, api_key, &room, interval_ms),
        Command::CheckConfig => {
            let mut shown = config.masked();
            shown.server.host = config.listen_host().to_owned();
            print!("{}", shown.to_toml_string());
            ExitCode::SUCCESS
        }
        Command::Worker { workers } => run_worker(config, workers),
    }
}

/// Success, or the error logged and printed with `what`.
fn finish(what: &str, result: Result<(), ServerError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{what} stopped");
            eprintln!("{what}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `switchboard token`: prints a JWT signed with the configured key.
fn token(
    config: &Config,
    user: &str,
    rooms: Option<Vec<String>>,
    publish: Option<Vec<String>>,
    ttl: Duration,
    private_key: Option<&std::path::Path>,
) -> ExitCode {
    match switchboard::auth::mint(&config.auth, user, rooms, publish, ttl, private_key) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchboard token: {e}");
            ExitCode::from(2)
        }
    }
}

/// `switchboard demo-feed`: a metric series into a room, until interrupted.
fn demo_feed(
    config: &Config,
    url: &str,
    api_key: Option<String>,
    room: &str,
    interval_ms: u64,
) -> ExitCode {
    let Some(key) = api_key.or_else(|| config.auth.api_keys.first().cloned()) else {
        eprintln!("switchboard demo-feed: give --api-key (or set auth.api_keys)");
        return ExitCode::from(2);
    };
    init_tracing();
    let every = Duration::from_millis(interval_ms.max(10));
    let feed = switchboard::demo::feed(url, &key, room, every);
    match tokio::runtime::Runtime::new().map(|rt| rt.block_on(feed)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) | Err(e) => {
            eprintln!("switchboard demo-feed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `switchboard worker`: task workers only, cluster mode.
fn run_worker(config: Config, workers: Option<usize>) -> ExitCode {
    if config.broker.kind != BrokerKind::Redis {
        eprintln!(
            "switchboard worker: needs broker.kind = \"redis\" (with the memory broker, tasks run inside the hub: tasks.workers)"
        );
        return ExitCode::from(2);
    }
    init_tracing();
    let hands = workers.unwrap_or(match config.tasks.workers {
        0 => 4,
        n => n,
    });
    finish("switchboard worker", worker(config, hands))
}

/// Binds `server.host`:`server.port` (see `Config::listen_host`) and
/// serves until SIGTERM or SIGINT.
fn serve(config: Config) -> Result<(), ServerError> {
    let listener = std::net::TcpListener::bind((config.listen_host(), config.server.port))?;
    actix_web::rt::System::new().block_on(server::run(config, listener, server::signal()))
}

/// Binds `server.host`:`server.port` (health and metrics) and runs task
/// workers until SIGTERM or SIGINT.
fn worker(config: Config, hands: usize) -> Result<(), ServerError> {
    let listener = std::net::TcpListener::bind((config.listen_host(), config.server.port))?;
    actix_web::rt::System::new().block_on(server::run_worker(
        config,
        listener,
        hands,
        server::signal(),
    ))
}

/// Logs on stderr: text (coloured only on a terminal, and not with
/// `NO_COLOR` set), or JSON with `SWITCHBOARD_LOG_FORMAT=json`.
fn init_tracing() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    if std::env::var("SWITCHBOARD_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
