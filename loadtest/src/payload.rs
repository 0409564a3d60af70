//! What the publishers of `latency` and `fanout` publish (`--payload`): the bare stamp (send time,
//! publisher, sequence number), or the stamp inside a realistic ~1 KiB JSON market-data message,
//! the size and shape a compressed codec is meant for.

use std::fmt::Write as _;

use serde::Serialize;

use crate::ws::Stamp;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    /// `{"t":…,"p":…,"s":…}`, about 40 bytes.
    #[default]
    Stamp,
    /// The stamp's fields plus an order-book update of one instrument (ten levels a side,
    /// prices and sizes varying from message to message), about 1 KiB of JSON.
    Market,
}

/// Levels per side of a `market` payload's book.
const LEVELS: u64 = 10;

impl Payload {
    /// The JSON object published for `stamp`. Its fields other than `t`, `p` and `s` are
    /// ignored by the subscribers, which read only the stamp.
    pub fn data(self, stamp: &Stamp) -> String {
        let Stamp { t, p, s } = stamp;
        let mut data = format!(r#"{{"t":{t},"p":{p},"s":{s}"#);
        if self == Payload::Market {
            market(&mut data, stamp);
        }
        data.push('}');
        data
    }
}

/// The fields of a market-data message: an instrument, exchange time and sequence, last trade,
/// and ten bid and ask levels around a mid price that wanders with the sequence number. The
/// numbers come from a generator seeded by the publisher and sequence, so every message differs
/// as real ticks do (a compressor gets no free repetition between frames).
fn market(data: &mut String, stamp: &Stamp) {
    let mut random = SplitMix(stamp.p as u64 * 1_000_003 + stamp.s);
    let mid_cents = 6_421_000 + (stamp.s % 4_000) * 5 + random.below(50);
    let last_cents = mid_cents - 25 + random.below(50);
    let _ = write!(
        data,
        r#","type":"book_update","venue":"XNAS","symbol":"NVDA","currency":"USD","seq":{},"exchange_ts":"2026-12-05T17:{:02}:{:02}.{:06}Z","last":{{"price":"{}","size":{},"side":"{}","trade_id":{}}},"#,
        stamp.s,
        random.below(60),
        random.below(60),
        random.below(1_000_000),
        price(last_cents),
        1 + random.below(900),
        if random.below(2) == 0 { "buy" } else { "sell" },
        880_000_000 + stamp.s * 7 + random.below(7),
    );
    for (side, sign) in [("bids", -1i64), ("asks", 1i64)] {
        let _ = write!(data, r#""{side}":["#);
        for level in 0..LEVELS {
            let offset = (5 * (level + 1) + random.below(3)) as i64 * sign;
            let _ = write!(
                data,
                r#"{}{{"px":"{}","qty":{},"orders":{}}}"#,
                if level == 0 { "" } else { "," },
                price((mid_cents as i64 + offset) as u64),
                100 * (1 + random.below(40)),
                1 + random.below(25),
            );
        }
        data.push_str("],");
    }
    let _ = write!(
        data,
        r#""stats":{{"open":"642.10","high":"{}","low":"{}","volume":{},"vwap":"{}"}},"flags":["regular","consolidated"]"#,
        price(mid_cents + 900 + random.below(100)),
        price(mid_cents - 900 - random.below(100)),
        31_000_000 + stamp.s * 113 + random.below(100),
        price(mid_cents - 40 + random.below(80)),
    );
}

/// Cents as a decimal price string.
fn price(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// A tiny seeded generator (SplitMix64): reproducible numbers without a dependency.
struct SplitMix(u64);

impl SplitMix {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_payload_is_the_stamp() {
        let stamp = Stamp { t: 5, p: 1, s: 2 };
        assert_eq!(Payload::Stamp.data(&stamp), r#"{"t":5,"p":1,"s":2}"#);
    }

    #[test]
    fn market_payload_is_about_a_kibibyte_of_json_carrying_the_stamp() {
        for s in [1, 2, 999, 123_456] {
            let stamp = Stamp {
                t: 1_000_000 + s,
                p: 3,
                s,
            };
            let data = Payload::Market.data(&stamp);
            assert!(
                (900..=1200).contains(&data.len()),
                "{} bytes: {data}",
                data.len()
            );
            let value: serde_json::Value = serde_json::from_str(&data).expect("JSON");
            assert_eq!(value["t"], stamp.t);
            assert_eq!(value["p"], 3);
            assert_eq!(value["s"], s);
            assert_eq!(value["bids"].as_array().map(Vec::len), Some(10));
            let parsed: Stamp = serde_json::from_str(&data).expect("a stamp");
            assert_eq!((parsed.t, parsed.p, parsed.s), (stamp.t, 3, s));
        }
        // Consecutive messages differ.
        let a = Payload::Market.data(&Stamp { t: 1, p: 0, s: 1 });
        let b = Payload::Market.data(&Stamp { t: 1, p: 0, s: 2 });
        assert_ne!(a[20..], b[20..]);
    }
}
