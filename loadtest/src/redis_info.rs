//! Redis's command counters, read with `INFO` over a plain RESP connection, and what they say a
//! published message cost.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::report::{RedisCost, round3};

/// The address of a `redis://HOST:PORT` URL; loopback only, no credentials.
pub fn redis_addr(url: &str) -> Result<SocketAddr> {
    let rest = url
        .strip_prefix("redis://")
        .context("--redis-url must look like redis://127.0.0.1:6379")?;
    if rest.contains('@') {
        bail!("--redis-url with credentials is not supported");
    }
    let authority = rest.split('/').next().unwrap_or(rest);
    let addr = match authority.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => SocketAddr::new(
            authority
                .parse::<IpAddr>()
                .context("the Redis host must be an IP address")?,
            6379,
        ),
    };
    if !addr.ip().is_loopback() {
        bail!("load tests target loopback addresses only");
    }
    Ok(addr)
}

/// Redis's command counters at one moment.
pub struct RedisSnapshot {
    /// `calls` per command, from INFO commandstats.
    calls: BTreeMap<String, u64>,
    /// total_commands_processed, from INFO stats.
    total_commands_processed: u64,
}

/// A snapshot of the Redis at `addr`, when there is one to watch.
pub async fn redis_snapshot_of(addr: Option<SocketAddr>) -> Result<Option<RedisSnapshot>> {
    match addr {
        Some(addr) => Ok(Some(redis_snapshot(addr).await?)),
        None => Ok(None),
    }
}

pub async fn redis_snapshot(addr: SocketAddr) -> Result<RedisSnapshot> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut stream = BufReader::new(TcpStream::connect(addr).await?);
        let commandstats = redis_info(&mut stream, "commandstats").await?;
        let stats = redis_info(&mut stream, "stats").await?;
        let calls = commandstats
            .lines()
            .filter_map(|line| {
                let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = fields
                    .split(',')
                    .find_map(|field| field.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.parse().ok()?))
            })
            .collect();
        let total_commands_processed = stats
            .lines()
            .find_map(|line| line.strip_prefix("total_commands_processed:"))
            .context("no total_commands_processed in INFO stats")?
            .trim()
            .parse()?;
        Ok(RedisSnapshot {
            calls,
            total_commands_processed,
        })
    })
    .await
    .context("Redis INFO timed out")?
}

/// Sends `INFO <section>` (RESP) and returns the bulk-string answer.
async fn redis_info(stream: &mut BufReader<TcpStream>, section: &str) -> Result<String> {
    let request = format!("*2\r\n$4\r\nINFO\r\n${}\r\n{section}\r\n", section.len());
    stream.get_mut().write_all(request.as_bytes()).await?;
    let mut header = String::new();
    stream.read_line(&mut header).await?;
    let Some(length) = header.strip_prefix('$') else {
        bail!("Redis answered {:?}", header.trim_end());
    };
    let length: usize = length.trim_end().parse()?;
    if length > 1 << 20 {
        bail!("INFO answer of {length} bytes");
    }
    let mut body = vec![0; length + 2];
    stream.read_exact(&mut body).await?;
    body.truncate(length);
    Ok(String::from_utf8(body)?)
}

/// Calls per command between two snapshots, this harness's INFO left out.
fn command_deltas(before: &RedisSnapshot, after: &RedisSnapshot) -> BTreeMap<String, u64> {
    after
        .calls
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .map(|(name, &calls)| {
            let delta = calls.saturating_sub(before.calls.get(name).copied().unwrap_or(0));
            (name.clone(), delta)
        })
        .filter(|(_, delta)| *delta > 0)
        .collect()
}

pub fn redis_cost(
    before: &RedisSnapshot,
    after: &RedisSnapshot,
    published: u64,
    window_secs: u64,
    baseline: Option<&(RedisSnapshot, RedisSnapshot, u64)>,
) -> RedisCost {
    let published = published.max(1) as f64;
    let measured = command_deltas(before, after);
    let commands: u64 = measured.values().sum();
    let script_calls: u64 = measured
        .iter()
        .filter(|(name, _)| {
            matches!(
                name.as_str(),
                "eval" | "evalsha" | "eval_ro" | "evalsha_ro" | "fcall" | "fcall_ro"
            )
        })
        .map(|(_, delta)| delta)
        .sum();
    let by_command = measured
        .iter()
        .map(|(name, &delta)| (name.clone(), round3(delta as f64 / published)))
        .collect();
    // The background scaled to the measured window, subtracted command by command.
    let net = baseline.map(|(idle_before, idle_after, idle_secs)| {
        let idle = command_deltas(idle_before, idle_after);
        let scale = window_secs as f64 / *idle_secs as f64;
        let background_per_sec = idle.values().sum::<u64>() as f64 / *idle_secs as f64;
        let mut net_by_command = BTreeMap::new();
        let mut net_total = 0.0;
        for (name, &delta) in &measured {
            let background = idle.get(name).copied().unwrap_or(0) as f64 * scale;
            let net = (delta as f64 - background).max(0.0) / published;
            net_total += net;
            if net >= 0.0005 {
                net_by_command.insert(name.clone(), round3(net));
            }
        }
        (
            round3(background_per_sec),
            round3(net_total),
            net_by_command,
        )
    });
    RedisCost {
        commands_per_publish: round3(commands as f64 / published),
        script_calls_per_publish: round3(script_calls as f64 / published),
        total_commands_processed_per_publish: round3(
            after
                .total_commands_processed
                .saturating_sub(before.total_commands_processed) as f64
                / published,
        ),
        by_command_per_publish: by_command,
        commands,
        background_commands_per_sec: net.as_ref().map(|net| net.0),
        net_commands_per_publish: net.as_ref().map(|net| net.1),
        net_by_command_per_publish: net.map(|net| net.2),
    }
}
