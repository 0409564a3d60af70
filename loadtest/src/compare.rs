//! `compare`: one table of `fanout` results (switchboard, Socket.IO, the raw ceiling server),
//! with the RSS per connection of `connect` results and ratios against the switchboard run of
//! the same shape, as aligned text or Markdown, and (`--html`) one self-contained page of the
//! table and the systems' charts side by side. switchboard over a fallback transport is a
//! system of its own (`switchboard/sse`, `switchboard/poll`), and so is switchboard in another
//! codec (`switchboard msgpack`, `switchboard json+deflate`), compared with switchboard over a
//! JSON WebSocket.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::cli::CompareArgs;
use crate::html::{self, Page};

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
    if let Some(path) = &args.html {
        std::fs::write(path, table.html())
            .with_context(|| format!("writing {}", path.display()))?;
    }
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
    /// Results written before `--codec` existed are JSON ones.
    #[serde(default = "json")]
    codec: String,
    /// Results written before `--payload` existed carry the bare stamp.
    #[serde(default = "stamp")]
    payload: String,
    subscribers: u64,
    rooms: u64,
    rate_target: u64,
    delivered_per_sec: f64,
    latency_ms_p50: f64,
    latency_ms_p99: f64,
    latency_ms_p999: f64,
    #[serde(default)]
    server_cpu_secs_per_million_deliveries: Option<f64>,
    #[serde(default)]
    wire_bytes_per_delivery: Option<f64>,
    lost: u64,
    duplicates: u64,
}

impl Fanout {
    /// The runs a row is compared with: same subscribers, rooms, rate and payload.
    fn shape(&self) -> (u64, u64, u64, &str) {
        (
            self.subscribers,
            self.rooms,
            self.rate_target,
            &self.payload,
        )
    }

    /// switchboard over a JSON WebSocket: what every row is compared with.
    fn is_baseline(&self) -> bool {
        self.protocol == "switchboard"
            && matches!(self.transport.as_deref(), None | Some("websocket"))
            && self.codec == "json"
    }
}

/// The field of a `connect` result the table shows, and which system it measured.
#[derive(Deserialize)]
struct Connect {
    #[serde(default = "switchboard")]
    protocol: String,
    #[serde(default)]
    transport: Option<String>,
    /// Results written before `connect --codec` existed are JSON ones.
    #[serde(default = "json")]
    codec: String,
    #[serde(default)]
    server_rss_per_connection_bytes: Option<f64>,
}

fn switchboard() -> String {
    "switchboard".to_owned()
}

fn json() -> String {
    "json".to_owned()
}

fn stamp() -> String {
    "stamp".to_owned()
}

/// The row name of a result: its protocol, with the transport unless it is the WebSocket.
fn system(protocol: &str, transport: Option<&str>) -> String {
    match transport {
        None | Some("websocket") => protocol.to_owned(),
        Some(transport) => format!("{protocol}/{transport}"),
    }
}

/// The row name of a `fanout` or `connect` result: [`system`], with the codec unless it is JSON.
fn codec_system(protocol: &str, transport: Option<&str>, codec: &str) -> String {
    let name = system(protocol, transport);
    if codec == "json" {
        name
    } else {
        format!("{name} {codec}")
    }
}

/// Rows of the same shape in this order; unknown systems last.
const SYSTEMS: [&str; 7] = [
    "switchboard",
    "switchboard msgpack",
    "switchboard json+deflate",
    "switchboard/sse",
    "switchboard/poll",
    "socketio",
    "raw",
];

const HEADER: [&str; 17] = [
    "system",
    "subscribers",
    "rooms",
    "rate/s",
    "payload",
    "delivered/s",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "CPU-s/1M",
    "RSS/conn KiB",
    "wire B/deliv",
    "lost/dup",
    "deliv/CPU-s vs sb",
    "p99 vs sb",
    "delivered/s vs sb",
    "wire B vs sb",
];

/// What the terse headers mean, printed under the table.
const LEGEND: &str = "rate/s: messages published per second; delivered/s: deliveries \
received per second; CPU-s/1M: server CPU seconds (every --cpu-pid process) per million \
deliveries; RSS/conn: server memory per idle connection (connect); wire B/deliv: WebSocket \
bytes (payload and frame header) the subscribers received per delivery; lost/dup: deliveries \
lost and duplicated; vs sb: ratio against the switchboard (JSON over WebSocket) row of the same \
subscribers, rooms, rate and payload (deliveries per CPU-second and delivered/s above 1: better \
than switchboard; p99 and wire bytes above 1: slower, bigger).\n";

/// Columns of text (left-aligned); the rest are numbers but the payload.
const TEXT_COLUMNS: usize = 1;
const PAYLOAD_COLUMN: usize = 4;

/// The titles of the `--html` page's charts.
pub const DELIVERED_CHART: &str = "Deliveries per second";
pub const CPU_CHART: &str = "Server CPU-seconds per million deliveries";
pub const P99_CHART: &str = "p99 latency (ms)";
pub const RSS_CHART: &str = "Server memory per idle connection (KiB)";
pub const WIRE_CHART: &str = "WebSocket bytes per delivery";

/// One colour per series, in order.
const PALETTE: [&str; 8] = [
    html::BLUE,
    html::ORANGE,
    html::GREEN,
    html::RED,
    html::PURPLE,
    "#8c564b",
    "#e377c2",
    "#17becf",
];

pub struct Table {
    rows: Vec<[String; HEADER.len()]>,
    /// The figures the charts draw, one per row in the same order.
    points: Vec<Point>,
    /// RSS per idle connection (bytes) by system, in the order of the connect results.
    rss: Vec<(String, Option<f64>)>,
}

/// One row's figures, for the charts.
struct Point {
    /// The series it belongs to: the system, with the payload and shape when the results
    /// hold more than one.
    series: String,
    rate: u64,
    delivered_per_sec: f64,
    cpu_secs_per_million: Option<f64>,
    p99_ms: f64,
    wire_bytes_per_delivery: Option<f64>,
}

/// The table of `fanout` results (path, JSON), ordered by subscribers, rooms, rate and then
/// system (switchboard, socketio, raw); each row's ratios are against the switchboard result of
/// the same subscribers, rooms and rate, if there is one. `connect` results (path, JSON) give
/// the RSS per connection of their system (protocol, transport and codec).
pub fn build(fanout: &[(String, Value)], connect: &[(String, Value)]) -> Result<Table> {
    let mut results = fanout
        .iter()
        .map(|(path, value)| {
            let result = Fanout::deserialize(value)
                .with_context(|| format!("{path}: not a fanout result"))?;
            Ok((
                codec_system(&result.protocol, result.transport.as_deref(), &result.codec),
                result,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut rss = Vec::<(String, Option<f64>)>::new();
    for (path, value) in connect {
        let result =
            Connect::deserialize(value).with_context(|| format!("{path}: not a connect result"))?;
        let name = codec_system(&result.protocol, result.transport.as_deref(), &result.codec);
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
    results.sort_by(|(system, result), (other_system, other)| {
        (result.shape(), system_order(system), system).cmp(&(
            other.shape(),
            system_order(other_system),
            other_system,
        ))
    });
    let several = |key: &dyn Fn(&Fanout) -> String| {
        results
            .iter()
            .map(|(_, result)| key(result))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 1
    };
    let several_payloads = several(&|result| result.payload.clone());
    let several_shapes = several(&|result| format!("{}x{}", result.rooms, result.subscribers));
    let points = results
        .iter()
        .map(|(system, result)| {
            let mut series = system.clone();
            if several_payloads {
                series.push_str(&format!(", {}", result.payload));
            }
            if several_shapes {
                series.push_str(&format!(
                    ", {} room(s) x {}",
                    result.rooms,
                    result.subscribers / result.rooms.max(1)
                ));
            }
            Point {
                series,
                rate: result.rate_target,
                delivered_per_sec: result.delivered_per_sec,
                cpu_secs_per_million: result.server_cpu_secs_per_million_deliveries,
                p99_ms: result.latency_ms_p99,
                wire_bytes_per_delivery: result.wire_bytes_per_delivery,
            }
        })
        .collect();

    let rows = results
        .iter()
        .map(|(system, result)| {
            let baseline = results
                .iter()
                .map(|(_, other)| other)
                .find(|other| other.is_baseline() && other.shape() == result.shape());
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
                result.payload.clone(),
                format!("{:.0}", result.delivered_per_sec),
                format!("{:.2}", result.latency_ms_p50),
                format!("{:.2}", result.latency_ms_p99),
                format!("{:.2}", result.latency_ms_p999),
                number(cpu, 2),
                number(rss_kib, 1),
                number(result.wire_bytes_per_delivery, 1),
                format!("{}/{}", result.lost, result.duplicates),
                times(efficiency),
                times(baseline.and_then(|base| ratio(result.latency_ms_p99, base.latency_ms_p99))),
                times(
                    baseline
                        .and_then(|base| ratio(result.delivered_per_sec, base.delivered_per_sec)),
                ),
                times(
                    baseline
                        .and_then(|base| base.wire_bytes_per_delivery)
                        .zip(result.wire_bytes_per_delivery)
                        .and_then(|(base, own)| ratio(own, base)),
                ),
            ]
        })
        .collect();
    Ok(Table { rows, points, rss })
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

    /// One self-contained page: a headline, the table, its legend, and the charts side by side
    /// (deliveries/s, server CPU per delivery, p99 latency, memory per idle connection and, when
    /// measured, wire bytes per delivery), every system a colour, every rate a group of bars.
    pub fn html(&self) -> String {
        let mut series: Vec<&str> = Vec::new();
        for point in &self.points {
            if !series.contains(&point.series.as_str()) {
                series.push(&point.series);
            }
        }
        let mut rates: Vec<u64> = self.points.iter().map(|point| point.rate).collect();
        rates.sort_unstable();
        rates.dedup();
        let groups: Vec<String> = rates.iter().map(|rate| format!("{rate} msgs/s")).collect();
        let color_of = |index: usize| PALETTE[index % PALETTE.len()];
        let chart = |title: &str, unit: &str, value: &dyn Fn(&Point) -> Option<f64>| {
            let bars: Vec<(&str, &str, Vec<Option<f64>>)> = series
                .iter()
                .enumerate()
                .map(|(index, name)| {
                    let values = rates
                        .iter()
                        .map(|rate| {
                            self.points
                                .iter()
                                .find(|point| point.series == *name && point.rate == *rate)
                                .and_then(value)
                        })
                        .collect();
                    (*name, color_of(index), values)
                })
                .collect();
            html::grouped_bar_chart(title, unit, &groups, &bars)
        };
        let mut charts = vec![
            chart(DELIVERED_CHART, "deliveries/s", &|point| {
                Some(point.delivered_per_sec)
            }),
            chart(CPU_CHART, "CPU-s per 1M", &|point| {
                point.cpu_secs_per_million
            }),
            chart(P99_CHART, "ms", &|point| Some(point.p99_ms)),
        ];
        // A system keeps its colour in the memory chart; one with only a connect result gets
        // the next free one.
        let mut names = series.clone();
        for (name, _) in &self.rss {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
        let rss_bars: Vec<(&str, &str, Vec<Option<f64>>)> = self
            .rss
            .iter()
            .map(|(name, bytes)| {
                let index = names.iter().position(|known| known == name).unwrap_or(0);
                (
                    name.as_str(),
                    color_of(index),
                    vec![bytes.map(|bytes| bytes / 1024.0)],
                )
            })
            .collect();
        charts.push(html::grouped_bar_chart(
            RSS_CHART,
            "KiB",
            &["idle connection".to_owned()],
            &rss_bars,
        ));
        if self
            .points
            .iter()
            .any(|point| point.wire_bytes_per_delivery.is_some())
        {
            charts.push(chart(WIRE_CHART, "bytes", &|point| {
                point.wire_bytes_per_delivery
            }));
        }

        let mut page = Page::new("compare");
        let rates_text: Vec<String> = rates.iter().map(u64::to_string).collect();
        page.push_html(&format!(
            "<section class=\"headline\">\n<p>{} side by side at {} msgs/s: {} run(s), {} \
             idle-memory result(s).</p>\n</section>\n",
            html::escape(&series.join(", ")),
            html::escape(&rates_text.join(", ")),
            self.points.len(),
            self.rss.len()
        ));
        page.section("Side by side", &charts);
        let mut table = String::from("<h2>Table</h2>\n<div class=\"wide\">\n<table>\n<tr>");
        for header in HEADER {
            table.push_str(&format!("<th>{}</th>", html::escape(header)));
        }
        table.push_str("</tr>\n");
        for row in &self.rows {
            table.push_str("<tr>");
            for (column, cell) in row.iter().enumerate() {
                let class = if column < TEXT_COLUMNS || column == PAYLOAD_COLUMN {
                    ""
                } else {
                    " class=\"num\""
                };
                table.push_str(&format!("<td{class}>{}</td>", html::escape(cell)));
            }
            table.push_str("</tr>\n");
        }
        table.push_str("</table>\n</div>\n");
        table.push_str(&format!("<p>{}</p>\n", html::escape(LEGEND.trim_end())));
        page.push_html(&table);
        page.finish()
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

    /// The cell of `row` under `header`.
    fn cell<'a>(row: &'a [String], header: &str) -> &'a str {
        let column = HEADER
            .iter()
            .position(|known| *known == header)
            .unwrap_or_else(|| panic!("no column {header}"));
        &row[column]
    }

    fn ratios(row: &[String]) -> [&str; 3] {
        [
            cell(row, "deliv/CPU-s vs sb"),
            cell(row, "p99 vs sb"),
            cell(row, "delivered/s vs sb"),
        ]
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
            .map(|row| (cell(row, "system"), cell(row, "rate/s")))
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
        assert_eq!(cell(sb, "delivered/s"), "100000");
        assert_eq!(cell(sb, "p99 ms"), "4.00");
        assert_eq!(cell(sb, "CPU-s/1M"), "20.00");
        assert_eq!(cell(sb, "RSS/conn KiB"), "10.0");
        assert_eq!(cell(sb, "lost/dup"), "0/0");
        assert_eq!(cell(sb, "payload"), "stamp");
        assert_eq!(cell(sb, "wire B/deliv"), "-", "an older result");
        assert_eq!(ratios(sb), ["1.00x", "1.00x", "1.00x"]);
        // Twice switchboard's CPU per delivery: half the deliveries per CPU-second.
        assert_eq!(ratios(sio), ["0.50x", "2.00x", "0.90x"]);
        assert_eq!(
            cell(sio, "RSS/conn KiB"),
            "-",
            "no connect result for socketio"
        );
        assert_eq!(ratios(raw), ["4.00x", "0.25x", "1.00x"]);
        assert_eq!(
            cell(raw, "RSS/conn KiB"),
            "-",
            "the connect result has no RSS"
        );
        // No switchboard run at 200 msgs/s, and no CPU figure.
        assert_eq!(cell(raw_200, "CPU-s/1M"), "-");
        assert_eq!(ratios(raw_200), ["-", "-", "-"]);
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
        let systems: Vec<&str> = table.rows.iter().map(|row| cell(row, "system")).collect();
        assert_eq!(
            systems,
            ["switchboard", "switchboard/sse", "switchboard/poll"]
        );
        assert_eq!(cell(&table.rows[0], "RSS/conn KiB"), "10.0");
        assert_eq!(cell(&table.rows[1], "RSS/conn KiB"), "20.0");
        assert_eq!(cell(&table.rows[2], "RSS/conn KiB"), "-");
        assert_eq!(&ratios(&table.rows[1])[..2], ["0.50x", "2.00x"]);
        assert_eq!(&ratios(&table.rows[2])[..2], ["0.25x", "5.00x"]);
    }

    /// A switchboard run of the market payload in `codec`, with its wire bytes.
    fn market(codec: &str, cpu: f64, wire: f64) -> Value {
        let mut value = fanout(Some("switchboard"), 200, 60_000.0, 10.0, json!(cpu));
        value["codec"] = json!(codec);
        value["payload"] = json!("market");
        value["transport"] = json!("websocket");
        value["wire_bytes_per_delivery"] = json!(wire);
        value
    }

    #[test]
    fn codecs_are_systems_compared_with_json_of_the_same_payload() {
        let table = build(
            &files(vec![
                market("json+deflate", 12.0, 400.0),
                // The stamp payload at the same rate is another shape: not a baseline.
                fanout(Some("switchboard"), 200, 60_000.0, 10.0, json!(1.0)),
                market("json", 10.0, 1200.0),
            ]),
            &[],
        )
        .expect("a table");
        let rows: Vec<(&str, &str)> = table
            .rows
            .iter()
            .map(|row| (cell(row, "system"), cell(row, "payload")))
            .collect();
        assert_eq!(
            rows,
            [
                ("switchboard", "market"),
                ("switchboard json+deflate", "market"),
                ("switchboard", "stamp"),
            ]
        );
        let deflate = &table.rows[1];
        assert_eq!(cell(deflate, "wire B/deliv"), "400.0");
        assert_eq!(cell(deflate, "wire B vs sb"), "0.33x");
        // 1.2 times the CPU per delivery.
        assert_eq!(cell(deflate, "deliv/CPU-s vs sb"), "0.83x");
        assert_eq!(cell(&table.rows[2], "wire B vs sb"), "-");
    }

    #[test]
    fn a_connect_result_in_a_codec_gives_that_codec_its_memory() {
        let table = build(
            &files(vec![
                market("json", 10.0, 1200.0),
                market("json+deflate", 12.0, 400.0),
                market("msgpack", 9.0, 1000.0),
            ]),
            &files(vec![
                json!({"protocol": "switchboard", "codec": "json", "server_rss_per_connection_bytes": 10240.0}),
                json!({"protocol": "switchboard", "codec": "json+deflate", "server_rss_per_connection_bytes": 10752.0}),
            ]),
        )
        .expect("a table");
        let rss: Vec<(&str, &str)> = table
            .rows
            .iter()
            .map(|row| (cell(row, "system"), cell(row, "RSS/conn KiB")))
            .collect();
        assert_eq!(
            rss,
            [
                ("switchboard", "10.0"),
                ("switchboard msgpack", "-"),
                ("switchboard json+deflate", "10.5"),
            ]
        );
        // A second result of the same codec is refused; one of another codec is not.
        let twice = files(vec![
            json!({"protocol": "switchboard", "codec": "msgpack", "server_rss_per_connection_bytes": 1.0}),
            json!({"protocol": "switchboard", "codec": "msgpack", "server_rss_per_connection_bytes": 2.0}),
        ]);
        assert!(build(&[], &twice).is_err());
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
        assert!(lines[2].contains(" 4.00x "), "{text}");
        assert!(lines[2].ends_with(" -"), "no wire figures: {text}");
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
            lines[3].starts_with("| raw | 2000 | 1 | 50 | stamp | 1000 |"),
            "{markdown}"
        );
    }

    /// Every bar of the page's chart titled `title`, as (series, group, value).
    fn bars(document: &tl::VDom<'_>, title: &str) -> Vec<(String, String, f64)> {
        let parser = document.parser();
        let svg = document
            .query_selector("svg")
            .expect("a selector")
            .filter_map(|handle| handle.get(parser)?.as_tag())
            .find(|svg| {
                svg.attributes()
                    .get("aria-label")
                    .flatten()
                    .is_some_and(|label| label.as_utf8_str() == title)
            })
            .unwrap_or_else(|| panic!("no chart {title}"));
        let attribute = |tag: &tl::HTMLTag<'_>, name: &str| {
            tag.attributes()
                .get(name)
                .flatten()
                .map(|value| value.as_utf8_str().into_owned())
        };
        svg.query_selector(parser, "rect")
            .expect("a selector")
            .filter_map(|handle| handle.get(parser)?.as_tag())
            .filter_map(|rect| {
                Some((
                    attribute(rect, "data-series")?,
                    attribute(rect, "data-group")?,
                    attribute(rect, "data-value")?.parse().expect("a number"),
                ))
            })
            .collect()
    }

    #[test]
    fn the_html_page_holds_every_chart_with_every_figure_and_the_table() {
        let mut deflate = market("json+deflate", 12.0, 400.0);
        deflate["rate_target"] = json!(50);
        let table = build(
            &files(vec![
                fanout(Some("switchboard"), 50, 100_000.0, 4.0, json!(20.0)),
                fanout(Some("raw"), 50, 99_000.0, 3.5, json!(10.0)),
                fanout(Some("switchboard"), 200, 400_000.0, 60.0, json!(2.5)),
                fanout(Some("raw"), 200, 390_000.0, 50.0, Value::Null),
                deflate,
            ]),
            &files(vec![
                json!({"protocol": "switchboard", "server_rss_per_connection_bytes": 9216.0}),
                json!({"protocol": "raw", "server_rss_per_connection_bytes": 7168.0}),
                json!({"protocol": "socketio", "server_rss_per_connection_bytes": 13312.0}),
            ]),
        )
        .expect("a table");
        let page = table.html();
        assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
        for external in ["http://", "https://", "<script", "<link", "src="] {
            assert!(!page.contains(external), "{external} in the page");
        }
        let document = tl::parse(&page, tl::ParserOptions::default()).expect("HTML");
        let group = |rate: u64| format!("{rate} msgs/s");
        // The payloads differ, so each series names its payload.
        let sb = "switchboard, stamp";
        let raw = "raw, stamp";
        let deflate = "switchboard json+deflate, market";
        let mut delivered = bars(&document, DELIVERED_CHART);
        delivered.sort_by(|a, b| a.partial_cmp(b).expect("numbers"));
        assert_eq!(
            delivered,
            [
                (raw.to_owned(), group(200), 390_000.0),
                (raw.to_owned(), group(50), 99_000.0),
                (deflate.to_owned(), group(50), 60_000.0),
                (sb.to_owned(), group(200), 400_000.0),
                (sb.to_owned(), group(50), 100_000.0),
            ]
        );
        let cpu = bars(&document, CPU_CHART);
        assert_eq!(cpu.len(), 4, "raw at 200 has no CPU figure: {cpu:?}");
        assert!(cpu.contains(&(sb.to_owned(), group(200), 2.5)), "{cpu:?}");
        assert!(
            cpu.contains(&(deflate.to_owned(), group(50), 12.0)),
            "{cpu:?}"
        );
        let p99 = bars(&document, P99_CHART);
        assert_eq!(p99.len(), 5, "{p99:?}");
        assert!(p99.contains(&(raw.to_owned(), group(50), 3.5)), "{p99:?}");
        let rss = bars(&document, RSS_CHART);
        let idle = "idle connection".to_owned();
        assert_eq!(
            rss,
            [
                ("switchboard".to_owned(), idle.clone(), 9.0),
                ("raw".to_owned(), idle.clone(), 7.0),
                ("socketio".to_owned(), idle, 13.0),
            ]
        );
        assert_eq!(
            bars(&document, WIRE_CHART),
            [(deflate.to_owned(), group(50), 400.0)]
        );
        // The table: one row per result under the header.
        let parser = document.parser();
        let rows: Vec<Vec<String>> = document
            .query_selector("tr")
            .expect("a selector")
            .filter_map(|handle| handle.get(parser)?.as_tag())
            .map(|row| {
                row.children()
                    .top()
                    .iter()
                    .filter_map(|cell| cell.get(parser))
                    .map(|cell| cell.inner_text(parser).into_owned())
                    .collect()
            })
            .collect();
        assert_eq!(rows.len(), 6, "{rows:?}");
        assert_eq!(rows[0], HEADER);
        assert_eq!(rows[1..], table.rows[..]);
    }

    #[test]
    fn a_page_without_connect_or_wire_results_still_draws_its_charts() {
        let table = build(
            &files(vec![fanout(
                Some("switchboard"),
                50,
                1000.0,
                4.0,
                json!(20.0),
            )]),
            &[],
        )
        .expect("a table");
        let page = table.html();
        let document = tl::parse(&page, tl::ParserOptions::default()).expect("HTML");
        assert!(bars(&document, RSS_CHART).is_empty());
        assert!(page.contains("no data"), "the empty memory chart says so");
        assert_eq!(bars(&document, DELIVERED_CHART).len(), 1);
        assert!(!page.contains(WIRE_CHART), "no wire figures, no chart");
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
