//! Scenario `fanout`: S subscribers spread over K rooms and over every target, P publishers
//! (spread the same way) at a total rate R for D seconds, against switchboard or (`--protocol`)
//! one of the peers it is compared with. The run itself is the `latency` scenario's
//! ([`crate::latency::measure`]): end-to-end latency from the timestamp in each payload,
//! delivered messages per second, server CPU per delivery, and loss, duplicates and order (by
//! offset per room on switchboard, by each publisher's sequence numbers on the peers). On
//! switchboard every session may use a fallback transport instead of the WebSocket
//! (`--transport sse|poll`).

use anyhow::Result;

use crate::cli::FanoutArgs;
use crate::latency::{Plan, measure};
use crate::report::{FanoutResult, emit};
use crate::ws::url_addr;

pub async fn run(args: FanoutArgs) -> Result<()> {
    args.check()?;
    let targets = args
        .urls
        .iter()
        .map(|url| Ok((url.clone(), url_addr(url)?)))
        .collect::<Result<Vec<_>>>()?;
    let plan = Plan::new(
        &args.run,
        targets.clone(),
        targets,
        (args.rooms, args.subscribers / args.rooms),
        (args.protocol, args.transport),
    );
    let figures = measure(&plan).await?;
    let result = FanoutResult {
        protocol: args.protocol,
        transport: args.transport,
        codec: args.run.codec,
        payload: args.run.payload,
        urls: args.urls.clone(),
        rooms: plan.rooms,
        subscribers: plan.subscribers(),
        subscribers_per_room: plan.subscribers_per_room,
        subscribers_per_url: plan.subscribers_per_target(),
        publishers: plan.publishers,
        rate_target: plan.rate,
        warmup_secs: plan.warmup_secs,
        duration_secs: plan.duration_secs,
        figures,
    };
    emit(&result, args.run.json.as_deref())?;
    if let Some(path) = &args.run.html {
        crate::html::write(path, "fanout", &result, &result.figures)?;
    }
    Ok(())
}
