//! An echo server for the WebSocket conformance run (the Autobahn
//! TestSuite's `fuzzingclient`, see `tests/autobahn/run.sh`): every
//! message comes back as it came, through the hub's own frame reader,
//! outbound queue and socket writer.
//!
//! ```sh
//! cargo run --example autobahn_echo -- 127.0.0.1:9001
//! ```
//!
//! Prints `listening on HOST:PORT` once it accepts. Not part of the hub: it
//! has no auth and no limits but the message size (16 MiB + 1 KiB, so the
//! suite's largest messages fit).

use std::time::Duration;

use switchboard::session::echo::EchoLimits;
use switchboard::session::outbound::Bounds;

const MAX_MESSAGE: usize = 16 * 1024 * 1024 + 1024;

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".to_owned());
    let listener = std::net::TcpListener::bind(&addr)?;
    println!("listening on {}", listener.local_addr()?);
    let limits = EchoLimits {
        max_message_bytes: MAX_MESSAGE,
        outbound: Bounds {
            frames: 4096,
            bytes: 4 * MAX_MESSAGE,
        },
        write_timeout: Duration::from_secs(30),
    };
    actix_web::rt::System::new().block_on(switchboard::http::echo::serve(listener, limits))
}
