//! A real `haproxy` in front of real nodes, run from `deploy/haproxy/haproxy.cfg` (the file users
//! deploy, configured through its `SB_*` environment variables), on loopback ports chosen at run
//! time; killed (by pid) on drop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::{DEADLINE, NodeProcess, collect_lines, free_port, wait_until, workspace_file};

/// `deploy/haproxy/haproxy.cfg` in this workspace.
pub fn config_path() -> PathBuf {
    workspace_file("deploy/haproxy/haproxy.cfg")
}

/// Where a node serves clients and where HAProxy checks its `/readyz`.
#[derive(Debug, Clone, Copy)]
pub struct Backend {
    pub public: SocketAddr,
    pub internal: SocketAddr,
}

impl From<&NodeProcess> for Backend {
    fn from(node: &NodeProcess) -> Self {
        Backend {
            public: node.public,
            internal: node.internal,
        }
    }
}

/// The `SB_*` variables that point haproxy.cfg at `backends` (servers `node1`, `node2`, … in
/// that order) and bind it to the given ports.
pub fn config_env(
    backends: &[Backend],
    public_port: u16,
    stats_port: u16,
    check_interval: Duration,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("SB_PUBLIC_BIND".into(), format!("127.0.0.1:{public_port}")),
        ("SB_STATS_BIND".into(), format!("127.0.0.1:{stats_port}")),
        (
            "SB_CHECK_INTER".into(),
            format!("{}ms", check_interval.as_millis()),
        ),
        // Within this machine's limit of open files (two per proxied connection).
        ("SB_MAXCONN".into(), "2000".into()),
        ("SB_FRONTEND_MAXCONN".into(), "1900".into()),
        ("SB_SERVER_MAXCONN".into(), "1000".into()),
    ];
    for (index, backend) in backends.iter().enumerate() {
        let n = index + 1;
        env.push((format!("SB_NODE{n}"), backend.public.to_string()));
        env.push((
            format!("SB_NODE{n}_CHECK_PORT"),
            backend.internal.port().to_string(),
        ));
    }
    env
}

/// Runs `haproxy -c` on the config with `env`; the error holds HAProxy's output.
pub fn check_config(env: &[(String, String)]) -> Result<()> {
    let output = haproxy_command(env)
        .args(["-c", "-f"])
        .arg(config_path())
        .output()
        .context("running haproxy -c (install the haproxy package)")?;
    if !output.status.success() {
        bail!(
            "haproxy -c failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A running `haproxy`.
pub struct HaproxyProcess {
    child: Child,
    /// Where clients connect: `ws://{public}/ws`.
    pub public: SocketAddr,
    /// The stats page, HAProxy's Prometheus exporter and `/healthz`.
    pub stats: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl HaproxyProcess {
    /// Starts HAProxy in front of `backends`, checking `/readyz` every `check_interval`, and
    /// waits until it serves and sees every backend UP.
    pub async fn start(backends: &[Backend], check_interval: Duration) -> Result<HaproxyProcess> {
        Self::start_with_env(backends, check_interval, &[]).await
    }

    /// Like [`HaproxyProcess::start`], with more `SB_*` variables (e.g. the TLS frontend's).
    pub async fn start_with_env(
        backends: &[Backend],
        check_interval: Duration,
        extra: &[(String, String)],
    ) -> Result<HaproxyProcess> {
        let mut last_error = None;
        // A port picked here may be taken before HAProxy binds it: try again with others.
        for _ in 0..5 {
            let public_port = free_port()?;
            let stats_port = free_port()?;
            let mut env = config_env(backends, public_port, stats_port, check_interval);
            env.extend_from_slice(extra);
            match Self::spawn(&env, public_port, stats_port).await {
                Ok(haproxy) => {
                    haproxy.wait_all_up(backends.len()).await?;
                    return Ok(haproxy);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("haproxy did not start")))
    }

    async fn spawn(
        env: &[(String, String)],
        public_port: u16,
        stats_port: u16,
    ) -> Result<HaproxyProcess> {
        let (child, logs) = spawn_logged(haproxy_command(env).arg("-f").arg(config_path()))?;
        let mut haproxy = HaproxyProcess {
            child,
            public: SocketAddr::from(([127, 0, 0, 1], public_port)),
            stats: SocketAddr::from(([127, 0, 0, 1], stats_port)),
            logs,
        };
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = haproxy.child.try_wait()? {
                bail!(
                    "haproxy exited with {status}: {}",
                    haproxy.logs().join("\n")
                );
            }
            if reqwest::get(haproxy.stats_url("/healthz"))
                .await
                .is_ok_and(|response| response.status().is_success())
            {
                return Ok(haproxy);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("haproxy did not answer: {}", haproxy.logs().join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.public)
    }

    pub fn stats_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.stats)
    }

    /// What HAProxy printed: its warnings and one log line per finished connection.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("logs lock").clone()
    }

    /// Each server of the `switchboard` backend (`node1`, …) with its status from the stats CSV:
    /// `UP`, `DOWN`, or a transition such as `UP 1/2`.
    pub async fn servers(&self) -> Result<BTreeMap<String, String>> {
        let csv = reqwest::get(self.stats_url("/stats;csv"))
            .await?
            .error_for_status()?
            .text()
            .await?;
        parse_servers(&csv)
    }

    /// Waits until the server's status is exactly `status`.
    pub async fn wait_server(&self, server: &str, status: &str) -> Result<()> {
        wait_until(&format!("haproxy to report {server} {status}"), || async {
            self.servers()
                .await
                .is_ok_and(|servers| servers.get(server).is_some_and(|state| state == status))
        })
        .await
    }

    /// Waits until HAProxy lists `count` servers, all UP.
    pub async fn wait_all_up(&self, count: usize) -> Result<()> {
        wait_until(&format!("haproxy to see {count} servers UP"), || async {
            self.servers().await.is_ok_and(|servers| {
                servers.len() == count && servers.values().all(|state| state == "UP")
            })
        })
        .await
    }

    /// HAProxy's own Prometheus metrics (the exporter on the stats port).
    pub async fn metrics(&self) -> Result<String> {
        Ok(reqwest::get(self.stats_url("/metrics"))
            .await?
            .error_for_status()?
            .text()
            .await?)
    }
}

impl Drop for HaproxyProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The servers of the `switchboard` backend and their status, from HAProxy's stats CSV.
pub fn parse_servers(csv: &str) -> Result<BTreeMap<String, String>> {
    let header = csv
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("# "))
        .context("stats CSV without a header")?;
    let column = |name: &str| {
        header
            .split(',')
            .position(|field| field == name)
            .with_context(|| format!("no {name} column in the stats CSV"))
    };
    let (proxy, server, status) = (column("pxname")?, column("svname")?, column("status")?);
    Ok(csv
        .lines()
        .skip(1)
        .map(|line| line.split(',').collect::<Vec<_>>())
        .filter(|fields| {
            fields.get(proxy) == Some(&"switchboard")
                && fields
                    .get(server)
                    .is_some_and(|name| !matches!(*name, "BACKEND" | "FRONTEND"))
        })
        .filter_map(|fields| {
            Some((
                fields.get(server)?.to_string(),
                fields.get(status)?.to_string(),
            ))
        })
        .collect())
}

/// Spawns `command` (a `haproxy`) with its stdout and stderr collected, line by line, in the
/// returned logs.
pub fn spawn_logged(command: &mut Command) -> Result<(Child, Arc<Mutex<Vec<String>>>)> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning haproxy (install the haproxy package)")?;
    let logs = Arc::new(Mutex::new(Vec::new()));
    collect_lines(child.stdout.take().context("stdout")?, &logs);
    collect_lines(child.stderr.take().context("stderr")?, &logs);
    Ok((child, logs))
}

/// `haproxy` with exactly the given `SB_*` variables (none inherited from the test's
/// environment).
pub fn haproxy_command(env: &[(String, String)]) -> Command {
    let mut command = Command::new("haproxy");
    for (key, _) in std::env::vars() {
        if key.starts_with("SB_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().map(|(key, value)| (key, value)));
    command
}
