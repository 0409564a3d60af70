//! Admission on the public port before any WebSocket exists: per client address, a cap on
//! connections open at once and a rate of new connections; for the whole node, a pace of new
//! connections that makes a reconnect storm wait in line instead of overrunning the node.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::Config;
use crate::metrics::{GaugeGuard, Metrics};

/// How often the per-address rate limiter forgets addresses whose bucket is full again.
const PRUNE_EVERY: Duration = Duration::from_secs(5);

/// `Retry-After` for an address at its connection cap: nobody knows when one of its connections
/// ends, so this only spaces out the retries.
const AT_CAP_RETRY_AFTER_SECS: u64 = 5;

/// Why a client address may not open a connection now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The `switchboard_handshakes_total` result.
    pub result: &'static str,
    pub message: &'static str,
    /// For the `Retry-After` header; at least 1.
    pub retry_after_secs: u64,
}

pub struct FrontDoor {
    max_per_ip: usize,
    /// Open connections per client address; an address leaves with its last connection, so this
    /// holds at most as many entries as there are open connections.
    open: DashMap<IpAddr, usize>,
    rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
    pacer: Option<Pacer>,
    metrics: Arc<Metrics>,
}

/// The node-wide pace: whoever holds `line` waits for the limiter; the rest queue on the fair
/// (FIFO) mutex, so a storm costs one timer, not one wake-up per waiter per token.
struct Pacer {
    limiter: DefaultDirectRateLimiter,
    line: tokio::sync::Mutex<()>,
}

fn quota(rate: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Some(Quota::per_second(rate).allow_burst(burst))
}

impl FrontDoor {
    /// The limits `config` asks for; a task prunes the per-address rate limiter while the door
    /// is in use.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Arc<FrontDoor> {
        let door = Arc::new(FrontDoor {
            max_per_ip: config.max_connections_per_ip,
            open: DashMap::new(),
            rate: quota(config.connect_rate_per_ip, config.connect_burst_per_ip)
                .map(RateLimiter::dashmap),
            pacer: quota(config.accept_rate, config.accept_burst).map(|quota| Pacer {
                limiter: RateLimiter::direct(quota),
                line: tokio::sync::Mutex::new(()),
            }),
            metrics,
        });
        if door.rate.is_some() {
            tokio::spawn(prune(Arc::downgrade(&door)));
        }
        door
    }

    /// Admits one more connection from `ip`, or says why not. The slot counts the connection
    /// for `--max-connections-per-ip` until it is dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<IpSlot, Refusal> {
        let slot = if self.max_per_ip > 0 {
            let mut count = self.open.entry(ip).or_insert(0);
            if *count >= self.max_per_ip {
                return Err(Refusal {
                    result: "ip_connections",
                    message: "too many connections from your address: close one or retry later",
                    retry_after_secs: AT_CAP_RETRY_AFTER_SECS,
                });
            }
            if *count == 0 {
                self.metrics.client_addresses.inc();
            }
            *count += 1;
            IpSlot(Some((self.clone(), ip)))
        } else {
            IpSlot(None)
        };
        if let Some(rate) = &self.rate
            && let Err(not_until) = rate.check_key(&ip)
        {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(Refusal {
                result: "ip_rate",
                message: "too many new connections from your address: retry later",
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            });
        }
        Ok(slot)
    }

    /// Waits for the node-wide pace (`--accept-rate`), in arrival order.
    pub async fn pace(&self) {
        let Some(pacer) = &self.pacer else {
            return;
        };
        if let Ok(_line) = pacer.line.try_lock()
            && pacer.limiter.check().is_ok()
        {
            return;
        }
        self.metrics.accept_waits.inc();
        let _waiting = GaugeGuard::new(&self.metrics.accept_waiting);
        let _line = pacer.line.lock().await;
        pacer.limiter.until_ready().await;
    }
}

/// Forgets addresses whose rate bucket is full again: such an address is as if it never
/// connected. What remains are addresses that connected within about burst ÷ rate seconds (4 s
/// by default) plus one pruning period, a number the node-wide accept rate bounds.
async fn prune(door: Weak<FrontDoor>) {
    loop {
        tokio::time::sleep(PRUNE_EVERY).await;
        let Some(door) = door.upgrade() else {
            return;
        };
        door.prune();
    }
}

impl FrontDoor {
    fn prune(&self) {
        if let Some(rate) = &self.rate {
            rate.retain_recent();
            rate.shrink_to_fit();
            self.metrics.connect_rate_addresses.set(rate.len() as i64);
        }
    }
}

/// One connection counted against its address's cap; dropping it (however the connection
/// ends, panics included) gives the place back.
pub struct IpSlot(Option<(Arc<FrontDoor>, IpAddr)>);

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some((door, ip)) = self.0.take()
            && door
                .open
                .remove_if_mut(&ip, |_, count| {
                    *count -= 1;
                    *count == 0
                })
                .is_some()
        {
            door.metrics.client_addresses.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Options;

    fn door(options: Options) -> Arc<FrontDoor> {
        let config = options.resolve().expect("valid options");
        FrontDoor::new(&config, Arc::new(Metrics::new().expect("metrics")))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[tokio::test]
    async fn the_cap_counts_open_connections_per_address_and_frees_on_drop() {
        let door = door(Options {
            max_connections_per_ip: Some(2),
            connect_rate_per_ip: Some(0),
            ..Options::default()
        });
        let first = door.admit(ip("192.0.2.1")).expect("first");
        let second = door.admit(ip("192.0.2.1")).expect("second");
        let refusal = door.admit(ip("192.0.2.1")).err().expect("third refused");
        assert_eq!(refusal.result, "ip_connections");
        assert!(refusal.retry_after_secs >= 1);
        let other = door.admit(ip("192.0.2.2")).expect("another address");
        assert_eq!(door.metrics.client_addresses.get(), 2);
        drop(first);
        let third = door.admit(ip("192.0.2.1")).expect("a freed place");
        drop((second, third, other));
        assert!(
            door.open.is_empty(),
            "addresses without connections are forgotten"
        );
        assert_eq!(door.metrics.client_addresses.get(), 0);
    }

    #[tokio::test]
    async fn the_rate_refuses_with_a_retry_after_and_does_not_hold_a_place() {
        let door = door(Options {
            max_connections_per_ip: Some(10),
            connect_rate_per_ip: Some(1),
            connect_burst_per_ip: Some(2),
            ..Options::default()
        });
        let _kept = [
            door.admit(ip("192.0.2.1")).expect("burst 1"),
            door.admit(ip("192.0.2.1")).expect("burst 2"),
        ];
        let refusal = door.admit(ip("192.0.2.1")).err().expect("over the rate");
        assert_eq!(refusal.result, "ip_rate");
        assert_eq!(refusal.retry_after_secs, 1);
        assert_eq!(door.open.get(&ip("192.0.2.1")).map(|count| *count), Some(2));
        door.admit(ip("192.0.2.3"))
            .expect("another address has its own bucket");
    }

    #[tokio::test]
    async fn addresses_whose_allowance_is_full_again_are_forgotten() {
        let door = door(Options {
            connect_rate_per_ip: Some(4),
            connect_burst_per_ip: Some(1),
            ..Options::default()
        });
        let rate = door.rate.as_ref().expect("a rate limiter");
        for last in 1..=50 {
            drop(
                door.admit(IpAddr::from([192, 0, 2, last]))
                    .expect("admitted"),
            );
        }
        assert_eq!(rate.len(), 50);
        // One connection's allowance comes back in 250 ms at 4/s; governor forgets the address
        // one interval after that.
        tokio::time::sleep(Duration::from_millis(800)).await;
        door.admit(ip("198.51.100.1")).expect("admitted");
        door.prune();
        assert_eq!(rate.len(), 1, "only the address just seen is kept");
        assert_eq!(door.metrics.connect_rate_addresses.get(), 1);
    }

    #[tokio::test]
    async fn zero_turns_the_address_limits_off() {
        let door = door(Options {
            max_connections_per_ip: Some(0),
            connect_rate_per_ip: Some(0),
            ..Options::default()
        });
        let slots: Vec<IpSlot> = (0..500)
            .map(|_| door.admit(ip("192.0.2.1")).expect("no limit"))
            .collect();
        assert_eq!(slots.len(), 500);
        assert!(door.open.is_empty());
    }

    #[tokio::test]
    async fn the_pace_lets_a_burst_through_then_queues_and_counts_the_waits() {
        let door = door(Options {
            accept_rate: Some(10),
            accept_burst: Some(3),
            ..Options::default()
        });
        for _ in 0..3 {
            door.pace().await;
        }
        assert_eq!(door.metrics.accept_waits.get(), 0);
        let waiting: Vec<_> = (0..5)
            .map(|_| {
                let door = door.clone();
                tokio::spawn(async move { door.pace().await })
            })
            .collect();
        for task in waiting {
            task.await.expect("paced");
        }
        assert_eq!(door.metrics.accept_waits.get(), 5);
        assert_eq!(door.metrics.accept_waiting.get(), 0);
    }
}
