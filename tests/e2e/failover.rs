//! Failover behind a real HAProxy: a real `redis-server`, three real nodes and `haproxy` run from
//! `deploy/haproxy/haproxy.cfg`, with clients of the Rust SDK connected through HAProxy as real
//! clients are. A node is killed, drained, or all are restarted one by one while a backend
//! publishes a numbered stream; every client must end with every room message exactly once, in
//! offset order. Also: the config is valid and agrees with the node's timeouts, and
//! `deploy/local/cluster.sh` brings a working cluster up and down.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use switchboard_client::{Client, ConnectOptions, Event};
use switchboard_e2e::haproxy::{self, Backend, HaproxyProcess};
use switchboard_e2e::{DEADLINE, NodeProcess, RedisProcess, binary, parse_metric, wait_until};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One test at a time: each runs a whole cluster, and timings mean little on 2 shared cores
/// when three clusters compete.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ROOMS: [&str; 3] = ["failover-a", "failover-b", "failover-c"];
const CLIENTS: usize = 30;
/// HAProxy's check interval here (production: 2 s); a node is DOWN after two failed checks.
const CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// The backend publishes one message every this long, to the rooms in turn (50 per second).
const PUBLISH_EVERY: Duration = Duration::from_millis(20);
/// Spread over this, a drained node's 10 or so clients are closed one per 100 ms.
const DRAIN_GRACE_MS: &str = "1500";

/// Room → (offset, data) of its messages.
type Stream = BTreeMap<String, Vec<(u64, Value)>>;

// ---------------------------------------------------------------------------------------------
// The cluster

struct Cluster {
    redis: RedisProcess,
    nodes: Vec<NodeProcess>,
    haproxy: HaproxyProcess,
}

impl Cluster {
    async fn start() -> Result<Cluster> {
        let redis = RedisProcess::start().await?;
        let mut nodes = Vec::new();
        for index in 0..3 {
            nodes.push(NodeProcess::start(&as_strs(&node_args(&redis, index))).await?);
        }
        for node in &nodes {
            node.wait_ready().await?;
        }
        let backends: Vec<Backend> = nodes.iter().map(Backend::from).collect();
        let haproxy = HaproxyProcess::start(&backends, CHECK_INTERVAL).await?;
        Ok(Cluster {
            redis,
            nodes,
            haproxy,
        })
    }

    /// Starts node `index` again, on the ports HAProxy knows it by, and waits until it is ready.
    async fn restart(&mut self, index: usize) -> Result<()> {
        let (public, internal) = (
            self.nodes[index].public.to_string(),
            self.nodes[index].internal.to_string(),
        );
        let args = node_args(&self.redis, index);
        let node = NodeProcess::start_on(&public, &internal, &as_strs(&args), &[]).await?;
        node.wait_ready().await?;
        self.nodes[index] = node;
        Ok(())
    }

    /// The `switchboard_connections` gauge of every node.
    async fn connections(&self) -> Result<Vec<f64>> {
        let mut counts = Vec::new();
        for node in &self.nodes {
            counts.push(node.metric("switchboard_connections").await?);
        }
        Ok(counts)
    }
}

fn node_args(redis: &RedisProcess, index: usize) -> Vec<String> {
    [
        "--redis",
        &redis.url(),
        "--node-id",
        &format!("failover-{}", index + 1),
        "--drain-grace-ms",
        DRAIN_GRACE_MS,
        "--history-size",
        "1000",
        "--rate-limit",
        "0",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// HAProxy's name for node `index`.
fn server(index: usize) -> String {
    format!("node{}", index + 1)
}

// ---------------------------------------------------------------------------------------------
// Clients: each records everything it receives, from a task reading its events.

#[derive(Default)]
struct Log {
    /// Room → (offset, data) of every message, in arrival order.
    messages: Stream,
    /// The node of each connection, in order.
    nodes: Vec<String>,
    /// The close code of each disconnect (`None`: the connection just ended).
    closes: Vec<Option<u16>>,
    /// For each reconnect, how long the client was away: from the disconnect to the next
    /// welcome.
    away: Vec<Duration>,
    down_since: Option<Instant>,
    /// Rooms resubscribed with `recovered: false`, or not resubscribed at all.
    not_recovered: Vec<String>,
}

impl Log {
    fn node(&self) -> Option<&str> {
        self.nodes.last().map(String::as_str)
    }

    fn connected(&self) -> bool {
        self.down_since.is_none()
    }
}

struct Watched {
    client: Client,
    log: Arc<Mutex<Log>>,
    /// Room → its offset when this client subscribed: it must receive everything after it.
    start: BTreeMap<String, u64>,
    task: JoinHandle<()>,
}

impl Watched {
    async fn connect(url: &str, user: &str, rooms: &[&str]) -> Result<Watched> {
        let client = Client::connect(
            url,
            ConnectOptions {
                user: Some(user.into()),
                ..ConnectOptions::default()
            },
        )
        .await
        .with_context(|| format!("{user} connecting through HAProxy"))?;
        let log = Arc::new(Mutex::new(Log::default()));
        let task = tokio::spawn(record(client.clone(), log.clone()));
        let mut start = BTreeMap::new();
        for room in rooms {
            let subscription = client.subscribe(*room).await?;
            start.insert((*room).to_owned(), subscription.offset);
        }
        wait_until("the first welcome to be recorded", || async {
            log.lock().expect("log").node().is_some()
        })
        .await?;
        Ok(Watched {
            client,
            log,
            start,
            task,
        })
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().expect("log")
    }

    async fn close(self) {
        self.client.close().await;
        self.task.abort();
    }
}

async fn record(client: Client, log: Arc<Mutex<Log>>) {
    while let Some(event) = client.next_event().await {
        let mut log = log.lock().expect("log");
        match event {
            Event::Message(message) => log
                .messages
                .entry(message.room.clone())
                .or_default()
                .push((message.offset, message.data.clone())),
            Event::Connected { node, .. } => {
                if let Some(since) = log.down_since.take() {
                    log.away.push(since.elapsed());
                }
                log.nodes.push(node);
            }
            Event::Disconnected { code, .. } => {
                log.closes.push(code);
                log.down_since = Some(Instant::now());
            }
            Event::Resubscribed {
                room,
                recovered: false,
            } => log.not_recovered.push(room),
            Event::ResubscribeFailed { room, .. } => log.not_recovered.push(room),
            Event::Closed => break,
            _ => {}
        }
    }
}

/// `CLIENTS` clients through HAProxy; client `i` joins two of the three rooms.
async fn connect_clients(url: &str) -> Result<Vec<Watched>> {
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let rooms = [ROOMS[i % 3], ROOMS[(i + 1) % 3]];
        clients.push(Watched::connect(url, &format!("user-{i}"), &rooms).await?);
    }
    Ok(clients)
}

/// Waits until the nodes hold all clients between them, and checks that HAProxy spread them.
async fn assert_spread(cluster: &Cluster) -> Result<Vec<f64>> {
    wait_until("the nodes to count every client", || async {
        cluster
            .connections()
            .await
            .is_ok_and(|counts| counts.iter().sum::<f64>() == CLIENTS as f64)
    })
    .await?;
    let counts = cluster.connections().await?;
    // leastconn gives each of the three nodes a third; allow some slack.
    ensure!(
        counts.iter().all(|count| *count >= 5.0),
        "clients not spread over the nodes: {counts:?}"
    );
    Ok(counts)
}

async fn wait_all_connected(clients: &[Watched], away_from: &str) -> Result<()> {
    wait_until(
        "every client to be connected, none to the lost node",
        || async {
            clients.iter().all(|client| {
                let log = client.log();
                log.connected() && log.node().is_some_and(|node| node != away_from)
            })
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// The backend publishing a numbered stream through the server API.

struct Publisher {
    /// Internal URL of the node the next publish goes to.
    target: Arc<Mutex<String>>,
    published: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<Result<Stream>>,
}

impl Publisher {
    fn start(node: &NodeProcess) -> Publisher {
        let target = Arc::new(Mutex::new(node.http_url("")));
        let published = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(publish(target.clone(), published.clone(), stop.clone()));
        Publisher {
            target,
            published,
            stop,
            task,
        }
    }

    fn publish_via(&self, node: &NodeProcess) {
        *self.target.lock().expect("target") = node.http_url("");
    }

    /// Waits until `count` more messages have been published.
    async fn wait_more(&self, count: u64) -> Result<()> {
        let goal = self.published.load(Ordering::SeqCst) + count;
        wait_until(&format!("{count} more publishes"), || async {
            self.published.load(Ordering::SeqCst) >= goal || self.task.is_finished()
        })
        .await?;
        ensure!(!self.task.is_finished(), "the publisher stopped");
        Ok(())
    }

    /// Stops publishing; room → (offset, data) of every message, in offset order.
    async fn finish(self) -> Result<Stream> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await?
    }
}

async fn publish(
    target: Arc<Mutex<String>>,
    published: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<Stream> {
    let http = reqwest::Client::builder().timeout(DEADLINE).build()?;
    let mut rooms: Stream = BTreeMap::new();
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tick.tick().await;
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let room = ROOMS[(n % 3) as usize];
        let data = json!({ "n": n });
        let url = format!("{}/api/publish", target.lock().expect("target"));
        let answer: Value = http
            .post(&url)
            .json(&json!({ "room": room, "data": data }))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("publish {n} to {url}"))?
            .json()
            .await?;
        let offset = answer["offset"]
            .as_u64()
            .context("publish answer without offset")?;
        rooms.entry(room.into()).or_default().push((offset, data));
        published.fetch_add(1, Ordering::SeqCst);
    }
    Ok(rooms)
}

/// Every client has every message of its rooms published after it subscribed, exactly once and
/// in offset order, and recovered every room after each reconnect.
async fn assert_nothing_lost(published: &Stream, clients: &[Watched]) -> Result<()> {
    for (room, messages) in published {
        let offsets: Vec<u64> = messages.iter().map(|(offset, _)| *offset).collect();
        ensure!(
            offsets.windows(2).all(|pair| pair[1] == pair[0] + 1),
            "{room}: the publisher's offsets have gaps: {offsets:?}"
        );
    }
    let last = |room: &str| published.get(room).and_then(|messages| messages.last());
    let caught_up = wait_until(
        "every client to receive the last message of its rooms",
        || {
            let all = clients.iter().all(|client| {
                let log = client.log();
                client.start.keys().all(|room| {
                    let last_seen = log
                        .messages
                        .get(room)
                        .and_then(|messages| messages.last())
                        .map(|(offset, _)| *offset);
                    last_seen == last(room).map(|(offset, _)| *offset)
                })
            });
            async move { all }
        },
    )
    .await;
    for (index, client) in clients.iter().enumerate() {
        let log = client.log();
        ensure!(
            log.not_recovered.is_empty(),
            "client {index}: rooms not recovered after a reconnect: {:?}",
            log.not_recovered
        );
        for (room, start) in &client.start {
            let expected: Vec<&(u64, Value)> = published
                .get(room)
                .map(|messages| {
                    messages
                        .iter()
                        .filter(|(offset, _)| offset > start)
                        .collect()
                })
                .unwrap_or_default();
            let received: Vec<&(u64, Value)> = log
                .messages
                .get(room)
                .map(|messages| messages.iter().collect())
                .unwrap_or_default();
            if received != expected {
                let offsets = |list: &[&(u64, Value)]| -> Vec<u64> {
                    list.iter().map(|(offset, _)| *offset).collect()
                };
                bail!(
                    "client {index} ({:?}), room {room}: received offsets {:?}, expected {:?}",
                    log.nodes,
                    offsets(&received),
                    offsets(&expected)
                );
            }
        }
    }
    caught_up
}

fn report(label: &str, clients: &[Watched]) -> Vec<Duration> {
    let away: Vec<Duration> = clients
        .iter()
        .flat_map(|client| client.log().away.clone())
        .collect();
    let max = away.iter().max().copied().unwrap_or_default();
    let mean = if away.is_empty() {
        Duration::ZERO
    } else {
        away.iter().sum::<Duration>() / away.len() as u32
    };
    println!(
        "{label}: {} reconnects, clients away max {max:?}, mean {mean:?}",
        away.len()
    );
    away
}

async fn close_all(clients: Vec<Watched>) {
    for client in clients {
        client.close().await;
    }
}

// ---------------------------------------------------------------------------------------------
// The tests

#[tokio::test]
async fn killed_node_clients_resume_elsewhere_through_haproxy() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start().await?;
    let clients = connect_clients(&cluster.haproxy.ws_url()).await?;
    let spread = assert_spread(&cluster).await?;
    println!("connections per node: {spread:?}");

    let publisher = Publisher::start(&cluster.nodes[1]);
    publisher.wait_more(30).await?;
    let victim = cluster.nodes[0].node_id.clone();
    let on_victim: Vec<usize> = (0..clients.len())
        .filter(|&index| clients[index].log().node() == Some(victim.as_str()))
        .collect();
    ensure!(!on_victim.is_empty(), "no client on {victim}");

    cluster.nodes[0].kill()?;
    wait_all_connected(&clients, &victim).await?;
    cluster.haproxy.wait_server(&server(0), "DOWN").await?;
    publisher.wait_more(30).await?;
    let published = publisher.finish().await?;
    assert_nothing_lost(&published, &clients).await?;

    for (index, client) in clients.iter().enumerate() {
        let log = client.log();
        let expected_disconnects = usize::from(on_victim.contains(&index));
        ensure!(
            log.closes.len() == expected_disconnects,
            "client {index} on {:?} was disconnected {} times (closes {:?})",
            log.nodes,
            log.closes.len(),
            log.closes
        );
    }
    let survivors = [
        cluster.nodes[1].metric("switchboard_connections").await?,
        cluster.nodes[2].metric("switchboard_connections").await?,
    ];
    ensure!(
        survivors.iter().sum::<f64>() == CLIENTS as f64,
        "the survivors hold {survivors:?} connections"
    );
    report("kill -9", &clients);
    close_all(clients).await;
    Ok(())
}

#[tokio::test]
async fn drained_node_leaves_haproxy_before_its_clients_and_loses_nothing() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start().await?;
    let url = cluster.haproxy.ws_url();
    let clients = connect_clients(&url).await?;
    assert_spread(&cluster).await?;
    let publisher = Publisher::start(&cluster.nodes[1]);
    publisher.wait_more(30).await?;
    let victim = cluster.nodes[0].node_id.clone();
    let on_victim: Vec<usize> = (0..clients.len())
        .filter(|&index| clients[index].log().node() == Some(victim.as_str()))
        .collect();
    ensure!(
        on_victim.len() >= 2,
        "too few clients on {victim}: {on_victim:?}"
    );

    cluster.nodes[0].terminate();
    // Readiness fails first: while /readyz already answers 503, some of the node's clients have
    // not been closed yet.
    let readyz = cluster.nodes[0].http_url("/readyz");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = reqwest::get(&readyz).await?.status().as_u16();
        if status == 503 {
            break;
        }
        ensure!(Instant::now() < deadline, "/readyz still answers {status}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let still_open = on_victim
        .iter()
        .filter(|&&index| clients[index].log().closes.is_empty())
        .count();
    ensure!(
        still_open > 0,
        "every client of the draining node was closed before /readyz answered 503"
    );

    // New connections go to the other nodes at once: the draining node refuses them and HAProxy
    // retries them elsewhere, before its checks have noticed.
    let mut newcomers = Vec::new();
    for i in 0..3 {
        newcomers.push(Watched::connect(&url, &format!("early-{i}"), &[ROOMS[0]]).await?);
    }
    cluster.haproxy.wait_server(&server(0), "DOWN").await?;
    let down = format!(
        "haproxy_server_status{{proxy=\"switchboard\",server=\"{}\",state=\"DOWN\"}}",
        server(0)
    );
    ensure!(
        parse_metric(&cluster.haproxy.metrics().await?, &down) == 1.0,
        "HAProxy's exporter does not report {} DOWN",
        server(0)
    );
    for i in 0..3 {
        newcomers.push(Watched::connect(&url, &format!("late-{i}"), &[ROOMS[0]]).await?);
    }
    for newcomer in &newcomers {
        let node = newcomer.log().node().map(str::to_owned);
        ensure!(
            node.as_deref() != Some(victim.as_str()),
            "a new connection went to the draining node"
        );
    }

    let status = cluster.nodes[0].wait_exit(DEADLINE).await?;
    ensure!(status.success(), "the drained node exited with {status}");
    wait_all_connected(&clients, &victim).await?;
    publisher.wait_more(30).await?;
    let published = publisher.finish().await?;
    assert_nothing_lost(&published, &clients).await?;
    for &index in &on_victim {
        let closes = clients[index].log().closes.clone();
        ensure!(
            closes == [Some(1001)],
            "client {index} of the drained node saw closes {closes:?}, expected [1001]"
        );
    }
    report("drain", &clients);
    close_all(newcomers).await;
    close_all(clients).await;
    Ok(())
}

#[tokio::test]
async fn rolling_restart_under_publishing_loses_nothing() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start().await?;
    let clients = connect_clients(&cluster.haproxy.ws_url()).await?;
    assert_spread(&cluster).await?;
    let publisher = Publisher::start(&cluster.nodes[1]);
    publisher.wait_more(30).await?;

    let started = Instant::now();
    for index in 0..3 {
        // The backend talks to a node that stays up during this step.
        publisher.publish_via(&cluster.nodes[(index + 1) % 3]);
        let node_id = cluster.nodes[index].node_id.clone();
        cluster.nodes[index].terminate();
        let status = cluster.nodes[index].wait_exit(DEADLINE).await?;
        ensure!(status.success(), "{node_id} exited with {status}");
        cluster.restart(index).await?;
        cluster.haproxy.wait_server(&server(index), "UP").await?;
        wait_all_connected(&clients, &node_id).await?;
    }
    println!("rolling restart of 3 nodes took {:?}", started.elapsed());
    publisher.wait_more(30).await?;
    let published = publisher.finish().await?;
    assert_nothing_lost(&published, &clients).await?;

    for (index, client) in clients.iter().enumerate() {
        let closes = client.log().closes.clone();
        ensure!(
            !closes.is_empty() && closes.iter().all(|code| *code == Some(1001)),
            "client {index}: closes {closes:?}; every client is drained at least once, with 1001"
        );
    }
    let away = report("rolling restart", &clients);
    ensure!(away.len() >= CLIENTS, "only {} reconnects", away.len());
    close_all(clients).await;
    Ok(())
}

/// The config is valid as users deploy it (with and without its optional settings), and its
/// timeouts let the node, not HAProxy, decide when an idle WebSocket is dead.
#[test]
fn haproxy_config_is_valid_and_outlasts_the_node_idle_timeout() -> Result<()> {
    let backend = |port: u16| Backend {
        public: ([127, 0, 0, 1], port).into(),
        internal: ([127, 0, 0, 1], port + 1000).into(),
    };
    haproxy::check_config(&[])?;
    haproxy::check_config(&haproxy::config_env(
        &[backend(8081), backend(8082), backend(8083)],
        8080,
        8404,
        CHECK_INTERVAL,
    ))?;
    haproxy::check_config(&[
        ("SB_NODE1".into(), "127.0.0.1:8081".into()),
        ("SB_STATS_SOCKET".into(), "/tmp/haproxy.sock".into()),
    ])?;

    let help = Command::new(binary()).arg("--help").output()?;
    let help = String::from_utf8(help.stdout)?;
    let default_ms = |flag: &str| -> Result<u64> {
        let after = help
            .split(flag)
            .nth(1)
            .with_context(|| format!("{flag} not in --help"))?;
        let default = after
            .split("[default: ")
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .with_context(|| format!("no default for {flag}"))?;
        Ok(default.parse()?)
    };
    let idle = Duration::from_millis(default_ms("--idle-timeout-ms")?);
    let heartbeat = Duration::from_millis(default_ms("--heartbeat-ms")?);
    let handshake = Duration::from_millis(default_ms("--handshake-timeout-ms")?);
    ensure!(heartbeat < idle, "heartbeat {heartbeat:?} >= idle {idle:?}");

    let config = std::fs::read_to_string(haproxy::config_path())?;
    let timeout = |name: &str| -> Result<Duration> {
        let value = config
            .lines()
            .find_map(|line| line.trim().strip_prefix(&format!("timeout {name} ")))
            .with_context(|| format!("no timeout {name}"))?;
        parse_haproxy_duration(value.trim())
    };
    for name in ["tunnel", "client", "server"] {
        let value = timeout(name)?;
        ensure!(
            value > idle,
            "timeout {name} {value:?} must exceed the node's idle timeout {idle:?}"
        );
    }
    ensure!(timeout("http-request")? >= handshake);
    ensure!(timeout("client-fin")? < idle);
    Ok(())
}

fn parse_haproxy_duration(value: &str) -> Result<Duration> {
    let digits = value.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let number: u64 = digits
        .parse()
        .with_context(|| format!("duration {value}"))?;
    Ok(match &value[digits.len()..] {
        "ms" => Duration::from_millis(number),
        "" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        "h" => Duration::from_secs(number * 3600),
        unit => bail!("unknown unit {unit} in {value}"),
    })
}

// ---------------------------------------------------------------------------------------------
// deploy/local/cluster.sh

/// A cluster started by cluster.sh in a directory of its own, brought down (and the directory
/// removed) on drop, pass or fail.
struct ScriptCluster {
    dir: PathBuf,
}

impl ScriptCluster {
    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(|workspace| workspace.join("deploy/local/cluster.sh"))
            .unwrap_or_default()
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let output = Command::new(Self::script())
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .env("SB_CHECK_INTER", "200ms")
            .output()
            .context("running cluster.sh")?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "cluster.sh {args:?} failed ({}): {stdout}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(stdout)
    }

    fn env(&self) -> Result<BTreeMap<String, String>> {
        Ok(std::fs::read_to_string(self.dir.join("cluster.env"))?
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect())
    }

    /// The pids the script recorded.
    fn pids(&self) -> Result<Vec<u32>> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir(self.dir.join("pids"))? {
            let text = std::fs::read_to_string(entry?.path())?;
            let pid = text.split_whitespace().next().context("empty pid file")?;
            pids.push(pid.parse()?);
        }
        Ok(pids)
    }
}

impl Drop for ScriptCluster {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn local_cluster_script_up_status_down() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = std::env::temp_dir().join(format!("switchboard-cluster-sh-{}", std::process::id()));
    let cluster = ScriptCluster { dir };
    let binary = binary();
    let binary = binary.to_str().context("binary path")?;
    let up = cluster.run(&["up", "--binary", binary])?;
    let env = cluster.env()?;
    let ws = env.get("WS_URL").context("cluster.env without WS_URL")?;
    ensure!(
        up.contains(ws.as_str()),
        "up does not print the HAProxy URL: {up}"
    );
    for key in [
        "HAPROXY_STATS_URL",
        "HAPROXY_METRICS_URL",
        "NODE3_WS_URL",
        "NODE3_INTERNAL_URL",
    ] {
        ensure!(env.contains_key(key), "cluster.env without {key}");
    }
    let pids = cluster.pids()?;
    ensure!(
        pids.len() == 5,
        "expected redis, 3 nodes and haproxy, got pids {pids:?}"
    );

    // Publish and subscribe through HAProxy.
    let listener = Client::connect(ws, ConnectOptions::default()).await?;
    listener.subscribe("script-room").await?;
    let speaker = Client::connect(ws, ConnectOptions::default()).await?;
    let offset = speaker
        .publish("script-room", json!("over haproxy"))
        .await?;
    let received = tokio::time::timeout(DEADLINE, async {
        while let Some(event) = listener.next_event().await {
            if let Event::Message(message) = event {
                return Some(message);
            }
        }
        None
    })
    .await?
    .context("the listener closed")?;
    ensure!(received.offset == offset && received.data == json!("over haproxy"));
    listener.close().await;
    speaker.close().await;

    let status = cluster.run(&["status"])?;
    ensure!(
        status.matches("running (pid").count() == 5
            && status.matches("/readyz 200").count() == 3
            && status.contains("node1 UP, node2 UP, node3 UP"),
        "status: {status}"
    );

    cluster.run(&["down"])?;
    for pid in pids {
        // A zombie (exited, not yet reaped) has no executable any more.
        ensure!(
            std::fs::read_link(format!("/proc/{pid}/exe")).is_err(),
            "pid {pid} still runs after down"
        );
    }
    let status = cluster.run(&["status"])?;
    ensure!(
        status.contains("no cluster recorded"),
        "status after down: {status}"
    );
    Ok(())
}
