//! `switchboard-loadtest`: drives a switchboard deployment over real sockets and reports what it
//! held. Scenario `connect` opens N idle connections at a held rate and reports handshake latency
//! and the server's resident memory per connection. Scenario `latency` publishes on one node at a
//! held rate, receives on others and reports end-to-end delivery latency, loss, duplicates and the
//! Redis commands each published message cost. Scenario `fanout` spreads subscribers and publishers
//! over every target and reports the same delivery figures. Scenario `direct` has users on
//! different nodes message each other (with `--persist`, through their inboxes, acknowledging, and
//! across a reconnect storm with `--drop-after-secs`); `reconnect` drops every subscriber at once and measures how
//! fast they are back and whether `since` recovery lost anything. `compare` prints one table of
//! `fanout` (and `connect`) results against switchboard, Socket.IO and the raw ceiling server.
//! `connect` and `fanout` run over WebSocket or, with `--transport sse|poll`, over the fallback
//! transports.

mod cli;
mod codec;
mod compare;
mod connect;
mod direct;
mod fallback;
mod fanout;
mod html;
mod latency;
mod payload;
mod persist;
mod procfs;
mod progress;
mod protocol;
mod reconnect;
mod redis_info;
mod report;
mod sequence;
mod transport;
mod worker;
mod ws;

use anyhow::Result;
use clap::Parser;

use crate::cli::{Cli, Scenario};

#[tokio::main]
async fn main() -> Result<()> {
    // Connections are files: use the hard limit, not the (often 1024) soft one.
    if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("switchboard-loadtest: cannot raise the open-files limit: {error}");
    }
    match Cli::parse().scenario {
        Scenario::Connect(args) => connect::run(args).await,
        Scenario::Latency(args) => latency::run(args).await,
        Scenario::Fanout(args) => fanout::run(args).await,
        Scenario::Direct(args) => direct::run(args).await,
        Scenario::Reconnect(args) => reconnect::run(args).await,
        Scenario::ConnectWorker => worker::run().await,
        Scenario::Compare(args) => compare::run(&args),
    }
}
