//! Per-connection abuse limits, whatever the transport: a frame rate limit with strikes, and a
//! tolerance for undecodable frames. Made on the first frame they count, so idle connections
//! (which only answer heartbeats) don't pay.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use switchboard_protocol::close;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::queue::CloseRequest;

struct Limits {
    rate: Option<DefaultDirectRateLimiter>,
    strikes: DefaultDirectRateLimiter,
    bad_frames: DefaultDirectRateLimiter,
}

impl Limits {
    fn new(config: &Config) -> Self {
        let rate = NonZeroU32::new(config.rate_limit).map(|per_second| {
            let burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(per_second);
            RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst))
        });
        Limits {
            rate,
            strikes: tolerance(config.rate_limit_strikes, Duration::from_secs(10)),
            bad_frames: tolerance(config.max_bad_frames, Duration::from_secs(60)),
        }
    }
}

/// A limiter that allows `count` events per `window` (at least one).
fn tolerance(count: u32, window: Duration) -> DefaultDirectRateLimiter {
    let count = NonZeroU32::new(count).unwrap_or(NonZeroU32::MIN);
    let period = (window / count.get()).max(Duration::from_nanos(1));
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(count);
    RateLimiter::direct(quota)
}

/// One session's limits, boxed and made on first use: an idle session holds one null pointer.
#[derive(Default)]
pub(super) struct Guards(Option<Box<Limits>>);

fn close_request(code: u16, reason: &str) -> CloseRequest {
    CloseRequest {
        code,
        reason: reason.to_owned(),
    }
}

impl Guards {
    fn limits(&mut self, config: &Config) -> &mut Limits {
        self.0.get_or_insert_with(|| Box::new(Limits::new(config)))
    }

    /// Counts one frame of `kind` against the rate limit: `Ok(true)` when it is over the limit
    /// and must be refused, `Err` (close with 1008) once the client keeps going over it.
    pub(super) fn over_rate(
        &mut self,
        config: &Config,
        metrics: &Metrics,
        kind: &'static str,
    ) -> Result<bool, CloseRequest> {
        let limits = self.limits(config);
        let Some(rate) = &limits.rate else {
            return Ok(false);
        };
        if rate.check().is_ok() {
            return Ok(false);
        }
        metrics.rate_limited.with_label_values(&[kind]).inc();
        if limits.strikes.check().is_err() {
            tracing::info!(kind, "closing: sustained rate-limit abuse");
            return Err(close_request(close::POLICY, "rate limit exceeded"));
        }
        Ok(true)
    }

    /// Counts one undecodable frame: `Err` (close with 1008) once a client keeps sending them.
    pub(super) fn bad_frame(&mut self, config: &Config) -> Result<(), CloseRequest> {
        if self.limits(config).bad_frames.check().is_err() {
            tracing::info!("closing: too many bad frames");
            return Err(close_request(close::POLICY, "too many bad frames"));
        }
        Ok(())
    }
}
