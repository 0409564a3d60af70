//! `compare`: one table of `fanout` results (switchboard, Socket.IO, the raw ceiling server),
//! with the RSS per connection of `connect` results and ratios against the switchboard run of
//! the same shape, as aligned text or Markdown. switchboard over a fallback transport is a
//! system of its own (`switchboard/sse`, `switchboard/poll`), compared with switchboard over
//! WebSocket.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::cli::CompareArgs;

pub fn run(args: &CompareArgs) -> Result<()> {
    let fanout = args
        .fanout
        .iter()
        .map(|path| read(path))
        .collect::<Result<Vec<_>>>()?;
    let connect = args
        .connect
        .iter()
        .map(|path| read(path))
        .collect::<Result<Vec<_>>>()?;
    let table = build(&fanout, &connect)?;
    print!(
        "{}",
        if args.markdown {
            table.markdown()
        } else {
            table.text()
        }
    );
    Ok(())
}

/// A result file as (its path, for messages; its JSON).
fn read(path: &Path) -> Result<(String, Value)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value = serde_json::from_str(&text)
        .with_context(|| format!("{} does not hold JSON", path.display()))?;
    Ok((path.display().to_string(), value))
}

/// The fields of a `fanout` result the table shows.
#[derive(Deserialize)]
struct Fanout {
    /// Results written before `--protocol` existed are switchboard's.
    #[serde(default = "switchboard")]
    protocol: String,
    /// Results written before `--transport` existed are WebSocket ones.
    #[serde(default)]
    transport: Option<String>,
    subscribers: u64,
    rooms: u64,
    rate_target: u64,
    delivered_per_sec: f64,
    latency_ms_p50: f64,
    latency_ms_p99: f64,
    latency_ms_p999: f64,
    #[serde(default)]
    server_cpu_secs_per_million_deliveries: Option<f64>,
    lost: u64,
    duplicates: u64,
}

/// The field of a `connect` result the table shows, and which system it measured.
#[derive(Deserialize)]
struct Connect {
    #[serde(default = "switchboard")]
    protocol: String,
    #[serde(default)]
    transport: Option<String>,
    #[serde(default)]
    server_rss_per_connection_bytes: Option<f64>,
}

fn switchboard() -> String {
    "switchboard".to_owned()
}

/// The row name of a result: its protocol, with the transport unless it is the WebSocket.
fn system(protocol: &str, transport: Option<&str>) -> String {
    match transport {
        None | Some("websocket") => protocol.to_owned(),
        Some(transport) => format!("{protocol}/{transport}"),
    }
}

/// Rows of the same shape in this order; unknown systems last.
const SYSTEMS: [&str; 5] = [
    "switchboard",
    "switchboard/sse",
    "switchboard/poll",
    "socketio",
    "raw",
];

const HEADER: [&str; 14] = [
    "system",
    "subscribers",
    "rooms",
    "rate/s",
    "delivered/s",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "CPU-s/1M",
    "RSS/conn KiB",
    "lost/dup",
    "deliv/CPU-s vs sb",
    "p99 vs sb",
    "delivered/s vs sb",
];

/// What the terse headers mean, printed under the table.
const LEGEND: &str = "rate/s: messages published per second; delivered/s: deliveries \
received per second; CPU-s/1M: server CPU seconds (every --cpu-pid process) per million \
deliveries; RSS/conn: server memory per idle connection (connect); lost/dup: deliveries lost \
and duplicated; vs sb: ratio against the switchboard row of the same subscribers, rooms and \
rate (deliveries per CPU-second and delivered/s above 1: better than switchboard; p99 above 1: \
slower).\n";

/// Columns of text (left-aligned); the rest are numbers.
const TEXT_COLUMNS: usize = 1;

pub struct Table {
    rows: Vec<[String; HEADER.len()]>,
}

/// The table of `fanout` results (path, JSON), ordered by subscribers, rooms, rate and then
/// system (switchboard, socketio, raw); each row's ratios are against the switchboard result of
/// the same subscribers, rooms and rate, if there is one. `connect` results (path, JSON) give
/// the RSS per connection of their `protocol`.
pub fn build(fanout: &[(String, Value)], connect: &[(String, Value)]) -> Result<Table> {
    let mut results = fanout
        .iter()
        .map(|(path, value)| {
            let result = Fanout::deserialize(value)
                .with_context(|| format!("{path}: not a fanout result"))?;
            Ok((
                system(&result.protocol, result.transport.as_deref()),
                result,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut rss = Vec::<(String, Option<f64>)>::new();
    for (path, value) in connect {
        let result =
            Connect::deserialize(value).with_context(|| format!("{path}: not a connect result"))?;
        let name = system(&result.protocol, result.transport.as_deref());
        if rss.iter().any(|(system, _)| *system == name) {
            bail!("{path}: a second connect result for {name}");
        }
        rss.push((name, result.server_rss_per_connection_bytes));
    }
    let system_order = |system: &str| {
        SYSTEMS
            .iter()
            .position(|known| *known == system)
            .unwrap_or(usize::MAX)
    };
    results.sort_by_key(|(system, result)| {
        (
            result.subscribers,
            result.rooms,
            result.rate_target,
            system_order(system),
        )
    });

    let rows = results
        .iter()
        .map(|(system, result)| {
            let baseline = results.iter().map(|(_, other)| other).find(|other| {
                other.protocol == "switchboard"
                    && matches!(other.transport.as_deref(), None | Some("websocket"))
                    && (other.subscribers, other.rooms, other.rate_target)
                        == (result.subscribers, result.rooms, result.rate_target)
            });
            let rss_kib = rss
                .iter()
                .find(|(name, _)| name == system)
                .and_then(|(_, bytes)| *bytes)
                .map(|bytes| bytes / 1024.0);
            let cpu = result.server_cpu_secs_per_million_deliveries;
            // Deliveries per CPU-second is the inverse of CPU-seconds per delivery.
            let efficiency = baseline
                .and_then(|base| base.server_cpu_secs_per_million_deliveries)
                .zip(cpu)
                .and_then(|(base, own)| ratio(base, own));
            [
                system.clone(),
                result.subscribers.to_string(),
                result.rooms.to_string(),
                result.rate_target.to_string(),
                format!("{:.0}", result.delivered_per_sec),
                format!("{:.2}", result.latency_ms_p50),
                format!("{:.2}", result.latency_ms_p99),
                format!("{:.2}", result.latency_ms_p999),
                number(cpu, 2),
                number(rss_kib, 1),
                format!("{}/{}", result.lost, result.duplicates),
                times(efficiency),
                times(baseline.and_then(|base| ratio(result.latency_ms_p99, base.latency_ms_p99))),
                times(
                    baseline
                        .and_then(|base| ratio(result.delivered_per_sec, base.delivered_per_sec)),
                ),
            ]
        })
        .collect();
    Ok(Table { rows })
}

fn ratio(numerator: f64, denominator: f64) -> Option<f64> {
    (denominator > 0.0).then(|| numerator / denominator)
}

fn number(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{value:.decimals$}"))
}

fn times(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{value:.2}x"))
}

impl Table {
    /// Aligned columns (text left, numbers right), then the legend.
    pub fn text(&self) -> String {
        let widths: Vec<usize> = (0..HEADER.len())
            .map(|column| {
                self.rows
                    .iter()
                    .map(|row| row[column].chars().count())
                    .chain([HEADER[column].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[&str]| {
            let cells: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(column, cell)| {
                    let width = widths[column];
                    if column < TEXT_COLUMNS {
                        format!("{cell:<width$}")
                    } else {
                        format!("{cell:>width$}")
                    }
                })
                .collect();
            format!("{}\n", cells.join("  ").trim_end())
        };
        let mut text = line(&HEADER);
        for row in &self.rows {
            text.push_str(&line(&row.each_ref().map(String::as_str)));
        }
        text.push('\n');
        text.push_str(LEGEND);
        text
    }

    /// A Markdown table (numbers right-aligned), then the legend as a paragraph.
    pub fn markdown(&self) -> String {
        let mut text = format!("| {} |\n|", HEADER.join(" | "));
        for column in 0..HEADER.len() {
            text.push_str(if column < TEXT_COLUMNS {
                "---|"
            } else {
                "---:|"
            });
        }
        text.push('\n');
        for row in &self.rows {
            text.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        text.push('\n');
        text.push_str(LEGEND);
        text
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fanout(protocol: Option<&str>, rate: u64, delivered: f64, p99: f64, cpu: Value) -> Value {
        let mut value = json!({
            "subscribers": 2000,
            "rooms": 1,
            "rate_target": rate,
            "delivered_per_sec": delivered,
            "latency_ms_p50": 1.0,
            "latency_ms_p99": p99,
            "latency_ms_p999": p99 * 2.0,
            "server_cpu_secs_per_million_deliveries": cpu,
            "lost": 0,
            "duplicates": 0,
        });
        if let Some(protocol) = protocol {
            value["protocol"] = json!(protocol);
        }
        value
    }

    fn files(values: Vec<Value>) -> Vec<(String, Value)> {
        values
            .into_iter()
            .enumerate()
            .map(|(index, value)| (format!("file{index}.json"), value))
            .collect()
    }

    #[test]
    fn rows_are_ordered_by_rate_then_system_with_ratios_against_switchboard() {
        let table = build(
            &files(vec![
                fanout(Some("raw"), 50, 100_000.0, 1.0, json!(5.0)),
                fanout(Some("socketio"), 50, 90_000.0, 8.0, json!(40.0)),
                // No protocol field: an older result, switchboard's.
                fanout(None, 50, 100_000.0, 4.0, json!(20.0)),
                fanout(Some("raw"), 200, 400_000.0, 2.0, Value::Null),
            ]),
            &files(vec![
                json!({"protocol": "switchboard", "server_rss_per_connection_bytes": 10240.0}),
                json!({"protocol": "raw", "server_rss_per_connection_bytes": null}),
            ]),
        )
        .expect("a table");
        let systems: Vec<(&str, &str)> = table
            .rows
            .iter()
            .map(|row| (row[0].as_str(), row[3].as_str()))
            .collect();
        assert_eq!(
            systems,
            [
                ("switchboard", "50"),
                ("socketio", "50"),
                ("raw", "50"),
                ("raw", "200")
            ]
        );
        let [sb, sio, raw, raw_200] = &table.rows[..] else {
            panic!("four rows");
        };
        assert_eq!(sb[4], "100000");
        assert_eq!(sb[6], "4.00");
        assert_eq!(sb[8], "20.00");
        assert_eq!(sb[9], "10.0");
        assert_eq!(sb[10], "0/0");
        assert_eq!(&sb[11..], ["1.00x", "1.00x", "1.00x"]);
        // Twice switchboard's CPU per delivery: half the deliveries per CPU-second.
        assert_eq!(&sio[11..], ["0.50x", "2.00x", "0.90x"]);
        assert_eq!(sio[9], "-", "no connect result for socketio");
        assert_eq!(&raw[11..], ["4.00x", "0.25x", "1.00x"]);
        assert_eq!(raw[9], "-", "the connect result has no RSS");
        // No switchboard run at 200 msgs/s, and no CPU figure.
        assert_eq!(raw_200[8], "-");
        assert_eq!(&raw_200[11..], ["-", "-", "-"]);
    }

    #[test]
    fn fallback_transports_are_systems_compared_with_the_websocket() {
        let mut sse = fanout(Some("switchboard"), 50, 1000.0, 8.0, json!(40.0));
        sse["transport"] = json!("sse");
        let mut poll = fanout(Some("switchboard"), 50, 1000.0, 20.0, json!(80.0));
        poll["transport"] = json!("poll");
        let mut websocket = fanout(Some("switchboard"), 50, 1000.0, 4.0, json!(20.0));
        websocket["transport"] = json!("websocket");
        let table = build(
            &files(vec![poll, sse, websocket]),
            &files(vec![
                json!({"protocol": "switchboard", "transport": "sse", "server_rss_per_connection_bytes": 20480.0}),
                json!({"protocol": "switchboard", "server_rss_per_connection_bytes": 10240.0}),
            ]),
        )
        .expect("a table");
        let systems: Vec<&str> = table.rows.iter().map(|row| row[0].as_str()).collect();
        assert_eq!(
            systems,
            ["switchboard", "switchboard/sse", "switchboard/poll"]
        );
        assert_eq!(table.rows[0][9], "10.0");
        assert_eq!(table.rows[1][9], "20.0");
        assert_eq!(table.rows[2][9], "-");
        assert_eq!(&table.rows[1][11..13], ["0.50x", "2.00x"]);
        assert_eq!(&table.rows[2][11..13], ["0.25x", "5.00x"]);
    }

    #[test]
    fn text_and_markdown_hold_every_row() {
        let table = build(
            &files(vec![
                fanout(Some("switchboard"), 50, 1000.0, 4.0, json!(20.0)),
                fanout(Some("raw"), 50, 1000.0, 1.0, json!(5.0)),
            ]),
            &[],
        )
        .expect("a table");
        let text = table.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "header, two rows, blank, legend: {text}");
        assert!(lines[0].starts_with("system"), "{text}");
        assert!(lines[2].starts_with("raw "), "{text}");
        assert!(lines[2].ends_with("1.00x"), "{text}");
        let markdown = table.markdown();
        let lines: Vec<&str> = markdown.lines().collect();
        assert_eq!(lines.len(), 6, "{markdown}");
        assert!(
            lines[0].starts_with("| system | subscribers |"),
            "{markdown}"
        );
        assert_eq!(
            lines[1],
            format!("|---|{}", "---:|".repeat(HEADER.len() - 1))
        );
        assert!(
            lines[3].starts_with("| raw | 2000 | 1 | 50 | 1000 |"),
            "{markdown}"
        );
    }

    #[test]
    fn refuses_what_is_not_a_fanout_result_or_a_second_connect_result() {
        let error = build(&files(vec![json!({"connections_open": 5})]), &[])
            .err()
            .expect("not a fanout result");
        assert!(format!("{error:#}").contains("file0.json"), "{error:#}");
        let connect = files(vec![
            json!({"protocol": "raw", "server_rss_per_connection_bytes": 1.0}),
            json!({"protocol": "raw", "server_rss_per_connection_bytes": 2.0}),
        ]);
        assert!(build(&[], &connect).is_err());
    }
}
