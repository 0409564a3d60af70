//! Redis work per node and node incarnations (issue 11), with a real `redis-server` and real
//! nodes: a node's index sets shrink as its sessions leave; reaping a node that holds thousands
//! of sessions (killed, or stopped gracefully) is a series of short Redis calls (SLOWLOG), leaves
//! the keys as they were and never fails another node's readiness; a node restarted under its
//! id reaps its predecessor at once; two live processes with one id both keep their entries.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use switchboard_e2e::api::{api_ok_within, api_presence_within, api_send_within, readyz_within};
use switchboard_e2e::client::subscribe_frame;
use switchboard_e2e::{NodeProcess, RawClient, RedisProcess};
use switchboard_protocol::api::NodesResponse;
use switchboard_protocol::{ClientFrame, Codec, ServerFrame};

/// Generous: the machine running the tests is shared and slow.
const LONG: Duration = Duration::from_secs(90);
/// Index entries one REAP call may pop from each of the node's sets: the batch the node passes
/// (`REAP_BATCH` in crates/switchboard-redis/src/scripts.rs). A call's work must not grow with
/// the node, or reaping a big node blocks the shard and every node's pub/sub pings with it.
const REAP_BATCH: usize = 100;
/// The same for the sets nodes of earlier versions kept (`REAP_LEGACY_BATCH`); empty here, but
/// each popped entry would cost a walk (HGETALL) of a room's presence or a user's sessions.
const REAP_LEGACY_BATCH: usize = 20;
/// Commands one REAP call may run (lua/reap.lua): three per member (HGET, HDEL, PUBLISH), two per
/// session (HGET, HDEL), one walk per legacy entry of each of two sets, and at most 14 others
/// (EXISTS and SET of the node's keys, four SPOPs, four EXISTS, DEL, SREM, DEL).
const MOST_COMMANDS_PER_CALL: usize = 5 * REAP_BATCH + 2 * REAP_LEGACY_BATCH + 14;
/// Rooms the load test's sessions spread over (each session is a presence member of one).
const ROOMS: usize = 50;

/// Polls `condition` every 50 ms until it holds, or fails after `within`.
async fn poll<F, Fut>(what: &str, within: Duration, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if condition().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node on `redis` named `id`, with the per-address admission limits off (every test client
/// comes from 127.0.0.1), a short drain, and no demo: its `$sys.stats` publisher would make room
/// keys of its own in the middle of the key counts.
async fn node(redis: &RedisProcess, id: &str, node_ttl: Duration) -> Result<NodeProcess> {
    let ttl = node_ttl.as_millis().to_string();
    let node = NodeProcess::start(&[
        "--redis",
        &redis.url(),
        "--node-id",
        id,
        "--node-ttl-ms",
        &ttl,
        "--max-connections-per-ip",
        "0",
        "--connect-rate-per-ip",
        "0",
        "--accept-rate",
        "0",
        "--drain-grace-ms",
        "500",
        "--demo",
        "false",
    ])
    .await?;
    node.wait_ready().await?;
    Ok(node)
}

/// The instances `/api/nodes` (asked of `observer`) lists for node id `id`.
async fn instances(observer: &NodeProcess, id: &str) -> Result<Vec<String>> {
    let answer: NodesResponse = api_ok_within(observer, "GET", "/api/nodes", None, LONG).await?;
    Ok(answer
        .nodes
        .into_iter()
        .filter(|node| node.id == id)
        .map(|node| node.instance)
        .collect())
}

/// The only instance `/api/nodes` lists for `id`, once it lists one (a node is listed from its
/// first heartbeat).
async fn instance(observer: &NodeProcess, id: &str) -> Result<String> {
    poll(&format!("{id} listed"), LONG, async || {
        Ok(!instances(observer, id).await?.is_empty())
    })
    .await?;
    let listed = instances(observer, id).await?;
    ensure!(listed.len() == 1, "{id} listed as {listed:?}");
    ensure!(
        listed[0].len() == 16 && listed[0].chars().all(|c| c.is_ascii_hexdigit()),
        "instance {:?} is not 16 hex digits",
        listed[0]
    );
    Ok(listed[0].clone())
}

async fn scard(redis: &RedisProcess, key: &str) -> Result<u64> {
    Ok(redis.cli(&["SCARD", key]).await?.parse()?)
}

/// Every `sb:` key.
async fn keys(redis: &RedisProcess) -> Result<BTreeSet<String>> {
    let listed: Vec<String> = serde_json::from_str(&redis.cli(&["--json", "KEYS", "sb:*"]).await?)?;
    Ok(listed.into_iter().collect())
}

/// Room in the SLOWLOG for the calls of a reap of this many sessions: the reap's commands (see
/// [`MOST_COMMANDS_PER_CALL`]) and the other nodes' traffic meanwhile.
fn log_capacity(sessions: usize) -> usize {
    10 * sessions + 100_000
}

/// Logs every call (and every command a script runs, which Redis 7 logs just before the script's
/// own entry) from now on, the log cleared, for [`reap_calls`].
async fn log_every_call(redis: &RedisProcess, capacity: usize) -> Result<()> {
    redis
        .cli(&[
            "CONFIG",
            "SET",
            "slowlog-log-slower-than",
            "0",
            "slowlog-max-len",
            &capacity.to_string(),
        ])
        .await?;
    redis.cli(&["SLOWLOG", "RESET"]).await?;
    Ok(())
}

/// One REAP script call as the SLOWLOG shows it.
#[derive(Debug)]
struct ReapCall {
    /// How long Redis says it took, logging included: information only.
    micros: u64,
    /// The commands it ran.
    commands: usize,
    /// Of them, HDELs: the sessions and members it removed.
    removed: usize,
}

/// The REAP calls logged since [`log_every_call`], oldest first; and how many entries the log
/// holds. Fails if the log overflowed `capacity` (a call's commands could then be missing).
async fn reap_calls(redis: &RedisProcess, capacity: usize) -> Result<(Vec<ReapCall>, usize)> {
    let log: Vec<Value> =
        serde_json::from_str(&redis.cli(&["--json", "SLOWLOG", "GET", "-1"]).await?)?;
    ensure!(
        log.len() < capacity,
        "the SLOWLOG filled up ({} entries): the count of a call's commands could be short",
        log.len()
    );
    let mut calls = Vec::new();
    // A script's commands come from Redis's script client, "?:0", logged in order just before the
    // script's own entry; nothing else runs while a script does.
    let mut run: Vec<&str> = Vec::new();
    for entry in log.iter().rev() {
        let command = entry[3][0].as_str().context("a command")?;
        if entry[4] == "?:0" {
            run.push(command);
            continue;
        }
        // EVALSHA <sha> 0 sb: <node> <mode> ...: only the REAP script takes no key.
        if command.eq_ignore_ascii_case("EVALSHA") && entry[3][2] == "0" {
            calls.push(ReapCall {
                micros: entry[2].as_u64().context("a duration")?,
                commands: run.len(),
                removed: run.iter().filter(|run| **run == "HDEL").count(),
            });
        }
        run.clear();
    }
    Ok((calls, log.len()))
}

/// Opens sessions for users `u<first>`.. on `node`, each subscribed to (and so a presence
/// member of) one of [`ROOMS`] rooms, a few hundred handshakes at a time.
async fn open(node: &NodeProcess, first: usize, count: usize) -> Result<Vec<RawClient>> {
    let url = node.ws_url();
    let opened: Vec<Result<RawClient>> = stream::iter(first..first + count)
        .map(|index| {
            let url = format!("{url}?user=u{index}");
            async move {
                let (mut client, welcome) = RawClient::connect(&url, Codec::Json).await?;
                ensure!(
                    matches!(welcome, ServerFrame::Welcome { .. }),
                    "not a welcome: {welcome:?}"
                );
                client
                    .send_frame(&subscribe_frame(
                        &format!("room-{}", index % ROOMS),
                        1,
                        None,
                    ))
                    .await?;
                match client.next_frame().await? {
                    ServerFrame::Reply(reply) if reply.id == 1 => Ok(client),
                    other => bail!("subscribe answered {other:?}"),
                }
            }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    opened.into_iter().collect()
}

/// Closes the sessions, a few hundred at a time.
async fn close(clients: Vec<RawClient>) {
    stream::iter(clients)
        .for_each_concurrent(200, |mut client| async move {
            let _ = client.socket.close(None).await;
        })
        .await;
}

/// Waits until the index sets of incarnation `name` hold `count` entries each.
async fn indexes_hold(redis: &RedisProcess, name: &str, count: u64) -> Result<()> {
    let sessions = format!("sb:n:{name}:sessions");
    let members = format!("sb:n:{name}:members");
    poll(
        &format!("{name}'s index sets to hold {count}"),
        LONG,
        async || {
            Ok(scard(redis, &sessions).await? == count && scard(redis, &members).await? == count)
        },
    )
    .await
}

/// Waits until `name`, holding `held` sessions (each a presence member), is reaped from the shard,
/// checking all the while that `healthy` stays ready; then checks, in the log [`log_every_call`]
/// started, that each REAP call ran a bounded number of commands, so that a reap is a series of
/// short calls however big the node was; and that those calls removed all `held` sessions and
/// members between them unless `others_may_remove` (a node stopping gracefully closes its
/// sessions first, and they leave on their own).
async fn reaped_in_short_calls(
    redis: &RedisProcess,
    name: &str,
    held: usize,
    others_may_remove: bool,
    healthy: &NodeProcess,
) -> Result<()> {
    poll(&format!("{name} reaped"), LONG, async || {
        ensure!(
            readyz_within(healthy, LONG).await? == 200,
            "a healthy node lost readiness while {name} was reaped"
        );
        let nodes = redis.cli(&["SMEMBERS", "sb:nodes"]).await?;
        Ok(!nodes.lines().any(|node| node == name)
            && scard(redis, &format!("sb:n:{name}:sessions")).await? == 0
            && scard(redis, &format!("sb:n:{name}:members")).await? == 0)
    })
    .await?;
    let (calls, logged) = reap_calls(redis, log_capacity(held)).await?;
    let removed: usize = calls.iter().map(|call| call.removed).sum();
    let longest = calls.iter().map(|call| call.micros).max().unwrap_or(0);
    let most = calls.iter().map(|call| call.commands).max().unwrap_or(0);
    // Time is printed, not checked: on a loaded machine even a short call can show a long time,
    // when Redis was descheduled during it (and logging every command slows scripts down).
    println!(
        "{name} reaped in {} REAP calls ({logged} commands logged): at most {most} commands in \
         one, {removed} sessions and members removed; the longest call {longest} µs",
        calls.len()
    );
    ensure!(!calls.is_empty(), "no REAP call logged for {name}");
    if let Some(call) = calls
        .iter()
        .find(|call| call.commands > MOST_COMMANDS_PER_CALL)
    {
        bail!(
            "a REAP call ran {} commands, over {MOST_COMMANDS_PER_CALL}: {call:?}",
            call.commands
        );
    }
    // Two HDELs per session: its user entry and its presence entry.
    let expected = if others_may_remove { 0 } else { 2 * held };
    ensure!(
        removed >= expected,
        "the REAP calls removed {removed} entries, not the {expected} of {held} sessions"
    );
    // So a batch bigger than REAP_BATCH (one call for everything) fails even if each of its
    // entries took fewer commands.
    ensure!(
        calls.len() >= removed.div_ceil(2 * REAP_BATCH),
        "{} REAP calls removed {removed} entries, more than {REAP_BATCH} sessions each",
        calls.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_many_sessions_keeps_small_indexes_and_is_reaped_in_short_calls() -> Result<()> {
    // Larger runs (docs/benchmarks.md) set these; a wave must stay under the open-files limit.
    let size = |name: &str, default: usize| -> Result<usize> {
        std::env::var(name).map_or(Ok(default), |value| {
            value.parse().with_context(|| format!("{name}={value}"))
        })
    };
    let waves = size("REDIS_NODES_WAVES", 3)?;
    let per_wave = size("REDIS_NODES_PER_WAVE", 3_000)?;
    let held = size("REDIS_NODES_HELD", 3_000)?;
    let ttl = Duration::from_millis(1500);
    let redis = RedisProcess::start().await?;
    let observer = node(&redis, "node-b", ttl).await?;
    instance(&observer, "node-b").await?;
    let baseline = keys(&redis).await?;
    let mut busy = node(&redis, "node-a", ttl).await?;
    let name = format!("node-a@{}", instance(&observer, "node-a").await?);

    // Sessions come and go in waves: the index sets grow with them and shrink back to nothing.
    for wave in 0..waves {
        let clients = open(&busy, wave * per_wave, per_wave).await?;
        indexes_hold(&redis, &name, per_wave as u64).await?;
        close(clients).await;
        indexes_hold(&redis, &name, 0).await?;
    }

    // Killed while holding sessions: the other node reaps it in short calls.
    let clients = open(&busy, waves * per_wave, held).await?;
    indexes_hold(&redis, &name, held as u64).await?;
    log_every_call(&redis, log_capacity(held)).await?;
    busy.kill()?;
    drop(clients);
    reaped_in_short_calls(&redis, &name, held, false, &observer).await?;
    let mut expected = baseline.clone();
    expected.insert(format!("sb:n:{name}:reaped"));
    let reaped = poll("keys back to baseline after the reap", LONG, async || {
        Ok(keys(&redis).await? == expected)
    })
    .await;
    if let Err(error) = reaped {
        let left = keys(&redis).await?;
        let extra: Vec<&String> = left.difference(&expected).take(20).collect();
        let missing: Vec<&String> = expected.difference(&left).collect();
        return Err(error.context(format!(
            "{} keys left over (first: {extra:?}), missing {missing:?}",
            left.difference(&expected).count()
        )));
    }

    // Stopped gracefully while holding sessions: it removes its own entries, in short calls.
    let mut leaving = node(&redis, "node-c", ttl).await?;
    let name = format!("node-c@{}", instance(&observer, "node-c").await?);
    let clients = open(&leaving, 0, held).await?;
    indexes_hold(&redis, &name, held as u64).await?;
    log_every_call(&redis, log_capacity(held)).await?;
    leaving.terminate();
    leaving.wait_exit(LONG).await?;
    drop(clients);
    reaped_in_short_calls(&redis, &name, held, true, &observer).await?;
    let left = keys(&redis).await?;
    ensure!(left == expected, "a graceful stop left {left:?}");
    Ok(())
}

/// A raw session that keeps its id.
struct Session {
    client: RawClient,
    session: String,
}

impl Session {
    async fn connect(node: &NodeProcess, user: &str) -> Result<Session> {
        let (client, welcome) =
            RawClient::connect(&format!("{}?user={user}", node.ws_url()), Codec::Json).await?;
        let ServerFrame::Welcome { session, .. } = welcome else {
            bail!("not a welcome: {welcome:?}");
        };
        Ok(Session { client, session })
    }

    async fn subscribe(&mut self, room: &str, presence_events: bool) -> Result<()> {
        self.client
            .send_frame(&ClientFrame::Subscribe {
                room: room.to_owned(),
                id: Some(1),
                since: None,
                presence_events,
            })
            .await?;
        match self.client.next_frame().await? {
            ServerFrame::Reply(reply) if reply.id == 1 => Ok(()),
            other => bail!("subscribe answered {other:?}"),
        }
    }
}

/// A watcher's presence events, in order: (join?, user, session).
type Events = Vec<(bool, String, String)>;

/// Reads the watcher's presence events until `done` holds for them.
async fn watch(
    watcher: &mut Session,
    events: &mut Events,
    done: impl Fn(&Events) -> bool,
) -> Result<()> {
    while !done(events) {
        let frame = tokio::time::timeout(LONG, watcher.client.next_frame())
            .await
            .with_context(|| format!("waiting for presence events; got {events:?}"))??;
        match frame {
            ServerFrame::Join(notice) => events.push((true, notice.user, notice.session)),
            ServerFrame::Leave(notice) => events.push((false, notice.user, notice.session)),
            other => bail!("the watcher got {other:?}"),
        }
    }
    Ok(())
}

/// Each user's last presence event: (join?, session).
fn last_events(events: &Events) -> BTreeMap<String, (bool, String)> {
    let mut last = BTreeMap::new();
    for (join, user, session) in events {
        last.insert(user.clone(), (*join, session.clone()));
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_under_its_id_replaces_its_predecessor_at_once() -> Result<()> {
    // Far longer than the test needs: what happens must not come from the TTL.
    let ttl = Duration::from_secs(60);
    let users = ["ann", "bob", "cy"];
    let redis = RedisProcess::start().await?;
    let other = node(&redis, "node-b", ttl).await?;
    let mut first = node(&redis, "node-a", ttl).await?;
    let old_instance = instance(&other, "node-a").await?;
    let mut watcher = Session::connect(&other, "watcher").await?;
    watcher.subscribe("lobby", true).await?;
    let mut old = Vec::new();
    for user in users {
        let mut session = Session::connect(&first, user).await?;
        session.subscribe("lobby", false).await?;
        old.push(session);
    }
    let mut events = Events::new();
    watch(&mut watcher, &mut events, |events| {
        events.len() == users.len()
    })
    .await?;

    // The container is killed and started again under the same id; its clients come back and
    // rejoin. Its liveness key is made to never expire: the old incarnation can then only go
    // because the new one replaced it, however long the machine takes.
    first.kill()?;
    let liveness = format!("sb:n:node-a@{old_instance}");
    ensure!(
        redis.cli(&["PERSIST", &liveness]).await? == "1",
        "{liveness} has no expiry to remove"
    );
    let second = node(&redis, "node-a", ttl).await?;
    let mut new = Vec::new();
    for user in users {
        let mut session = Session::connect(&second, user).await?;
        session.subscribe("lobby", false).await?;
        new.push(session);
    }
    let mut expected: BTreeSet<(String, String)> = users
        .iter()
        .zip(&new)
        .map(|(user, session)| (user.to_string(), session.session.clone()))
        .collect();
    expected.insert(("watcher".into(), watcher.session.clone()));
    poll("presence without the old sessions", LONG, async || {
        Ok(api_presence_within(&other, "lobby", LONG).await? == expected)
    })
    .await?;
    for user in users {
        ensure!(
            api_send_within(&other, user, json!("hi"), LONG).await? == 1,
            "{user} has more than the new session in the registry"
        );
    }
    let new_instance = instance(&other, "node-a").await?;
    ensure!(
        new_instance != old_instance,
        "the restart kept instance {old_instance}"
    );

    // The watcher saw each old session leave and each new one join, the join last: no leave
    // without a later join.
    let new_sessions: BTreeSet<String> =
        new.iter().map(|session| session.session.clone()).collect();
    let old_sessions: BTreeSet<String> =
        old.iter().map(|session| session.session.clone()).collect();
    watch(&mut watcher, &mut events, |events| {
        let left = events
            .iter()
            .filter(|(join, _, session)| !join && old_sessions.contains(session))
            .count();
        let joined = events
            .iter()
            .filter(|(join, _, session)| *join && new_sessions.contains(session))
            .count();
        left == users.len() && joined == users.len()
    })
    .await?;
    for (user, (join, session)) in last_events(&events) {
        ensure!(
            join && new_sessions.contains(&session),
            "{user}'s last presence event is not the new session's join: {events:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_live_processes_with_one_id_both_keep_their_entries() -> Result<()> {
    let ttl = Duration::from_millis(1500);
    let redis = RedisProcess::start().await?;
    let other = node(&redis, "node-b", ttl).await?;
    let first = node(&redis, "node-a", ttl).await?;
    let mut watcher = Session::connect(&other, "watcher").await?;
    watcher.subscribe("lobby", true).await?;
    let mut ann = Session::connect(&first, "ann").await?;
    ann.subscribe("lobby", false).await?;
    let mut events = Events::new();
    watch(&mut watcher, &mut events, |events| events.len() == 1).await?;

    // A second process under the same id (a misconfiguration): it takes the first for its dead
    // predecessor and reaps it; the first, alive, writes its entries back at its next heartbeat.
    let twin = node(&redis, "node-a", ttl).await?;
    let mut bob = Session::connect(&twin, "bob").await?;
    bob.subscribe("lobby", false).await?;
    let expected: BTreeSet<(String, String)> = [
        ("ann".to_owned(), ann.session.clone()),
        ("bob".to_owned(), bob.session.clone()),
        ("watcher".to_owned(), watcher.session.clone()),
    ]
    .into();
    let settled = async || -> Result<bool> {
        Ok(instances(&other, "node-a").await?.len() == 2
            && api_presence_within(&other, "lobby", LONG).await? == expected
            && api_send_within(&other, "ann", json!("hi"), LONG).await? == 1
            && api_send_within(&other, "bob", json!("hi"), LONG).await? == 1)
    };
    poll("both processes listed with their sessions", LONG, settled).await?;
    // And it stays so over several TTLs: neither keeps removing the other.
    tokio::time::sleep(ttl * 3).await;
    ensure!(settled().await?, "the two processes' entries changed");
    watch(&mut watcher, &mut events, |events| {
        let last = last_events(events);
        last.get("ann") == Some(&(true, ann.session.clone()))
            && last.get("bob") == Some(&(true, bob.session.clone()))
    })
    .await?;
    Ok(())
}
