//! Throwaway certificates made with the `openssl` CLI at test time: a CA, and a server
//! certificate it signs for `127.0.0.1` and `localhost`; and TLS clients that trust only that CA.
//! Everything lives in a temp directory removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, ensure};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use switchboard_protocol::{Codec, ServerFrame};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::{DEADLINE, RawClient};

/// A directory under the temp directory, removed on drop (pass or fail).
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new, empty directory whose name starts with `prefix`.
    pub fn new(prefix: &str) -> Result<TempDir> {
        let dir = TempDir(std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        )));
        std::fs::create_dir_all(&dir.0)?;
        Ok(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA (`ca.pem`, `ca.key`) and a server certificate it signed (`server.pem`, `server.key`,
/// and `server-bundle.pem`: both in one file, as HAProxy wants them), valid for a day.
pub struct TestCerts {
    dir: TempDir,
}

impl TestCerts {
    pub fn new() -> Result<TestCerts> {
        let dir = TempDir::new("switchboard-test-certs")?;
        let openssl = |args: &[&str]| -> Result<()> {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(&dir.0)
                .output()
                .context("running openssl")?;
            ensure!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            Ok(())
        };
        let key = |file: &str| {
            openssl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                file,
            ])
        };
        key("ca.key")?;
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=switchboard test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ])?;
        key("server.key")?;
        openssl(&[
            "req",
            "-new",
            "-key",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ])?;
        // An end-entity certificate (not a CA) for the names the tests dial.
        std::fs::write(
            dir.0.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             extendedKeyUsage=serverAuth\n",
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ])?;
        let mut bundle = std::fs::read(dir.0.join("server.pem"))?;
        bundle.extend(std::fs::read(dir.0.join("server.key"))?);
        std::fs::write(dir.0.join("server-bundle.pem"), bundle)?;
        Ok(TestCerts { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// The path of one of the files, as a string (for command lines and environment variables).
    pub fn path(&self, file: &str) -> Result<String> {
        self.dir
            .0
            .join(file)
            .to_str()
            .map(str::to_owned)
            .context("a UTF-8 temp path")
    }

    /// A TLS client configuration that trusts only this CA, offering ALPN `http/1.1`.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_file_iter(self.dir.0.join("ca.pem"))? {
            roots.add(certificate?)?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// A TLS connection to `addr`, verified against this CA for `name`.
    pub async fn connect_tls(
        &self,
        addr: std::net::SocketAddr,
        name: &str,
    ) -> Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from(name.to_owned())?;
        let tls = tokio::time::timeout(
            DEADLINE,
            TlsConnector::from(self.client_config()?).connect(name, tcp),
        )
        .await
        .context("no TLS handshake in time")??;
        Ok(tls)
    }

    /// Opens `wss://…` with the codec's subprotocol, trusting this CA, and reads the `welcome`.
    pub async fn connect_wss(&self, url: &str, codec: Codec) -> Result<(RawClient, ServerFrame)> {
        let mut request = url.into_client_request()?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(codec.protocol()),
        );
        let (socket, _) = tokio::time::timeout(
            DEADLINE,
            tokio_tungstenite::connect_async_tls_with_config(
                request,
                None,
                true,
                Some(Connector::Rustls(self.client_config()?)),
            ),
        )
        .await
        .context("no wss handshake in time")??;
        let mut client = RawClient { socket, codec };
        let welcome = client.next_frame().await?;
        match welcome {
            ServerFrame::Welcome { .. } => Ok((client, welcome)),
            other => Err(anyhow!("first frame is not welcome: {other:?}")),
        }
    }
}
