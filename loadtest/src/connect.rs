//! Scenario `connect`: opens N connections at a held rate, holds them idle, and reports handshake
//! latency and the server's resident memory per connection.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use tokio::sync::Mutex;

use crate::cli::ConnectArgs;
use crate::procfs::rss_bytes;
use crate::report::{ConnectResult, emit};
use crate::ws::{open, url_addr};

pub async fn run(args: ConnectArgs) -> Result<()> {
    let url = url_addr(&args.url)?;
    let rss_before = args.pid.map(rss_bytes).transpose()?;
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let failures = Arc::new(AtomicU64::new(0));
    let (socket_tx, mut socket_rx) = tokio::sync::mpsc::unbounded_channel();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut schedule =
        tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate.max(1) as f64));
    schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    for index in 0..args.connections {
        schedule.tick().await;
        if Instant::now() > deadline {
            bail!("timed out while opening connections");
        }
        let source = Ipv4Addr::new(
            127,
            0,
            0,
            1 + (index % u64::from(args.source_addresses.max(1))) as u8,
        );
        let target = args.url.clone();
        let histogram = histogram.clone();
        let failures = failures.clone();
        let socket_tx = socket_tx.clone();
        tokio::spawn(async move {
            let begun = Instant::now();
            match open(&target, url, Some(IpAddr::V4(source))).await {
                Ok(socket) => {
                    let micros = begun.elapsed().as_micros() as u64;
                    histogram.lock().await.record(micros.max(1)).ok();
                    let _ = socket_tx.send(socket);
                }
                Err(error) => {
                    if failures.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("connect failed: {error:#}");
                    }
                }
            }
        });
    }
    drop(socket_tx);
    let mut sockets = Vec::with_capacity(args.connections as usize);
    while let Some(socket) = tokio::time::timeout_at(deadline.into(), socket_rx.recv())
        .await
        .context("timed out waiting for handshakes")?
    {
        sockets.push(socket);
    }
    let open_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} connections open in {open_secs:.1}s; holding {}s",
        sockets.len(),
        args.hold_secs
    );
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let rss_after = args.pid.map(rss_bytes).transpose()?;
    let histogram = histogram.lock().await;
    let open = sockets.len() as u64;
    let result = ConnectResult {
        connections_requested: args.connections,
        connections_open: open,
        failures: failures.load(Ordering::Relaxed),
        handshake_ms_p50: histogram.value_at_quantile(0.5) as f64 / 1000.0,
        handshake_ms_p99: histogram.value_at_quantile(0.99) as f64 / 1000.0,
        handshake_ms_max: histogram.max() as f64 / 1000.0,
        server_rss_before_bytes: rss_before,
        server_rss_after_bytes: rss_after,
        server_rss_per_connection_bytes: match (rss_before, rss_after) {
            (Some(before), Some(after)) if open > 0 => {
                Some(after.saturating_sub(before) as f64 / open as f64)
            }
            _ => None,
        },
    };
    emit(&result, args.json.as_deref())?;
    drop(sockets);
    Ok(())
}
