//! Echo server for Autobahn|Testsuite (tests/autobahn/run.sh): the node's WebSocket layer with an
//! echo in place of the protocol, since a real session speaks first (`welcome`) and answers text
//! with JSON. It uses the node's configuration (`server::websocket_config` of the options given)
//! and reads as a session does: pings answered by tungstenite and flushed, a failed read closed
//! with the code `session::read_error_close` picks, within the same close timeout.
//!
//!   cargo run -p switchboard --example autobahn_echo -- ADDR [switchboard options…]

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use switchboard::config::Options;
use switchboard::server::websocket_config;
use switchboard::session::read_error_close;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

/// As long as a session waits for its close frame to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .context("usage: autobahn_echo ADDR [switchboard options…]")?;
    let options = Options::parse_from(std::iter::once("switchboard".to_owned()).chain(args));
    let config = options.resolve()?;
    let ws_config = websocket_config(&config);
    let listener = TcpListener::bind(&addr).await?;
    println!("autobahn_echo listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(echo(stream, ws_config));
    }
}

async fn echo(stream: TcpStream, config: WebSocketConfig) {
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    while let Some(incoming) = ws.next().await {
        let sent = match incoming {
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => ws.send(message).await,
            // tungstenite queued the pong, or the close reply; flushing sends it.
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => ws.flush().await,
            Ok(Message::Close(_)) => {
                let _ = ws.flush().await;
                return;
            }
            Err(error) => {
                if let Some(request) = read_error_close(&error) {
                    let frame = CloseFrame {
                        code: CloseCode::from(request.code),
                        reason: request.reason.into(),
                    };
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(Some(frame))).await;
                }
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}
