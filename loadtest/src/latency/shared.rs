//! State the publishers and subscribers of one run share, and what each of them counts.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;

use crate::payload::Payload;

/// Latencies are recorded in microseconds up to this; longer ones count as this.
const LATENCY_CEILING_US: u64 = 60_000_000;
/// Subscribers record into this many histograms, to keep lock contention and memory small.
pub const HISTOGRAM_SHARDS: u64 = 16;

/// State shared by the publishers and subscribers of one run.
pub struct Shared {
    /// The common clock: every timestamp is microseconds since this.
    pub base: Instant,
    /// Room names, `[a-z0-9-]` only, so they go into every protocol's frames unescaped.
    pub rooms: Vec<String>,
    /// What every publish carries besides its stamp.
    pub payload: Payload,
    /// switchboard: highest offset a publish reply acknowledged, per room.
    pub room_last: Vec<AtomicU64>,
    /// Messages written to each room's publishers' connections: what the peers, which neither
    /// acknowledge publishes nor give offsets, owe each subscriber of the room.
    pub room_published: Vec<AtomicU64>,
    pub window_start_us: AtomicU64,
    pub window_end_us: AtomicU64,
    pub histograms: Vec<Mutex<Histogram<u64>>>,
    /// Highest latency (µs) per second of the window, by send time.
    pub max_by_second: Vec<AtomicU64>,
    /// Latencies (µs) per second of the window, by send time, for per-second percentiles.
    pub histograms_by_second: Vec<Mutex<Histogram<u32>>>,
    /// Unique deliveries received in each second of the window, by receipt time.
    pub delivered_by_second: Vec<AtomicU64>,
    /// Subscriber connections subscribed and still reading.
    pub connected: AtomicU64,
    /// Unique deliveries over the whole run.
    pub received: AtomicU64,
    pub seq: AtomicU64,
    pub answered: AtomicU64,
    pub publish_errors: AtomicU64,
}

impl Shared {
    /// State for `rooms` (names) and a measured window of `window_secs`, which
    /// starts unset (nothing is in it until [`Shared::set_window`]).
    pub fn new(rooms: Vec<String>, payload: Payload, window_secs: u64) -> Shared {
        Shared {
            payload,
            base: Instant::now(),
            room_last: rooms.iter().map(|_| AtomicU64::new(0)).collect(),
            room_published: rooms.iter().map(|_| AtomicU64::new(0)).collect(),
            rooms,
            window_start_us: AtomicU64::new(u64::MAX),
            window_end_us: AtomicU64::new(u64::MAX),
            histograms: (0..HISTOGRAM_SHARDS)
                .map(|_| Mutex::new(latency_histogram()))
                .collect(),
            max_by_second: (0..window_secs).map(|_| AtomicU64::new(0)).collect(),
            histograms_by_second: (0..window_secs)
                .map(|_| {
                    Mutex::new(
                        Histogram::new_with_bounds(1, LATENCY_CEILING_US, 2)
                            .expect("valid histogram bounds"),
                    )
                })
                .collect(),
            delivered_by_second: (0..window_secs).map(|_| AtomicU64::new(0)).collect(),
            connected: AtomicU64::new(0),
            received: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            publish_errors: AtomicU64::new(0),
        }
    }

    /// Sets the measured window: messages sent from `start` until `end`.
    pub fn set_window(&self, start: tokio::time::Instant, end: tokio::time::Instant) {
        self.window_start_us
            .store(self.us_at(start), Ordering::SeqCst);
        self.window_end_us.store(self.us_at(end), Ordering::SeqCst);
    }

    /// Microseconds on the common clock, now.
    pub fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    /// Microseconds on the common clock at `at`.
    pub fn us_at(&self, at: tokio::time::Instant) -> u64 {
        at.into_std()
            .saturating_duration_since(self.base)
            .as_micros() as u64
    }

    /// Whether a time on the common clock falls in the measured window.
    pub fn in_window(&self, at_us: u64) -> bool {
        at_us >= self.window_start_us.load(Ordering::Relaxed)
            && at_us < self.window_end_us.load(Ordering::Relaxed)
    }
}

/// What one subscriber saw.
#[derive(Default)]
pub struct SubscriberStats {
    pub room: usize,
    /// switchboard: the room's offset when subscribed, and the last one received.
    pub start_offset: u64,
    pub last_offset: u64,
    /// The peers: the last sequence number received from each publisher (index).
    pub last_seq: Vec<u64>,
    pub unique: u64,
    pub duplicates: u64,
    pub epoch_mismatches: u64,
    pub unexpected: u64,
    pub in_window: u64,
    pub received_in_window: u64,
    /// WebSocket wire bytes ([`crate::codec::wire_bytes`]) of the frames read for the
    /// deliveries counted in `received_in_window` (and of any other frame read with them); None
    /// over a fallback transport.
    pub wire_bytes_in_window: Option<u64>,
    /// The JSON bytes those deliveries decoded to.
    pub json_bytes_in_window: u64,
    pub gaps: u64,
    pub closed_early: bool,
}

/// What one publisher sent, and how late against its schedule.
pub struct PublisherStats {
    pub sent: u64,
    pub sent_in_window: u64,
    pub lag: Histogram<u64>,
    /// Its connection failed or stalled before the end of the schedule, which it then ended.
    pub failed: bool,
}

/// An empty histogram of microseconds, 1 to the latency ceiling.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_CEILING_US, 3).expect("valid histogram bounds")
}
