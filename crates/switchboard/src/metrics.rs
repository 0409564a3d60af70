//! Prometheus metrics of one node. Every metric is listed in docs/metrics.md. Label values come
//! from small fixed sets (frame types, close codes, results), never from user input.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use switchboard_protocol::close;

/// Buckets of the broker call histogram, up to the Redis command timeout (2 s); the publish
/// histogram has all but the last.
const BROKER_CALL_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
];

pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    pub handshakes: IntCounterVec,
    pub frames_in: IntCounterVec,
    pub frames_out: IntCounterVec,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub deliveries: IntCounterVec,
    pub dropped: IntCounterVec,
    pub slow_closes: IntCounter,
    pub inbox_dropped: IntCounter,
    pub closes: IntCounterVec,
    pub errors_sent: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub session_panics: IntCounter,
    pub publish_seconds: Histogram,
    pub queue_wait_seconds: Histogram,
    pub queue_bytes: IntGauge,
    pub rooms: IntGauge,
    pub broker_errors: IntCounterVec,
    pub broker_call_seconds: HistogramVec,
    pub limit_refusals: IntCounterVec,
    pub ready: IntGauge,
    pub accept_waits: IntCounter,
    pub accept_waiting: IntGauge,
    pub client_addresses: IntGauge,
    pub connect_rate_addresses: IntGauge,
    pub internal_connections: IntGauge,
    pub internal_refused: IntCounter,
    pub sessions: IntGaugeVec,
    pub fallback_requests: IntCounterVec,
    pub forwarded_frames: IntCounterVec,
    pub deflate_frames: IntCounterVec,
    /// Pre-resolved children for the hot path, so a delivery costs one atomic add.
    pub room_deliveries: IntCounter,
    pub message_frames_out: IntCounter,
}

/// Close codes get their own label value; anything else is "other".
pub fn close_label(code: u16) -> &'static str {
    match code {
        close::NORMAL => "1000",
        close::GOING_AWAY => "1001",
        close::PROTOCOL_ERROR => "1002",
        close::INVALID_PAYLOAD => "1007",
        close::POLICY => "1008",
        close::TOO_BIG => "1009",
        close::INTERNAL => "1011",
        close::TRY_AGAIN_LATER => "1013",
        _ => "other",
    }
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(metric.clone()))?;
            Ok::<_, prometheus::Error>(metric)
        };
        let counter = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok::<_, prometheus::Error>(metric)
        };
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok::<_, prometheus::Error>(metric)
        };
        let sessions = IntGaugeVec::new(
            Opts::new(
                "switchboard_sessions",
                "Sessions open on this node, by transport (websocket, sse, poll).",
            ),
            &["transport"],
        )?;
        registry.register(Box::new(sessions.clone()))?;
        let frames_out = counter_vec(
            "switchboard_frames_out_total",
            "Frames written to clients, by frame type.",
            &["type"],
        )?;
        let deliveries = counter_vec(
            "switchboard_deliveries_total",
            "Messages queued to local sessions, by kind (room, direct, broadcast, join, leave).",
            &["kind"],
        )?;
        let publish_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "switchboard_publish_duration_seconds",
                "Time for the broker to accept a publish (offset assigned, history appended, fanned out).",
            )
            .buckets(BROKER_CALL_BUCKETS[..BROKER_CALL_BUCKETS.len() - 1].to_vec()),
        )?;
        registry.register(Box::new(publish_seconds.clone()))?;
        let broker_call_seconds = HistogramVec::new(
            HistogramOpts::new(
                "switchboard_broker_call_duration_seconds",
                "Time of every broker call the node makes, failed or not, by operation.",
            )
            .buckets(BROKER_CALL_BUCKETS.to_vec()),
            &["op"],
        )?;
        registry.register(Box::new(broker_call_seconds.clone()))?;
        let queue_wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "switchboard_queue_wait_seconds",
                "Time the oldest frame of each batch written to a client waited in the node, from being queued to the session until written to its socket.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0,
            ]),
        )?;
        registry.register(Box::new(queue_wait_seconds.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Metrics {
            connections: gauge(
                "switchboard_connections",
                "Sessions open on this node, all transports.",
            )?,
            handshakes: counter_vec(
                "switchboard_handshakes_total",
                "Session opening requests (WebSocket handshakes, GET /sse and GET /poll) on the public port, by result.",
                &["result"],
            )?,
            frames_in: counter_vec(
                "switchboard_frames_in_total",
                "Frames received from clients, by frame type (invalid: could not be decoded).",
                &["type"],
            )?,
            bytes_in: counter(
                "switchboard_bytes_in_total",
                "Payload bytes of data frames received from clients.",
            )?,
            bytes_out: counter(
                "switchboard_bytes_out_total",
                "Payload bytes of data frames written to clients.",
            )?,
            dropped: counter_vec(
                "switchboard_dropped_total",
                "Messages not delivered to a session, by reason (slow: its queue was full; closed: it was closing).",
                &["reason"],
            )?,
            slow_closes: counter(
                "switchboard_slow_consumer_closes_total",
                "Sessions closed with 1013 because their outbound queue overflowed.",
            )?,
            inbox_dropped: counter(
                "switchboard_inbox_dropped_total",
                "Unacknowledged inbox messages dropped to keep a user's inbox within --inbox-size, counted by the node whose persisted send dropped them.",
            )?,
            closes: counter_vec(
                "switchboard_closes_total",
                "Close frames sent by the server, by close code.",
                &["code"],
            )?,
            errors_sent: counter_vec(
                "switchboard_errors_sent_total",
                "Error frames sent to clients, by error code.",
                &["code"],
            )?,
            rate_limited: counter_vec(
                "switchboard_rate_limited_total",
                "Client frames over the per-connection rate limit, by kind (data, control: WebSocket ping and pong).",
                &["kind"],
            )?,
            session_panics: counter(
                "switchboard_session_panics_total",
                "Session tasks that panicked (the session was still cleaned up).",
            )?,
            queue_bytes: gauge(
                "switchboard_queue_bytes",
                "Bytes waiting in all sessions' outbound queues (including the batch being written).",
            )?,
            rooms: gauge(
                "switchboard_rooms",
                "Rooms with at least one local subscriber.",
            )?,
            broker_errors: counter_vec(
                "switchboard_broker_errors_total",
                "Broker calls that failed, by operation.",
                &["op"],
            )?,
            limit_refusals: counter_vec(
                "switchboard_limit_refusals_total",
                "Requests refused because they would pass a configured limit, by limit (subscriptions: --max-subscriptions; message_size: a publish or send whose frame would exceed --max-message-size).",
                &["limit"],
            )?,
            ready: gauge(
                "switchboard_ready",
                "1 when /readyz answers 200 (broker healthy and not draining), else 0.",
            )?,
            accept_waits: counter(
                "switchboard_accept_waits_total",
                "New connections on the public port that waited for --accept-rate before their handshake.",
            )?,
            accept_waiting: gauge(
                "switchboard_accept_waiting",
                "New connections on the public port waiting for --accept-rate now.",
            )?,
            client_addresses: gauge(
                "switchboard_client_addresses",
                "Client addresses with connections open on the public port (counted for --max-connections-per-ip).",
            )?,
            connect_rate_addresses: gauge(
                "switchboard_connect_rate_addresses",
                "Client addresses the --connect-rate-per-ip limiter remembers, as of its last pruning.",
            )?,
            internal_connections: gauge(
                "switchboard_internal_connections",
                "Connections open on the internal port.",
            )?,
            internal_refused: counter(
                "switchboard_internal_refused_total",
                "Connections to the internal port closed at once because --internal-max-connections were open.",
            )?,
            fallback_requests: counter_vec(
                "switchboard_fallback_requests_total",
                "Requests of the SSE and long-poll transports, by endpoint (open: GET /sse and /poll; poll: GET /poll/{session}; post: POST /sse|/poll/{session}; delete: DELETE /sse|/poll/{session}) and result (ok, not_found, forbidden, wrong_node, too_large, bad_frame, rate_limited, unavailable).",
                &["endpoint", "result"],
            )?,
            forwarded_frames: counter_vec(
                "switchboard_forwarded_frames_total",
                "Client frames of fallback sessions crossing nodes, by result (sent: POSTed here and forwarded to the session's node; received: forwarded here for a local session; dropped: received for a session gone or with its inbound full).",
                &["result"],
            )?,
            deflate_frames: counter_vec(
                "switchboard_deflate_frames_total",
                "Frames encoded for switchboard.v1.json+deflate sessions, by result (compressed or stored); a room fan-out counts once however many such subscribers it reaches.",
                &["result"],
            )?,
            sessions,
            room_deliveries: deliveries.with_label_values(&["room"]),
            message_frames_out: frames_out.with_label_values(&["message"]),
            frames_out,
            deliveries,
            publish_seconds,
            broker_call_seconds,
            queue_wait_seconds,
            registry,
        })
    }

    /// The registry, for the broker's own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// With `--tls-cert` only (absent otherwise): the certificate's expiry, for an alert before
    /// clients start refusing it.
    pub fn register_tls_expiry(&self, not_after: i64) -> prometheus::Result<()> {
        let expiry = IntGauge::new(
            "switchboard_tls_certificate_expiry_timestamp_seconds",
            "When the public port's TLS certificate expires (Unix time).",
        )?;
        expiry.set(not_after);
        self.registry.register(Box::new(expiry))
    }

    pub fn close_sent(&self, code: u16) {
        self.closes.with_label_values(&[close_label(code)]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|error| format!("# metrics encoding failed: {error}\n"))
    }
}

/// Adds one to a gauge until dropped, however the holder ends (cancelled, panicked).
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: &IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
