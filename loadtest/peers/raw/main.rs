//! `switchboard-raw-ceiling`: the fastest honest broadcast server this machine can run, as the
//! ceiling the side-by-side benchmark compares switchboard and Socket.IO against. Plain tokio and
//! tokio-tungstenite: no Redis, no envelope, no auth, one process.
//!
//! Wire contract (see `loadtest/src/protocol.rs`): on any path, a text frame `sub ROOM` subscribes
//! the connection to ROOM and is answered `ok ROOM`; a text frame `pub ROOM DATA` sends DATA, as
//! is, as a text frame to every connection subscribed to ROOM, unacknowledged.
//!
//! Each room is a `tokio::sync::broadcast` channel: a published frame is built once and each
//! subscriber's task clones it (a reference count) and writes it, feeding every message already
//! waiting before one flush. The channel holds at most `--lag-limit` messages per room; a
//! subscriber that falls further behind is disconnected (as soon as its socket takes writes
//! again) instead of buffered without bound: a stalled one holds one batch, never the backlog.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::stream::{self, SelectAll, Stream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Most messages written before one flush, so one busy room cannot starve the reads.
const MAX_BATCH: usize = 64;

#[derive(Parser)]
#[command(
    name = "switchboard-raw-ceiling",
    version,
    about = "Raw tokio-tungstenite broadcast server: the ceiling for the side-by-side benchmark"
)]
struct Args {
    /// Address to listen on; port 0 picks a free one. The bound address is printed on stdout as
    /// `listening on IP:PORT`.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Messages a room keeps for its slowest subscriber; one that falls further behind is
    /// disconnected.
    #[arg(long, default_value_t = 4096)]
    lag_limit: usize,
}

/// Room name → its channel. A room is removed when its last subscriber leaves.
type Rooms = Arc<Mutex<HashMap<String, broadcast::Sender<Utf8Bytes>>>>;

/// The rooms one connection receives from, merged into one stream.
type Subscriptions = SelectAll<Pin<Box<dyn Stream<Item = Result<Utf8Bytes, RecvError>> + Send>>>;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // Each connection is a file: use the hard limit, not the (often 1024) soft one.
    if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("switchboard-raw-ceiling: cannot raise the open-files limit: {error}");
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("listening on {}", listener.local_addr()?);

    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let rooms = Rooms::default();
    let mut backoff = Duration::from_millis(1);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(1);
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, rooms.clone(), args.lag_limit));
            }
            Err(error) => {
                // Out of file descriptors or similar: back off instead of spinning.
                eprintln!("switchboard-raw-ceiling: accept failed: {error}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// One connection, start to end; its rooms forget it when it is gone.
async fn serve(stream: TcpStream, rooms: Rooms, lag_limit: usize) {
    let mut joined = Vec::new();
    let _ = connection(stream, &rooms, lag_limit, &mut joined).await;
    let mut rooms = rooms.lock().expect("rooms lock");
    for room in joined {
        if rooms.get(&room).is_some_and(|tx| tx.receiver_count() == 0) {
            rooms.remove(&room);
        }
    }
}

async fn connection(
    stream: TcpStream,
    rooms: &Rooms,
    lag_limit: usize,
    joined: &mut Vec<String>,
) -> Result<()> {
    // The same read buffer as switchboard's default (1 KiB), so idle connections compare alike.
    let config = WebSocketConfig::default().read_buffer_size(1024);
    let mut ws = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await?;
    let mut subscriptions = Subscriptions::new();
    loop {
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    if let Some(room) = text.strip_prefix("sub ") {
                        if !joined.iter().any(|r| r == room) {
                            subscriptions.push(subscribe(rooms, room, lag_limit));
                            joined.push(room.to_owned());
                        }
                        ws.send(Message::text(format!("ok {room}"))).await?;
                    } else if let Some((room, data)) =
                        text.strip_prefix("pub ").and_then(|rest| rest.split_once(' '))
                    {
                        let sender = rooms.lock().expect("rooms lock").get(room).cloned();
                        if let Some(sender) = sender {
                            // No subscriber left is not an error: nobody to deliver to.
                            let _ = sender.send(Utf8Bytes::from(data));
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None => return Ok(()),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error.into()),
            },
            Some(message) = subscriptions.next() => {
                // Lagged past --lag-limit: disconnect rather than buffer without bound.
                ws.feed(Message::Text(message?)).await?;
                for _ in 1..MAX_BATCH {
                    match subscriptions.next().now_or_never() {
                        Some(Some(message)) => ws.feed(Message::Text(message?)).await?,
                        _ => break,
                    }
                }
                ws.flush().await?;
            }
        }
    }
}

/// The stream of `room`'s messages, creating the room if it is new.
fn subscribe(
    rooms: &Rooms,
    room: &str,
    lag_limit: usize,
) -> Pin<Box<dyn Stream<Item = Result<Utf8Bytes, RecvError>> + Send>> {
    let receiver = rooms
        .lock()
        .expect("rooms lock")
        .entry(room.to_owned())
        .or_insert_with(|| broadcast::channel(lag_limit).0)
        .subscribe();
    Box::pin(stream::unfold(receiver, |mut receiver| async move {
        Some((receiver.recv().await, receiver))
    }))
}
