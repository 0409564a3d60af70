//! Configuration: command-line flags, each with a `SWITCHBOARD_*` environment variable, and an
//! optional TOML file whose keys are the flags' long names. A flag or variable wins over the file,
//! the file over the default. docs/configuration.md lists every option. Each option is declared
//! once, in `options!` below: flag, variable, file key, help text and default together (see
//! config/declare.rs for what that generates).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use declare::options;

/// Exit status for a configuration error (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The name the flag takes, for the help text's default.
impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.to_possible_value() {
            Some(value) => f.write_str(value.get_name()),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JwtAlgorithm {
    Hs256,
    Rs256,
    Es256,
}

options! {
/// Every option as given; `None` where neither the command line, the environment nor the file set it.
#[derive(Parser, Deserialize, Debug, Clone, Default)]
#[command(
    name = "switchboard",
    version,
    about = "A horizontally scaled WebSocket gateway",
    long_about = "A horizontally scaled WebSocket gateway.\n\nEvery option can also be set by its \
                  environment variable or by its long name as a key in the TOML file given by \
                  --config. Flags and variables win over the file."
)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Options {
    /// TOML file with options (keys are the long flag names, e.g. `max-connections = 5000`).
    #[arg(long, env = "SWITCHBOARD_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: PathBuf;

    /// Public address: WebSocket clients connect to ws://ADDR/ws.
    #[arg(long, env = "SWITCHBOARD_LISTEN", value_name = "ADDR")]
    pub listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080));

    /// Internal address: /metrics, /healthz, /readyz and /api/*.
    #[arg(long, env = "SWITCHBOARD_INTERNAL_LISTEN", value_name = "ADDR")]
    pub internal_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 9090));

    /// PEM file with the public port's certificate chain (leaf first); with --tls-key, clients
    /// connect with wss:// (and the demo page is https). Unset: plain ws://.
    #[arg(long, env = "SWITCHBOARD_TLS_CERT", value_name = "FILE")]
    pub tls_cert: PathBuf, default "none";

    /// PEM file with the private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "SWITCHBOARD_TLS_KEY", value_name = "FILE")]
    pub tls_key: PathBuf, default "none";

    /// This node's id, unique in the cluster.
    #[arg(long, env = "SWITCHBOARD_NODE_ID")]
    pub node_id: String, default "generated, node-<random>";

    /// Redis shards for a cluster (comma-separated redis:// URLs, or rediss:// for TLS). Unset:
    /// the embedded broker.
    #[arg(long, env = "SWITCHBOARD_REDIS", value_name = "URLS")]
    pub redis: String;

    /// PEM file with the CA certificates that rediss:// shards' certificates must chain to,
    /// instead of the built-in Mozilla roots (for a private CA).
    #[arg(long, env = "SWITCHBOARD_REDIS_CA_FILE", value_name = "FILE")]
    pub redis_ca_file: PathBuf;

    /// A node that has not reported for this long is dead: the cluster drops its sessions and
    /// presence. It reports every third of this.
    #[arg(long, env = "SWITCHBOARD_NODE_TTL_MS", value_name = "MS")]
    pub node_ttl_ms: u64 = 15_000;

    /// HS256 secret; setting it (or --jwt-public-key) turns authentication on.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String;

    /// PEM file with the RSA or EC public key that verifies RS256 / ES256 tokens.
    #[arg(long, env = "SWITCHBOARD_JWT_PUBLIC_KEY", value_name = "FILE")]
    pub jwt_public_key: PathBuf;

    /// Token algorithm.
    #[arg(long, env = "SWITCHBOARD_JWT_ALGORITHM")]
    pub jwt_algorithm: JwtAlgorithm, default "hs256 with a secret, rs256 or es256 by the public key's type";

    /// Required `iss` claim, if set; set it whenever the key is shared (an identity provider's).
    #[arg(long, env = "SWITCHBOARD_JWT_ISSUER")]
    pub jwt_issuer: String;

    /// Required `aud` claim, if set; set it whenever the key signs tokens for other services.
    #[arg(long, env = "SWITCHBOARD_JWT_AUDIENCE")]
    pub jwt_audience: String;

    /// Clock-skew leeway for `exp` and `nbf`, in seconds (0..=60).
    #[arg(long, env = "SWITCHBOARD_JWT_LEEWAY_SECS", value_name = "SECS")]
    pub jwt_leeway_secs: u64 = 30;

    /// Bearer key the server API (/api/*) requires. Unset: the API is open (keep the internal port private).
    #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
    pub api_key: String;

    /// Origins allowed to open sessions, and by CORS on /sse and /poll (comma-separated, e.g.
    /// https://app.example.com). Unset: any.
    #[arg(
        long,
        env = "SWITCHBOARD_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGINS"
    )]
    pub allowed_origins: Vec<String>;

    /// Load balancers or proxies (comma-separated addresses or CIDRs, e.g. 10.0.0.0/8) whose
    /// X-Forwarded-For header names the client in logs. Unset: the TCP peer is the client.
    #[arg(
        long,
        env = "SWITCHBOARD_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_name = "CIDRS"
    )]
    pub trusted_proxies: Vec<String>;

    /// Most connections (handshaking or open) at once; more wait in the kernel's accept backlog.
    /// A long-poll session holds one place for its life besides each request's connection.
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: usize, default "the open-files limit less 512";

    /// Most connections open at once from one client address (the peer, or the client named by
    /// a trusted proxy); more get HTTP 429. 0 turns the limit off.
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: usize = 1000;

    /// New connections per second from one client address; more get HTTP 429 with Retry-After.
    /// 0 turns the limit off.
    #[arg(long, env = "SWITCHBOARD_CONNECT_RATE_PER_IP", value_name = "PER_SEC")]
    pub connect_rate_per_ip: u32 = 50;

    /// New connections one client address may open at once above --connect-rate-per-ip.
    #[arg(long, env = "SWITCHBOARD_CONNECT_BURST_PER_IP", value_name = "N")]
    pub connect_burst_per_ip: u32 = 200;

    /// New connections per second for the whole node; more wait their turn (within the
    /// handshake timeout) instead of being refused. 0 turns the pacing off.
    #[arg(long, env = "SWITCHBOARD_ACCEPT_RATE", value_name = "PER_SEC")]
    pub accept_rate: u32 = 2000;

    /// New connections the node takes at once above --accept-rate before they wait.
    #[arg(long, env = "SWITCHBOARD_ACCEPT_BURST", value_name = "N")]
    pub accept_burst: u32 = 1000;

    /// A client must finish the HTTP upgrade within this many milliseconds.
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_TIMEOUT_MS", value_name = "MS")]
    pub handshake_timeout_ms: u64 = 10_000;

    /// Largest frame or message a client may send, in bytes; larger closes with 1009.
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_SIZE", value_name = "BYTES")]
    pub max_message_size: usize = 1 << 20;

    /// Most bytes waiting to be written to one client; a reader that falls further behind is
    /// closed with 1013. At least twice max-message-size, so one large frame being read does not
    /// close a reader when the next arrives.
    #[arg(long, env = "SWITCHBOARD_MAX_QUEUE_BYTES", value_name = "BYTES")]
    pub max_queue_bytes: usize, default "4 × max-message-size";

    /// Most rooms one session may be subscribed to; one more `subscribe` gets
    /// `error limit_exceeded`.
    #[arg(long, env = "SWITCHBOARD_MAX_SUBSCRIPTIONS", value_name = "N")]
    pub max_subscriptions: usize = 128;

    /// Frames per second one connection may send, WebSocket pings and pongs included; 0 turns the
    /// limit off.
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT", value_name = "PER_SEC")]
    pub rate_limit: u32 = 100;

    /// Frames a connection may send in a burst above the rate.
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT_BURST", value_name = "N")]
    pub rate_limit_burst: u32 = 200;

    /// Rate-limited frames tolerated within 10 seconds before the connection is closed with 1008.
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT_STRIKES", value_name = "N")]
    pub rate_limit_strikes: u32 = 50;

    /// Undecodable frames tolerated within a minute before the connection is closed with 1008.
    #[arg(long, env = "SWITCHBOARD_MAX_BAD_FRAMES", value_name = "N")]
    pub max_bad_frames: u32 = 10;

    /// Interval of the server's WebSocket pings, also sent to clients in `welcome`.
    #[arg(long, env = "SWITCHBOARD_HEARTBEAT_MS", value_name = "MS")]
    pub heartbeat_ms: u64 = 25_000;

    /// A client that sends nothing (not even a pong) for this long is closed.
    #[arg(long, env = "SWITCHBOARD_IDLE_TIMEOUT_MS", value_name = "MS")]
    pub idle_timeout_ms: u64 = 60_000;

    /// A long poll (`GET /poll/{session}`) with nothing to deliver is answered with `[]` after
    /// this long; shorter than idle-timeout-ms, so a client that keeps polling is never reaped.
    #[arg(long, env = "SWITCHBOARD_POLL_TIMEOUT_MS", value_name = "MS")]
    pub poll_timeout_ms: u64, default "25000, at most half idle-timeout-ms";

    /// A client of the internal port must send a request's headers within this many
    /// milliseconds, or its connection is closed; also bounds idle keep-alive.
    #[arg(
        long,
        env = "SWITCHBOARD_INTERNAL_HEADER_TIMEOUT_MS",
        value_name = "MS"
    )]
    pub internal_header_timeout_ms: u64 = 10_000;

    /// Most connections open at once on the internal port; more are closed at once.
    #[arg(long, env = "SWITCHBOARD_INTERNAL_MAX_CONNECTIONS", value_name = "N")]
    pub internal_max_connections: usize = 256;

    /// On SIGTERM/SIGINT, sessions are closed with 1001 in batches spread over this many
    /// milliseconds.
    #[arg(long, env = "SWITCHBOARD_DRAIN_GRACE_MS", value_name = "MS")]
    pub drain_grace_ms: u64 = 10_000;

    /// On SIGTERM/SIGINT, /readyz answers 503 at once but the node keeps accepting and serving
    /// normally for this many milliseconds before it drains, so that a load balancer polling
    /// /readyz stops sending it new connections first. Use it without a preStop hook; set it to
    /// at least the balancer's checks to mark a server down (HAProxy: fall × inter).
    #[arg(long, env = "SWITCHBOARD_DRAIN_DELAY_MS", value_name = "MS")]
    pub drain_delay_ms: u64 = 0;

    /// Messages of history kept per room, for `history` and `since` recovery.
    #[arg(long, env = "SWITCHBOARD_HISTORY_SIZE", value_name = "N")]
    pub history_size: usize = 100;

    /// Seconds a message stays in history.
    #[arg(long, env = "SWITCHBOARD_HISTORY_TTL_SECS", value_name = "SECS")]
    pub history_ttl_secs: u64 = 300;

    /// Messages kept per user inbox (persisted `send`); past it the oldest unacknowledged are
    /// dropped and counted, so one flooded user cannot grow without bound.
    #[arg(long, env = "SWITCHBOARD_INBOX_SIZE", value_name = "N")]
    pub inbox_size: usize = 1000;

    /// Seconds a persisted direct message stays in its user's inbox.
    #[arg(long, env = "SWITCHBOARD_INBOX_TTL_SECS", value_name = "SECS")]
    pub inbox_ttl_secs: u64 = 604_800;

    /// Seconds a `key` of a publish or persisted send is remembered: a repeat within it answers
    /// the first result with `duplicate: true`.
    #[arg(long, env = "SWITCHBOARD_IDEMPOTENCY_WINDOW_SECS", value_name = "SECS")]
    pub idempotency_window_secs: u64 = 300;

    /// Seconds a room's offset and epoch outlive its last publish once nobody subscribes.
    #[arg(long, env = "SWITCHBOARD_STREAM_TTL_SECS", value_name = "SECS")]
    pub stream_ttl_secs: u64 = 86_400;

    /// After the last local subscriber leaves, keep receiving the room this long in case another joins.
    #[arg(long, env = "SWITCHBOARD_ROOM_LINGER_MS", value_name = "MS")]
    pub room_linger_ms: u64 = 2_000;

    /// Bytes of the per-connection read buffer, and of each socket read; small keeps idle
    /// connections cheap (a larger frame is read in more reads).
    #[arg(long, env = "SWITCHBOARD_READ_BUFFER_SIZE", value_name = "BYTES")]
    pub read_buffer_size: usize = 1024;

    /// Bytes of outgoing frames coalesced into one socket write when a connection has several
    /// queued; 0 writes every frame on its own. Once used, a connection keeps a buffer this large.
    #[arg(long, env = "SWITCHBOARD_WRITE_BUFFER_SIZE", value_name = "BYTES")]
    pub write_buffer_size: usize = 4096;

    /// Serve the demo page at / on the public port and publish this node's figures to the
    /// read-only room $sys.stats every second (`--demo false` turns both off).
    #[arg(long, env = "SWITCHBOARD_DEMO", value_name = "BOOL", action = clap::ArgAction::Set)]
    pub demo: bool = true;

    /// Log format.
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT")]
    pub log_format: LogFormat = LogFormat::Text;

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `switchboard=debug`).
    #[arg(long, env = "SWITCHBOARD_LOG", value_name = "FILTER")]
    pub log: String = String::from("info");
}
}

/// Authentication settings, when on.
#[derive(Debug, Clone)]
pub enum JwtKey {
    Secret(String),
    PublicKeyPem(Vec<u8>),
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub key: JwtKey,
    pub algorithm: JwtAlgorithm,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

/// The resolved, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub internal_listen: SocketAddr,
    /// TLS on the public port, when --tls-cert and --tls-key are set.
    pub tls: Option<crate::tls::Tls>,
    pub node_id: String,
    /// This process's instance id (16 hex digits, random at every start, not an option): a
    /// node restarted under the same id is a new incarnation (docs/architecture.md).
    pub instance: String,
    pub redis: Option<Vec<String>>,
    /// PEM CA certificates for rediss:// shards, replacing the built-in roots.
    pub redis_ca: Option<Vec<u8>>,
    pub node_ttl: Duration,
    pub jwt: Option<JwtConfig>,
    pub api_key: Option<String>,
    pub allowed_origins: Option<Vec<String>>,
    /// Peers whose X-Forwarded-For is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub max_connections: usize,
    /// 0: no limit.
    pub max_connections_per_ip: usize,
    /// 0: no limit.
    pub connect_rate_per_ip: u32,
    pub connect_burst_per_ip: u32,
    /// 0: no pacing.
    pub accept_rate: u32,
    pub accept_burst: u32,
    pub handshake_timeout: Duration,
    pub internal_header_timeout: Duration,
    pub internal_max_connections: usize,
    pub max_message_size: usize,
    pub max_queue_bytes: usize,
    pub max_subscriptions: usize,
    pub rate_limit: u32,
    pub rate_limit_burst: u32,
    pub rate_limit_strikes: u32,
    pub max_bad_frames: u32,
    pub heartbeat: Duration,
    pub idle_timeout: Duration,
    pub poll_timeout: Duration,
    pub drain_grace: Duration,
    pub drain_delay: Duration,
    pub history_size: usize,
    pub history_ttl: Duration,
    pub stream_ttl: Duration,
    pub inbox_size: usize,
    pub inbox_ttl: Duration,
    pub idempotency_window: Duration,
    pub room_linger: Duration,
    pub read_buffer_size: usize,
    pub write_buffer_size: usize,
    /// The demo page on the public port and the `$sys.stats` publisher.
    pub demo: bool,
    pub log_format: LogFormat,
    pub log: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("invalid option {option}: {message}")]
    Invalid {
        option: &'static str,
        message: String,
    },
}

fn invalid(option: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        option,
        message: message.into(),
    }
}

/// Files a node keeps open besides its connections (listeners, Redis, logs, /proc reads).
const RESERVED_FILES: u64 = 512;

impl Options {
    fn read_file(path: &Path) -> Result<Options, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::ParseFile {
            path: path.to_owned(),
            message: error.message().to_owned(),
        })
    }

    /// Merges the config file (if any) under these options and validates the result.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let options = match self.config.clone() {
            Some(path) => {
                let file = Options::read_file(&path)?;
                self.or(file)
            }
            None => self,
        };
        options.validate()
    }

    fn validate(self) -> Result<Config, ConfigError> {
        let given = self.given();
        let node_id = match given.node_id {
            Some(id)
                if id.is_empty()
                    || id.len() > 64
                    || !id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) =>
            {
                return Err(invalid(
                    "node-id",
                    "must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'",
                ));
            }
            Some(id) => id,
            None => format!("node-{:08x}", rand::random::<u32>()),
        };
        let redis = match given.redis {
            Some(urls) => {
                let shards: Vec<String> = urls
                    .split(',')
                    .map(str::trim)
                    .filter(|url| !url.is_empty())
                    .map(str::to_owned)
                    .collect();
                if shards.is_empty() {
                    return Err(invalid("redis", "lists no URL"));
                }
                for shard in &shards {
                    if !(shard.starts_with("redis://") || shard.starts_with("rediss://")) {
                        return Err(invalid(
                            "redis",
                            format!(
                                "{:?} is not a redis:// URL",
                                switchboard_redis::redacted(shard)
                            ),
                        ));
                    }
                }
                Some(shards)
            }
            None => None,
        };
        let redis_ca = match given.redis_ca_file {
            Some(_)
                if !redis
                    .iter()
                    .flatten()
                    .any(|shard| shard.starts_with("rediss://")) =>
            {
                return Err(invalid(
                    "redis-ca-file",
                    "applies to rediss:// shards, and --redis lists none",
                ));
            }
            Some(path) => Some(read_ca_file(&path)?),
            None => None,
        };
        let tls = match (&given.tls_cert, &given.tls_key) {
            (Some(cert), Some(key)) => Some(
                crate::tls::Tls::load(cert, key)
                    .map_err(|error| invalid(error.option, error.message))?,
            ),
            (Some(_), None) => return Err(invalid("tls-key", "--tls-cert needs --tls-key")),
            (None, Some(_)) => return Err(invalid("tls-cert", "--tls-key needs --tls-cert")),
            (None, None) => None,
        };
        let leeway = given.jwt_leeway_secs;
        if leeway > 60 {
            return Err(invalid("jwt-leeway-secs", "must be at most 60"));
        }
        let jwt_key = match (given.jwt_secret, given.jwt_public_key) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "jwt-secret",
                    "set either --jwt-secret or --jwt-public-key, not both",
                ));
            }
            (Some(secret), None) if secret.len() < 16 => {
                return Err(invalid("jwt-secret", "must be at least 16 bytes"));
            }
            (Some(secret), None) => Some(JwtKey::Secret(secret)),
            (None, Some(path)) => {
                let pem = std::fs::read(&path).map_err(|error| {
                    invalid("jwt-public-key", format!("{}: {error}", path.display()))
                })?;
                Some(JwtKey::PublicKeyPem(pem))
            }
            (None, None) => None,
        };
        let jwt = match jwt_key {
            None => {
                let given = [
                    ("jwt-algorithm", given.jwt_algorithm.is_some()),
                    ("jwt-issuer", given.jwt_issuer.is_some()),
                    ("jwt-audience", given.jwt_audience.is_some()),
                ];
                if let Some((option, _)) = given.into_iter().find(|(_, set)| *set) {
                    return Err(invalid(
                        option,
                        "JWT options need --jwt-secret or --jwt-public-key",
                    ));
                }
                None
            }
            Some(key) => {
                let algorithm = match (&key, given.jwt_algorithm) {
                    (JwtKey::Secret(_), None | Some(JwtAlgorithm::Hs256)) => JwtAlgorithm::Hs256,
                    (JwtKey::Secret(_), Some(_)) => {
                        return Err(invalid(
                            "jwt-algorithm",
                            "a secret only verifies hs256; use --jwt-public-key for rs256/es256",
                        ));
                    }
                    (JwtKey::PublicKeyPem(_), Some(JwtAlgorithm::Hs256)) => {
                        return Err(invalid(
                            "jwt-algorithm",
                            "hs256 needs --jwt-secret, not a public key",
                        ));
                    }
                    (JwtKey::PublicKeyPem(_), Some(algorithm)) => algorithm,
                    (JwtKey::PublicKeyPem(pem), None) => {
                        if jsonwebtoken::DecodingKey::from_ec_pem(pem).is_ok() {
                            JwtAlgorithm::Es256
                        } else {
                            JwtAlgorithm::Rs256
                        }
                    }
                };
                Some(JwtConfig {
                    key,
                    algorithm,
                    issuer: given.jwt_issuer,
                    audience: given.jwt_audience,
                    leeway: Duration::from_secs(leeway),
                })
            }
        };
        if given.api_key.as_deref().is_some_and(str::is_empty) {
            return Err(invalid("api-key", "must not be empty"));
        }
        let allowed_origins = match given.allowed_origins {
            Some(origins) => {
                let origins: Vec<String> = origins
                    .into_iter()
                    .map(|origin| origin.trim().trim_end_matches('/').to_owned())
                    .filter(|origin| !origin.is_empty())
                    .collect();
                if origins.is_empty() {
                    return Err(invalid("allowed-origins", "lists no origin"));
                }
                Some(origins)
            }
            None => None,
        };
        let mut trusted_proxies = Vec::new();
        for entry in given.trusted_proxies.iter().flatten() {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let network = entry
                .parse::<ipnet::IpNet>()
                .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    invalid(
                        "trusted-proxies",
                        format!("{entry:?} is neither an IP address nor a CIDR"),
                    )
                })?;
            trusted_proxies.push(network);
        }
        let max_connections = match given.max_connections {
            Some(0) => return Err(invalid("max-connections", "must be at least 1")),
            Some(n) => n,
            None => {
                let (soft, _) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
                soft.saturating_sub(RESERVED_FILES).max(64) as usize
            }
        };
        let positive = |option: &'static str, value: u64| match value {
            0 => Err(invalid(option, "must be greater than 0")),
            value => Ok(value),
        };
        let heartbeat_ms = positive("heartbeat-ms", given.heartbeat_ms)?;
        let idle_timeout_ms = positive("idle-timeout-ms", given.idle_timeout_ms)?;
        if idle_timeout_ms <= heartbeat_ms {
            return Err(invalid(
                "idle-timeout-ms",
                "must be longer than heartbeat-ms, or live clients are closed between pings",
            ));
        }
        let poll_timeout_ms = match given.poll_timeout_ms {
            Some(ms) => positive("poll-timeout-ms", ms)?,
            None => (idle_timeout_ms / 2).clamp(1, 25_000),
        };
        if poll_timeout_ms >= idle_timeout_ms {
            return Err(invalid(
                "poll-timeout-ms",
                "must be shorter than idle-timeout-ms, or waiting long-poll sessions are reaped",
            ));
        }
        let max_message_size = given.max_message_size;
        if max_message_size < 256 {
            return Err(invalid("max-message-size", "must be at least 256 bytes"));
        }
        let max_queue_bytes = given
            .max_queue_bytes
            .unwrap_or(max_message_size.saturating_mul(4));
        if max_queue_bytes < max_message_size.saturating_mul(2) {
            return Err(invalid(
                "max-queue-bytes",
                format!(
                    "must be at least twice max-message-size ({max_message_size} bytes), or a \
                     reader still taking one large frame is closed when the next arrives"
                ),
            ));
        }
        let max_subscriptions = given.max_subscriptions;
        if max_subscriptions == 0 {
            return Err(invalid("max-subscriptions", "must be at least 1"));
        }
        let read_buffer_size = given.read_buffer_size;
        if !(256..=1 << 20).contains(&read_buffer_size) {
            return Err(invalid(
                "read-buffer-size",
                "must be between 256 and 1048576",
            ));
        }
        let write_buffer_size = given.write_buffer_size;
        if write_buffer_size > 1 << 20 {
            return Err(invalid("write-buffer-size", "must be at most 1048576"));
        }
        let rate_limit_burst = given.rate_limit_burst;
        let rate_limit_strikes = given.rate_limit_strikes;
        let max_bad_frames = given.max_bad_frames;
        let connect_burst_per_ip = given.connect_burst_per_ip;
        let accept_burst = given.accept_burst;
        for (option, value) in [
            ("rate-limit-burst", rate_limit_burst),
            ("rate-limit-strikes", rate_limit_strikes),
            ("max-bad-frames", max_bad_frames),
            ("connect-burst-per-ip", connect_burst_per_ip),
            ("accept-burst", accept_burst),
        ] {
            if value == 0 {
                return Err(invalid(option, "must be at least 1"));
            }
        }
        let internal_max_connections = given.internal_max_connections;
        if internal_max_connections == 0 {
            return Err(invalid("internal-max-connections", "must be at least 1"));
        }
        let node_ttl_ms = given.node_ttl_ms;
        if node_ttl_ms < 300 {
            return Err(invalid("node-ttl-ms", "must be at least 300"));
        }
        let history_ttl_secs = positive("history-ttl-secs", given.history_ttl_secs)?;
        let stream_ttl_secs = positive("stream-ttl-secs", given.stream_ttl_secs)?;
        if stream_ttl_secs < history_ttl_secs {
            return Err(invalid(
                "stream-ttl-secs",
                "must be at least history-ttl-secs, or offsets would be forgotten before their messages",
            ));
        }
        let inbox_size = given.inbox_size;
        if inbox_size == 0 {
            return Err(invalid("inbox-size", "must be at least 1"));
        }
        let inbox_ttl_secs = positive("inbox-ttl-secs", given.inbox_ttl_secs)?;
        let idempotency_window_secs =
            positive("idempotency-window-secs", given.idempotency_window_secs)?;
        let log = given.log;
        if tracing_subscriber::EnvFilter::try_new(&log).is_err() {
            return Err(invalid("log", format!("{log:?} is not a log filter")));
        }
        Ok(Config {
            listen: given.listen,
            internal_listen: given.internal_listen,
            tls,
            node_id,
            instance: format!("{:016x}", rand::random::<u64>()),
            redis,
            redis_ca,
            node_ttl: Duration::from_millis(node_ttl_ms),
            jwt,
            api_key: given.api_key,
            allowed_origins,
            trusted_proxies,
            max_connections,
            handshake_timeout: Duration::from_millis(positive(
                "handshake-timeout-ms",
                given.handshake_timeout_ms,
            )?),
            internal_header_timeout: Duration::from_millis(positive(
                "internal-header-timeout-ms",
                given.internal_header_timeout_ms,
            )?),
            internal_max_connections,
            max_connections_per_ip: given.max_connections_per_ip,
            connect_rate_per_ip: given.connect_rate_per_ip,
            connect_burst_per_ip,
            accept_rate: given.accept_rate,
            accept_burst,
            max_message_size,
            max_queue_bytes,
            max_subscriptions,
            rate_limit: given.rate_limit,
            rate_limit_burst,
            rate_limit_strikes,
            max_bad_frames,
            heartbeat: Duration::from_millis(heartbeat_ms),
            idle_timeout: Duration::from_millis(idle_timeout_ms),
            poll_timeout: Duration::from_millis(poll_timeout_ms),
            drain_grace: Duration::from_millis(given.drain_grace_ms),
            drain_delay: Duration::from_millis(given.drain_delay_ms),
            history_size: given.history_size,
            history_ttl: Duration::from_secs(history_ttl_secs),
            stream_ttl: Duration::from_secs(stream_ttl_secs),
            inbox_size,
            inbox_ttl: Duration::from_secs(inbox_ttl_secs),
            idempotency_window: Duration::from_secs(idempotency_window_secs),
            room_linger: Duration::from_millis(given.room_linger_ms),
            read_buffer_size,
            write_buffer_size,
            demo: given.demo,
            log_format: given.log_format,
            log,
        })
    }
}

/// Reads `--redis-ca-file`, which must hold CA certificates the TLS client accepts.
fn read_ca_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let pem = std::fs::read(path)
        .map_err(|error| invalid("redis-ca-file", format!("{}: {error}", path.display())))?;
    switchboard_redis::check_ca_pem(&pem)
        .map_err(|error| invalid("redis-ca-file", format!("{}: {error}", path.display())))?;
    Ok(pem)
}

mod declare;

#[cfg(test)]
mod docs_tests;
#[cfg(test)]
mod tests;
