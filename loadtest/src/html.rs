//! Self-contained HTML reports: the parameters and summary from the same result the JSON holds,
//! and inline SVG charts drawn here (no scripts, nothing fetched). [`Page`] and the charts are
//! shared by every scenario; [`write`] is the report of a publish/subscribe run.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

use hdrhistogram::Histogram;

use crate::report::{DeliveryFigures, ms, round3};

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 280.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 44.0;

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1000px}\
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}\
table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;\
text-align:left;vertical-align:top}th{background:#f3f3f3;font-weight:600}\
td.num{text-align:right;font-variant-numeric:tabular-nums}\
svg{background:#fff;border:1px solid #ddd;margin:0.5em 0;display:block}\
.charts{display:flex;flex-wrap:wrap;gap:1em}.wide{overflow-x:auto}.headline{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:0.6em 1em;margin:1em 0}.headline p{font-size:1.1em;margin:0.2em 0 0.6em}.figures{display:flex;flex-wrap:wrap;gap:0.6em 1.6em}.figure .value{display:block;font-size:1.5em;font-weight:600;font-variant-numeric:tabular-nums}.figure .label{color:#555;font-size:0.85em}.bad .value{color:#d62728}";

/// One number of a headline: the result's key it comes from, a short label, its value (as the
/// JSON has it: a number, or null when not measured), and whether it is bad news (shown red
/// when it is above 0).
pub struct Figure<'a> {
    pub key: &'a str,
    pub label: &'a str,
    pub value: Value,
    pub bad_above_zero: bool,
}

impl Figure<'_> {
    /// `key`'s value in `result` (serialised as for the JSON), null if it has none.
    pub fn of<'a>(result: &Value, key: &'a str, label: &'a str) -> Figure<'a> {
        Figure {
            key,
            label,
            value: result.get(key).cloned().unwrap_or(Value::Null),
            bad_above_zero: false,
        }
    }

    /// The same, red when above 0 (losses, failures).
    pub fn bad<'a>(result: &Value, key: &'a str, label: &'a str) -> Figure<'a> {
        Figure {
            bad_above_zero: true,
            ..Figure::of(result, key, label)
        }
    }
}

/// One line of a chart: its name, colour and (x, y) points.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// A report page being built: a title, tables and sections of charts.
pub struct Page {
    html: String,
}

impl Page {
    /// A page titled after `scenario`.
    pub fn new(scenario: &str) -> Page {
        let title = escape(&format!("switchboard-loadtest {scenario}"));
        Page {
            html: format!(
                "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
                 <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n"
            ),
        }
    }

    /// The Parameters and Summary tables of `result` (serialised as for the JSON): the keys
    /// `is_parameter` picks go to the first, the others to the second, except per-second series
    /// (`*_by_second`, which charts show). A list of objects (per worker, per server) gets a
    /// table of its own.
    pub fn result_tables(
        &mut self,
        result: &impl Serialize,
        is_parameter: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let result = serde_json::to_value(result)?;
        let empty = serde_json::Map::new();
        let all = result.as_object().unwrap_or(&empty);
        let is_rows = |value: &Value| {
            value
                .as_array()
                .is_some_and(|items| !items.is_empty() && items.iter().all(Value::is_object))
        };
        let parameters: Vec<(&String, &Value)> = all
            .iter()
            .filter(|(key, value)| is_parameter(key) && !is_rows(value))
            .collect();
        let summary: Vec<(&String, &Value)> = all
            .iter()
            .filter(|(key, value)| {
                !is_parameter(key) && !key.ends_with("_by_second") && !is_rows(value)
            })
            .collect();
        self.html.push_str("<h2>Parameters</h2>\n");
        self.html.push_str(&table(&parameters));
        self.html.push_str("<h2>Summary</h2>\n");
        self.html.push_str(&table(&summary));
        for (key, value) in all.iter().filter(|(_, value)| is_rows(value)) {
            let _ = writeln!(self.html, "<h2>{}</h2>", escape(key));
            self.html.push_str("<div class=\"wide\">\n");
            self.html.push_str(&rows_table(
                value.as_array().map(Vec::as_slice).unwrap_or(&[]),
            ));
            self.html.push_str("</div>\n");
        }
        Ok(())
    }

    /// The headline a report opens with: one sentence, then its key figures large, each
    /// marked with the result key it shows (`data-key`) and its exact value (`data-value`).
    pub fn headline(&mut self, sentence: &str, figures: &[Figure<'_>]) {
        let _ = writeln!(
            self.html,
            "<section class=\"headline\">\n<p>{}</p>\n<div class=\"figures\">",
            escape(sentence)
        );
        for figure in figures {
            let bad =
                figure.bad_above_zero && figure.value.as_f64().is_some_and(|value| value > 0.0);
            let _ = writeln!(
                self.html,
                "<div class=\"figure{}\" data-key=\"{}\" data-value=\"{}\">\
                 <span class=\"value\">{}</span><span class=\"label\">{}</span></div>",
                if bad { " bad" } else { "" },
                escape(figure.key),
                escape(&figure.value.to_string()),
                escape(&value_text(&figure.value)),
                escape(figure.label)
            );
        }
        self.html.push_str("</div>\n</section>\n");
    }

    /// Raw HTML the caller built (escaped already).
    pub fn push_html(&mut self, html: &str) {
        self.html.push_str(html);
    }

    /// A heading and its charts side by side.
    pub fn section(&mut self, heading: &str, charts: &[String]) {
        let _ = writeln!(
            self.html,
            "<h2>{}</h2>\n<div class=\"charts\">",
            escape(heading)
        );
        for chart in charts {
            self.html.push_str(chart);
        }
        self.html.push_str("</div>\n");
    }

    /// The two sections of the `direct` reports: the send-to-delivery latency (`bars` are p50,
    /// p90, p99, p99.9 and max) and the messages sent and delivered in each second.
    pub fn direct_sections(
        &mut self,
        latency_title: &str,
        bars: [f64; 5],
        percentiles: &[(f64, f64)],
        sent_by_second: &[u64],
        delivered_by_second: &[u64],
    ) {
        self.section(
            "Latency distribution",
            &[
                latency_bars(latency_title, bars),
                percentile_chart("Latency by percentile (ms)", percentiles),
            ],
        );
        self.section(
            "Throughput",
            &[line_chart(
                "Messages per second",
                "second since sending started",
                &[
                    Series {
                        name: "sent",
                        color: BLUE,
                        points: counts_by_second(sent_by_second),
                    },
                    Series {
                        name: "delivered",
                        color: GREEN,
                        points: counts_by_second(delivered_by_second),
                    },
                ],
                None,
            )],
        );
    }

    pub fn finish(mut self) -> String {
        self.html.push_str("</body>\n</html>\n");
        self.html
    }

    pub fn write(self, path: &Path) -> Result<()> {
        std::fs::write(path, self.finish())?;
        Ok(())
    }
}

/// Writes the report of `result` (a scenario's result, serialised as for the JSON) whose
/// delivery figures are `figures`, titled after `scenario`, to `path`.
pub fn write(
    path: &Path,
    scenario: &str,
    result: &impl Serialize,
    figures: &DeliveryFigures,
) -> Result<()> {
    std::fs::write(path, render(scenario, result, figures)?)?;
    Ok(())
}

fn render(scenario: &str, result: &impl Serialize, figures: &DeliveryFigures) -> Result<String> {
    let figure_values = serde_json::to_value(figures)?;
    let empty = serde_json::Map::new();
    let figure_keys = figure_values.as_object().unwrap_or(&empty);
    let mut page = Page::new(scenario);
    let all = serde_json::to_value(result)?;
    page.headline(
        &delivery_sentence(&all),
        &[
            Figure::of(&all, "delivered_per_sec", "delivered/s"),
            Figure::of(&all, "published_per_sec", "published/s"),
            Figure::of(&all, "latency_ms_p50", "p50 ms"),
            Figure::of(&all, "latency_ms_p99", "p99 ms"),
            Figure::bad(&all, "lost", "lost"),
            Figure::bad(&all, "duplicates", "duplicates"),
            Figure::bad(&all, "subscribers_closed_early", "subscribers closed"),
            Figure::of(
                &all,
                "server_cpu_secs_per_million_deliveries",
                "server CPU-s per 1M deliveries",
            ),
            Figure::of(&all, "wire_bytes_per_delivery", "wire bytes per delivery"),
        ],
    );
    page.result_tables(result, |key| !figure_keys.contains_key(key))?;
    page.section(
        "Latency distribution",
        &[
            latency_bars(
                "End-to-end latency (ms)",
                [
                    figures.latency_ms_p50,
                    figures.latency_ms_p90,
                    figures.latency_ms_p99,
                    figures.latency_ms_p999,
                    figures.latency_ms_max,
                ],
            ),
            percentile_chart("Latency by percentile (ms)", &figures.latency_percentiles),
        ],
    );
    page.section(
        "Over the measured window",
        &[
            line_chart(
                "Latency per second, by send time (ms)",
                "second of the window",
                &[
                    Series {
                        name: "p50",
                        color: GREEN,
                        points: by_second(&figures.latency_ms_p50_by_second),
                    },
                    Series {
                        name: "p99",
                        color: ORANGE,
                        points: by_second(&figures.latency_ms_p99_by_second),
                    },
                    Series {
                        name: "max",
                        color: RED,
                        points: by_second(&figures.latency_ms_max_by_second),
                    },
                ],
                None,
            ),
            line_chart(
                "Delivered messages per second",
                "second of the window",
                &[Series {
                    name: "delivered",
                    color: BLUE,
                    points: counts_by_second(&figures.delivered_by_second),
                }],
                None,
            ),
            line_chart(
                "Open subscriber connections",
                "second of the window",
                &[Series {
                    name: "connections",
                    color: PURPLE,
                    points: counts_by_second(&figures.connections_by_second),
                }],
                None,
            ),
        ],
    );
    Ok(page.finish())
}

/// A result's numbers (serialised as for the JSON), as a headline sentence shows them; a key
/// the result lacks (or holds null) reads 0.
pub struct Numbers<'a>(pub &'a Value);

impl Numbers<'_> {
    pub fn get(&self, key: &str) -> f64 {
        self.0.get(key).and_then(Value::as_f64).unwrap_or(0.0)
    }

    /// Rounded to a whole number, with thousands separators.
    pub fn whole(&self, key: &str) -> String {
        thousands(self.get(key).round() as u64)
    }

    /// As an axis label: up to two decimals.
    pub fn short(&self, key: &str) -> String {
        label(self.get(key))
    }

    /// The end of a headline sentence: what was lost (`lost_key`) and how many of `who` were
    /// closed early (`closed_key`, left out when none were), then a full stop.
    pub fn losses(&self, lost_key: &str, closed_key: &str, who: &str) -> String {
        let mut clause = match self.get(lost_key) as u64 {
            0 => "nothing lost".to_owned(),
            lost => format!("{} lost", thousands(lost)),
        };
        let closed = self.get(closed_key) as u64;
        if closed > 0 {
            let _ = write!(clause, ", {} {who} closed early", thousands(closed));
        }
        clause.push('.');
        clause
    }
}

/// What a publish/subscribe run did, in one sentence: deliveries received against those
/// expected, to how many subscribers, how fast, and what was lost.
fn delivery_sentence(result: &Value) -> String {
    let numbers = Numbers(result);
    format!(
        "{} of {} expected deliveries to {} subscribers ({} published/s); {} delivered/s in the \
         {}s window, p99 {} ms; {}",
        numbers.whole("received_total"),
        numbers.whole("expected_deliveries_total"),
        numbers.whole("subscribers"),
        numbers.short("published_per_sec"),
        numbers.whole("delivered_per_sec"),
        numbers.whole("duration_secs"),
        numbers.short("latency_ms_p99"),
        numbers.losses("lost", "subscribers_closed_early", "subscribers"),
    )
}

/// An integer with thousands separators.
pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

pub const BLUE: &str = "#1f77b4";
pub const GREEN: &str = "#2ca02c";
pub const ORANGE: &str = "#ff7f0e";
pub const RED: &str = "#d62728";
pub const PURPLE: &str = "#9467bd";

/// Per-second values as (second, value) points.
pub fn by_second(values: &[f64]) -> Vec<(f64, f64)> {
    values
        .iter()
        .enumerate()
        .map(|(second, value)| (second as f64, *value))
        .collect()
}

/// Per-second counts as (second, count) points.
pub fn counts_by_second(values: &[u64]) -> Vec<(f64, f64)> {
    values
        .iter()
        .enumerate()
        .map(|(second, value)| (second as f64, *value as f64))
        .collect()
}

/// A bar chart of p50, p90, p99, p99.9 and max, in milliseconds.
pub fn latency_bars(title: &str, [p50, p90, p99, p999, max]: [f64; 5]) -> String {
    bar_chart(
        title,
        "ms",
        &[
            ("p50", p50),
            ("p90", p90),
            ("p99", p99),
            ("p99.9", p999),
            ("max", max),
        ],
    )
}

/// The distribution of a histogram of microseconds as (percentile, milliseconds) points.
pub fn percentile_curve(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    histogram
        .iter_quantiles(2)
        .map(|step| {
            (
                round3(step.quantile_iterated_to() * 100.0),
                ms(step.value_iterated_to()),
            )
        })
        .collect()
}

/// A value-by-percentile curve: x is -log10(1 - q), so 90% is 1, 99% is 2, 99.9% is 3.
pub fn percentile_chart(title: &str, percentiles: &[(f64, f64)]) -> String {
    let curve: Vec<(f64, f64)> = percentiles
        .iter()
        .filter(|(percentile, _)| *percentile < 100.0)
        .map(|&(percentile, value)| (-(1.0 - percentile / 100.0).log10(), value))
        .collect();
    let curve_ticks = [
        (0.0, "0%"),
        (0.301, "50%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
        (5.0, "99.999%"),
    ];
    let curve_max = curve.iter().map(|point| point.0).fold(1.0, f64::max).ceil();
    let ticks: Vec<(f64, String)> = curve_ticks
        .iter()
        .filter(|(x, _)| *x <= curve_max)
        .map(|(x, label)| (*x, (*label).to_owned()))
        .collect();
    line_chart(
        title,
        "percentile",
        &[Series {
            name: "value",
            color: BLUE,
            points: curve,
        }],
        Some(ticks),
    )
}

/// Counts of `values` in `buckets` equal ranges from 0 to their maximum, as a bar chart whose
/// bars are labelled with each range's upper end.
pub fn distribution_chart(title: &str, unit: &str, values: &[f64], buckets: usize) -> String {
    let top = nice_ceiling(values.iter().copied().fold(0.0, f64::max));
    let width = top / buckets.max(1) as f64;
    let mut counts = vec![0u64; buckets.max(1)];
    for value in values {
        let bucket = ((value / width).ceil() as usize)
            .saturating_sub(1)
            .min(counts.len() - 1);
        counts[bucket] += 1;
    }
    let labels: Vec<String> = (1..=counts.len())
        .map(|bucket| format!("≤{}", label(width * bucket as f64)))
        .collect();
    let bars: Vec<(&str, f64)> = labels
        .iter()
        .zip(&counts)
        .map(|(label, count)| (label.as_str(), *count as f64))
        .collect();
    bar_chart(&format!("{title} ({unit})"), "", &bars)
}

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn table(rows: &[(&String, &Value)]) -> String {
    let mut html = String::from("<table>\n");
    for (key, value) in rows {
        let class = if value.is_number() {
            " class=\"num\""
        } else {
            ""
        };
        let _ = writeln!(
            html,
            "<tr><th>{}</th><td{class}>{}</td></tr>",
            escape(key),
            escape(&value_text(value))
        );
    }
    html.push_str("</table>\n");
    html
}

/// A list of objects as a table, one row each, a column per key.
fn rows_table(rows: &[Value]) -> String {
    let mut columns: Vec<&String> = Vec::new();
    for row in rows {
        for key in row.as_object().into_iter().flat_map(|object| object.keys()) {
            if !columns.contains(&key) {
                columns.push(key);
            }
        }
    }
    let mut html = String::from("<table>\n<tr>");
    for column in &columns {
        let _ = write!(html, "<th>{}</th>", escape(column));
    }
    html.push_str("</tr>\n");
    for row in rows {
        html.push_str("<tr>");
        for column in &columns {
            let value = row.get(column.as_str()).unwrap_or(&Value::Null);
            let class = if value.is_number() {
                " class=\"num\""
            } else {
                ""
            };
            let _ = write!(html, "<td{class}>{}</td>", escape(&value_text(value)));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    html
}

fn value_text(value: &Value) -> String {
    match value {
        Value::Null => "–".to_owned(),
        Value::String(text) => text.clone(),
        Value::Array(items) => items.iter().map(value_text).collect::<Vec<_>>().join(", "),
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| match value {
                Value::Object(_) => format!("{key}: {{{}}}", value_text(value)),
                _ => format!("{key}: {}", value_text(value)),
            })
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

/// A number to show on an axis or a bar.
fn label(value: f64) -> String {
    if value == 0.0 {
        "0".to_owned()
    } else if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 1.0 {
        format!("{}", (value * 100.0).round() / 100.0)
    } else {
        format!("{}", (value * 1000.0).round() / 1000.0)
    }
}

/// A round upper bound of an axis at or above `max`.
fn nice_ceiling(max: f64) -> f64 {
    if !max.is_finite() || max <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if max <= step * magnitude {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn svg_open(title: &str) -> String {
    format!(
        "<svg width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" \
         aria-label=\"{0}\" font-size=\"11\" font-family=\"system-ui,sans-serif\">\n\
         <text x=\"{LEFT}\" y=\"18\" font-size=\"13\" font-weight=\"600\">{0}</text>\n",
        escape(title)
    )
}

/// The y axis from 0 to `top`, with grid lines.
fn y_axis(top: f64) -> String {
    let mut svg = String::new();
    let plot_height = HEIGHT - TOP - BOTTOM;
    for tick in 0..=4 {
        let value = top * tick as f64 / 4.0;
        let y = HEIGHT - BOTTOM - plot_height * tick as f64 / 4.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            escape(&label(value))
        );
    }
    let _ = writeln!(
        svg,
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{:.1}\" stroke=\"#888\"/>\
         <line x1=\"{LEFT}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#888\"/>",
        HEIGHT - BOTTOM,
        WIDTH - RIGHT
    );
    svg
}

/// Bars of `(name, value)`; `unit` follows each value in its tooltip.
pub fn bar_chart(title: &str, unit: &str, bars: &[(&str, f64)]) -> String {
    let mut svg = svg_open(title);
    let top = nice_ceiling(bars.iter().map(|bar| bar.1).fold(0.0, f64::max));
    svg.push_str(&y_axis(top));
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let slot = plot_width / bars.len().max(1) as f64;
    for (index, (name, value)) in bars.iter().enumerate() {
        let height = plot_height * (value / top).clamp(0.0, 1.0);
        let x = LEFT + slot * index as f64 + slot * 0.2;
        let y = HEIGHT - BOTTOM - height;
        let _ = writeln!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{height:.1}\" fill=\"#1f77b4\">\
             <title>{1}: {2} {6}</title></rect>\
             <text x=\"{3:.1}\" y=\"{4:.1}\" text-anchor=\"middle\">{2}</text>\
             <text x=\"{3:.1}\" y=\"{5:.1}\" text-anchor=\"middle\">{1}</text>",
            slot * 0.6,
            escape(name),
            escape(&label(*value)),
            x + slot * 0.3,
            y - 4.0,
            HEIGHT - BOTTOM + 16.0,
            escape(unit)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Bars in groups (`groups`, labelled along the x axis), one bar per series in each group, the
/// series told apart by colour and a legend; a missing value leaves its slot empty. Each bar
/// carries its series, group and value as `data-series`, `data-group` and `data-value`.
pub fn grouped_bar_chart(
    title: &str,
    unit: &str,
    groups: &[String],
    series: &[(&str, &str, Vec<Option<f64>>)],
) -> String {
    let mut svg = svg_open(title);
    let top = nice_ceiling(
        series
            .iter()
            .flat_map(|(_, _, values)| values.iter().flatten())
            .copied()
            .fold(0.0, f64::max),
    );
    svg.push_str(&y_axis(top));
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let group_width = plot_width / groups.len().max(1) as f64;
    let bar_width = group_width * 0.8 / series.len().max(1) as f64;
    for (group_index, group) in groups.iter().enumerate() {
        let group_x = LEFT + group_width * group_index as f64;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            group_x + group_width / 2.0,
            HEIGHT - BOTTOM + 16.0,
            escape(group)
        );
        for (series_index, (name, color, values)) in series.iter().enumerate() {
            let Some(value) = values.get(group_index).copied().flatten() else {
                continue;
            };
            let height = plot_height * (value / top).clamp(0.0, 1.0);
            let x = group_x + group_width * 0.1 + bar_width * series_index as f64;
            let y = HEIGHT - BOTTOM - height;
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{0:.1}\" height=\"{height:.1}\" \
                 fill=\"{6}\" data-series=\"{1}\" data-group=\"{2}\" data-value=\"{3}\">\
                 <title>{1}, {2}: {4} {5}</title></rect>",
                bar_width * 0.9,
                escape(name),
                escape(group),
                value,
                escape(&label(value)),
                escape(unit),
                escape(color),
            );
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">{}</text>",
                x + bar_width * 0.45,
                y - 3.0,
                escape(&label(value))
            );
        }
    }
    if series
        .iter()
        .all(|(_, _, values)| values.iter().all(Option::is_none))
    {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#888\">no data</text>",
            LEFT + plot_width / 2.0,
            TOP + plot_height / 2.0
        );
    }
    // The legend in one row under the group labels, where it covers no bar.
    let legend_y = HEIGHT - 8.0;
    let mut legend_x = LEFT;
    for (name, color, _) in series {
        let _ = writeln!(
            svg,
            "<rect x=\"{legend_x:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{legend_y:.1}\" font-size=\"10\">{}</text>",
            legend_y - 9.0,
            escape(color),
            legend_x + 14.0,
            escape(name)
        );
        legend_x += 24.0 + 6.0 * name.chars().count() as f64;
    }
    svg.push_str("</svg>\n");
    svg
}

/// Lines over a shared x axis from the smallest to the largest x; `x_ticks` labels it, or
/// (without) about ten evenly spaced values do.
pub fn line_chart(
    title: &str,
    x_title: &str,
    series: &[Series<'_>],
    x_ticks: Option<Vec<(f64, String)>>,
) -> String {
    let mut svg = svg_open(title);
    let points = || series.iter().flat_map(|line| line.points.iter());
    let y_top = nice_ceiling(points().map(|point| point.1).fold(0.0, f64::max));
    let x_min = points().map(|point| point.0).fold(f64::INFINITY, f64::min);
    let x_min = if x_min.is_finite() {
        x_min.min(0.0)
    } else {
        0.0
    };
    let x_max = points()
        .map(|point| point.0)
        .fold(f64::NEG_INFINITY, f64::max)
        .max(x_min + 1.0);
    let x_max = match &x_ticks {
        Some(ticks) => ticks.iter().map(|tick| tick.0).fold(x_max, f64::max),
        None => x_max,
    };
    svg.push_str(&y_axis(y_top));
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let x_of = |x: f64| LEFT + plot_width * (x - x_min) / (x_max - x_min);
    let y_of = |y: f64| HEIGHT - BOTTOM - plot_height * (y / y_top).clamp(0.0, 1.0);

    let ticks = x_ticks.unwrap_or_else(|| {
        let step = nice_ceiling((x_max - x_min) / 10.0).max(1.0);
        let mut ticks = Vec::new();
        // From the first multiple of the step, so an axis starting below 0 still labels 0.
        let mut x = (x_min / step).ceil() * step;
        while x <= x_max + 1e-9 {
            ticks.push((x, label(x)));
            x += step;
        }
        ticks
    });
    for (x, text) in &ticks {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x_of(*x),
            HEIGHT - BOTTOM + 14.0,
            escape(text)
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{}</text>",
        LEFT + plot_width / 2.0,
        HEIGHT - 8.0,
        escape(x_title)
    );
    if series.iter().all(|line| line.points.is_empty()) {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#888\">no data</text>",
            LEFT + plot_width / 2.0,
            TOP + plot_height / 2.0
        );
    }
    for (index, line) in series.iter().enumerate() {
        let path: Vec<String> = line
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", x_of(x), y_of(y)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{0}\" stroke-width=\"2\" points=\"{1}\">\
             <title>{2}</title></polyline>",
            escape(line.color),
            path.join(" "),
            escape(line.name)
        );
        if line.points.len() <= 120 {
            for &(x, y) in &line.points {
                let _ = writeln!(
                    svg,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{}\">\
                     <title>{}: {} at {}</title></circle>",
                    x_of(x),
                    y_of(y),
                    escape(line.color),
                    escape(line.name),
                    escape(&label(y)),
                    escape(&label(x))
                );
            }
        }
        // Legend, top right.
        let legend_x = WIDTH - RIGHT - 90.0 * (series.len() - index) as f64;
        let _ = writeln!(
            svg,
            "<rect x=\"{legend_x:.1}\" y=\"10\" width=\"12\" height=\"3\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"15\">{}</text>",
            escape(line.color),
            legend_x + 16.0,
            escape(line.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Reading a report's headline back, for the scenarios' tests.
#[cfg(test)]
pub mod read_back {
    use serde_json::Value;

    /// A page's headline: its sentence, and each figure's result key and value (parsed from
    /// `data-value`), in order.
    pub fn headline(page: &str) -> (String, Vec<(String, Value)>) {
        let document = tl::parse(page, tl::ParserOptions::default()).expect("HTML");
        let parser = document.parser();
        let section = document
            .query_selector("section.headline")
            .expect("a selector")
            .next()
            .and_then(|handle| handle.get(parser))
            .expect("a headline");
        let sentence = section
            .as_tag()
            .and_then(|tag| tag.query_selector(parser, "p")?.next()?.get(parser))
            .map(|p| p.inner_text(parser).into_owned())
            .expect("a sentence");
        let figures = document
            .query_selector(".figure")
            .expect("a selector")
            .filter_map(|handle| handle.get(parser)?.as_tag())
            .map(|figure| {
                let attribute = |name: &str| {
                    figure
                        .attributes()
                        .get(name)
                        .flatten()
                        .map(|value| value.as_utf8_str().into_owned())
                        .unwrap_or_default()
                };
                let value = serde_json::from_str(&attribute("data-value")).expect("JSON");
                (attribute("data-key"), value)
            })
            .collect();
        (sentence, figures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(10.0), 10.0);
        assert_eq!(nice_ceiling(11.0), 20.0);
    }

    #[test]
    fn a_delivery_report_opens_with_its_headline_figures() {
        let figures = DeliveryFigures {
            published_per_sec: 200.0,
            delivered_per_sec: 399_330.5,
            latency_ms_p50: 25.15,
            latency_ms_p99: 63.39,
            expected_deliveries_total: 4_800_000,
            received_total: 4_794_297,
            lost: 5_703,
            subscribers_closed_early: 3,
            server_cpu_secs_per_million_deliveries: Some(2.64),
            ..DeliveryFigures::default()
        };
        #[derive(Serialize)]
        struct Run<'a> {
            subscribers: u64,
            duration_secs: u64,
            #[serde(flatten)]
            figures: &'a DeliveryFigures,
        }
        let run = Run {
            subscribers: 2000,
            duration_secs: 10,
            figures: &figures,
        };
        let page = render("fanout", &run, &figures).expect("a page");
        let (sentence, shown) = read_back::headline(&page);
        assert_eq!(
            sentence,
            "4,794,297 of 4,800,000 expected deliveries to 2,000 subscribers (200 published/s); \
             399,331 delivered/s in the 10s window, p99 63.39 ms; 5,703 lost, 3 subscribers \
             closed early."
        );
        let json = serde_json::to_value(&run).expect("JSON");
        assert_eq!(shown.len(), 9, "{shown:?}");
        for (key, value) in &shown {
            assert_eq!(value, &json[key.as_str()], "{key}");
        }
        assert!(
            shown
                .iter()
                .any(|(key, value)| key == "lost" && *value == 5703)
        );
        assert!(
            shown
                .iter()
                .any(|(key, value)| key == "wire_bytes_per_delivery" && value.is_null())
        );
        // Before the parameter tables.
        let headline_at = page.find("class=\"headline\"").expect("headline");
        let parameters_at = page.find("<h2>Parameters</h2>").expect("parameters");
        assert!(headline_at < parameters_at);
        assert!(page.contains("class=\"figure bad\" data-key=\"lost\""));
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(4_794_297), "4,794,297");
    }

    #[test]
    fn line_chart_without_points_still_draws() {
        let svg = line_chart("t<", "x", &[], None);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("t&lt;"));
        assert!(svg.contains("no data"));
    }
}
