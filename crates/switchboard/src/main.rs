//! The `switchboard` binary: configuration, logging, signals; everything else is in the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use switchboard::config::{Config, EXIT_CONFIG, LogFormat, Options};
use switchboard::{Server, StartError, demo};

fn main() -> ExitCode {
    let options = match Options::try_parse() {
        Ok(options) => options,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(EXIT_CONFIG as u8)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // Before resolving: the default --max-connections derives from the raised limit.
    raise_open_files_limit();
    let config = match options.resolve() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("switchboard: {error}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("switchboard: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> ExitCode {
    // Installed before anything is announced, so a SIGTERM right after start drains instead of
    // killing the process with the signal's default action.
    let shutdown = match shutdown_signal() {
        Ok(shutdown) => shutdown,
        Err(error) => {
            eprintln!("switchboard: cannot listen for signals: {error}");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::bind(config).await {
        Ok(server) => server,
        Err(error @ StartError::Config(_)) => {
            eprintln!("switchboard: {error}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
        Err(error) => {
            eprintln!("switchboard: {error}");
            return ExitCode::FAILURE;
        }
    };
    let node = server.node();
    let tls = node.config().tls.as_ref();
    if let Some(tls) = tls {
        log_certificate(tls);
        if let Err(error) = node.metrics().register_tls_expiry(tls.not_after) {
            tracing::warn!(%error, "cannot export the TLS certificate's expiry");
        }
    }
    let ws_scheme = if tls.is_some() { "wss" } else { "ws" };
    let internal = server
        .internal_addr()
        .map_or_else(|_| "?".to_owned(), |addr| addr.to_string());
    // The demo URL leads the line: it is what `cargo run` users open.
    let demo = if node.config().demo {
        format!(
            "demo page {}, ",
            demo::page_url(server.public_addr(), tls.is_some())
        )
    } else {
        String::new()
    };
    tracing::info!(
        node = node.id(),
        public = %server.public_addr(),
        %internal,
        auth = node.auth().enabled(),
        demo = node.config().demo,
        max_connections = node.config().max_connections,
        tls = tls.is_some(),
        "switchboard listening: {demo}WebSocket {ws_scheme}://{}/ws, metrics and API http://{}",
        server.public_addr(),
        internal,
    );
    // Someone at a terminal (`cargo run`) gets the page's address on a line of its own; log
    // collectors, which read a pipe, only get the log line above.
    if node.config().demo && std::io::stdout().is_terminal() {
        println!(
            "Demo page: {} (open it in two tabs)",
            demo::page_url(server.public_addr(), tls.is_some())
        );
    }
    match server.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "stopped with an error");
            ExitCode::FAILURE
        }
    }
}

/// Operators learn when the certificate needs replacing (a restart loads the new one).
fn log_certificate(tls: &switchboard::tls::Tls) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64);
    let days_left = (tls.not_after - now).div_euclid(86_400);
    if tls.not_after <= now {
        tracing::warn!(
            subject = %tls.subject,
            expires = %tls.expires,
            "the TLS certificate has expired: clients will refuse it"
        );
    } else {
        tracing::info!(
            subject = %tls.subject,
            expires = %tls.expires,
            days_left,
            "TLS on the public port (wss://)"
        );
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Connections are files: use the hard limit, not the (often 1024) soft one. Runs before logging
/// is set up, so a failure is reported on stderr directly.
fn raise_open_files_limit() {
    if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("switchboard: cannot raise the open-files limit: {error}");
    }
}

/// Resolves on the first SIGTERM or SIGINT; the handlers are in place when this returns.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
        }
    })
}
