//! Authentication, TLS and secret redaction of [`Config::connect`] against real nats-server
//! processes: every auth mode (user/password, token, NKey seed file, JWT `.creds` file)
//! connects, publishes and answers a request; every wrong credential fails at once with
//! [`ConnectErrorKind::Authorization`]; TLS works with the right CA and fails with a wrong one;
//! mutual TLS needs a client certificate; TLS-first works; and no secret reaches logs or errors.
//!
//! Certificates (rcgen), NKeys and JWTs (nkeys + ed25519 signatures) are made at test time.

use ce_messaging_test_support as support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ce_messaging::config::Config;
use ce_messaging::error::{ConnectError, ConnectErrorKind};
use futures::StreamExt as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use support::server::{NatsServer, ServerOptions};
use tempfile::TempDir;

/// Upper bound for anything a test waits on over the network.
const WAIT: Duration = Duration::from_secs(10);
/// A refused credential must be reported well within this (no silent retry loop).
const FAIL_FAST: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Test material: files, certificates, NKeys, JWTs.
// ---------------------------------------------------------------------------------------------

/// A temporary directory for the test's key and certificate files.
struct Files {
    dir: TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::Builder::new()
                .prefix("ce-sec-")
                .tempdir()
                .expect("temp dir"),
        }
    }

    fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).expect("write test file");
        path
    }
}

/// A CA with a server certificate (for 127.0.0.1 and localhost) and a client certificate.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA cert")
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("leaf params");
    params
        .distinguished_name
        .push(DnType::CommonName, "ce-messaging test");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new(files: &Files, prefix: &str) -> Pki {
        let ca = new_ca(&format!("{prefix} test CA"));
        let (server_cert, server_key) = leaf(
            &ca,
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) =
            leaf(&ca, &["client.test"], ExtendedKeyUsagePurpose::ClientAuth);
        Pki {
            ca: files.write(&format!("{prefix}-ca.pem"), &ca.pem()),
            server_cert: files.write(&format!("{prefix}-server.pem"), &server_cert),
            server_key: files.write(&format!("{prefix}-server-key.pem"), &server_key),
            client_cert: files.write(&format!("{prefix}-client.pem"), &client_cert),
            client_key: files.write(&format!("{prefix}-client-key.pem"), &client_key),
        }
    }

    /// A `tls { }` block for the server; `verify` asks for client certificates (mutual TLS).
    fn server_tls(&self, verify: bool, handshake_first: bool) -> String {
        let mut block = format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n",
            path_str(&self.server_cert),
            path_str(&self.server_key)
        );
        if verify {
            block += &format!("  ca_file: {:?}\n  verify: true\n", path_str(&self.ca));
        }
        if handshake_first {
            block += "  handshake_first: true\n";
        }
        block += "  timeout: 2\n}\n";
        block
    }
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

/// Signs JWT claims with an NKey, as the NATS JWT v2 format wants (`ed25519-nkey`).
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = serde_json::json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("JTI{}", xid::new().to_string().to_uppercase()),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = issuer.sign(signing_input.as_bytes()).expect("sign JWT");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// An operator with one account, for JWT (`.creds`) authentication with a memory resolver.
struct Operator {
    operator_jwt: String,
    account: nkeys::KeyPair,
    account_jwt: String,
}

impl Operator {
    fn new() -> Operator {
        let operator = nkeys::KeyPair::new_operator();
        let account = nkeys::KeyPair::new_account();
        let operator_jwt = jwt(
            &operator,
            &operator.public_key(),
            "test-operator",
            serde_json::json!({"type": "operator", "version": 2}),
        );
        let account_jwt = jwt(
            &operator,
            &account.public_key(),
            "test-account",
            serde_json::json!({
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1
                },
                "default_permissions": {"pub": {}, "sub": {}},
                "type": "account",
                "version": 2
            }),
        );
        Operator {
            operator_jwt,
            account,
            account_jwt,
        }
    }

    fn server_config(&self) -> String {
        format!(
            "operator: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {}\n}}\n",
            self.operator_jwt,
            self.account.public_key(),
            self.account_jwt
        )
    }

    /// A `.creds` file text for a new user of `signer` (the account, or any other key for a
    /// user the server must refuse); returns (creds text, user JWT, user seed).
    fn user_creds(signer: &nkeys::KeyPair) -> (String, String, String) {
        let user = nkeys::KeyPair::new_user();
        let user_jwt = jwt(
            signer,
            &user.public_key(),
            "test-user",
            serde_json::json!({
                "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                "type": "user", "version": 2
            }),
        );
        let seed = user.seed().expect("user seed");
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        );
        (creds, user_jwt, seed)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

fn start(extra_config: String) -> NatsServer {
    capture_logs();
    NatsServer::start_with(ServerOptions {
        jetstream: false,
        extra_config,
        ..Default::default()
    })
}

/// A config from environment-style variables (the path services use), pointed at `url`.
fn config(url: &str, vars: &[(&str, &str)]) -> Config {
    let mut all = vec![
        ("NATS_URL".to_string(), url.to_string()),
        ("NATS_RECONNECT_WAIT".to_string(), "0.1".to_string()),
    ];
    all.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::from_vars(all).expect("valid config")
}

async fn connect(config: &Config) -> Result<async_nats::Client, ConnectError> {
    tokio::time::timeout(WAIT, config.connect())
        .await
        .expect("connect neither succeeded nor failed in time")
}

/// Connecting must fail quickly with `kind`; returns the error.
async fn expect_failure(config: &Config, kind: ConnectErrorKind) -> ConnectError {
    let started = Instant::now();
    let err = tokio::time::timeout(FAIL_FAST, config.connect())
        .await
        .unwrap_or_else(|_| panic!("no error within {FAIL_FAST:?}: a silent retry loop?"))
        .expect_err("connect must be refused");
    assert_eq!(err.kind(), kind, "unexpected error: {err}");
    assert!(started.elapsed() < FAIL_FAST);
    err
}

/// Publishes a message to a subscriber and answers a request, all through `client`.
async fn publish_and_answer(client: &async_nats::Client) {
    let subject = format!("sec.{}", xid::new());
    let mut sub = client.subscribe(subject.clone()).await.expect("subscribe");
    client
        .publish(subject.clone(), "hello".into())
        .await
        .expect("publish");
    let msg = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("message in time")
        .expect("subscription open");
    assert_eq!(msg.payload.as_ref(), b"hello");

    let service = format!("sec.svc.{}", xid::new());
    let mut requests = client.subscribe(service.clone()).await.expect("subscribe");
    client.flush().await.expect("flush");
    let responder = client.clone();
    let answer = tokio::spawn(async move {
        if let Some(request) = requests.next().await {
            let reply = request.reply.expect("request has a reply subject");
            let mut body = b"echo:".to_vec();
            body.extend_from_slice(&request.payload);
            responder.publish(reply, body.into()).await.expect("reply");
            responder.flush().await.expect("flush reply");
        }
    });
    let reply = tokio::time::timeout(WAIT, client.request(service, "ping".into()))
        .await
        .expect("reply in time")
        .expect("request answered");
    assert_eq!(reply.payload.as_ref(), b"echo:ping");
    answer.await.expect("responder task");
}

/// Display and Debug of the error and of every source in its chain.
fn error_chain_text(err: &ConnectError) -> String {
    let mut text = format!("{err} {err:?}");
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        text += &format!(" | {inner} {inner:?}");
        source = inner.source();
    }
    text
}

fn assert_no_secret(text: &str, secrets: &[&str], what: &str) {
    for secret in secrets {
        assert!(!secret.is_empty());
        assert!(
            !text.contains(secret),
            "secret {secret:?} leaked into {what}: {text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn user_and_password_connect_and_wrong_or_missing_ones_are_refused() {
    let server = start(
        "authorization {\n  user: \"alice\"\n  password: \"pw-correct-4711\"\n}\n".to_string(),
    );
    let good = config(
        &server.url(),
        &[("NATS_USER", "alice"), ("NATS_PASSWORD", "pw-correct-4711")],
    );
    let client = connect(&good).await.expect("right password connects");
    publish_and_answer(&client).await;

    let wrong = config(
        &server.url(),
        &[("NATS_USER", "alice"), ("NATS_PASSWORD", "pw-wrong-0815")],
    );
    let err = expect_failure(&wrong, ConnectErrorKind::Authorization).await;
    assert_no_secret(&error_chain_text(&err), &["pw-wrong-0815"], "the error");

    let missing = config(&server.url(), &[]);
    expect_failure(&missing, ConnectErrorKind::Authorization).await;
}

#[tokio::test]
async fn user_and_password_in_the_url_connect() {
    let server =
        start("authorization {\n  user: \"bob\"\n  password: \"url-pw-1234\"\n}\n".to_string());
    let url = format!("nats://bob:url-pw-1234@127.0.0.1:{}", server.port());
    let client = connect(&config(&url, &[]))
        .await
        .expect("URL credentials connect");
    publish_and_answer(&client).await;

    let url = format!("nats://bob:url-pw-wrong@127.0.0.1:{}", server.port());
    let err = expect_failure(&config(&url, &[]), ConnectErrorKind::Authorization).await;
    assert_no_secret(&error_chain_text(&err), &["url-pw-wrong"], "the error");
}

#[tokio::test]
async fn token_connects_and_a_wrong_one_is_refused() {
    let server = start("authorization {\n  token: \"tok-correct-9876\"\n}\n".to_string());
    let client = connect(&config(
        &server.url(),
        &[("NATS_TOKEN", "tok-correct-9876")],
    ))
    .await
    .expect("right token connects");
    publish_and_answer(&client).await;

    let wrong = config(&server.url(), &[("NATS_TOKEN", "tok-wrong-5555")]);
    let err = expect_failure(&wrong, ConnectErrorKind::Authorization).await;
    assert_no_secret(&error_chain_text(&err), &["tok-wrong-5555"], "the error");

    expect_failure(&config(&server.url(), &[]), ConnectErrorKind::Authorization).await;
}

#[tokio::test]
async fn nkey_seed_file_connects_and_an_unknown_key_is_refused() {
    let files = Files::new();
    let user = nkeys::KeyPair::new_user();
    let server = start(format!(
        "authorization {{\n  users: [ {{ nkey: {} }} ]\n}}\n",
        user.public_key()
    ));
    let seed = user.seed().expect("seed");
    let seed_file = files.write("user.nk", &format!("{seed}\n"));
    let good = config(
        &server.url(),
        &[("NATS_NKEY_SEED_FILE", &path_str(&seed_file))],
    );
    let client = connect(&good).await.expect("known NKey connects");
    publish_and_answer(&client).await;

    let stranger = nkeys::KeyPair::new_user();
    let stranger_seed = stranger.seed().expect("seed");
    let stranger_file = files.write("stranger.nk", &stranger_seed);
    let wrong = config(
        &server.url(),
        &[("NATS_NKEY_SEED_FILE", &path_str(&stranger_file))],
    );
    let err = expect_failure(&wrong, ConnectErrorKind::Authorization).await;
    assert_no_secret(&error_chain_text(&err), &[&stranger_seed], "the error");

    // A file that holds no seed is a credentials error before any connection is tried.
    let garbage = files.write("garbage.nk", "SUnot-a-seed");
    let bad = config(
        &server.url(),
        &[("NATS_NKEY_SEED_FILE", &path_str(&garbage))],
    );
    let err = expect_failure(&bad, ConnectErrorKind::Credentials).await;
    assert!(err.to_string().contains("NATS_NKEY_SEED_FILE"), "{err}");
    assert_no_secret(&error_chain_text(&err), &["SUnot-a-seed"], "the error");
}

#[tokio::test]
async fn creds_file_connects_and_a_user_of_another_account_is_refused() {
    let files = Files::new();
    let operator = Operator::new();
    let server = start(operator.server_config());

    let (creds, _, _) = Operator::user_creds(&operator.account);
    let creds_file = files.write("user.creds", &creds);
    let good = config(
        &server.url(),
        &[("NATS_CREDS_FILE", &path_str(&creds_file))],
    );
    let client = connect(&good).await.expect("user of the account connects");
    publish_and_answer(&client).await;

    // Signed by an account the operator never issued.
    let rogue_account = nkeys::KeyPair::new_account();
    let (rogue, rogue_jwt, rogue_seed) = Operator::user_creds(&rogue_account);
    let rogue_file = files.write("rogue.creds", &rogue);
    let wrong = config(
        &server.url(),
        &[("NATS_CREDS_FILE", &path_str(&rogue_file))],
    );
    let err = expect_failure(&wrong, ConnectErrorKind::Authorization).await;
    assert_no_secret(
        &error_chain_text(&err),
        &[&rogue_jwt, &rogue_seed],
        "the error",
    );

    // A user JWT with someone else's seed: the nonce signature does not match.
    let (_, good_jwt, _) = Operator::user_creds(&operator.account);
    let other_seed = nkeys::KeyPair::new_user().seed().expect("seed");
    let mismatched = creds
        .lines()
        .map(|line| {
            if line.starts_with("eyJ") {
                good_jwt.clone()
            } else if line.starts_with("SU") {
                other_seed.clone()
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    let mismatched_file = files.write("mismatched.creds", &mismatched);
    let wrong = config(
        &server.url(),
        &[("NATS_CREDS_FILE", &path_str(&mismatched_file))],
    );
    expect_failure(&wrong, ConnectErrorKind::Authorization).await;
}

#[tokio::test]
async fn a_credential_refused_while_reconnecting_is_logged_and_retries_are_bounded() {
    let captured = capture_logs();
    let server = start("authorization {\n  token: \"tok-before-1111\"\n}\n".to_string());
    let id = format!("revoked-{}", xid::new());
    let config = config(
        &server.url(),
        &[
            ("NATS_TOKEN", "tok-before-1111"),
            ("NATS_MAX_RECONNECTS", "3"),
            ("NATS_CLIENT_ID", &id),
        ],
    );
    let client = connect(&config).await.expect("token accepted at first");
    publish_and_answer(&client).await;

    // The token is revoked while the client is connected: the server restarts with another.
    let path = server.config_path().to_path_buf();
    let text = std::fs::read_to_string(&path).expect("read server config");
    std::fs::write(&path, text.replace("tok-before-1111", "tok-after-2222"))
        .expect("write server config");
    server.restart();

    // Each refused attempt is logged as an error, and the client stops after 3 attempts.
    let gave_up = |logs: &str| {
        logs.lines().any(|line| {
            line.contains(&format!("client=\"{id}\"")) && line.contains("max reconnects")
        })
    };
    support::eventually(WAIT, || async { gave_up(&captured.text()) }).await;
    let logs = captured.text();
    assert!(
        logs.lines()
            .any(|l| l.contains("ERROR") && l.contains("authorization violation")),
        "refusals not logged as errors"
    );
    assert_ne!(
        client.connection_state(),
        async_nats::connection::State::Connected
    );
    assert_no_secret(&logs, &["tok-before-1111", "tok-after-2222"], "the logs");
}

// ---------------------------------------------------------------------------------------------
// TLS.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn tls_with_the_right_ca_works_and_with_a_wrong_ca_fails() {
    let files = Files::new();
    let pki = Pki::new(&files, "right");
    let other = Pki::new(&files, "other");
    let server = start(pki.server_tls(false, false));

    let good = config(&server.url(), &[("NATS_TLS_CA", &path_str(&pki.ca))]);
    let client = connect(&good).await.expect("TLS with the right CA");
    publish_and_answer(&client).await;

    let wrong = config(&server.url(), &[("NATS_TLS_CA", &path_str(&other.ca))]);
    expect_failure(&wrong, ConnectErrorKind::Tls).await;
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() {
    let files = Files::new();
    let pki = Pki::new(&files, "mtls");
    let server = start(pki.server_tls(true, false));

    let good = config(
        &server.url(),
        &[
            ("NATS_TLS_CA", &path_str(&pki.ca)),
            ("NATS_TLS_CERT", &path_str(&pki.client_cert)),
            ("NATS_TLS_KEY", &path_str(&pki.client_key)),
        ],
    );
    let client = connect(&good).await.expect("mutual TLS with a client cert");
    publish_and_answer(&client).await;

    let no_cert = config(&server.url(), &[("NATS_TLS_CA", &path_str(&pki.ca))]);
    let started = Instant::now();
    let err = connect(&no_cert)
        .await
        .expect_err("mutual TLS without a client certificate must fail");
    assert!(
        started.elapsed() < FAIL_FAST,
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(err.kind(), ConnectErrorKind::Tls, "{err}");
}

#[tokio::test]
async fn tls_first_handshake_works_when_asked() {
    let files = Files::new();
    let pki = Pki::new(&files, "first");
    let server = start(pki.server_tls(false, true));

    let good = config(
        &server.url(),
        &[
            ("NATS_TLS_CA", &path_str(&pki.ca)),
            ("NATS_TLS_FIRST", "true"),
        ],
    );
    let client = connect(&good).await.expect("TLS-first handshake");
    publish_and_answer(&client).await;

    // Without TLS first the client waits for an INFO the server never sends in plain text.
    let plain_first = config(&server.url(), &[("NATS_TLS_CA", &path_str(&pki.ca))]);
    let err = connect(&plain_first)
        .await
        .expect_err("a server with handshake_first refuses a plain start");
    // The server gives up on the plain-text client after its TLS timeout (2 s) and closes.
    assert!(
        matches!(
            err.kind(),
            ConnectErrorKind::Io | ConnectErrorKind::TimedOut
        ),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// No secret in logs or errors.
// ---------------------------------------------------------------------------------------------

/// A `tracing` writer appending to a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

static CAPTURED: OnceLock<Captured> = OnceLock::new();

/// Installs, once per test binary, a global subscriber recording everything at TRACE level
/// (async-nats included) into a buffer, and returns that buffer. Every test calls it (through
/// [`start`]) before it connects, so the subscriber is in place before any log call site is
/// first hit: a thread-local subscriber would miss events whose call-site interest another
/// test thread cached first.
fn capture_logs() -> &'static Captured {
    CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in this test binary");
        captured
    })
}

/// One auth mode for the log test: server config, a good and a wrong client config, and the
/// secrets both of them hold.
struct Mode {
    name: &'static str,
    server_config: String,
    good: Vec<(String, String)>,
    wrong: Vec<(String, String)>,
    /// Secrets that are part of URLs rather than variables (URL mode).
    url_userinfo: Option<(String, String)>,
    secrets: Vec<String>,
}

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn modes(files: &Files) -> Vec<Mode> {
    let nkey_user = nkeys::KeyPair::new_user();
    let nkey_seed = nkey_user.seed().expect("seed");
    let nkey_wrong_seed = nkeys::KeyPair::new_user().seed().expect("seed");
    let nkey_file = files.write("log-user.nk", &nkey_seed);
    let nkey_wrong_file = files.write("log-wrong.nk", &nkey_wrong_seed);

    let operator = Operator::new();
    let (creds, creds_jwt, creds_seed) = Operator::user_creds(&operator.account);
    let (wrong_creds, wrong_jwt, wrong_seed) = Operator::user_creds(&nkeys::KeyPair::new_account());
    let creds_file = files.write("log-user.creds", &creds);
    let wrong_creds_file = files.write("log-wrong.creds", &wrong_creds);

    vec![
        Mode {
            name: "user/password",
            server_config: "authorization { user: \"carol\", password: \"LOGPW-good-1\" }"
                .to_string(),
            good: kv(&[("NATS_USER", "carol"), ("NATS_PASSWORD", "LOGPW-good-1")]),
            wrong: kv(&[("NATS_USER", "carol"), ("NATS_PASSWORD", "LOGPW-bad-2")]),
            url_userinfo: None,
            secrets: vec!["LOGPW-good-1".into(), "LOGPW-bad-2".into()],
        },
        Mode {
            name: "URL user info",
            server_config: "authorization { user: \"dave\", password: \"URLPW-good-3\" }"
                .to_string(),
            good: vec![],
            wrong: vec![],
            url_userinfo: Some(("dave:URLPW-good-3".into(), "dave:URLPW-bad-4".into())),
            secrets: vec!["URLPW-good-3".into(), "URLPW-bad-4".into()],
        },
        Mode {
            name: "token",
            server_config: "authorization { token: \"LOGTOK-good-5\" }".to_string(),
            good: kv(&[("NATS_TOKEN", "LOGTOK-good-5")]),
            wrong: kv(&[("NATS_TOKEN", "LOGTOK-bad-6")]),
            url_userinfo: None,
            secrets: vec!["LOGTOK-good-5".into(), "LOGTOK-bad-6".into()],
        },
        Mode {
            name: "nkey",
            server_config: format!(
                "authorization {{ users: [ {{ nkey: {} }} ] }}",
                nkey_user.public_key()
            ),
            good: kv(&[("NATS_NKEY_SEED_FILE", &path_str(&nkey_file))]),
            wrong: kv(&[("NATS_NKEY_SEED_FILE", &path_str(&nkey_wrong_file))]),
            url_userinfo: None,
            secrets: vec![nkey_seed, nkey_wrong_seed],
        },
        Mode {
            name: "creds",
            server_config: operator.server_config(),
            good: kv(&[("NATS_CREDS_FILE", &path_str(&creds_file))]),
            wrong: kv(&[("NATS_CREDS_FILE", &path_str(&wrong_creds_file))]),
            url_userinfo: None,
            secrets: vec![creds_jwt, creds_seed, wrong_jwt, wrong_seed],
        },
    ]
}

/// Runs a connect, a reconnect (server restart) and a refused connect in every auth mode while
/// everything is logged at TRACE level (async-nats included), then checks that no secret
/// appears in the captured logs or in any error chain.
#[tokio::test]
async fn no_secret_reaches_logs_or_errors() {
    let captured = capture_logs();
    let files = Files::new();
    let mut all_secrets = Vec::new();
    let mut errors = String::new();
    let mut client_ids = Vec::new();
    for mode in modes(&files) {
        let server = start(mode.server_config.clone());
        let url = |userinfo: Option<&String>| match userinfo {
            Some(info) => format!("nats://{info}@127.0.0.1:{}", server.port()),
            None => server.url(),
        };
        let client_id = format!("log-test-{}", mode.name.replace(['/', ' '], "-"));
        client_ids.push(client_id.clone());
        let mut good = kv(&[
            ("NATS_RECONNECT_WAIT", "0.1"),
            ("NATS_CLIENT_ID", &client_id),
        ]);
        good.extend(mode.good.clone());
        good.push((
            "NATS_URL".into(),
            url(mode.url_userinfo.as_ref().map(|u| &u.0)),
        ));
        let mut wrong = mode.wrong.clone();
        wrong.push((
            "NATS_URL".into(),
            url(mode.url_userinfo.as_ref().map(|u| &u.1)),
        ));
        let good = Config::from_vars(good).expect("good config");
        let wrong = Config::from_vars(wrong).expect("wrong config");
        let config_debug = format!("{good:?} {wrong:?} {good:#?}");
        assert_no_secret(
            &config_debug,
            &mode.secrets.iter().map(String::as_str).collect::<Vec<_>>(),
            "Debug of the config",
        );

        let client = connect(&good)
            .await
            .unwrap_or_else(|e| panic!("{}: connect: {e}", mode.name));
        publish_and_answer(&client).await;

        // Reconnect: the server goes away and comes back on the same port.
        server.restart();
        let reconnected = tokio::time::timeout(WAIT, async {
            while client
                .statistics()
                .connects
                .load(std::sync::atomic::Ordering::Relaxed)
                < 2
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            reconnected.is_ok(),
            "{}: no reconnect within {WAIT:?}",
            mode.name
        );
        publish_and_answer(&client).await;

        let err = expect_failure(&wrong, ConnectErrorKind::Authorization).await;
        errors += &error_chain_text(&err);
        drop(client);
        all_secrets.extend(mode.secrets);
    }

    let logs = captured.text();
    // The check can fail: the subscriber did capture each connection's life.
    for id in &client_ids {
        for what in ["connected to NATS", "disconnected from NATS"] {
            let line = format!("{what} client=\"{id}\"");
            assert!(logs.contains(&line), "not logged: {line}");
        }
    }
    assert!(
        logs.contains("authorization violation"),
        "no refused connect logged"
    );
    let secrets: Vec<&str> = all_secrets.iter().map(String::as_str).collect();
    assert_no_secret(&logs, &secrets, "the logs");
    assert_no_secret(&errors, &secrets, "the errors");
}
