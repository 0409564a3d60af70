//! Unit tests of [`Options`] → [`Options::resolve`] / `validate`: defaults, precedence of flags
//! over the TOML file over defaults, and one test per validation rule (each error names its option).

use super::*;

use std::sync::atomic::{AtomicU64, Ordering};

/// A TOML file under the temp directory with a unique name, removed on drop (pass or fail).
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    fn new(contents: &str) -> TempFile {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "switchboard-config-test-{}-{}-{nanos}.toml",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
        ));
        std::fs::write(&path, contents).expect("write the temp config file");
        TempFile { path }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn resolve(options: Options) -> Config {
    match options.resolve() {
        Ok(config) => config,
        Err(error) => panic!("expected a valid configuration, got: {error}"),
    }
}

/// Resolves `options`, expecting an `Invalid` error for `option`, whose message names it.
#[track_caller]
fn expect_invalid(options: Options, option: &str) -> String {
    expect_invalid_naming(options, option, option)
}

/// Like [`expect_invalid`], but the error text must also name `named` (the option the user set,
/// which may differ from the option the error is filed under).
#[track_caller]
fn expect_invalid_naming(options: Options, option: &str, named: &str) -> String {
    let error = match options.resolve() {
        Ok(config) => panic!("expected an error about {option}, got {config:?}"),
        Err(error) => error,
    };
    let text = error.to_string();
    match &error {
        ConfigError::Invalid { option: got, .. } => {
            assert_eq!(*got, option, "error filed under the wrong option: {text}")
        }
        other => panic!("expected ConfigError::Invalid for {option}, got {other:?}"),
    }
    assert!(
        text.contains(named),
        "the error message does not name {named:?}: {text}"
    );
    assert!(!text.contains('\n'), "the error is not one line: {text:?}");
    text
}

fn parse(args: &[&str]) -> Options {
    let argv = std::iter::once("switchboard").chain(args.iter().copied());
    match Options::try_parse_from(argv) {
        Ok(options) => options,
        Err(error) => panic!("parsing {args:?} failed: {error}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Defaults

#[test]
fn defaults_listen_on_loopback_8080_and_9090() {
    let config = resolve(Options::default());
    assert_eq!(
        config.listen,
        "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        config.internal_listen,
        "127.0.0.1:9090".parse::<SocketAddr>().unwrap()
    );
}

#[test]
fn default_node_id_is_generated_and_unique() {
    let first = resolve(Options::default()).node_id;
    let second = resolve(Options::default()).node_id;
    for id in [&first, &second] {
        let suffix = id
            .strip_prefix("node-")
            .unwrap_or_else(|| panic!("generated node id {id:?} does not start with node-"));
        assert!(!suffix.is_empty(), "node id {id:?} has nothing after node-");
        assert!(
            !id.chars().any(char::is_whitespace) && id.len() <= 64,
            "generated node id {id:?} would not pass its own validation"
        );
    }
    assert_ne!(first, second, "two nodes got the same generated id");
}

#[test]
fn defaults_have_auth_off_and_the_embedded_broker() {
    let config = resolve(Options::default());
    assert!(
        config.jwt.is_none(),
        "auth is on by default: {:?}",
        config.jwt
    );
    assert!(config.api_key.is_none());
    assert!(config.allowed_origins.is_none());
    assert!(config.redis.is_none());
}

#[test]
fn defaults_of_the_numeric_options() {
    let config = resolve(Options::default());
    assert_eq!(config.heartbeat, Duration::from_millis(25_000));
    assert_eq!(config.idle_timeout, Duration::from_millis(60_000));
    assert_eq!(config.drain_grace, Duration::from_millis(10_000));
    assert_eq!(config.handshake_timeout, Duration::from_millis(10_000));
    assert_eq!(config.max_message_size, 1 << 20);
    assert_eq!(config.max_queue_bytes, 4 << 20);
    assert_eq!(config.max_subscriptions, 128);
    assert_eq!(config.rate_limit, 100);
    assert_eq!(config.rate_limit_burst, 200);
    assert_eq!(config.rate_limit_strikes, 50);
    assert_eq!(config.max_bad_frames, 10);
    assert_eq!(config.history_size, 100);
    assert_eq!(config.history_ttl, Duration::from_secs(300));
    assert_eq!(config.stream_ttl, Duration::from_secs(86_400));
    assert_eq!(config.room_linger, Duration::from_millis(2_000));
    assert_eq!(config.read_buffer_size, 1024);
    assert_eq!(config.write_buffer_size, 4096);
    assert_eq!(config.log_format, LogFormat::Text);
    assert_eq!(config.log, "info");
    assert!(config.max_connections >= 1);
    assert_eq!(config.max_connections_per_ip, 1000);
    assert_eq!(config.connect_rate_per_ip, 50);
    assert_eq!(config.connect_burst_per_ip, 200);
    assert_eq!(config.accept_rate, 2000);
    assert_eq!(config.accept_burst, 1000);
    assert_eq!(
        config.internal_header_timeout,
        Duration::from_millis(10_000)
    );
    assert_eq!(config.internal_max_connections, 256);
}

#[test]
fn explicit_values_are_kept() {
    let config = resolve(Options {
        listen: Some("0.0.0.0:1234".parse().unwrap()),
        internal_listen: Some("127.0.0.1:4321".parse().unwrap()),
        node_id: Some("node-a".into()),
        max_connections: Some(7),
        heartbeat_ms: Some(1000),
        idle_timeout_ms: Some(1001),
        drain_grace_ms: Some(0),
        log_format: Some(LogFormat::Json),
        log: Some("switchboard=debug,warn".into()),
        ..Options::default()
    });
    assert_eq!(config.listen.to_string(), "0.0.0.0:1234");
    assert_eq!(config.internal_listen.to_string(), "127.0.0.1:4321");
    assert_eq!(config.node_id, "node-a");
    assert_eq!(config.max_connections, 7);
    assert_eq!(config.heartbeat, Duration::from_millis(1000));
    assert_eq!(config.idle_timeout, Duration::from_millis(1001));
    assert_eq!(config.drain_grace, Duration::ZERO);
    assert_eq!(config.log_format, LogFormat::Json);
    assert_eq!(config.log, "switchboard=debug,warn");
}

// ---------------------------------------------------------------------------------------------
// The TOML file

#[test]
fn the_file_wins_over_defaults() {
    let file = TempFile::new(
        r#"
listen = "127.0.0.1:18080"
internal-listen = "127.0.0.1:19090"
node-id = "from-file"
heartbeat-ms = 5000
idle-timeout-ms = 15000
max-connections = 5000
allowed-origins = ["https://app.example.com/", "https://admin.example.com"]
log-format = "json"
log = "debug"
"#,
    );
    let config = resolve(Options {
        config: Some(file.path.clone()),
        ..Options::default()
    });
    assert_eq!(config.listen.to_string(), "127.0.0.1:18080");
    assert_eq!(config.internal_listen.to_string(), "127.0.0.1:19090");
    assert_eq!(config.node_id, "from-file");
    assert_eq!(config.heartbeat, Duration::from_millis(5000));
    assert_eq!(config.idle_timeout, Duration::from_millis(15000));
    assert_eq!(config.max_connections, 5000);
    assert_eq!(
        config.allowed_origins,
        Some(vec![
            "https://app.example.com".to_owned(),
            "https://admin.example.com".to_owned()
        ])
    );
    assert_eq!(config.log_format, LogFormat::Json);
    assert_eq!(config.log, "debug");
    // Options the file leaves out keep their defaults.
    assert_eq!(config.drain_grace, Duration::from_millis(10_000));
    assert!(config.jwt.is_none());
}

#[test]
fn flags_win_over_the_file() {
    let file = TempFile::new(
        r#"
node-id = "from-file"
heartbeat-ms = 5000
idle-timeout-ms = 15000
drain-grace-ms = 2500
"#,
    );
    let config = resolve(Options {
        config: Some(file.path.clone()),
        node_id: Some("from-flag".into()),
        heartbeat_ms: Some(1000),
        ..Options::default()
    });
    assert_eq!(config.node_id, "from-flag");
    assert_eq!(config.heartbeat, Duration::from_millis(1000));
    // Not given as flags: the file's values.
    assert_eq!(config.idle_timeout, Duration::from_millis(15000));
    assert_eq!(config.drain_grace, Duration::from_millis(2500));
}

#[test]
fn flags_parsed_by_clap_win_over_the_file() {
    let file = TempFile::new("node-id = \"from-file\"\nrate-limit = 7\nhistory-size = 9\n");
    let path = file.path.to_str().expect("utf-8 temp path").to_owned();
    let config = resolve(parse(&[
        "--config",
        &path,
        "--node-id",
        "from-flag",
        "--rate-limit",
        "3",
    ]));
    assert_eq!(config.node_id, "from-flag");
    assert_eq!(config.rate_limit, 3);
    assert_eq!(config.history_size, 9);
}

#[test]
fn the_file_is_validated_like_flags() {
    let file = TempFile::new("heartbeat-ms = 1000\nidle-timeout-ms = 500\n");
    expect_invalid(
        Options {
            config: Some(file.path.clone()),
            ..Options::default()
        },
        "idle-timeout-ms",
    );
    // A flag can repair what the file got wrong: the merged result is validated.
    let config = resolve(Options {
        config: Some(file.path.clone()),
        idle_timeout_ms: Some(3000),
        ..Options::default()
    });
    assert_eq!(config.idle_timeout, Duration::from_millis(3000));
}

#[test]
fn unknown_keys_in_the_file_are_an_error() {
    let file = TempFile::new("node-id = \"a\"\nmax-connection = 5\n");
    let error = Options {
        config: Some(file.path.clone()),
        ..Options::default()
    }
    .resolve()
    .expect_err("a misspelt key must not be ignored");
    let text = error.to_string();
    assert!(
        matches!(error, ConfigError::ParseFile { .. }),
        "expected ParseFile, got {error:?}"
    );
    assert!(
        text.contains("max-connection"),
        "the error does not name the unknown key: {text}"
    );
    assert!(
        text.contains(&file.path.display().to_string()),
        "the error does not name the file: {text}"
    );
}

#[test]
fn snake_case_keys_in_the_file_are_an_error() {
    // Keys are the long flag names: `max_connections` is not one of them.
    let file = TempFile::new("max_connections = 5\n");
    let error = Options {
        config: Some(file.path.clone()),
        ..Options::default()
    }
    .resolve()
    .expect_err("snake_case keys must not be ignored");
    assert!(matches!(error, ConfigError::ParseFile { .. }), "{error:?}");
}

#[test]
fn config_key_inside_the_file_is_an_error() {
    // `config` is skipped by serde, so it is not a key the file may set.
    let file = TempFile::new("config = \"/etc/other.toml\"\n");
    let error = Options {
        config: Some(file.path.clone()),
        ..Options::default()
    }
    .resolve()
    .expect_err("config inside the file must not be silently ignored");
    assert!(matches!(error, ConfigError::ParseFile { .. }), "{error:?}");
}

#[test]
fn a_wrongly_typed_value_in_the_file_is_an_error() {
    let file = TempFile::new("max-connections = \"many\"\n");
    let error = Options {
        config: Some(file.path.clone()),
        ..Options::default()
    }
    .resolve()
    .expect_err("a string for a number must fail");
    let text = error.to_string();
    assert!(matches!(error, ConfigError::ParseFile { .. }), "{error:?}");
    assert!(!text.contains('\n'), "not one line: {text:?}");
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let path = std::env::temp_dir().join(format!(
        "switchboard-config-test-missing-{}.toml",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let error = Options {
        config: Some(path.clone()),
        ..Options::default()
    }
    .resolve()
    .expect_err("a missing file must fail");
    assert!(matches!(error, ConfigError::ReadFile { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&path.display().to_string()),
        "{error}"
    );
}

#[test]
fn or_prefers_self_and_fills_the_gaps() {
    let flags = Options {
        node_id: Some("flag".into()),
        rate_limit: Some(1),
        ..Options::default()
    };
    let file = Options {
        node_id: Some("file".into()),
        rate_limit: Some(2),
        history_size: Some(3),
        api_key: Some("key".into()),
        ..Options::default()
    };
    let merged = flags.or(file);
    assert_eq!(merged.node_id.as_deref(), Some("flag"));
    assert_eq!(merged.rate_limit, Some(1));
    assert_eq!(merged.history_size, Some(3));
    assert_eq!(merged.api_key.as_deref(), Some("key"));
    assert_eq!(merged.heartbeat_ms, None);
}

// ---------------------------------------------------------------------------------------------
// Validation: each error names its option

#[test]
fn idle_timeout_must_exceed_heartbeat() {
    for idle in [500, 1000] {
        expect_invalid(
            Options {
                heartbeat_ms: Some(1000),
                idle_timeout_ms: Some(idle),
                ..Options::default()
            },
            "idle-timeout-ms",
        );
    }
    // Against the default heartbeat (25 s), too.
    expect_invalid(
        Options {
            idle_timeout_ms: Some(20_000),
            ..Options::default()
        },
        "idle-timeout-ms",
    );
    let config = resolve(Options {
        heartbeat_ms: Some(1000),
        idle_timeout_ms: Some(1001),
        ..Options::default()
    });
    assert!(config.idle_timeout > config.heartbeat);
}

#[test]
fn zero_durations_are_rejected() {
    expect_invalid(
        Options {
            heartbeat_ms: Some(0),
            ..Options::default()
        },
        "heartbeat-ms",
    );
    expect_invalid(
        Options {
            idle_timeout_ms: Some(0),
            ..Options::default()
        },
        "idle-timeout-ms",
    );
    expect_invalid(
        Options {
            handshake_timeout_ms: Some(0),
            ..Options::default()
        },
        "handshake-timeout-ms",
    );
    expect_invalid(
        Options {
            history_ttl_secs: Some(0),
            ..Options::default()
        },
        "history-ttl-secs",
    );
}

#[test]
fn inbox_limits_and_the_idempotency_window_must_be_positive() {
    let config = resolve(Options::default());
    assert_eq!(config.inbox_size, 1000);
    assert_eq!(config.inbox_ttl, Duration::from_secs(604_800));
    assert_eq!(config.idempotency_window, Duration::from_secs(300));
    for (options, option) in [
        (
            Options {
                inbox_size: Some(0),
                ..Options::default()
            },
            "inbox-size",
        ),
        (
            Options {
                inbox_ttl_secs: Some(0),
                ..Options::default()
            },
            "inbox-ttl-secs",
        ),
        (
            Options {
                idempotency_window_secs: Some(0),
                ..Options::default()
            },
            "idempotency-window-secs",
        ),
    ] {
        expect_invalid(options, option);
    }
}

#[test]
fn jwt_secret_must_be_at_least_16_bytes() {
    let text = expect_invalid(
        Options {
            jwt_secret: Some("x".repeat(15)),
            ..Options::default()
        },
        "jwt-secret",
    );
    assert!(
        !text.contains(&"x".repeat(15)),
        "the error leaks the secret: {text}"
    );
    let config = resolve(Options {
        jwt_secret: Some("x".repeat(16)),
        ..Options::default()
    });
    let jwt = config.jwt.expect("a secret turns auth on");
    assert!(matches!(jwt.key, JwtKey::Secret(ref secret) if secret.len() == 16));
    assert_eq!(jwt.algorithm, JwtAlgorithm::Hs256);
    assert_eq!(jwt.leeway, Duration::from_secs(30), "default leeway");
}

#[test]
fn jwt_secret_and_public_key_together_are_rejected() {
    let text = expect_invalid(
        Options {
            jwt_secret: Some("0123456789abcdef0123".into()),
            jwt_public_key: Some(PathBuf::from("/nonexistent/key.pem")),
            ..Options::default()
        },
        "jwt-secret",
    );
    assert!(
        text.contains("jwt-public-key"),
        "the error should mention both options: {text}"
    );
}

#[test]
fn jwt_leeway_is_at_most_60_seconds() {
    expect_invalid(
        Options {
            jwt_secret: Some("0123456789abcdef".into()),
            jwt_leeway_secs: Some(61),
            ..Options::default()
        },
        "jwt-leeway-secs",
    );
    let config = resolve(Options {
        jwt_secret: Some("0123456789abcdef".into()),
        jwt_leeway_secs: Some(60),
        ..Options::default()
    });
    assert_eq!(config.jwt.expect("auth on").leeway, Duration::from_secs(60));
}

#[test]
fn jwt_public_key_file_must_be_readable() {
    expect_invalid(
        Options {
            jwt_public_key: Some(PathBuf::from("/nonexistent/switchboard/key.pem")),
            ..Options::default()
        },
        "jwt-public-key",
    );
}

#[test]
fn jwt_algorithm_must_match_the_key() {
    expect_invalid(
        Options {
            jwt_secret: Some("0123456789abcdef".into()),
            jwt_algorithm: Some(JwtAlgorithm::Rs256),
            ..Options::default()
        },
        "jwt-algorithm",
    );
    let key = TempFile::new("-----BEGIN PUBLIC KEY-----\nnot really\n-----END PUBLIC KEY-----\n");
    expect_invalid(
        Options {
            jwt_public_key: Some(key.path.clone()),
            jwt_algorithm: Some(JwtAlgorithm::Hs256),
            ..Options::default()
        },
        "jwt-algorithm",
    );
}

#[test]
fn jwt_options_without_a_key_are_rejected() {
    expect_invalid(
        Options {
            jwt_algorithm: Some(JwtAlgorithm::Hs256),
            ..Options::default()
        },
        "jwt-algorithm",
    );
}

#[test]
fn jwt_issuer_or_audience_without_a_key_name_the_option_given() {
    // Someone who set only --jwt-issuer must be told about --jwt-issuer, not an option they
    // never touched.
    expect_invalid_naming(
        Options {
            jwt_issuer: Some("https://issuer.example".into()),
            ..Options::default()
        },
        "jwt-issuer",
        "jwt-issuer",
    );
    expect_invalid_naming(
        Options {
            jwt_audience: Some("switchboard".into()),
            ..Options::default()
        },
        "jwt-audience",
        "jwt-audience",
    );
}

#[test]
fn redis_must_list_redis_urls() {
    for bad in [
        "http://localhost:6379",
        "localhost:6379",
        "redis://a:1,tcp://b:2",
    ] {
        let text = expect_invalid(
            Options {
                redis: Some(bad.into()),
                ..Options::default()
            },
            "redis",
        );
        assert!(text.contains("redis"), "{text}");
    }
    for empty in ["", " , ,"] {
        expect_invalid(
            Options {
                redis: Some(empty.into()),
                ..Options::default()
            },
            "redis",
        );
    }
    let config = resolve(Options {
        redis: Some("redis://a:6379, rediss://b:6380 ,".into()),
        ..Options::default()
    });
    assert_eq!(
        config.redis,
        Some(vec![
            "redis://a:6379".to_owned(),
            "rediss://b:6380".to_owned()
        ])
    );
}

/// A self-signed CA certificate (EC P-256, valid until 2126), only ever parsed here.
const TEST_CA_PEM: &str = "\
-----BEGIN CERTIFICATE-----
MIIBoTCCAUegAwIBAgIUGTEFi5zv9QAdHdOSb3VROWXZUFkwCgYIKoZIzj0EAwIw
JTEjMCEGA1UEAwwac3dpdGNoYm9hcmQgY29uZmlnIHRlc3QgQ0EwIBcNMjYxMTIy
MDgxMjQwWhgPMjEyNjEwMjkwODEyNDBaMCUxIzAhBgNVBAMMGnN3aXRjaGJvYXJk
IGNvbmZpZyB0ZXN0IENBMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEJXNxO8CZ
ohmWBNeni9kjjDS39r5IBNzvo8rIJd2rNB0kPYxaKejwERdcMrbhxNOZM37JBDqF
+VW7XJgLDQxTnqNTMFEwHQYDVR0OBBYEFJomhRbVFaDP94D6JHORKvqkSQPXMB8G
A1UdIwQYMBaAFJomhRbVFaDP94D6JHORKvqkSQPXMA8GA1UdEwEB/wQFMAMBAf8w
CgYIKoZIzj0EAwIDSAAwRQIga9uxS7P9bRybv1TPe8gFqov8l/FvwEjgulil4lUg
+SkCIQCAclk4kgrjPCix31F1GWK8Whrx8O0le0+RG2kWIlCNsw==
-----END CERTIFICATE-----
";

#[test]
fn redis_ca_file_is_read_for_rediss_shards() {
    let ca = TempFile::new(TEST_CA_PEM);
    let config = resolve(Options {
        redis: Some("rediss://a:6380".into()),
        redis_ca_file: Some(ca.path.clone()),
        ..Options::default()
    });
    assert_eq!(config.redis_ca.as_deref(), Some(TEST_CA_PEM.as_bytes()));
    let path = ca.path.to_str().expect("utf-8 temp path");
    let file = TempFile::new(&format!(
        "redis = \"rediss://a:6380\"\nredis-ca-file = {path:?}\n"
    ));
    let config = resolve(Options {
        config: Some(file.path.clone()),
        ..Options::default()
    });
    assert!(
        config.redis_ca.is_some(),
        "the file key redis-ca-file is read"
    );
    let config = resolve(parse(&[
        "--redis",
        "rediss://a:6380",
        "--redis-ca-file",
        path,
    ]));
    assert!(
        config.redis_ca.is_some(),
        "the flag --redis-ca-file is read"
    );
    assert!(resolve(Options::default()).redis_ca.is_none());
}

#[test]
fn redis_ca_file_must_exist_and_hold_certificates() {
    let rediss = || Some("redis://a:6379,rediss://b:6380".to_owned());
    let text = expect_invalid(
        Options {
            redis: rediss(),
            redis_ca_file: Some(PathBuf::from("/nonexistent/switchboard/ca.pem")),
            ..Options::default()
        },
        "redis-ca-file",
    );
    assert!(text.contains("/nonexistent/switchboard/ca.pem"), "{text}");
    for contents in [
        "",
        "not a certificate\n",
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ] {
        let bad = TempFile::new(contents);
        expect_invalid(
            Options {
                redis: rediss(),
                redis_ca_file: Some(bad.path.clone()),
                ..Options::default()
            },
            "redis-ca-file",
        );
    }
    // Without a rediss:// shard the file could only be a mistake.
    let ca = TempFile::new(TEST_CA_PEM);
    for redis in [None, Some("redis://a:6379".to_owned())] {
        expect_invalid(
            Options {
                redis,
                redis_ca_file: Some(ca.path.clone()),
                ..Options::default()
            },
            "redis-ca-file",
        );
    }
}

#[test]
fn max_connections_must_be_at_least_one() {
    expect_invalid(
        Options {
            max_connections: Some(0),
            ..Options::default()
        },
        "max-connections",
    );
    assert_eq!(
        resolve(Options {
            max_connections: Some(1),
            ..Options::default()
        })
        .max_connections,
        1
    );
}

#[test]
fn read_buffer_size_must_be_in_range() {
    for bad in [0, 255, (1 << 20) + 1] {
        expect_invalid(
            Options {
                read_buffer_size: Some(bad),
                ..Options::default()
            },
            "read-buffer-size",
        );
    }
    for good in [256, 1 << 20] {
        assert_eq!(
            resolve(Options {
                read_buffer_size: Some(good),
                ..Options::default()
            })
            .read_buffer_size,
            good
        );
    }
}

#[test]
fn message_and_queue_sizes_have_minimums() {
    expect_invalid(
        Options {
            max_message_size: Some(255),
            ..Options::default()
        },
        "max-message-size",
    );
    expect_invalid(
        Options {
            max_queue_bytes: Some((2 << 20) - 1),
            ..Options::default()
        },
        "max-queue-bytes",
    );
    expect_invalid(
        Options {
            max_message_size: Some(4096),
            max_queue_bytes: Some(8191),
            ..Options::default()
        },
        "max-queue-bytes",
    );
    expect_invalid(
        Options {
            max_subscriptions: Some(0),
            ..Options::default()
        },
        "max-subscriptions",
    );
}

#[test]
fn the_queue_limit_follows_the_message_limit() {
    let config = resolve(Options {
        max_message_size: Some(4096),
        ..Options::default()
    });
    assert_eq!(config.max_queue_bytes, 4 * 4096);
    let config = resolve(Options {
        max_message_size: Some(4096),
        max_queue_bytes: Some(8192),
        ..Options::default()
    });
    assert_eq!(config.max_queue_bytes, 8192);
}

#[test]
fn rate_limit_tolerances_must_be_at_least_one() {
    expect_invalid(
        Options {
            rate_limit_burst: Some(0),
            ..Options::default()
        },
        "rate-limit-burst",
    );
    expect_invalid(
        Options {
            rate_limit_strikes: Some(0),
            ..Options::default()
        },
        "rate-limit-strikes",
    );
    expect_invalid(
        Options {
            max_bad_frames: Some(0),
            ..Options::default()
        },
        "max-bad-frames",
    );
    // A rate limit of 0 turns the limit off; that is valid.
    assert_eq!(
        resolve(Options {
            rate_limit: Some(0),
            ..Options::default()
        })
        .rate_limit,
        0
    );
}

#[test]
fn stream_ttl_must_cover_history_ttl() {
    expect_invalid(
        Options {
            history_ttl_secs: Some(600),
            stream_ttl_secs: Some(599),
            ..Options::default()
        },
        "stream-ttl-secs",
    );
    // Against the default history TTL (300 s), too.
    expect_invalid(
        Options {
            stream_ttl_secs: Some(100),
            ..Options::default()
        },
        "stream-ttl-secs",
    );
    let config = resolve(Options {
        history_ttl_secs: Some(600),
        stream_ttl_secs: Some(600),
        ..Options::default()
    });
    assert_eq!(config.stream_ttl, config.history_ttl);
}

#[test]
fn log_filter_must_parse() {
    for bad in ["switchboard=notalevel", "[unclosed"] {
        let text = expect_invalid(
            Options {
                log: Some(bad.into()),
                ..Options::default()
            },
            "log",
        );
        assert!(
            text.contains(bad),
            "the error should quote the filter: {text}"
        );
    }
    for good in ["warn", "switchboard=debug,info", "off"] {
        assert_eq!(
            resolve(Options {
                log: Some(good.into()),
                ..Options::default()
            })
            .log,
            good
        );
    }
}

#[test]
fn allowed_origins_must_not_be_empty() {
    for empty in [vec![], vec![String::new()], vec![" ".into(), "/".into()]] {
        expect_invalid(
            Options {
                allowed_origins: Some(empty),
                ..Options::default()
            },
            "allowed-origins",
        );
    }
    let config = resolve(Options {
        allowed_origins: Some(vec![" https://a.example/ ".into(), "".into()]),
        ..Options::default()
    });
    assert_eq!(
        config.allowed_origins,
        Some(vec!["https://a.example".to_owned()])
    );
}

#[test]
fn node_id_must_be_short_and_without_spaces() {
    for bad in [String::new(), "has space".into(), "x".repeat(65)] {
        expect_invalid(
            Options {
                node_id: Some(bad),
                ..Options::default()
            },
            "node-id",
        );
    }
    assert_eq!(
        resolve(Options {
            node_id: Some("x".repeat(64)),
            ..Options::default()
        })
        .node_id
        .len(),
        64
    );
}

#[test]
fn api_key_must_not_be_empty() {
    expect_invalid(
        Options {
            api_key: Some(String::new()),
            ..Options::default()
        },
        "api-key",
    );
}

// ---------------------------------------------------------------------------------------------
// Parsing the command line with clap

#[test]
fn clap_parses_every_kind_of_flag() {
    let options = parse(&[
        "--listen",
        "0.0.0.0:8000",
        "--internal-listen",
        "127.0.0.1:9000",
        "--node-id",
        "n1",
        "--allowed-origins",
        "https://a.example,https://b.example/",
        "--max-connections",
        "10",
        "--log-format",
        "json",
        "--jwt-algorithm",
        "hs256",
        "--jwt-secret",
        "0123456789abcdef",
        "--heartbeat-ms",
        "1000",
        "--idle-timeout-ms",
        "3000",
    ]);
    assert_eq!(options.listen, Some("0.0.0.0:8000".parse().unwrap()));
    assert_eq!(
        options.internal_listen,
        Some("127.0.0.1:9000".parse().unwrap())
    );
    assert_eq!(options.node_id.as_deref(), Some("n1"));
    assert_eq!(
        options.allowed_origins,
        Some(vec![
            "https://a.example".to_owned(),
            "https://b.example/".to_owned()
        ])
    );
    assert_eq!(options.max_connections, Some(10));
    assert_eq!(options.log_format, Some(LogFormat::Json));
    assert_eq!(options.jwt_algorithm, Some(JwtAlgorithm::Hs256));
    // Options not given stay unset, so the file can fill them.
    assert_eq!(options.redis, None);
    assert_eq!(options.drain_grace_ms, None);

    let config = resolve(options);
    assert_eq!(
        config.allowed_origins,
        Some(vec![
            "https://a.example".to_owned(),
            "https://b.example".to_owned()
        ])
    );
    assert_eq!(config.max_connections, 10);
    assert!(config.jwt.is_some());
}

#[test]
fn clap_accepts_repeated_allowed_origins_too() {
    let options = parse(&[
        "--allowed-origins",
        "https://a.example",
        "--allowed-origins",
        "https://b.example,https://c.example",
    ]);
    assert_eq!(
        options.allowed_origins,
        Some(vec![
            "https://a.example".to_owned(),
            "https://b.example".to_owned(),
            "https://c.example".to_owned()
        ])
    );
}

#[test]
fn clap_rejects_bad_values_naming_the_flag() {
    for (args, flag) in [
        (&["--listen", "notanaddress"][..], "--listen"),
        (&["--max-connections", "many"][..], "--max-connections"),
        (&["--heartbeat-ms", "soon"][..], "--heartbeat-ms"),
        (&["--log-format", "xml"][..], "--log-format"),
        (&["--jwt-algorithm", "none"][..], "--jwt-algorithm"),
    ] {
        let argv = std::iter::once("switchboard").chain(args.iter().copied());
        let error = Options::try_parse_from(argv)
            .err()
            .unwrap_or_else(|| panic!("{args:?} parsed"));
        assert!(error.use_stderr(), "{args:?}: a usage error goes to stderr");
        let text = error.to_string();
        assert!(
            text.contains(flag),
            "{args:?}: the error does not name {flag}: {text}"
        );
    }
}

#[test]
fn clap_rejects_unknown_flags() {
    let error = Options::try_parse_from(["switchboard", "--no-such-flag"])
        .expect_err("an unknown flag must fail");
    assert_eq!(error.kind(), clap::error::ErrorKind::UnknownArgument);
    assert!(error.use_stderr());
}

#[test]
fn clap_help_and_version_are_not_errors() {
    let help =
        Options::try_parse_from(["switchboard", "--help"]).expect_err("--help stops parsing");
    assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
    assert!(!help.use_stderr(), "--help goes to stdout and exits 0");
    let version =
        Options::try_parse_from(["switchboard", "--version"]).expect_err("--version stops parsing");
    assert_eq!(version.kind(), clap::error::ErrorKind::DisplayVersion);
    assert!(!version.use_stderr());
}

#[test]
fn clap_options_resolve_with_the_file() {
    let file = TempFile::new("allowed-origins = [\"https://file.example\"]\nlog = \"warn\"\n");
    let path = file.path.to_str().expect("utf-8 temp path").to_owned();
    let config = resolve(parse(&[
        "--config",
        &path,
        "--allowed-origins",
        "https://flag.example,https://other.example",
    ]));
    assert_eq!(
        config.allowed_origins,
        Some(vec![
            "https://flag.example".to_owned(),
            "https://other.example".to_owned()
        ])
    );
    assert_eq!(config.log, "warn");
}

// ---------------------------------------------------------------------------------------------
// The demo

#[test]
fn the_demo_is_on_by_default_and_turned_off_by_flag_or_file() {
    assert!(resolve(Options::default()).demo);
    assert!(!resolve(parse(&["--demo", "false"])).demo);
    assert!(resolve(parse(&["--demo", "true"])).demo);
    let file = TempFile::new("demo = false\n");
    let path = file.path.to_str().expect("utf-8 temp path").to_owned();
    assert!(!resolve(parse(&["--config", &path])).demo);
    assert!(resolve(parse(&["--config", &path, "--demo", "true"])).demo);
    let argv = ["switchboard", "--demo", "maybe"];
    assert!(
        Options::try_parse_from(argv).is_err(),
        "--demo takes true or false"
    );
}

#[test]
fn write_buffer_size_may_be_zero_but_not_above_a_mebibyte() {
    expect_invalid(
        Options {
            write_buffer_size: Some((1 << 20) + 1),
            ..Options::default()
        },
        "write-buffer-size",
    );
    for good in [0, 1 << 20] {
        assert_eq!(
            resolve(Options {
                write_buffer_size: Some(good),
                ..Options::default()
            })
            .write_buffer_size,
            good
        );
    }
}

#[test]
fn trusted_proxies_take_addresses_and_cidrs() {
    let config = resolve(Options {
        trusted_proxies: Some(vec![
            "10.0.0.0/8".into(),
            " 127.0.0.1 ".into(),
            "::1".into(),
        ]),
        ..Options::default()
    });
    let networks: Vec<String> = config
        .trusted_proxies
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(networks, ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]);
    assert!(resolve(Options::default()).trusted_proxies.is_empty());
    expect_invalid(
        Options {
            trusted_proxies: Some(vec!["10.0.0.0/33".into()]),
            ..Options::default()
        },
        "trusted-proxies",
    );
}

// ---------------------------------------------------------------------------------------------
// Admission limits and the internal port

#[test]
fn zero_turns_the_admission_limits_off() {
    let config = resolve(parse(&[
        "--max-connections-per-ip",
        "0",
        "--connect-rate-per-ip",
        "0",
        "--accept-rate",
        "0",
    ]));
    assert_eq!(config.max_connections_per_ip, 0);
    assert_eq!(config.connect_rate_per_ip, 0);
    assert_eq!(config.accept_rate, 0);
}

#[test]
fn admission_bursts_and_internal_limits_must_be_positive() {
    for args in [
        ["--connect-burst-per-ip", "0"],
        ["--accept-burst", "0"],
        ["--internal-max-connections", "0"],
        ["--internal-header-timeout-ms", "0"],
    ] {
        expect_invalid(parse(&args), args[0].trim_start_matches("--"));
    }
}

#[test]
fn admission_options_come_from_the_file() {
    let file = TempFile::new(
        "max-connections-per-ip = 5\nconnect-rate-per-ip = 2\nconnect-burst-per-ip = 3\n\
         accept-rate = 40\naccept-burst = 8\ninternal-header-timeout-ms = 1500\n\
         internal-max-connections = 4\n",
    );
    let config = resolve(Options {
        config: Some(file.path.clone()),
        accept_rate: Some(41),
        ..Options::default()
    });
    assert_eq!(config.max_connections_per_ip, 5);
    assert_eq!(config.connect_rate_per_ip, 2);
    assert_eq!(config.connect_burst_per_ip, 3);
    assert_eq!(config.accept_rate, 41, "the flag wins over the file");
    assert_eq!(config.accept_burst, 8);
    assert_eq!(config.internal_header_timeout, Duration::from_millis(1500));
    assert_eq!(config.internal_max_connections, 4);
}

/// A self-signed certificate (EC P-256, valid until 2126) and its key, only ever used here.
const TLS_TEST_CERT: &str = "\
-----BEGIN CERTIFICATE-----
MIIBsDCCAVegAwIBAgIUf0Ghvosn2E9O3E4tOTNZQHaSHNcwCgYIKoZIzj0EAwIw
IjEgMB4GA1UEAwwXc3dpdGNoYm9hcmQgY29uZmlnIHRlc3QwIBcNMjYxMjA1MTAw
NTMyWhgPMjEyNjExMTExMDA1MzJaMCIxIDAeBgNVBAMMF3N3aXRjaGJvYXJkIGNv
bmZpZyB0ZXN0MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEm8LqiGNm1h93hyPy
1TJVcUn/BB7dKdKfM/So36hBLZQq0XpcmON2zQZ/G4q2z0dxIoc6p7ryuL5o3eqS
v3HyTqNpMGcwHQYDVR0OBBYEFPClFBNcuSr0KYk8ucjIGD9O7m99MB8GA1UdIwQY
MBaAFPClFBNcuSr0KYk8ucjIGD9O7m99MA8GA1UdEwEB/wQFMAMBAf8wFAYDVR0R
BA0wC4IJbG9jYWxob3N0MAoGCCqGSM49BAMCA0cAMEQCIGoKrmZpDMTVthjmWPTp
Bft9Ejx9xm9o/ArEl7zOimLjAiAFQyX3HwLbrbJvn+BOE08MemAaiJwOwQqfmx5Q
30fBcg==
-----END CERTIFICATE-----
";
const TLS_TEST_KEY: &str = "\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQghVkDWW1l1NKOx6TJ
b6eGg7W9Lvz1UaW4QA0oq+XYV5OhRANCAASbwuqIY2bWH3eHI/LVMlVxSf8EHt0p
0p8z9KjfqEEtlCrRelyY43bNBn8birbPR3EihzqnuvK4vmjd6pK/cfJO
-----END PRIVATE KEY-----
";

#[test]
fn tls_cert_and_key_are_loaded_from_flags_or_the_file() {
    assert!(
        resolve(Options::default()).tls.is_none(),
        "plain by default"
    );
    let cert = TempFile::new(TLS_TEST_CERT);
    let key = TempFile::new(TLS_TEST_KEY);
    let (cert_path, key_path) = (
        cert.path.to_str().expect("utf-8 temp path"),
        key.path.to_str().expect("utf-8 temp path"),
    );
    let config = resolve(parse(&["--tls-cert", cert_path, "--tls-key", key_path]));
    let tls = config.tls.expect("TLS on");
    assert_eq!(tls.subject, "CN=switchboard config test");
    // 2126-11-11T10:05:32Z
    assert_eq!(tls.not_after, 4_950_065_132);
    let file = TempFile::new(&format!(
        "tls-cert = {cert_path:?}\ntls-key = {key_path:?}\n"
    ));
    let config = resolve(Options {
        config: Some(file.path.clone()),
        ..Options::default()
    });
    assert!(
        config.tls.is_some(),
        "the file keys tls-cert and tls-key are read"
    );
}

#[test]
fn tls_needs_both_files_readable_and_matching() {
    let cert = TempFile::new(TLS_TEST_CERT);
    let key = TempFile::new(TLS_TEST_KEY);
    let tls = |cert: &Path, key: &Path| Options {
        tls_cert: Some(cert.to_owned()),
        tls_key: Some(key.to_owned()),
        ..Options::default()
    };
    let text = expect_invalid_naming(
        Options {
            tls_cert: Some(cert.path.clone()),
            ..Options::default()
        },
        "tls-key",
        "--tls-cert",
    );
    assert!(text.contains("needs --tls-key"), "{text}");
    expect_invalid_naming(
        Options {
            tls_key: Some(key.path.clone()),
            ..Options::default()
        },
        "tls-cert",
        "--tls-key",
    );
    let missing = Path::new("/nonexistent/switchboard/tls.pem");
    let text = expect_invalid(tls(missing, &key.path), "tls-cert");
    assert!(text.contains("/nonexistent/switchboard/tls.pem"), "{text}");
    expect_invalid(tls(&cert.path, missing), "tls-key");
    for contents in [
        "",
        "not a certificate\n",
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        TLS_TEST_KEY,
    ] {
        let bad = TempFile::new(contents);
        expect_invalid(tls(&bad.path, &key.path), "tls-cert");
    }
    for contents in ["", "not a key\n", TLS_TEST_CERT] {
        let bad = TempFile::new(contents);
        expect_invalid(tls(&cert.path, &bad.path), "tls-key");
    }
    // A key that is not the certificate's.
    let other = TempFile::new(TEST_CA_PEM);
    let text = expect_invalid(tls(&other.path, &key.path), "tls-key");
    assert!(text.contains("KeyMismatch"), "{text}");
}

#[test]
fn the_poll_timeout_is_shorter_than_the_idle_timeout() {
    let config = resolve(Options::default());
    assert_eq!(config.poll_timeout, Duration::from_millis(25_000));
    // Unset, it follows a short idle timeout down, so such a node still starts.
    let config = resolve(Options {
        heartbeat_ms: Some(500),
        idle_timeout_ms: Some(3000),
        ..Options::default()
    });
    assert_eq!(config.poll_timeout, Duration::from_millis(1500));
    let config = resolve(Options {
        poll_timeout_ms: Some(59_999),
        ..Options::default()
    });
    assert_eq!(config.poll_timeout, Duration::from_millis(59_999));
    for ms in [0, 60_000, 90_000] {
        expect_invalid(
            Options {
                poll_timeout_ms: Some(ms),
                ..Options::default()
            },
            "poll-timeout-ms",
        );
    }
}
