//! Scenario `connect`: opens N connections over one or more targets at a held rate, holds them,
//! and reports handshake latency and the servers' resident memory per connection. The
//! connections are opened by `--workers` child processes (this binary, re-executed: see
//! [`crate::worker`]), each holding its share from its own 127.0.0.x source addresses, so one run
//! can hold more connections than one process may open files. The hold starts once every worker
//! has all of its connections open; the workers are killed (by pid) if the run fails, times out
//! or is interrupted.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::ValueEnum;
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use crate::cli::ConnectArgs;
use crate::html::{self, Figure, Page};
use crate::procfs::{connection_count, rss_bytes};
use crate::report::{ConnectResult, ServerFigures, WorkerFigures, emit, ms, round3};
use crate::worker::{self, HOLD, Report, Share, TICK};
use crate::ws::url_addr;

const MAX_CONNECTIONS: u64 = 200_000;
const MAX_RATE: u64 = 100_000;
const MAX_WORKERS: u64 = 32;
/// Most rooms one connection subscribes to (a node's default --max-subscriptions is 128).
const MAX_SUBSCRIBE: u32 = 100;
/// Files a worker keeps for itself beyond its connections (stdio, epoll, the runtime's).
const WORKER_RESERVED_FILES: u64 = 64;
/// How long workers may take to close and report once told to, and to start.
const WORKER_GRACE: Duration = Duration::from_secs(30);

impl ConnectArgs {
    /// Refuses flags outside the bounds one run is meant to hold, and shares one worker could
    /// not hold: more connections than its open-files limit, or than one source address has
    /// ephemeral ports for.
    fn check(&self) -> Result<()> {
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            bail!("--connections must be 1 to {MAX_CONNECTIONS}");
        }
        if self.rate == 0 || self.rate > MAX_RATE {
            bail!("--rate must be 1 to {MAX_RATE}");
        }
        if self.workers == 0 || self.workers > MAX_WORKERS {
            bail!("--workers must be 1 to {MAX_WORKERS}");
        }
        if self.source_addresses == 0 || self.workers * u64::from(self.source_addresses) > 254 {
            bail!(
                "--source-addresses must be at least 1, and --workers × --source-addresses at most 254"
            );
        }
        crate::cli::check_transport(self.protocol, self.transport)?;
        crate::cli::check_codec(self.protocol, self.transport, self.codec)?;
        if self.subscribe > MAX_SUBSCRIBE
            || (self.subscribe > 0 && self.protocol != crate::protocol::Protocol::Switchboard)
        {
            bail!("--subscribe must be at most {MAX_SUBSCRIBE}, and needs --protocol switchboard");
        }
        if self.timeout_secs == 0 || self.timeout_secs > 600 || self.hold_secs > 3600 {
            bail!("--timeout-secs must be 1 to 600, --hold-secs at most 3600");
        }
        let per_worker = self.connections.div_ceil(self.workers);
        let (files, _) = rlimit::Resource::NOFILE.get()?;
        if per_worker + WORKER_RESERVED_FILES > files {
            bail!(
                "each worker would hold {per_worker} connections, more than its open-files limit \
                 ({files}) allows: use more --workers"
            );
        }
        let per_source = per_worker.div_ceil(u64::from(self.source_addresses));
        if let Some(ports) = ephemeral_ports()
            && per_source > ports
        {
            bail!(
                "{per_source} connections per source address, more than the {ports} ephemeral \
                 ports: use more --source-addresses"
            );
        }
        for url in &self.urls {
            url_addr(url)?;
        }
        Ok(())
    }

    /// Worker `index`'s share: a contiguous block of the run's connections (so targets stay
    /// round-robin over the whole run), its part of the rate and its own source addresses.
    fn share(&self, index: u64) -> Share {
        let base = self.connections / self.workers;
        let extra = self.connections % self.workers;
        let first = index * base + index.min(extra);
        let count = base + u64::from(index < extra);
        let per_worker = u64::from(self.source_addresses);
        let sources = (0..per_worker)
            .map(|offset| Ipv4Addr::new(127, 0, 0, (1 + index * per_worker + offset) as u8))
            .collect();
        Share {
            protocol: self
                .protocol
                .to_possible_value()
                .map(|value| value.get_name().to_owned())
                .unwrap_or_default(),
            transport: self.transport,
            codec: self.codec,
            urls: self.urls.clone(),
            first,
            count,
            rate: self.rate as f64 * count as f64 / self.connections as f64,
            sources,
            timeout_secs: self.timeout_secs,
            subscribe: self.subscribe,
        }
    }
}

/// Size of the kernel's ephemeral port range.
fn ephemeral_ports() -> Option<u64> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut bounds = range.split_whitespace().map(|bound| bound.parse::<u64>());
    let (Some(Ok(low)), Some(Ok(high))) = (bounds.next(), bounds.next()) else {
        return None;
    };
    Some(high.saturating_sub(low) + 1)
}

/// One worker process, killed on drop if it is still running.
struct Worker {
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
    share: Share,
    opened: Option<Opened>,
    done: Option<Done>,
}

struct Opened {
    open: u64,
    failures: u64,
    open_per_url: Vec<u64>,
    open_secs: f64,
    handshakes: Histogram<u64>,
    started_unix_us: u64,
}

struct Done {
    dropped_before_hold: u64,
    dropped_during_hold: u64,
    opened_by_tick: Vec<u32>,
    dropped_by_tick: Vec<u32>,
    closed_tick: u64,
}

/// Each `--pid` server's RSS and the connections it holds on the URLs' ports.
fn server_figures(args: &ConnectArgs) -> Result<Vec<(u64, u64)>> {
    let ports = args
        .urls
        .iter()
        .map(|url| Ok(url_addr(url)?.port()))
        .collect::<Result<Vec<_>>>()?;
    args.pids
        .iter()
        .map(|(_, pid)| Ok((rss_bytes(*pid)?, connection_count(*pid, &ports)?)))
        .collect()
}

pub async fn run(args: ConnectArgs) -> Result<()> {
    args.check()?;
    let servers_before = server_figures(&args)?;
    let started = Instant::now();
    let started_unix_us = worker::unix_us();
    let exe = std::env::current_exe().context("finding this executable")?;
    let (report_tx, mut reports) = mpsc::unbounded_channel::<(usize, Option<Report>)>();
    let mut workers = Vec::new();
    for index in 0..args.workers {
        let share = args.share(index);
        let mut child = tokio::process::Command::new(&exe)
            .arg("connect-worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker")?;
        let pid = child.id().context("worker pid")?;
        let mut stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let slot = workers.len();
        eprintln!(
            "worker {slot} pid {pid}: {} connections from {} source addresses",
            share.count,
            share.sources.len()
        );
        workers.push(Worker {
            child,
            pid,
            stdin: None,
            share,
            opened: None,
            done: None,
        });
        let mut line = serde_json::to_string(&workers[slot].share)?;
        line.push('\n');
        stdin.write_all(line.as_bytes()).await?;
        workers[slot].stdin = Some(stdin);
        let report_tx = report_tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str(&line) {
                    Ok(report) => {
                        let _ = report_tx.send((slot, Some(report)));
                    }
                    Err(error) => eprintln!("worker {slot}: unreadable report: {error}"),
                }
            }
            let _ = report_tx.send((slot, None));
        });
    }
    drop(report_tx);

    let bound = Duration::from_secs(args.timeout_secs + args.hold_secs) + 2 * WORKER_GRACE;
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(bound, drive(&args, &mut workers, &mut reports, started)) => {
            outcome.unwrap_or_else(|_| Err(anyhow!("the workers did not finish within {}s", bound.as_secs())))
        }
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let servers_after = match outcome {
        Ok(after) => after,
        Err(error) => {
            for worker in &mut workers {
                let _ = worker.child.start_kill();
                let _ = worker.child.wait().await;
            }
            return Err(error);
        }
    };
    let result = assemble(
        &args,
        &workers,
        &servers_before,
        &servers_after,
        started_unix_us,
    )?;
    emit(&result, args.output.json.as_deref())?;
    if let Some(path) = &args.output.html {
        html_report(&result)?.write(path)?;
    }
    Ok(())
}

/// Runs the workers through opening, the hold and closing; returns the servers' RSS and sockets
/// at the end of the hold.
async fn drive(
    args: &ConnectArgs,
    workers: &mut [Worker],
    reports: &mut mpsc::UnboundedReceiver<(usize, Option<Report>)>,
    started: Instant,
) -> Result<Vec<(u64, u64)>> {
    let bar = crate::progress::counter(args.connections, "connecting");
    let mut done_by_worker = vec![0u64; workers.len()];
    while workers.iter().any(|worker| worker.opened.is_none()) {
        let (slot, report) = reports.recv().await.context("every worker is gone")?;
        match report {
            Some(Report::Progress { done }) => {
                done_by_worker[slot] = done;
                bar.set_position(done_by_worker.iter().sum());
            }
            Some(Report::Opened {
                open,
                failures,
                open_per_url,
                open_secs,
                handshakes,
                started_unix_us,
            }) => {
                done_by_worker[slot] = open + failures;
                bar.set_position(done_by_worker.iter().sum());
                workers[slot].opened = Some(Opened {
                    open,
                    failures,
                    open_per_url,
                    open_secs,
                    handshakes: worker::decode_histogram(&handshakes)?,
                    started_unix_us,
                });
            }
            Some(Report::Done { .. } | Report::Holding) => {
                bail!("worker {slot} reported out of order")
            }
            None => {
                let status = workers[slot].child.wait().await?;
                bail!(
                    "worker {slot} (pid {}) exited with {status} while opening",
                    workers[slot].pid
                );
            }
        }
    }
    bar.finish_and_clear();
    let open: u64 = workers
        .iter()
        .filter_map(|worker| worker.opened.as_ref())
        .map(|opened| opened.open)
        .sum();
    eprintln!(
        "{open} of {} connections open after {:.1}s",
        args.connections,
        started.elapsed().as_secs_f64(),
    );
    for worker in workers.iter_mut() {
        if let Some(stdin) = worker.stdin.as_mut() {
            stdin.write_all(format!("{HOLD}\n").as_bytes()).await?;
            stdin.flush().await?;
        }
    }
    let mut holding = 0;
    while holding < workers.len() {
        match reports.recv().await.context("every worker is gone")? {
            (_, Some(Report::Holding)) => holding += 1,
            (slot, None) => bail!("worker {slot} exited before the hold"),
            _ => {}
        }
    }
    eprintln!("every worker holding; holding {}s", args.hold_secs);
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let servers_after = server_figures(args)?;
    // Closing stdin tells each worker to close its connections and report.
    for worker in workers.iter_mut() {
        worker.stdin = None;
    }
    let closing = async {
        while workers.iter().any(|worker| worker.done.is_none()) {
            let (slot, report) = reports.recv().await.context("every worker is gone")?;
            match report {
                Some(Report::Done {
                    dropped_before_hold,
                    dropped_during_hold,
                    opened_by_tick,
                    dropped_by_tick,
                    closed_tick,
                }) => {
                    workers[slot].done = Some(Done {
                        dropped_before_hold,
                        dropped_during_hold,
                        opened_by_tick,
                        dropped_by_tick,
                        closed_tick,
                    });
                }
                Some(_) => {}
                None if workers[slot].done.is_none() => {
                    bail!("worker {slot} exited without its final report")
                }
                None => {}
            }
        }
        for (slot, worker) in workers.iter_mut().enumerate() {
            let status = worker.child.wait().await?;
            if !status.success() {
                bail!("worker {slot} (pid {}) exited with {status}", worker.pid);
            }
        }
        Ok::<(), anyhow::Error>(())
    };
    tokio::time::timeout(WORKER_GRACE, closing)
        .await
        .context("the workers did not close in time")??;
    Ok(servers_after)
}

/// The run's result from every worker's reports and the servers' figures.
fn assemble(
    args: &ConnectArgs,
    workers: &[Worker],
    before: &[(u64, u64)],
    after: &[(u64, u64)],
    started_unix_us: u64,
) -> Result<ConnectResult> {
    let mut handshakes = worker::handshake_histogram();
    let mut open_per_url = vec![0u64; args.urls.len()];
    let mut per_worker = Vec::new();
    let mut open_by_tick: Vec<i64> = Vec::new();
    let (mut open, mut failures, mut dropped_before, mut dropped_during) = (0, 0, 0, 0);
    let mut open_secs = 0.0f64;
    for worker in workers {
        let opened = worker
            .opened
            .as_ref()
            .context("worker without its open report")?;
        let done = worker
            .done
            .as_ref()
            .context("worker without its final report")?;
        handshakes.add(&opened.handshakes)?;
        for (total, count) in open_per_url.iter_mut().zip(&opened.open_per_url) {
            *total += count;
        }
        open += opened.open;
        failures += opened.failures;
        dropped_before += done.dropped_before_hold;
        dropped_during += done.dropped_during_hold;
        // Each worker's timeline starts when it read its share; shift it onto the run's.
        let offset = (opened.started_unix_us.saturating_sub(started_unix_us)
            / TICK.as_micros() as u64) as usize;
        let at =
            |timeline: &[u32], tick: usize| i64::from(timeline.get(tick).copied().unwrap_or(0));
        // Until the worker closed, so the line runs through the hold.
        let ticks = done
            .opened_by_tick
            .len()
            .max(done.dropped_by_tick.len())
            .max(done.closed_tick as usize + 1);
        if open_by_tick.len() < offset + ticks {
            open_by_tick.resize(offset + ticks, 0);
        }
        for tick in 0..ticks {
            open_by_tick[offset + tick] +=
                at(&done.opened_by_tick, tick) - at(&done.dropped_by_tick, tick);
        }
        let start_secs = (opened.started_unix_us.saturating_sub(started_unix_us)) as f64 / 1e6;
        open_secs = open_secs.max(start_secs + opened.open_secs);
        let sources = &worker.share.sources;
        per_worker.push(WorkerFigures {
            pid: worker.pid,
            sources: format!(
                "{}–{}",
                sources.first().copied().unwrap_or(Ipv4Addr::LOCALHOST),
                sources.last().copied().unwrap_or(Ipv4Addr::LOCALHOST)
            ),
            requested: worker.share.count,
            open: opened.open,
            failures: opened.failures,
            dropped_before_hold: done.dropped_before_hold,
            dropped_during_hold: done.dropped_during_hold,
            open_secs: round3(opened.open_secs),
            handshake_ms_p50: ms(opened.handshakes.value_at_quantile(0.5)),
            handshake_ms_p99: ms(opened.handshakes.value_at_quantile(0.99)),
            handshake_ms_max: ms(opened.handshakes.max()),
        });
    }
    let held = open - dropped_before - dropped_during;
    let servers: Vec<ServerFigures> = args
        .pids
        .iter()
        .zip(before.iter().zip(after))
        .map(
            |((name, pid), (&(rss_before, sockets_before), &(rss_after, sockets_after)))| {
                let sockets = sockets_after.saturating_sub(sockets_before);
                ServerFigures {
                    name: name.clone(),
                    pid: *pid,
                    rss_before_bytes: rss_before,
                    rss_after_bytes: rss_after,
                    sockets_before,
                    sockets_after,
                    rss_per_connection_bytes: (sockets > 0).then(|| {
                        (rss_after.saturating_sub(rss_before) as f64 / sockets as f64).round()
                    }),
                }
            },
        )
        .collect();
    let (rss_before, rss_after) = if servers.is_empty() {
        (None, None)
    } else {
        (
            Some(
                servers
                    .iter()
                    .map(|server| server.rss_before_bytes)
                    .sum::<u64>(),
            ),
            Some(
                servers
                    .iter()
                    .map(|server| server.rss_after_bytes)
                    .sum::<u64>(),
            ),
        )
    };
    let mut running = 0i64;
    let open_over_time = open_by_tick
        .iter()
        .enumerate()
        .map(|(tick, change)| {
            running += change;
            ((tick + 1) as f64 * TICK.as_secs_f64(), running as f64)
        })
        .collect();
    Ok(ConnectResult {
        protocol: args.protocol,
        transport: args.transport,
        codec: args.codec,
        urls: args.urls.clone(),
        connections_requested: args.connections,
        rate_target: args.rate,
        hold_secs: args.hold_secs,
        worker_processes: args.workers,
        connections_open: open,
        connections_open_per_url: open_per_url,
        failures,
        dropped_before_hold: dropped_before,
        dropped_during_hold: dropped_during,
        connections_held: held,
        open_secs: round3(open_secs),
        handshake_ms_p50: ms(handshakes.value_at_quantile(0.5)),
        handshake_ms_p90: ms(handshakes.value_at_quantile(0.9)),
        handshake_ms_p99: ms(handshakes.value_at_quantile(0.99)),
        handshake_ms_p999: ms(handshakes.value_at_quantile(0.999)),
        handshake_ms_max: ms(handshakes.max()),
        handshake_ms_mean: round3(handshakes.mean() / 1000.0),
        per_worker,
        servers,
        server_rss_before_bytes: rss_before,
        server_rss_after_bytes: rss_after,
        server_rss_per_connection_bytes: match (rss_before, rss_after) {
            (Some(before), Some(after)) if held > 0 => {
                Some((after.saturating_sub(before) as f64 / held as f64).round())
            }
            _ => None,
        },
        handshake_percentiles: crate::html::percentile_curve(&handshakes),
        open_over_time,
    })
}

/// The HTML report: parameters, summary, per-worker and per-server tables, the handshake
/// distribution and the connections open over the run.
fn html_report(result: &ConnectResult) -> Result<Page> {
    let mut page = Page::new("connect");
    let all = serde_json::to_value(result)?;
    let rss = result
        .server_rss_per_connection_bytes
        .map_or_else(String::new, |bytes| {
            format!("; {:.1} KiB of server RSS per connection", bytes / 1024.0)
        });
    page.headline(
        &format!(
            "{} of {} connections open in {:.1}s, handshake p99 {} ms; {} failed, {} dropped{rss}.",
            html::thousands(result.connections_open),
            html::thousands(result.connections_requested),
            result.open_secs,
            result.handshake_ms_p99,
            html::thousands(result.failures),
            html::thousands(result.dropped_before_hold + result.dropped_during_hold),
        ),
        &[
            Figure::of(&all, "connections_open", "open"),
            Figure::of(&all, "open_secs", "seconds to open"),
            Figure::of(&all, "handshake_ms_p99", "handshake p99 ms"),
            Figure::bad(&all, "failures", "failed"),
            Figure::bad(&all, "dropped_during_hold", "dropped in the hold"),
            Figure::of(
                &all,
                "server_rss_per_connection_bytes",
                "RSS bytes per connection",
            ),
        ],
    );
    let parameters = [
        "protocol",
        "transport",
        "codec",
        "urls",
        "connections_requested",
        "rate_target",
        "hold_secs",
        "worker_processes",
    ];
    page.result_tables(result, |key| parameters.contains(&key))?;
    page.section(
        "Handshake latency",
        &[
            html::latency_bars(
                "Handshake: TCP, upgrade and greeting (ms)",
                [
                    result.handshake_ms_p50,
                    result.handshake_ms_p90,
                    result.handshake_ms_p99,
                    result.handshake_ms_p999,
                    result.handshake_ms_max,
                ],
            ),
            html::percentile_chart(
                "Handshake by percentile (ms)",
                &result.handshake_percentiles,
            ),
        ],
    );
    page.section(
        "Connections over the run",
        &[html::line_chart(
            "Connections open (the hold starts when every worker is open)",
            "seconds since the start",
            &[html::Series {
                name: "open",
                color: html::PURPLE,
                points: result.open_over_time.clone(),
            }],
            None,
        )],
    );
    Ok(page)
}
