//! Every node publishes its figures once a second to the read-only room `$sys.stats`, so the
//! demo page (or any subscriber the token allows) sees the cluster over the gateway itself. One
//! small publish per node per second, through the same broker path as any message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use prometheus::core::Collector;
use serde_json::json;

use crate::auth::unix_now_millis;
use crate::node::Node;

/// The room the figures go to.
pub const STATS_ROOM: &str = "$sys.stats";
/// How often each node publishes.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// The sum of a counter over all its label values.
fn total(counter: &IntCounterVec) -> u64 {
    counter
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|metric| metric.get_counter().get_value() as u64)
        .sum()
}

/// Messages per second between two readings of a counter.
fn rate(now: u64, before: u64, elapsed: Duration) -> f64 {
    let per_sec = now.saturating_sub(before) as f64 / elapsed.as_secs_f64().max(0.001);
    (per_sec * 10.0).round() / 10.0
}

/// Publishes this node's figures every [`STATS_INTERVAL`] until the task is aborted. Skips a tick
/// while the broker is unhealthy rather than logging a failed publish every second.
pub async fn publish_stats(node: Arc<Node>) {
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let metrics = node.metrics().clone();
    let mut last = (
        Instant::now(),
        total(&metrics.frames_in),
        total(&metrics.frames_out),
    );
    loop {
        tick.tick().await;
        let now = (
            Instant::now(),
            total(&metrics.frames_in),
            total(&metrics.frames_out),
        );
        let elapsed = now.0 - last.0;
        let data = json!({
            "node": node.id(),
            "connections": node.session_count(),
            "messages_in_per_sec": rate(now.1, last.1, elapsed),
            "messages_out_per_sec": rate(now.2, last.2, elapsed),
            "uptime_secs": unix_now_millis().saturating_sub(node.started_at()) / 1000,
            "interval_ms": STATS_INTERVAL.as_millis() as u64,
        });
        last = now;
        if !node.broker_healthy() {
            continue;
        }
        // A failure is counted and logged by `publish`; the next tick tries again.
        let _ = node.publish(STATS_ROOM, data, None).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_with_one_decimal() {
        assert_eq!(rate(30, 10, Duration::from_secs(2)), 10.0);
        assert_eq!(rate(1, 0, Duration::from_secs(3)), 0.3);
        assert_eq!(rate(5, 9, Duration::from_secs(1)), 0.0);
        assert_eq!(rate(5, 0, Duration::ZERO), 5000.0);
    }

    #[test]
    fn the_stats_room_is_a_system_room() {
        assert!(crate::node::is_system_room(STATS_ROOM));
        assert!(crate::node::valid_room(STATS_ROOM));
    }
}
