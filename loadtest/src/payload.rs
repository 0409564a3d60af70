//! What the publishers of `latency` and `fanout` publish (`--payload`): the bare stamp (send time,
//! publisher, sequence number), or the stamp inside a realistic ~1 KiB JSON market-data or chat
//! message, the size and shape a compressed codec is meant for.

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
    /// The stamp's fields plus a chat message: ids, room, author, timestamps, a 500 to 700
    /// character body of English sentences picked per message, mentions, reactions and a link
    /// preview, about 1 KiB of JSON.
    Chat,
}

/// Levels per side of a `market` payload's book.
const LEVELS: u64 = 10;

impl Payload {
    /// The JSON object published for `stamp`. Its fields other than `t`, `p` and `s` are
    /// ignored by the subscribers, which read only the stamp.
    pub fn data(self, stamp: &Stamp) -> String {
        let Stamp { t, p, s } = stamp;
        let mut data = format!(r#"{{"t":{t},"p":{p},"s":{s}"#);
        match self {
            Payload::Stamp => {}
            Payload::Market => market(&mut data, stamp),
            Payload::Chat => chat(&mut data, stamp),
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

/// Sentences a chat body is made of: varied, natural English, each under 200 characters, so a
/// body grown to [`BODY_MIN`] stays under 700.
const SENTENCES: [&str; 40] = [
    "Morning all, the staging deploy finished at half past eight and nothing looks on fire yet.",
    "Could someone double-check the invoice totals for October before I send them to finance?",
    "I moved the retro to Thursday because half the team is at the conference on Wednesday.",
    "The new onboarding flow cut the drop-off on the second screen by almost a third.",
    "Heads up: the office wifi will be down between noon and one while they swap the router.",
    "Does anyone remember why we pinned that library to the old version last spring?",
    "I tried the ramen place across the street and it was honestly better than expected.",
    "The customer in Lisbon says the export still times out for files larger than two gigabytes.",
    "Thanks for jumping on that so quickly, it saved us a very awkward call with the client.",
    "We should write down the rollback steps somewhere other than my head, just in case.",
    "My train is delayed again, so start the standup without me and I will catch up after.",
    "The dashboard shows a spike in latency every night at three, right when the backups run.",
    "I left some comments on the design doc, mostly questions about the migration plan.",
    "If nobody objects, I will merge the cleanup branch after lunch and watch the alerts.",
    "Quick reminder that expense reports for the quarter are due by the end of next week.",
    "The printer on the fourth floor is jammed again and I am not brave enough to open it.",
    "Has anyone else noticed that search results got slower since the index was rebuilt?",
    "We hit ten thousand active users this morning, which is wild for a Tuesday.",
    "I am out on Friday for a dentist appointment but reachable on my phone if it is urgent.",
    "The load test looked fine until the cache warmed up, then memory climbed steadily.",
    "Please do not rename the shared folders, three scripts depend on those exact paths.",
    "Lunch is on the company today, there are sandwiches and a suspicious green salad.",
    "The support queue is down to twelve tickets, the lowest it has been since summer.",
    "I wrote a short summary of the incident and the timeline is in the usual place.",
    "Can we agree on one date format for the reports, I keep converting them by hand?",
    "The intern found a bug in the rounding code that has been there for about four years.",
    "Our certificate expires in nine days, so renewing it is now officially my hobby.",
    "I would rather ship the smaller version on time than the perfect one a month late.",
    "The meeting room booking system double-booked us again, so we are in the kitchen.",
    "Marketing wants screenshots of the new settings page by tomorrow afternoon.",
    "I am seeing a handful of timeouts from the payment provider, nothing alarming yet.",
    "Somebody left a very nice cake in the break room with a note that just says sorry.",
    "The translation files for Portuguese and Polish are finally in, thanks to the volunteers.",
    "Let us keep the discussion about tabs and spaces out of the release channel, please.",
    "I rebased the feature branch onto main and the tests are green on my machine.",
    "The weather app says rain all week, which seems like a good excuse to stay indoors.",
    "We could batch those notifications instead of sending one email for every change.",
    "I checked with legal and the new terms can go live once the banner copy is approved.",
    "The old server in the closet is finally switched off and it is suddenly very quiet.",
    "Good catch on the timezone issue, users in Auckland were seeing yesterday's schedule.",
];

/// Who writes and is mentioned: (user id, display name).
const PEOPLE: [(&str, &str); 12] = [
    ("u_01H8Z3K2QF", "Amara Okafor"),
    ("u_01H8Z3M7TB", "Lukas Schneider"),
    ("u_01H8Z3P4XN", "Priya Raman"),
    ("u_01H8Z3R9DC", "Tomás Herrera"),
    ("u_01H8Z3T1WG", "Mei Lin"),
    ("u_01H8Z3V6JS", "Jonah Feld"),
    ("u_01H8Z3X2LA", "Sofia Rossi"),
    ("u_01H8Z3Z8PE", "Kwame Mensah"),
    ("u_01H8Z42C5R", "Hannah Berg"),
    ("u_01H8Z44N0V", "Dmitri Volkov"),
    ("u_01H8Z46Q3Y", "Aiko Tanaka"),
    ("u_01H8Z48H7M", "Gabriel Costa"),
];

const ROOMS: [&str; 5] = [
    "team-platform",
    "general",
    "support-escalations",
    "release-coordination",
    "random",
];

const EMOJI: [&str; 8] = ["👍", "🎉", "😂", "👀", "🙏", "🔥", "✅", "❤️"];

/// Link previews: (URL, title, site).
const LINKS: [(&str, &str, &str); 4] = [
    (
        "https://docs.example.com/runbooks/rollback",
        "Runbook: rolling back a release",
        "Example Docs",
    ),
    (
        "https://status.example.com/incidents/2931",
        "Elevated latency on the EU cluster",
        "Example Status",
    ),
    (
        "https://news.example.org/2026/12/remote-teams",
        "What remote teams learned this year",
        "Example News",
    ),
    (
        "https://git.example.com/platform/gateway/pull/1487",
        "Batch notification emails per user",
        "Example Git",
    ),
];

/// Shortest chat body, characters.
const BODY_MIN: usize = 500;

/// The fields of a chat message: an id, the room, the author, ISO timestamps, a body of
/// sentences from [`SENTENCES`] picked by a generator seeded by the publisher and sequence (so
/// consecutive messages differ, as real chat does), mentions, reactions and a link preview.
fn chat(data: &mut String, stamp: &Stamp) {
    let mut random = SplitMix(stamp.p as u64 * 1_000_003 + stamp.s);
    let mut body = String::new();
    while body.len() < BODY_MIN {
        let sentence = SENTENCES[random.below(SENTENCES.len() as u64) as usize];
        if !body.is_empty() {
            body.push(' ');
        }
        body.push_str(sentence);
    }
    let pick = |random: &mut SplitMix, len: usize| random.below(len as u64) as usize;
    let (author_id, author_name) = PEOPLE[pick(&mut random, PEOPLE.len())];
    let (minute, second, millis) = (random.below(60), random.below(60), random.below(1000));
    let _ = write!(
        data,
        r#","type":"chat.message","id":"msg_{:016x}","room":{},"author":{{"id":"{author_id}","display_name":{},"avatar_url":"https://cdn.example.com/avatars/{author_id}/96.png"}},"created_at":"2026-12-05T17:{minute:02}:{second:02}.{millis:03}Z","edited_at":{},"text":{},"mentions":["#,
        random.below(u64::MAX),
        json_string(ROOMS[pick(&mut random, ROOMS.len())]),
        json_string(author_name),
        if random.below(4) == 0 {
            format!(
                r#""2026-12-05T17:{minute:02}:{:02}.{millis:03}Z""#,
                (second + 1 + random.below(58)) % 60
            )
        } else {
            "null".to_owned()
        },
        json_string(&body),
    );
    for index in 0..random.below(3) {
        let (id, name) = PEOPLE[pick(&mut random, PEOPLE.len())];
        let _ = write!(
            data,
            r#"{}{{"id":"{id}","display_name":{}}}"#,
            if index == 0 { "" } else { "," },
            json_string(name)
        );
    }
    data.push_str(r#"],"reactions":["#);
    let first = pick(&mut random, EMOJI.len());
    for index in 0..1 + random.below(3) as usize {
        let _ = write!(
            data,
            r#"{}{{"emoji":"{}","count":{},"me":{}}}"#,
            if index == 0 { "" } else { "," },
            EMOJI[(first + index) % EMOJI.len()],
            1 + random.below(12),
            random.below(3) == 0
        );
    }
    let (url, title, site) = LINKS[pick(&mut random, LINKS.len())];
    let _ = write!(
        data,
        r#"],"attachments":[{{"type":"link_preview","url":"{url}","title":{},"site_name":{}}}],"reply_count":{}"#,
        json_string(title),
        json_string(site),
        random.below(20),
    );
}

/// `text` as a JSON string, quotes included.
fn json_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
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

    /// Longest chat body, characters.
    const BODY_MAX: usize = 700;

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

    #[test]
    fn every_sentence_fits_the_body_bound() {
        for sentence in SENTENCES {
            assert!(sentence.len() < BODY_MAX - BODY_MIN, "{sentence}");
            assert!(sentence.is_ascii(), "{sentence}");
        }
    }

    #[test]
    fn chat_payload_is_about_a_kibibyte_of_json_carrying_the_stamp() {
        let mut bodies = std::collections::HashSet::new();
        for s in 1..=200 {
            let stamp = Stamp {
                t: 1_000_000 + s,
                p: 2,
                s,
            };
            let data = Payload::Chat.data(&stamp);
            assert!(data.starts_with(&format!(r#"{{"t":{},"p":2,"s":{s},"#, stamp.t)));
            assert!(
                (900..=1400).contains(&data.len()),
                "{} bytes: {data}",
                data.len()
            );
            let value: serde_json::Value = serde_json::from_str(&data).expect("JSON");
            let text = value["text"].as_str().expect("a body");
            assert!(
                (BODY_MIN..=BODY_MAX).contains(&text.len()),
                "{} characters: {text}",
                text.len()
            );
            assert!(text.ends_with(['.', '?']), "{text}");
            for key in ["display_name", "avatar_url", "id"] {
                assert!(value["author"][key].is_string(), "author.{key}: {data}");
            }
            assert!(
                value["created_at"]
                    .as_str()
                    .is_some_and(|at| at.ends_with('Z'))
            );
            assert!(value["mentions"].is_array() && value["reactions"].is_array());
            assert_eq!(value["attachments"][0]["type"], "link_preview");
            let parsed: Stamp = serde_json::from_str(&data).expect("a stamp");
            assert_eq!((parsed.t, parsed.p, parsed.s), (stamp.t, 2, s));
            bodies.insert(text.to_owned());
        }
        // Consecutive messages differ; bodies hardly ever repeat.
        assert!(
            bodies.len() >= 195,
            "{} distinct bodies of 200",
            bodies.len()
        );
    }
}
