//! `fanout --codec` with `--payload market` and `chat`, and `connect --codec`, against a real node
//! and Redis: every codec delivers everything, the bytes on the wire per delivery are what each
//! codec makes of the same ~1 KiB payload, the `--html` report opens with the JSON's own headline
//! figures, `compare --html` draws each run's figures in its charts, and idle connections open and
//! hold in every codec. The HTML is parsed (tl), not searched as text.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{assert_delivered_everything, field, headline, node, run_loadtest};
use serde_json::Value;
use switchboard_e2e::{NodeProcess, RedisProcess};

fn tmp(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("codecs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

fn attribute(tag: &tl::HTMLTag<'_>, name: &str) -> Option<String> {
    tag.attributes()
        .get(name)
        .flatten()
        .map(|value| value.as_utf8_str().into_owned())
}

/// The bars of the chart titled `title`: (series, group, value).
fn bars(page: &str, title: &str) -> Vec<(String, String, f64)> {
    let document = tl::parse(page, tl::ParserOptions::default()).expect("HTML");
    let parser = document.parser();
    let svg = document
        .query_selector("svg")
        .expect("a selector")
        .filter_map(|handle| handle.get(parser)?.as_tag())
        .find(|svg| attribute(svg, "aria-label").as_deref() == Some(title))
        .unwrap_or_else(|| panic!("no chart {title}"));
    svg.query_selector(parser, "rect[data-series]")
        .expect("a selector")
        .filter_map(|handle| handle.get(parser)?.as_tag())
        .map(|rect| {
            (
                attribute(rect, "data-series").expect("series"),
                attribute(rect, "data-group").expect("group"),
                attribute(rect, "data-value")
                    .and_then(|value| value.parse().ok())
                    .expect("a value"),
            )
        })
        .collect()
}

fn read(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("the --html file");
    let _ = std::fs::remove_file(path);
    text
}

#[tokio::test]
async fn every_codec_delivers_the_market_payload_and_the_pages_show_its_figures() {
    let redis = RedisProcess::start().await.expect("starting redis-server");
    let node = node("codecs", Some(&redis), &[]).await;
    let (rooms, subscribers, publishers, rate, duration_secs) = (2, 8, 2, 50, 2);
    let mut results = Vec::new();
    for codec in ["json", "msgpack", "json+deflate"] {
        let html = tmp(&format!("{codec}.html"));
        let args: Vec<String> = [
            "fanout",
            "--url",
            &node.ws_url(),
            &format!("--rooms={rooms}"),
            &format!("--subscribers={subscribers}"),
            &format!("--publishers={publishers}"),
            &format!("--rate={rate}"),
            &format!("--duration-secs={duration_secs}"),
            "--warmup-secs=1",
            "--drain-secs=5",
            "--setup-timeout-secs=30",
            "--codec",
            codec,
            "--payload",
            "market",
            &format!("--cpu-pid=node={}", node.pid()),
            "--html",
            &html.display().to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        let result = run_loadtest(
            &format!("codecs-{}", codec.replace('+', "-")),
            &args,
            Duration::from_secs(90),
        )
        .await;
        assert_eq!(result["codec"], codec, "{result:#}");
        assert_eq!(result["payload"], "market", "{result:#}");
        let subscribers_per_room = subscribers / rooms;
        assert_delivered_everything(
            &result,
            &[
                "lost",
                "duplicates",
                "epoch_mismatches",
                "publish_errors",
                "publish_unanswered",
                "subscribers_closed_early",
                "unexpected_frames",
            ],
            rate,
            duration_secs,
            subscribers_per_room,
        );
        assert_eq!(
            field(&result, "received_total"),
            field(&result, "published_total") * subscribers_per_room,
            "{result:#}"
        );
        let json_bytes = result["json_bytes_per_delivery"]
            .as_f64()
            .expect("JSON bytes");
        let wire_bytes = result["wire_bytes_per_delivery"]
            .as_f64()
            .expect("wire bytes");
        // The ~1 KiB payload in its `message` envelope.
        assert!(
            (1_000.0..1_500.0).contains(&json_bytes),
            "{json_bytes}: {result:#}"
        );
        match codec {
            // Text frames of 126 to 65,535 bytes: a 4-byte header each, nothing else.
            "json" => assert!((wire_bytes - json_bytes - 4.0).abs() < 0.01, "{result:#}"),
            // Binary maps: shorter than the JSON, not by much.
            "msgpack" => assert!(
                wire_bytes < json_bytes && wire_bytes > json_bytes / 2.0,
                "{result:#}"
            ),
            // Compressed frames (the flag byte says so; the harness inflated them to check
            // their offsets): well under the JSON.
            _ => assert!(wire_bytes < json_bytes / 2.0, "{result:#}"),
        }

        let page = read(&html);
        let (_, figures) = headline(&page);
        assert_eq!(figures.len(), 9, "{figures:?}");
        for (key, value) in &figures {
            assert_eq!(value, &result[key.as_str()], "{key} in the headline");
        }
        assert!(
            figures
                .iter()
                .any(|(key, value)| key == "wire_bytes_per_delivery" && value.is_f64())
        );
        let path = tmp(&format!("{codec}.json"));
        std::fs::write(&path, result.to_string()).expect("writing a result");
        results.push((path, result));
    }

    let page_path = tmp("compare.html");
    let status = Command::new(env!("CARGO_BIN_EXE_switchboard-loadtest"))
        .arg("compare")
        .arg("--html")
        .arg(&page_path)
        .args(results.iter().map(|(path, _)| path))
        .stdout(Stdio::null())
        .status()
        .expect("running compare");
    assert!(status.success());
    let page = read(&page_path);
    for (path, _) in &results {
        let _ = std::fs::remove_file(path);
    }
    let group = format!("{rate} msgs/s");
    let series = |codec: &str| match codec {
        "json" => "switchboard".to_owned(),
        codec => format!("switchboard {codec}"),
    };
    for (title, key) in [
        ("Deliveries per second", "delivered_per_sec"),
        ("p99 latency (ms)", "latency_ms_p99"),
        ("WebSocket bytes per delivery", "wire_bytes_per_delivery"),
        (
            "Server CPU-seconds per million deliveries",
            "server_cpu_secs_per_million_deliveries",
        ),
    ] {
        let mut drawn = bars(&page, title);
        drawn.sort_by(|a, b| a.0.cmp(&b.0));
        let mut expected: Vec<(String, String, f64)> = results
            .iter()
            .map(|(_, result)| {
                (
                    series(result["codec"].as_str().expect("codec")),
                    group.clone(),
                    result[key].as_f64().expect("a figure"),
                )
            })
            .collect();
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(drawn, expected, "{title}");
    }
    // No connect results: the memory chart is there, empty.
    assert!(bars(&page, "Server memory per idle connection (KiB)").is_empty());
}

/// A short `fanout` run on `node` in `codec`, publishing `payload`.
async fn fanout_run(node: &NodeProcess, codec: &str, payload: &str) -> Value {
    let args: Vec<String> = [
        "fanout",
        "--url",
        &node.ws_url(),
        "--rooms=2",
        "--subscribers=8",
        "--publishers=2",
        "--rate=50",
        "--duration-secs=2",
        "--warmup-secs=1",
        "--drain-secs=5",
        "--setup-timeout-secs=30",
        "--codec",
        codec,
        "--payload",
        payload,
    ]
    .map(str::to_owned)
    .to_vec();
    run_loadtest(
        &format!("{payload}-{}", codec.replace('+', "-")),
        &args,
        Duration::from_secs(90),
    )
    .await
}

#[tokio::test]
async fn the_chat_payload_is_delivered_and_deflate_shrinks_it() {
    let redis = RedisProcess::start().await.expect("starting redis-server");
    let node = node("codecs", Some(&redis), &[]).await;
    let mut wire = Vec::new();
    for codec in ["json", "json+deflate"] {
        let result = fanout_run(&node, codec, "chat").await;
        assert_eq!(result["payload"], "chat", "{result:#}");
        assert_delivered_everything(
            &result,
            &[
                "lost",
                "duplicates",
                "publish_errors",
                "subscribers_closed_early",
                "unexpected_frames",
            ],
            50,
            2,
            4,
        );
        let json_bytes = result["json_bytes_per_delivery"]
            .as_f64()
            .expect("JSON bytes");
        // The ~1 KiB chat message in its `message` envelope.
        assert!(
            (1_000.0..1_600.0).contains(&json_bytes),
            "{json_bytes}: {result:#}"
        );
        wire.push(
            result["wire_bytes_per_delivery"]
                .as_f64()
                .expect("wire bytes"),
        );
    }
    // Each message is compressed on its own (no dictionary shared between frames): ~1.3 KiB of
    // English prose, keys and URLs go in about 0.6 of the bytes.
    assert!(wire[1] < wire[0] * 0.75, "{wire:?}");
}

#[tokio::test]
async fn connect_holds_idle_connections_in_every_codec() {
    let redis = RedisProcess::start().await.expect("starting redis-server");
    let node = node("codecs", Some(&redis), &[]).await;
    let (connections, subscribe) = (20, 2);
    for codec in ["json", "msgpack", "json+deflate"] {
        let stored_before = node
            .metric(r#"switchboard_deflate_frames_total{result="stored"}"#)
            .await
            .expect("metrics");
        let args: Vec<String> = [
            "connect",
            "--url",
            &node.ws_url(),
            &format!("--connections={connections}"),
            "--rate=400",
            "--hold-secs=1",
            &format!("--subscribe={subscribe}"),
            "--codec",
            codec,
            &format!("--pid=node={}", node.pid()),
            "--timeout-secs=30",
        ]
        .map(str::to_owned)
        .to_vec();
        let result = run_loadtest(
            &format!("connect-{}", codec.replace('+', "-")),
            &args,
            Duration::from_secs(60),
        )
        .await;
        // A connection counts as open only once the node chose the offered subprotocol (the
        // handshake fails otherwise) and every subscribe reply decoded in that codec.
        assert_eq!(result["codec"], codec, "{result:#}");
        assert_eq!(
            field(&result, "connections_open"),
            connections,
            "{result:#}"
        );
        assert_eq!(
            field(&result, "connections_held"),
            connections,
            "{result:#}"
        );
        assert_eq!(field(&result, "failures"), 0, "{result:#}");
        let server = &result["servers"][0];
        assert_eq!(
            field(server, "sockets_after") - field(server, "sockets_before"),
            connections,
            "{result:#}"
        );
        // The node encoded each json+deflate session's subscribe replies in that codec (small
        // frames go stored), and no other codec's.
        let stored = node
            .metric(r#"switchboard_deflate_frames_total{result="stored"}"#)
            .await
            .expect("metrics")
            - stored_before;
        if codec == "json+deflate" {
            assert!(
                stored >= (connections * subscribe) as f64,
                "{stored} stored deflate frames"
            );
        } else {
            assert_eq!(stored, 0.0, "{codec}");
        }
    }
}

#[test]
fn a_codec_other_than_json_needs_switchboard_over_websocket() {
    for (scenario, extra) in [
        ("fanout", ["--codec", "msgpack", "--transport", "sse"]),
        ("fanout", ["--codec", "json+deflate", "--protocol", "raw"]),
        (
            "connect",
            ["--codec", "json+deflate", "--transport", "poll"],
        ),
        ("connect", ["--codec", "msgpack", "--protocol", "socketio"]),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_switchboard-loadtest"))
            .args([scenario, "--url", "ws://127.0.0.1:9/ws"])
            .args(extra)
            .output()
            .expect("running fanout");
        assert!(!output.status.success(), "{extra:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("--codec msgpack|json+deflate needs --protocol switchboard"),
            "{extra:?}: {stderr}"
        );
    }
}
