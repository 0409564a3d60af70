//! One shard's connections: the TLS set-up of its client, the shared command connection, and
//! calls bounded by the command timeout that count their failures.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_redis::{BuildError, Manager, Pool, PoolConfig, Runtime, Timeouts};
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{RedisError, RedisResult, TlsCertificates};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use switchboard_broker::{BrokerError, BrokerResult};
use tokio::sync::mpsc;

use crate::subscriber::Control;
use crate::writes::Writer;
use crate::{COMMAND_TIMEOUT, Inner};

/// Why `--redis-ca-file` is not a usable set of CA certificates.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("not a PEM certificate file: {0}")]
    NotPem(#[source] rustls::pki_types::pem::Error),
    #[error("unusable certificate: {0}")]
    Unusable(#[source] rustls::Error),
    #[error("holds no PEM certificate")]
    Empty,
}

/// Why the broker could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("no Redis shard configured")]
    NoShard,
    /// The shard's URL, redacted.
    #[error("shard {0} is listed twice")]
    ListedTwice(String),
    /// A shard (its URL redacted) whose URL or TLS set-up the Redis client refuses.
    #[error("{shard}: {source}")]
    Client { shard: String, source: RedisError },
    /// A shard (its URL redacted) whose connection pool could not be built.
    #[error("{shard}: {source}")]
    Pool { shard: String, source: BuildError },
    #[error(transparent)]
    Metrics(#[from] prometheus::Error),
}

/// Checks that `pem` holds at least one certificate and that every one is a usable trust anchor,
/// so that a bad `--redis-ca-file` stops the node at start rather than every TLS connect.
pub fn check_ca_pem(pem: &[u8]) -> Result<(), CaError> {
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(pem) {
        let certificate = certificate.map_err(CaError::NotPem)?;
        roots.add(certificate).map_err(CaError::Unusable)?;
    }
    if roots.is_empty() {
        return Err(CaError::Empty);
    }
    Ok(())
}

/// The client of one shard: a `rediss://` shard verifies its certificate against `ca_pem` when
/// given, else against the built-in roots.
fn shard_client(url: &str, ca_pem: Option<&[u8]>) -> RedisResult<redis::Client> {
    match ca_pem {
        Some(pem) if url.starts_with("rediss://") => redis::Client::build_with_tls(
            url,
            TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        ),
        _ => redis::Client::open(url),
    }
}

fn redis_error(error: RedisError) -> BrokerError {
    if error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
    {
        BrokerError::Unavailable(error.to_string())
    } else {
        BrokerError::Internal(error.to_string())
    }
}

/// A shard URL fit for logs and error messages: its password, if any, replaced by `***`.
pub fn redacted(shard_url: &str) -> String {
    match url::Url::parse(shard_url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => shard_url.to_owned(),
        Err(_) => "(an unparsable URL)".to_owned(),
    }
}

pub(crate) struct Shard {
    /// See [`Shard::connection`].
    pub(crate) shared: Mutex<Option<MultiplexedConnection>>,
    pub(crate) label: String,
    pub(crate) client: redis::Client,
    pub(crate) pool: Pool,
    pub(crate) control: mpsc::UnboundedSender<Control>,
    /// Taken by `start`, which spawns the shard's task.
    pub(crate) control_rx: Mutex<Option<mpsc::UnboundedReceiver<Control>>>,
    pub(crate) up: AtomicBool,
    /// The queue of this shard's registry and presence writes (see `writes`).
    pub(crate) writer: OnceLock<Writer>,
}

impl Shard {
    /// Shard `index` at `url`: its client, its command pool (connecting lazily) and the control
    /// channel of its pub/sub task.
    pub(crate) fn new(index: usize, url: &str, ca_pem: Option<&[u8]>) -> Result<Shard, SetupError> {
        let client_error = |source| SetupError::Client {
            shard: redacted(url),
            source,
        };
        let client = shard_client(url, ca_pem).map_err(client_error)?;
        // From the client's connection info, which carries the TLS roots (a URL would not).
        let manager = Manager::new(client.get_connection_info().clone()).map_err(client_error)?;
        let pool = Pool::builder(manager)
            .config(PoolConfig {
                max_size: 16,
                timeouts: Timeouts {
                    wait: Some(COMMAND_TIMEOUT),
                    create: Some(COMMAND_TIMEOUT),
                    recycle: Some(COMMAND_TIMEOUT),
                },
                ..PoolConfig::default()
            })
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|source| SetupError::Pool {
                shard: redacted(url),
                source,
            })?;
        let (control, control_rx) = mpsc::unbounded_channel();
        Ok(Shard {
            shared: Mutex::new(None),
            label: index.to_string(),
            client,
            pool,
            control,
            control_rx: Mutex::new(Some(control_rx)),
            up: AtomicBool::new(false),
            writer: OnceLock::new(),
        })
    }

    /// A multiplexed connection shared by every call to this shard. It comes from the pool once
    /// and is reused until a call finds it broken: taking one from the pool per call would cost
    /// the pool's health check (a round trip) every time.
    async fn connection(&self) -> BrokerResult<MultiplexedConnection> {
        if let Some(connection) = self.shared.lock().clone() {
            return Ok(connection);
        }
        let pooled = self
            .pool
            .get()
            .await
            .map_err(|error| BrokerError::Unavailable(error.to_string()))?;
        let mut connection = MultiplexedConnection::clone(&pooled);
        // redis-rs fails a call whose answer takes over 500 ms by default, which a burst of
        // writes on a busy node easily passes: calls are bounded by COMMAND_TIMEOUT instead.
        connection.set_response_timeout(COMMAND_TIMEOUT);
        *self.shared.lock() = Some(connection.clone());
        Ok(connection)
    }
}

impl Inner {
    fn error(&self, shard: &Shard, op: &str, error: BrokerError) -> BrokerError {
        self.metrics.errors.with_label_values(&[&shard.label]).inc();
        tracing::debug!(shard = %shard.label, op, %error, "redis call failed");
        error
    }

    /// Runs one call on the shard's pool, bounded by the command timeout.
    pub(crate) async fn call<T, F>(&self, shard: &Shard, op: &str, call: F) -> BrokerResult<T>
    where
        F: AsyncFnOnce(&mut MultiplexedConnection) -> redis::RedisResult<T>,
    {
        let attempt = async {
            let mut connection = shard.connection().await?;
            call(&mut connection).await.map_err(redis_error)
        };
        let result = match tokio::time::timeout(COMMAND_TIMEOUT, attempt).await {
            Ok(result) => result,
            Err(_) => Err(BrokerError::Unavailable(format!("redis {op} timed out"))),
        };
        result.map_err(|error| {
            if matches!(error, BrokerError::Unavailable(_)) {
                shard.shared.lock().take();
            }
            self.error(shard, op, error)
        })
    }

    /// Like [`Inner::call`], for a call that changes state: once it may have been sent, a timeout
    /// or a broken connection leaves its outcome unknown, which `call` would report as
    /// `Unavailable` (certainly not done).
    pub(crate) async fn call_write<T, F>(&self, shard: &Shard, op: &str, call: F) -> BrokerResult<T>
    where
        F: AsyncFnOnce(&mut MultiplexedConnection) -> redis::RedisResult<T>,
    {
        if !shard.up.load(Ordering::SeqCst) {
            // The shard's pub/sub connection is down, so its command connection is most likely
            // dead too, and a write sent on it would end unknown: better certainly not sent.
            let error = BrokerError::Unavailable(format!("redis {op}: the shard is down"));
            return Err(self.error(shard, op, error));
        }
        let result = match tokio::time::timeout(COMMAND_TIMEOUT, shard.connection()).await {
            Err(_) => Err(BrokerError::Unavailable(format!(
                "redis {op}: no connection in time"
            ))),
            Ok(Err(error)) => Err(error),
            Ok(Ok(mut connection)) => {
                match tokio::time::timeout(COMMAND_TIMEOUT, call(&mut connection)).await {
                    Ok(Ok(value)) => Ok(value),
                    Ok(Err(error)) if error.is_connection_refusal() => {
                        Err(BrokerError::Unavailable(error.to_string()))
                    }
                    Ok(Err(error))
                        if error.is_io_error()
                            || error.is_connection_dropped()
                            || error.is_timeout() =>
                    {
                        Err(BrokerError::UnknownOutcome(error.to_string()))
                    }
                    Ok(Err(error)) => Err(BrokerError::Internal(error.to_string())),
                    Err(_) => Err(BrokerError::UnknownOutcome(format!(
                        "redis {op} sent but not answered in time"
                    ))),
                }
            }
        };
        result.map_err(|error| {
            if matches!(
                error,
                BrokerError::Unavailable(_) | BrokerError::UnknownOutcome(_)
            ) {
                shard.shared.lock().take();
            }
            self.error(shard, op, error)
        })
    }

    pub(crate) fn up_shard(&self) -> BrokerResult<&Shard> {
        self.shards
            .iter()
            .find(|shard| shard.up.load(Ordering::SeqCst))
            .ok_or_else(|| BrokerError::Unavailable("no Redis shard is up".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_ca_file_says_what_is_wrong_with_it() {
        for (pem, expected) in [
            (&b""[..], "holds no PEM certificate"),
            (b"not a certificate\n", "holds no PEM certificate"),
            (
                b"-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
                "not a PEM certificate file: ",
            ),
            (
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "unusable certificate: ",
            ),
        ] {
            let error = check_ca_pem(pem).unwrap_err();
            let variant_fits = match &error {
                CaError::Empty => expected == "holds no PEM certificate",
                CaError::NotPem(_) => expected.starts_with("not a PEM"),
                CaError::Unusable(_) => expected.starts_with("unusable"),
            };
            assert!(variant_fits, "{error:?}");
            assert!(error.to_string().starts_with(expected), "{error}");
        }
    }

    #[test]
    fn passwords_never_show_in_shard_urls() {
        assert_eq!(
            redacted("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://:***@10.0.0.1:6379/0"
        );
        assert_eq!(
            redacted("rediss://user:s3cret@cache.example.com:6380"),
            "rediss://user:***@cache.example.com:6380"
        );
        assert_eq!(redacted("redis://10.0.0.1:6379"), "redis://10.0.0.1:6379");
        assert!(!redacted("redis://:s3cret@[bad").contains("s3cret"));
    }
}
