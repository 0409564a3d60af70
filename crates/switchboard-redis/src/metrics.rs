//! The broker's Prometheus metrics, labelled by shard.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

pub(crate) struct Metrics {
    pub(crate) up: IntGaugeVec,
    pub(crate) reconnects: IntCounterVec,
    pub(crate) errors: IntCounterVec,
    pub(crate) messages: IntCounterVec,
    pub(crate) write_batch_size: HistogramVec,
}

impl Metrics {
    pub(crate) fn new(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| {
            let metric = IntGaugeVec::new(Opts::new(name, help), &["shard"])?;
            registry.register(Box::new(metric.clone()))?;
            Ok::<_, prometheus::Error>(metric)
        };
        let counter = |name: &str, help: &str| {
            let metric = IntCounterVec::new(Opts::new(name, help), &["shard"])?;
            registry.register(Box::new(metric.clone()))?;
            Ok::<_, prometheus::Error>(metric)
        };
        Ok(Metrics {
            up: gauge(
                "switchboard_redis_shard_up",
                "1 while the shard's pub/sub connection is up and subscribed, else 0.",
            )?,
            reconnects: counter(
                "switchboard_redis_reconnects_total",
                "Times the shard's pub/sub connection was re-established after a loss.",
            )?,
            errors: counter(
                "switchboard_redis_errors_total",
                "Redis calls that failed or timed out, and lost pub/sub connections.",
            )?,
            messages: counter(
                "switchboard_redis_messages_total",
                "Pub/sub messages received from the shard.",
            )?,
            write_batch_size: {
                let metric = HistogramVec::new(
                    HistogramOpts::new(
                        "switchboard_redis_write_batch_size",
                        "Registry and presence writes sent to the shard in one pipeline.",
                    )
                    .buckets(vec![1.0, 10.0, 100.0, 500.0, 1000.0]),
                    &["shard"],
                )?;
                registry.register(Box::new(metric.clone()))?;
                metric
            },
        })
    }
}
