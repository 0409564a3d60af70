//! TLS on the public port (`--tls-cert` / `--tls-key`): clients connect with `wss://` (and the
//! demo page is served over https). rustls with the ring provider offers TLS 1.3 and 1.2 with
//! rustls' default cipher suites, and ALPN `http/1.1`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

use crate::node::Node;

/// A connection on the public port: plain TCP, or TLS over it. The TLS state is boxed: inline it
/// would make every plain connection carry its 1.2 KiB too (hyper boxes the upgraded IO at the
/// size of the larger variant).
pub type Stream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// The loaded certificate chain and key, checked at start.
#[derive(Debug, Clone)]
pub struct Tls {
    config: Arc<ServerConfig>,
    /// The leaf certificate's subject, for the start-up log.
    pub subject: String,
    /// When the leaf certificate expires, as seconds since the Unix epoch.
    pub not_after: i64,
    /// The same, readable.
    pub expires: String,
}

/// Why the files cannot be used: the option to blame and what is wrong.
#[derive(Debug)]
pub struct LoadError {
    pub option: &'static str,
    pub message: String,
}

impl Tls {
    /// Reads and checks the PEM files: a certificate chain (leaf first) and its private key
    /// (PKCS#8, PKCS#1 or SEC1), which must match.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Tls, LoadError> {
        let fail = |option: &'static str, path: &Path, message: String| LoadError {
            option,
            message: format!("{}: {message}", path.display()),
        };
        let cert_pem = std::fs::read(cert_path)
            .map_err(|error| fail("tls-cert", cert_path, error.to_string()))?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| fail("tls-cert", cert_path, format!("invalid PEM: {error}")))?;
        let Some(leaf) = chain.first() else {
            return Err(fail(
                "tls-cert",
                cert_path,
                "no PEM CERTIFICATE block".to_owned(),
            ));
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|error| {
            fail(
                "tls-cert",
                cert_path,
                format!("not an X.509 certificate: {error}"),
            )
        })?;
        let subject = parsed.subject().to_string();
        let not_after = parsed.validity().not_after.timestamp();
        let expires = parsed.validity().not_after.to_string();
        let key_pem = std::fs::read(key_path)
            .map_err(|error| fail("tls-key", key_path, error.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| {
            fail(
                "tls-key",
                key_path,
                format!("no usable PEM private key: {error}"),
            )
        })?;
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|error| fail("tls-cert", cert_path, error.to_string()))?
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .map_err(|error| {
                    fail(
                        "tls-key",
                        key_path,
                        format!("cannot be used with {}: {error}", cert_path.display()),
                    )
                })?;
        // Only HTTP/1.1 carries the WebSocket upgrade the node speaks.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            config: Arc::new(config),
            subject,
            not_after,
            expires,
        })
    }
}

/// The connection as the HTTP layer reads it: with TLS on, after a TLS handshake that must end by
/// `deadline` (the handshake timeout covers TLS and HTTP together). `None` when the handshake
/// failed or timed out; counted in `switchboard_handshakes_total`.
pub async fn accept(
    node: &Node,
    stream: TcpStream,
    remote: SocketAddr,
    deadline: Instant,
) -> Option<Stream> {
    let Some(tls) = &node.config().tls else {
        return Some(Either::Left(stream));
    };
    let acceptor = TlsAcceptor::from(tls.config.clone());
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Some(Either::Right(Box::new(stream))),
        Ok(Err(error)) => {
            node.metrics()
                .handshakes
                .with_label_values(&["tls_error"])
                .inc();
            tracing::debug!(%error, %remote, "TLS handshake failed");
            None
        }
        Err(_) => {
            node.metrics()
                .handshakes
                .with_label_values(&["timeout"])
                .inc();
            tracing::debug!(%remote, "TLS handshake timed out");
            None
        }
    }
}
