//! Redis servers that fail the way production ones do: killed with SIGKILL and restarted from
//! the snapshot they saved earlier (losing the writes since), replicas promoted after their
//! primary died, and a TCP forwarder that re-points the nodes' one shard URL to another server.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{free_port, kill_redis, redis_cli, spawn_redis};

/// A `redis-server` on a free loopback port with its own directory, which keeps `dump.rdb`
/// across [`SnapshotRedis::restart`]. It saves only when told (`SAVE`). Killed by pid and its
/// directory removed on drop.
pub struct SnapshotRedis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    replica_of: Option<u16>,
}

impl SnapshotRedis {
    /// Starts an empty server; with `replica_of`, a replica of the server on that port.
    pub async fn start(replica_of: Option<u16>) -> Result<SnapshotRedis> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!(
            "switchboard-redis-{}-{port}-{:08x}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).context("creating the Redis directory")?;
        let mut redis = SnapshotRedis {
            child: None,
            port,
            dir,
            replica_of,
        };
        redis.spawn().await?;
        Ok(redis)
    }

    async fn spawn(&mut self) -> Result<()> {
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        command
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--protected-mode",
                "no",
                // Tests stall the server with DEBUG SLEEP.
                "--enable-debug-command",
                "local",
            ])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--dbfilename",
                "dump.rdb",
            ])
            .arg("--dir")
            .arg(&self.dir);
        if let Some(primary) = self.replica_of {
            command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        spawn_redis(&mut command, self.port, &mut self.child).await
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against this server and returns its trimmed output.
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        redis_cli(self.port, args).await
    }

    /// Kills the server with SIGKILL, as a crash would: nothing since the last `SAVE` is kept.
    pub fn kill(&mut self) {
        kill_redis(&mut self.child);
    }

    /// Kills the server and starts it again on the same port from its last snapshot.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }

    /// Stops following the primary without becoming a primary (writes the primary takes from
    /// now on never arrive here), as a replica whose link broke would.
    pub async fn detach(&mut self) -> Result<()> {
        // A port nothing listens on: the replica keeps its data and retries in vain.
        let nowhere = free_port()?;
        self.cli(&["REPLICAOF", "127.0.0.1", &nowhere.to_string()])
            .await?;
        self.replica_of = Some(nowhere);
        Ok(())
    }

    /// Promotes this replica (`REPLICAOF NO ONE`).
    pub async fn promote(&mut self) -> Result<()> {
        self.cli(&["REPLICAOF", "NO", "ONE"]).await?;
        self.replica_of = None;
        Ok(())
    }
}

impl Drop for SnapshotRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    nanos ^ std::process::id().rotate_left(16)
}

/// A TCP forwarder on a free loopback port to a Redis server that can be changed: what a
/// stable DNS name or a virtual IP in front of a failed-over Redis is to the nodes.
pub struct Forwarder {
    pub port: u16,
    target: watch::Sender<u16>,
    task: JoinHandle<()>,
}

impl Forwarder {
    pub async fn start(target: u16) -> Result<Forwarder> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (target, watching) = watch::channel(target);
        let watching = Arc::new(watching);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut changes = (*watching).clone();
                tokio::spawn(async move {
                    let to = *changes.borrow_and_update();
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", to)).await else {
                        return;
                    };
                    let mut inbound = inbound;
                    // A connection lives until either side closes or the target changes.
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = changes.changed() => {}
                    }
                });
            }
        });
        Ok(Forwarder { port, target, task })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends new connections to `port` and cuts every open one.
    pub fn retarget(&self, port: u16) {
        self.target.send_replace(port);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
