//! Prometheus metrics, served as text on `GET /metrics`.
//!
//! Counters touched once per connection or per frame use the shared
//! registry directly. The two that move once per *recipient* — messages
//! delivered and delivery latency — are accumulated in thread-local
//! buffers on each worker and flushed by that worker's hub once a second,
//! so the fan-out path shares no cache line across worker threads.

use std::cell::RefCell;
use std::sync::LazyLock;

use prometheus::local::{LocalHistogram, LocalIntCounter};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub connections_open: IntGauge,
    pub connections_accepted: IntCounter,
    pub connections_rejected: IntCounterVec,
    pub connections_closed: IntCounterVec,
    pub frames_received: IntCounterVec,
    pub messages_delivered: IntCounter,
    pub delivery_latency: Histogram,
    pub errors: IntCounterVec,
    pub slow_consumer_closes: IntCounter,
    pub published: IntCounterVec,
    pub redis_reconnects: IntCounterVec,
    pub redis_malformed: IntCounter,
    pub fanout_dropped: IntCounter,
    pub tasks: TaskMetrics,
}

/// The async tasks' metrics.
pub struct TaskMetrics {
    pub submitted: IntCounterVec,
    pub started: IntCounterVec,
    pub succeeded: IntCounterVec,
    pub failed: IntCounterVec,
    pub retried: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub run_seconds: Histogram,
    pub queued: IntGauge,
    pub running: IntGauge,
    pub dead: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

/// Publish to socket: 100 µs to 5 s.
fn delivery_latency(registry: &Registry) -> Histogram {
    histogram(
        registry,
        "switchboard_delivery_latency_seconds",
        "From a message's publish to the moment its frame is handed to the socket.",
        vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0,
        ],
    )
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let connections_open = gauge(
            &registry,
            "switchboard_connections_open",
            "Open WebSocket sessions.",
        );
        let delivery_latency = delivery_latency(&registry);
        Metrics {
            connections_open,
            connections_accepted: counter(
                &registry,
                "switchboard_connections_accepted_total",
                "WebSocket sessions accepted (authenticated and within limits).",
            ),
            connections_rejected: counter_vec(
                &registry,
                "switchboard_connections_rejected_total",
                "WebSocket upgrades refused, by close reason.",
                "reason",
            ),
            connections_closed: counter_vec(
                &registry,
                "switchboard_connections_closed_total",
                "Sessions closed by the server, by close reason.",
                "reason",
            ),
            frames_received: counter_vec(
                &registry,
                "switchboard_frames_received_total",
                "Client frames received, by type (`invalid` for frames that did not parse).",
                "type",
            ),
            messages_delivered: counter(
                &registry,
                "switchboard_messages_delivered_total",
                "Frames of published messages handed to recipients' sockets.",
            ),
            delivery_latency,
            errors: counter_vec(
                &registry,
                "switchboard_errors_total",
                "Error frames sent to clients, by code.",
                "code",
            ),
            slow_consumer_closes: counter(
                &registry,
                "switchboard_slow_consumer_closes_total",
                "Sessions closed 1013 because their outbound queue was full.",
            ),
            published: counter_vec(
                &registry,
                "switchboard_published_total",
                "Publishes accepted, by target (room, user, broadcast).",
                "target",
            ),
            redis_reconnects: counter_vec(
                &registry,
                "switchboard_redis_reconnects_total",
                "Times a Redis connection came back after an outage, by connection (subscriber, commands).",
                "connection",
            ),
            tasks: TaskMetrics::new(&registry),
            fanout_dropped: counter(
                &registry,
                "switchboard_fanout_dropped_total",
                "Fan-outs dropped for a hub whose mailbox was full (their recipients are closed 1013).",
            ),
            redis_malformed: counter(
                &registry,
                "switchboard_redis_malformed_total",
                "Malformed payloads received on a hub channel and ignored.",
            ),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl TaskMetrics {
    fn new(registry: &Registry) -> TaskMetrics {
        TaskMetrics {
            submitted: counter_vec(
                registry,
                "switchboard_tasks_submitted_total",
                "Tasks submitted (not counting repeated idempotency keys), by name.",
                "name",
            ),
            started: counter_vec(
                registry,
                "switchboard_tasks_started_total",
                "Task attempts started by this process's workers, by name.",
                "name",
            ),
            succeeded: counter_vec(
                registry,
                "switchboard_tasks_succeeded_total",
                "Tasks done, by name.",
                "name",
            ),
            failed: counter_vec(
                registry,
                "switchboard_tasks_failed_total",
                "Task attempts that failed (error, time-out), by name.",
                "name",
            ),
            retried: counter_vec(
                registry,
                "switchboard_tasks_retried_total",
                "Failed attempts retried, by name.",
                "name",
            ),
            dead_lettered: counter_vec(
                registry,
                "switchboard_tasks_dead_lettered_total",
                "Tasks failed for good and copied to the dead letters, by name.",
                "name",
            ),
            run_seconds: histogram(
                registry,
                "switchboard_task_run_seconds",
                "How long one attempt of a task's handler ran.",
                vec![
                    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0,
                ],
            ),
            queued: gauge(
                registry,
                "switchboard_tasks_queued",
                "Tasks waiting for a worker (cluster-wide in cluster mode).",
            ),
            running: gauge(
                registry,
                "switchboard_tasks_running",
                "Tasks a worker holds (pending in the consumer group).",
            ),
            dead: gauge(
                registry,
                "switchboard_tasks_dead_letters",
                "Tasks in the dead-letter stream.",
            ),
        }
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Creates the labelled series a dashboard expects at 0 (Prometheus
/// clients only export a label value once it was used), and
/// `switchboard_build_info{version, role}` (`role`: `hub` or `worker`).
pub fn init(role: &str, task_names: &[String]) {
    use crate::protocol::{CloseReason, ErrorCode};
    let m = metrics();
    let info = IntGaugeVec::new(
        Opts::new(
            "switchboard_build_info",
            "Always 1: the version and the role of this process.",
        ),
        &["version", "role"],
    )
    .expect("valid metric");
    if m.registry.register(Box::new(info.clone())).is_ok() {
        info.with_label_values(&[env!("CARGO_PKG_VERSION"), role])
            .set(1);
    }
    for reason in CloseReason::ALL {
        m.connections_rejected.with_label_values(&[reason.label()]);
        m.connections_closed.with_label_values(&[reason.label()]);
    }
    for code in ErrorCode::ALL {
        m.errors.with_label_values(&[code.as_str()]);
    }
    for target in ["room", "user", "broadcast"] {
        m.published.with_label_values(&[target]);
    }
    for connection in ["subscriber", "commands"] {
        m.redis_reconnects.with_label_values(&[connection]);
    }
    for name in task_names {
        let t = &m.tasks;
        for counter in [
            &t.submitted,
            &t.started,
            &t.succeeded,
            &t.failed,
            &t.retried,
            &t.dead_lettered,
        ] {
            counter.with_label_values(&[name]);
        }
    }
}

struct LocalMetrics {
    delivered: LocalIntCounter,
    latency: LocalHistogram,
}

thread_local! {
    static LOCAL: RefCell<Option<LocalMetrics>> = const { RefCell::new(None) };
}

fn with_local(f: impl FnOnce(&mut LocalMetrics)) {
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        let local = l.get_or_insert_with(|| LocalMetrics {
            delivered: metrics().messages_delivered.local(),
            latency: metrics().delivery_latency.local(),
        });
        f(local);
    });
}

/// One message frame was handed to a socket, `latency_s` after its publish.
pub fn record_delivery(latency_s: f64) {
    with_local(|l| {
        l.delivered.inc();
        l.latency.observe(latency_s);
    });
}

/// Publishes this thread's buffered counts to the shared registry.
pub fn flush_local() {
    with_local(|l| {
        l.delivered.flush();
        l.latency.flush();
    });
}
