//! Tests of reading, validating and connecting with a configuration.
//! (Test code only, declared `#[cfg(test)] mod tests;`: its unwrap()/expect() calls are
//! assertions, never a library path.)
#![cfg(test)]

use super::connect::{caused_by_tls, UrlAuth};
use super::*;

use std::path::Path;
use std::time::Duration;

use crate::codec::ContentMode;
use crate::error::{ConfigError, ConfigErrorKind, ConnectErrorKind};

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn from(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_vars(vars(pairs))
}

/// Asserts an invalid-value error that names `var`.
fn assert_names(err: ConfigError, kind: ConfigErrorKind, var: &str) {
    assert_eq!(err.kind(), kind, "{err}");
    assert!(
        err.to_string().contains(var),
        "error should name {var}: {err}"
    );
}

#[test]
fn defaults_match_the_contract() {
    let config = from(&[]).unwrap();
    assert_eq!(config.nats_url, "nats://127.0.0.1:4222");
    assert!(config.client_id.starts_with("ce-messaging-"));
    assert_eq!(config.client_id.len(), "ce-messaging-".len() + 20);
    assert_eq!(config.queue_group, None);
    assert_eq!(config.queue_group(), config.client_id);
    assert_eq!(config.durable_name(), config.client_id);
    assert_eq!(config.wildcard_subject, None);
    assert_eq!(config.max_reconnects, -1);
    assert_eq!(config.reconnect_wait, Duration::from_secs(2));
    assert_eq!(config.request_timeout, Duration::from_secs(10));
    assert_eq!(config.js_stream, "CLOUDEVENTS");
    assert_eq!(config.js_subject_prefix, "events");
    assert_eq!(config.js_ack_wait, Duration::from_secs(30));
    assert_eq!(config.js_max_deliver, 5);
    assert_eq!(config.js_handler_timeout, Duration::from_secs(300));
    assert_eq!(config.js_replicas, 1);
    assert_eq!(config.js_duplicate_window, Duration::from_secs(120));
    assert_eq!(config.js_dlq_stream, "DEADLETTER");
    assert_eq!(config.events_timeout, Duration::from_secs(30));
    assert_eq!(config.ce_mode, ContentMode::Structured);
    assert!(!config.tls_first);
    assert!(config.creds_file.is_none() && config.nkey_seed_file.is_none());
    assert!(config.tls_ca.is_none() && config.tls_cert.is_none() && config.tls_key.is_none());
    assert!(config.user.is_none() && config.password.is_none() && config.token.is_none());
    assert_ne!(
        Config::default().client_id,
        Config::default().client_id,
        "each default gets its own client id"
    );
}

#[test]
fn every_variable_is_read() {
    let config = from(&[
        ("NATS_URL", "nats://n1:4222,nats://n2:4222"),
        ("NATS_CLIENT_ID", "orders-1"),
        ("NATS_QUEUE_GROUP", "orders"),
        ("NATS_WILDCARD_SUBJECT", "orders.>"),
        ("NATS_MAX_RECONNECTS", "10"),
        ("NATS_RECONNECT_WAIT", "0.5"),
        ("NATS_REQUEST_TIMEOUT", "3"),
        ("NATS_DURABLE_NAME", "orders-durable"),
        ("NATS_JS_STREAM", "EVTS"),
        ("NATS_JS_SUBJECT_PREFIX", "ev.x"),
        ("NATS_JS_ACK_WAIT", "12.25"),
        ("NATS_JS_MAX_DELIVER", "-1"),
        ("NATS_JS_REPLICAS", "3"),
        ("NATS_JS_DUPLICATE_WINDOW", "60"),
        ("NATS_JS_DLQ_STREAM", "DLQ"),
        ("NATS_EVENTS_TIMEOUT", "7"),
        ("NATS_CE_MODE", "Binary"),
        ("NATS_TLS_CA", "/etc/ca.pem"),
        ("NATS_TLS_CERT", "/etc/cert.pem"),
        ("NATS_TLS_KEY", "/etc/key.pem"),
        ("NATS_TLS_FIRST", "true"),
        ("NATS_USER", "alice"),
        ("NATS_PASSWORD", "pa ss"),
        ("HOME", "/ignored"),
    ])
    .unwrap();
    assert_eq!(config.nats_url, "nats://n1:4222,nats://n2:4222");
    assert_eq!(config.client_id, "orders-1");
    assert_eq!(config.queue_group(), "orders");
    assert_eq!(config.wildcard_subject.as_deref(), Some("orders.>"));
    assert_eq!(config.max_reconnects, 10);
    assert_eq!(config.reconnect_wait, Duration::from_millis(500));
    assert_eq!(config.request_timeout, Duration::from_secs(3));
    assert_eq!(config.durable_name(), "orders-durable");
    assert_eq!(config.js_stream, "EVTS");
    assert_eq!(config.js_subject_prefix, "ev.x");
    assert_eq!(config.js_ack_wait, Duration::from_millis(12_250));
    assert_eq!(config.js_max_deliver, -1);
    assert_eq!(config.js_replicas, 3);
    assert_eq!(config.js_duplicate_window, Duration::from_secs(60));
    assert_eq!(config.js_dlq_stream, "DLQ");
    assert_eq!(config.events_timeout, Duration::from_secs(7));
    assert_eq!(config.ce_mode, ContentMode::Binary);
    assert_eq!(config.tls_ca.as_deref(), Some(Path::new("/etc/ca.pem")));
    assert_eq!(config.tls_cert.as_deref(), Some(Path::new("/etc/cert.pem")));
    assert_eq!(config.tls_key.as_deref(), Some(Path::new("/etc/key.pem")));
    assert!(config.tls_first);
    assert_eq!(config.user.as_deref(), Some("alice"));
    assert_eq!(config.password.as_ref().map(Secret::expose), Some("pa ss"));
    assert_eq!(config.events_subject("order.created"), "ev.x.order.created");
    assert_eq!(
        config.dead_letter_subject(),
        "deadletter.EVTS.orders-durable"
    );

    let config = from(&[
        ("NATS_TOKEN", "t0k"),
        ("NATS_CREDS_FILE", ""),
        ("NATS_NKEY_SEED_FILE", ""),
    ])
    .unwrap();
    assert_eq!(config.token.as_ref().map(Secret::expose), Some("t0k"));
    let config = from(&[("NATS_CREDS_FILE", "/x/user.creds")]).unwrap();
    assert_eq!(
        config.creds_file.as_deref(),
        Some(Path::new("/x/user.creds"))
    );
    let config = from(&[("NATS_NKEY_SEED_FILE", "/x/seed.nk")]).unwrap();
    assert_eq!(
        config.nkey_seed_file.as_deref(),
        Some(Path::new("/x/seed.nk"))
    );
}

#[test]
fn empty_variables_count_as_unset() {
    let config = from(&[
        ("NATS_URL", ""),
        ("NATS_JS_REPLICAS", "  "),
        ("NATS_REQUEST_TIMEOUT", ""),
        ("NATS_QUEUE_GROUP", ""),
    ])
    .unwrap();
    assert_eq!(config.nats_url, DEFAULT_NATS_URL);
    assert_eq!(config.js_replicas, 1);
    assert_eq!(config.request_timeout, Duration::from_secs(10));
    assert_eq!(config.queue_group, None);
}

#[test]
fn values_that_do_not_parse_name_their_variable() {
    let cases = [
        ("NATS_MAX_RECONNECTS", "many"),
        ("NATS_RECONNECT_WAIT", "2s"),
        ("NATS_REQUEST_TIMEOUT", "ten"),
        ("NATS_JS_ACK_WAIT", "-1"),
        ("NATS_JS_MAX_DELIVER", "5.5"),
        ("NATS_JS_REPLICAS", "-3"),
        ("NATS_JS_DUPLICATE_WINDOW", "NaN"),
        ("NATS_EVENTS_TIMEOUT", "inf"),
        ("NATS_CE_MODE", "json"),
        ("NATS_TLS_FIRST", "maybe"),
        ("NATS_RECONNECT_WAIT", "1e300"),
        ("NATS_JS_START_POSITION", "latest"),
        ("NATS_JS_START_POSITION", "time:yesterday"),
        ("NATS_JS_PRIORITY_LEVELS", "two"),
        ("NATS_JS_PRIORITY_LEVELS", "-1"),
        ("NATS_JS_PRIORITY_LEVELS", "256"),
    ];
    for (var, value) in cases {
        let err = from(&[(var, value)]).expect_err(var);
        assert_names(err, ConfigErrorKind::InvalidValue, var);
    }
}

#[test]
fn out_of_range_values_name_their_variable() {
    let cases = [
        ("NATS_JS_REPLICAS", "0"),
        ("NATS_JS_REPLICAS", "6"),
        ("NATS_JS_PRIORITY_LEVELS", "0"),
        ("NATS_JS_PRIORITY_LEVELS", "11"),
        ("NATS_JS_MAX_DELIVER", "0"),
        ("NATS_JS_START_POSITION", "sequence:0"),
        ("NATS_JS_HANDLER_TIMEOUT", "0"),
        ("NATS_JS_MAX_DELIVER", "-2"),
        ("NATS_MAX_RECONNECTS", "0"),
        ("NATS_MAX_RECONNECTS", "-5"),
        ("NATS_REQUEST_TIMEOUT", "0"),
        ("NATS_JS_ACK_WAIT", "0"),
        ("NATS_JS_DUPLICATE_WINDOW", "0.0"),
        ("NATS_EVENTS_TIMEOUT", "0"),
        ("NATS_JS_STREAM", "a.b"),
        ("NATS_JS_DLQ_STREAM", "dl q"),
        ("NATS_DURABLE_NAME", "x>y"),
        ("NATS_JS_SUBJECT_PREFIX", "events.*"),
        ("NATS_JS_SUBJECT_PREFIX", "events..x"),
        ("NATS_QUEUE_GROUP", "a b"),
        ("NATS_WILDCARD_SUBJECT", "a.>.b"),
        ("NATS_WILDCARD_SUBJECT", "a.b*"),
        ("NATS_URL", "nats://h:notaport"),
        ("NATS_URL", "nats://h1:4222,,nats://h2:4222"),
        ("NATS_CLIENT_ID", "has space"),
    ];
    for (var, value) in cases {
        let err = from(&[(var, value)]).expect_err(&format!("{var}={value}"));
        assert_names(err, ConfigErrorKind::InvalidValue, var);
    }
}

#[test]
fn a_client_id_unfit_as_durable_name_is_refused_unless_one_is_given() {
    let err = from(&[("NATS_CLIENT_ID", "svc.orders")]).unwrap_err();
    assert_names(err, ConfigErrorKind::InvalidValue, "NATS_DURABLE_NAME");
    let config = from(&[
        ("NATS_CLIENT_ID", "svc.orders"),
        ("NATS_DURABLE_NAME", "svc-orders"),
    ])
    .unwrap();
    assert_eq!(config.queue_group(), "svc.orders");
    assert_eq!(config.durable_name(), "svc-orders");
}

#[test]
fn contradicting_settings_name_the_variables() {
    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[("NATS_USER", "alice")], "NATS_PASSWORD"),
        (&[("NATS_PASSWORD", "pw")], "NATS_USER"),
        (&[("NATS_TLS_CERT", "/c.pem")], "NATS_TLS_KEY"),
        (&[("NATS_TLS_KEY", "/k.pem")], "NATS_TLS_CERT"),
        (
            &[("NATS_TOKEN", "t"), ("NATS_CREDS_FILE", "/u.creds")],
            "NATS_CREDS_FILE",
        ),
        (
            &[("NATS_JS_DLQ_STREAM", "CLOUDEVENTS")],
            "NATS_JS_DLQ_STREAM",
        ),
    ];
    for (pairs, var) in cases {
        let err = from(pairs).expect_err(var);
        assert_names(err, ConfigErrorKind::Invalid, var);
    }
}

#[test]
fn durations_and_counts_beyond_their_documented_range_name_their_variable() {
    let cases = [
        // Seconds that wrapped as nanoseconds on the server (1e12 s -> 3,875,820,019 s).
        ("NATS_JS_ACK_WAIT", "1e12"),
        ("NATS_JS_ACK_WAIT", "1e10"),
        ("NATS_JS_ACK_WAIT", "86400.5"),
        ("NATS_JS_DUPLICATE_WINDOW", "1e12"),
        ("NATS_JS_DUPLICATE_WINDOW", "1e10"),
        ("NATS_JS_DUPLICATE_WINDOW", "86401"),
        ("NATS_JS_DUPLICATE_WINDOW", "0.5"),
        ("NATS_JS_MAX_DELIVER", "9223372036854775807"),
        ("NATS_JS_MAX_DELIVER", "1000001"),
        ("NATS_JS_MAX_DELIVER", "9223372036854775808"),
        ("NATS_MAX_RECONNECTS", "1000001"),
        ("NATS_RECONNECT_WAIT", "3601"),
        ("NATS_RECONNECT_WAIT", "-0.5"),
        ("NATS_REQUEST_TIMEOUT", "301"),
        ("NATS_REQUEST_TIMEOUT", "1e12"),
        ("NATS_EVENTS_TIMEOUT", "3601"),
        ("NATS_EVENTS_TIMEOUT", "1e-12"),
        ("NATS_JS_REPLICAS", "18446744073709551616"),
        ("NATS_JS_SUBJECT_PREFIX", &"p".repeat(256)),
    ];
    for (var, value) in cases {
        let err = from(&[(var, value)]).expect_err(&format!("{var}={value}"));
        assert_names(err, ConfigErrorKind::InvalidValue, var);
    }
}

#[test]
fn the_bounds_themselves_are_accepted() {
    let config = from(&[
        ("NATS_JS_ACK_WAIT", "86400"),
        ("NATS_JS_DUPLICATE_WINDOW", "86400"),
        ("NATS_JS_MAX_DELIVER", "1000000"),
        ("NATS_MAX_RECONNECTS", "1000000"),
        ("NATS_RECONNECT_WAIT", "3600"),
        ("NATS_REQUEST_TIMEOUT", "300"),
        ("NATS_EVENTS_TIMEOUT", "3600"),
        ("NATS_JS_REPLICAS", "5"),
        ("NATS_JS_SUBJECT_PREFIX", &"p".repeat(255)),
    ])
    .unwrap();
    assert_eq!(config.js_ack_wait, Duration::from_secs(86_400));
    assert_eq!(config.js_duplicate_window, Duration::from_secs(86_400));
    assert_eq!(config.js_max_deliver, 1_000_000);
    assert_eq!(config.max_reconnects, 1_000_000);
    assert_eq!(config.reconnect_wait, Duration::from_secs(3600));
    assert_eq!(config.request_timeout, MAX_REQUEST_TIMEOUT);
    assert_eq!(config.events_timeout, Duration::from_secs(3600));
    let config = from(&[
        ("NATS_JS_ACK_WAIT", "0.001"),
        ("NATS_JS_DUPLICATE_WINDOW", "1"),
        ("NATS_RECONNECT_WAIT", "0"),
        ("NATS_REQUEST_TIMEOUT", "0.001"),
        ("NATS_EVENTS_TIMEOUT", "0.001"),
    ])
    .unwrap();
    assert_eq!(config.js_ack_wait, Duration::from_millis(1));
    assert_eq!(config.reconnect_wait, Duration::ZERO);
}

#[test]
fn a_config_built_in_code_is_held_to_the_same_bounds() {
    let cases: [(&str, Config); 5] = [
        (
            "NATS_JS_ACK_WAIT",
            Config {
                js_ack_wait: Duration::from_secs(1_000_000_000_000),
                ..Default::default()
            },
        ),
        (
            "NATS_JS_DUPLICATE_WINDOW",
            Config {
                js_duplicate_window: Duration::MAX,
                ..Default::default()
            },
        ),
        (
            "NATS_JS_MAX_DELIVER",
            Config {
                js_max_deliver: i64::MAX,
                ..Default::default()
            },
        ),
        (
            "NATS_EVENTS_TIMEOUT",
            Config {
                events_timeout: Duration::from_secs(86_400),
                ..Default::default()
            },
        ),
        (
            "NATS_RECONNECT_WAIT",
            Config {
                reconnect_wait: Duration::from_secs(86_400),
                ..Default::default()
            },
        ),
    ];
    for (var, config) in cases {
        assert_names(
            config.validate().expect_err(var),
            ConfigErrorKind::InvalidValue,
            var,
        );
    }
}

#[test]
fn request_timeout_above_the_maximum_is_an_error() {
    assert_names(
        from(&[("NATS_REQUEST_TIMEOUT", "301")]).unwrap_err(),
        ConfigErrorKind::InvalidValue,
        "NATS_REQUEST_TIMEOUT",
    );
    let config = from(&[("NATS_REQUEST_TIMEOUT", "299.5")]).unwrap();
    assert_eq!(config.request_timeout, Duration::from_millis(299_500));
    let config = Config {
        request_timeout: Duration::from_secs(301),
        ..Default::default()
    };
    assert_names(
        config.validate().unwrap_err(),
        ConfigErrorKind::InvalidValue,
        "NATS_REQUEST_TIMEOUT",
    );
}

#[test]
fn debug_and_errors_never_show_secrets() {
    let config = from(&[("NATS_USER", "alice"), ("NATS_PASSWORD", "hunter2")]).unwrap();
    let debug = format!("{config:?} {config:#?}");
    assert!(!debug.contains("hunter2"), "password leaked: {debug}");
    assert!(debug.contains("alice"), "the user name is not a secret");

    // Debug of a config is built by hand, so it is checked even for combinations that
    // do not validate.
    let config = Config {
        nats_url: "nats://bob:urlpass@h1:4222,nats://tok3n@h2:4222".to_string(),
        ..Default::default()
    };
    let debug = format!("{config:?} {config:#?}");
    for secret in ["urlpass", "tok3n", "bob:"] {
        assert!(!debug.contains(secret), "{secret} leaked: {debug}");
    }
    assert!(debug.contains("nats://<redacted>@h1:4222,nats://<redacted>@h2:4222"));
    let err = config.validate().unwrap_err();
    assert!(!format!("{err} {err:?}").contains("urlpass"), "{err:?}");

    let config = Config {
        token: Some(Secret::new("sekrit-token")),
        ..Default::default()
    };
    assert!(!format!("{config:?}").contains("sekrit-token"));
    let options = config.connect_options().unwrap();
    assert!(!format!("{options:?}").contains("sekrit-token"));

    // A bad URL with user info: the error shows the URL without it.
    let err = from(&[("NATS_URL", "nats://bob:urlpass@h1:notaport")]).unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(
        text.contains("NATS_URL") && !text.contains("urlpass"),
        "{text}"
    );
}

#[test]
fn redact_url_hides_every_form_of_user_info() {
    assert_eq!(redact_url("nats://u:p@h:1"), "nats://<redacted>@h:1");
    assert_eq!(redact_url("tls://token@h"), "tls://<redacted>@h");
    assert_eq!(redact_url("u:p@h:4222"), "<redacted>@h:4222");
    // Unencoded special characters in the password do not leak the rest.
    assert_eq!(redact_url("nats://u:p/a@ss@h:1"), "nats://<redacted>@h:1");
    assert_eq!(redact_url("nats://h:1"), "nats://h:1");
    assert_eq!(redact_url(""), "");
}

#[test]
fn url_user_info_becomes_credentials_and_leaves_the_addresses() {
    let config = Config {
        nats_url: "nats://al%40ice:p%3Ass@h1:4222, h2:4223".to_string(),
        ..Default::default()
    };
    let servers = config.servers().unwrap();
    assert!(
        servers.auth
            == Some(UrlAuth::UserPassword(
                "al@ice".to_string(),
                Secret::new("p:ss")
            ))
    );
    let addrs: Vec<String> = servers
        .addrs
        .iter()
        .map(|a| format!("{a:?} {}", a.as_url_str()))
        .collect();
    assert!(addrs[0].contains("nats://h1:4222"), "{addrs:?}");
    assert!(addrs[1].contains("nats://h2:4223"), "{addrs:?}");
    assert!(!addrs.concat().contains("p%3Ass"), "{addrs:?}");

    let config = Config {
        nats_url: "tls://s3cr3t@h1".to_string(),
        ..Default::default()
    };
    let servers = config.servers().unwrap();
    assert!(servers.auth == Some(UrlAuth::Token(Secret::new("s3cr3t"))));
    assert!(servers.addrs[0].tls_required());
    assert!(!format!("{:?}", servers.addrs).contains("s3cr3t"));
    config.connect_options().unwrap();
}

#[test]
fn url_user_info_must_not_compete_with_other_credentials() {
    let err = from(&[("NATS_URL", "nats://a:b@h1:4222"), ("NATS_TOKEN", "tok")]).unwrap_err();
    assert_names(err, ConfigErrorKind::Invalid, "NATS_URL");
    let err = from(&[("NATS_URL", "nats://a:b@h1:4222,nats://c:d@h2:4222")]).unwrap_err();
    assert!(!err.to_string().contains(":b@") && !err.to_string().contains(":d@"));
    assert_names(err, ConfigErrorKind::InvalidValue, "NATS_URL");
    // The same credentials on every server are fine.
    from(&[("NATS_URL", "nats://a:b@h1:4222,nats://a:b@h2:4222")]).unwrap();
}

#[test]
fn connect_options_refuse_an_invalid_config_and_name_missing_files() {
    let config = Config {
        js_replicas: 0,
        ..Default::default()
    };
    let err = config.connect_options().unwrap_err();
    assert_eq!(err.kind(), ConnectErrorKind::InvalidConfig);
    assert!(format!("{err}").contains("NATS_JS_REPLICAS"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let cases = [
        (
            Config {
                creds_file: Some(missing.clone()),
                ..Default::default()
            },
            ConnectErrorKind::Credentials,
            "NATS_CREDS_FILE",
        ),
        (
            Config {
                nkey_seed_file: Some(missing.clone()),
                ..Default::default()
            },
            ConnectErrorKind::Credentials,
            "NATS_NKEY_SEED_FILE",
        ),
        (
            Config {
                tls_ca: Some(missing.clone()),
                ..Default::default()
            },
            ConnectErrorKind::Tls,
            "NATS_TLS_CA",
        ),
        (
            Config {
                tls_cert: Some(missing.clone()),
                tls_key: Some(missing.clone()),
                ..Default::default()
            },
            ConnectErrorKind::Tls,
            "NATS_TLS_CERT",
        ),
    ];
    for (config, kind, var) in cases {
        let err = config.connect_options().expect_err(var);
        assert_eq!(err.kind(), kind, "{err}");
        assert!(err.to_string().contains(var), "{err}");
    }
}

#[test]
fn a_malformed_creds_file_is_a_credentials_error_that_does_not_quote_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("user.creds");
    std::fs::write(&path, "not a creds file, secret-ish content").unwrap();
    let config = Config {
        creds_file: Some(path),
        ..Default::default()
    };
    let err = config.connect_options().unwrap_err();
    assert_eq!(err.kind(), ConnectErrorKind::Credentials);
    assert!(!format!("{err} {err:?}").contains("secret-ish"), "{err:?}");
}

#[test]
fn an_nkey_seed_file_is_checked_without_quoting_it() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.nk");
    let seed = nkeys::KeyPair::new_user().seed().unwrap();
    std::fs::write(&good, format!("{seed}\n")).unwrap();
    let config = Config {
        nkey_seed_file: Some(good),
        ..Default::default()
    };
    config.connect_options().unwrap();

    let bad = dir.path().join("bad.nk");
    std::fs::write(&bad, "SUAMALFORMEDSEEDTEXT").unwrap();
    let config = Config {
        nkey_seed_file: Some(bad),
        ..Default::default()
    };
    let err = config.connect_options().unwrap_err();
    assert_eq!(err.kind(), ConnectErrorKind::Credentials);
    assert!(err.to_string().contains("NATS_NKEY_SEED_FILE"), "{err}");
    assert!(!format!("{err} {err:?}").contains("MALFORMED"), "{err:?}");
}

#[test]
fn tls_errors_are_recognised_inside_io_errors() {
    let tls = async_nats::rustls::Error::General("handshake".into());
    let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
    assert!(caused_by_tls(&io));
    let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    assert!(!caused_by_tls(&plain));
}

#[tokio::test]
async fn connecting_to_a_closed_port_fails_at_once_with_io() {
    // Bind then drop a listener to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = Config {
        nats_url: format!("nats://user:topsecret@127.0.0.1:{port}"),
        ..Default::default()
    };
    let err = tokio::time::timeout(Duration::from_secs(10), config.connect())
        .await
        .expect("connect must fail, not retry forever")
        .unwrap_err();
    assert_eq!(err.kind(), ConnectErrorKind::Io, "{err}");
    assert!(!format!("{err} {err:?}").contains("topsecret"), "{err:?}");
}

#[test]
fn start_position_is_read_and_unset_means_the_library_default() {
    use crate::config::StartPosition;
    assert_eq!(from(&[]).unwrap().js_start_position, None);
    let config = from(&[("NATS_JS_START_POSITION", "new")]).unwrap();
    assert_eq!(config.js_start_position, Some(StartPosition::New));
    let config = from(&[("NATS_JS_START_POSITION", "sequence:7")]).unwrap();
    assert_eq!(config.js_start_position, Some(StartPosition::Sequence(7)));
    let config = Config {
        js_start_position: Some(StartPosition::Sequence(0)),
        ..Config::default()
    };
    assert!(config
        .validate()
        .unwrap_err()
        .to_string()
        .contains("NATS_JS_START_POSITION"));
}

#[test]
fn priority_levels_default_to_off_and_are_read() {
    assert_eq!(from(&[]).expect("defaults").js_priority_levels, 1);
    let config = from(&[("NATS_JS_PRIORITY_LEVELS", " 3 ")]).expect("3 levels");
    assert_eq!(config.js_priority_levels, 3);
    assert_eq!(
        from(&[("NATS_JS_PRIORITY_LEVELS", "10")])
            .expect("10")
            .js_priority_levels,
        10
    );
}
