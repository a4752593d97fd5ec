//! One `nats-server` process for integration tests: a generated config file, a temporary store
//! directory, a free loopback port, and kill/restart/pause/resume/lame-duck controls.
//!
//! The process is SIGKILLed and reaped, and its directory deleted, when the [`NatsServer`] is
//! dropped, including while a test panics.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// How long a server may take to become ready before the harness gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a restart keeps retrying while the old port is still held by the kernel.
const REBIND_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout for one HTTP request to the monitoring endpoint.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times a fresh start picks new ports after losing a port race to another process.
const PORT_RACE_ATTEMPTS: usize = 5;

/// Options for [`NatsServer::start_with`]. Use `..Default::default()` for the rest.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Enable JetStream (file storage, `sync_interval: always`). Default: true.
    pub jetstream: bool,
    /// Text appended verbatim to the generated config file, e.g. `"max_payload: 65536"`.
    pub extra_config: String,
    /// `server_name`; default: `ce-test-<port>`.
    pub server_name: Option<String>,
    /// Client port to listen on; default: a free port.
    pub port: Option<u16>,
    /// Monitoring port; default: a free port.
    pub monitor_port: Option<u16>,
    /// Wait for `/healthz` to be fully healthy (needed by clusters only after they formed),
    /// instead of `/healthz?js-enabled-only=true`. Default: false.
    pub wait_healthy: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            jetstream: true,
            extra_config: String::new(),
            server_name: None,
            port: None,
            monitor_port: None,
            wait_healthy: false,
        }
    }
}

/// A running (or killed, or paused) `nats-server` child process owned by a test.
///
/// All controls take `&self`, so a server can be shared (`Arc<NatsServer>`) with a task that
/// kills or pauses it while the test talks to it.
pub struct NatsServer {
    name: String,
    port: u16,
    monitor_port: u16,
    jetstream: bool,
    wait_healthy: bool,
    config_path: PathBuf,
    log_path: PathBuf,
    binary: PathBuf,
    child: Mutex<Option<Child>>,
    paused: AtomicBool,
    // Dropped last (after the Drop impl kills the child): deletes config, log and store.
    dir: TempDir,
}

impl std::fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsServer")
            .field("name", &self.name)
            .field("url", &self.url())
            .field("monitor", &self.monitor_url())
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl NatsServer {
    /// Starts a JetStream-enabled server on a free loopback port and waits until it is ready.
    pub fn start() -> NatsServer {
        NatsServer::start_with(ServerOptions::default())
    }

    /// Starts a server with the given options and waits until it is ready.
    ///
    /// Panics (with the server's log tail) if it does not come up.
    pub fn start_with(options: ServerOptions) -> NatsServer {
        let server = NatsServer::spawn(options);
        server.wait_ready();
        server
    }

    /// Starts the process without waiting for readiness (clusters start all nodes first).
    pub(crate) fn spawn(options: ServerOptions) -> NatsServer {
        let binary = nats_server_binary();
        let fixed_ports = options.port.is_some() || options.monitor_port.is_some();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let picked = free_ports(2);
            let port = options.port.unwrap_or(picked[0]);
            let monitor_port = options.monitor_port.unwrap_or(picked[1]);
            let dir = tempfile::Builder::new()
                .prefix("ce-nats-")
                .tempdir()
                .expect("create temp dir for nats-server");
            let name = options
                .server_name
                .clone()
                .unwrap_or_else(|| format!("ce-test-{port}"));
            let config_path = dir.path().join("nats-server.conf");
            let log_path = dir.path().join("nats-server.log");
            let store_dir = dir.path().join("jetstream");
            let config = render_config(&name, port, monitor_port, &options, &store_dir);
            fs::write(&config_path, config).expect("write nats-server config");

            let server = NatsServer {
                name,
                port,
                monitor_port,
                jetstream: options.jetstream,
                wait_healthy: options.wait_healthy,
                config_path,
                log_path,
                binary: binary.clone(),
                child: Mutex::new(None),
                paused: AtomicBool::new(false),
                dir,
            };
            server.spawn_child();
            // Another process may grab a port between our probe and the server's bind. With
            // picked ports, try again with fresh ones; with fixed ports, report it.
            if !fixed_ports && attempt < PORT_RACE_ATTEMPTS && server.exited_with_port_in_use() {
                continue;
            }
            return server;
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<monitor port>`.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// The monitoring port.
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// The configured `server_name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The JetStream store directory (kept across [`restart`](Self::restart)).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    /// The generated config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The process id, or `None` after [`kill`](Self::kill).
    pub fn pid(&self) -> Option<u32> {
        self.lock_child().as_ref().map(Child::id)
    }

    /// True while the child process has not exited.
    pub fn is_running(&self) -> bool {
        let mut child = self.lock_child();
        match child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server with SIGKILL (no clean shutdown) and reaps it. Safe to call twice.
    pub fn kill(&self) {
        let mut guard = self.lock_child();
        if let Some(mut child) = guard.take() {
            // SIGKILL also ends a SIGSTOPped process. An error means it already exited.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Restarts the server on the same port with the same store, killing it first if it is
    /// still running, and waits until it is ready.
    pub fn restart(&self) {
        self.kill();
        let deadline = Instant::now() + REBIND_TIMEOUT;
        loop {
            self.spawn_child();
            if self.exited_with_port_in_use() && Instant::now() < deadline {
                // The old socket lingers briefly in the kernel; back off and bind again.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            break;
        }
        self.wait_ready();
    }

    /// Freezes the process with SIGSTOP: connections stay open but nothing is answered.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
        self.paused.store(true, Ordering::SeqCst);
        // kill(2) returns before every thread has stopped; wait so the caller's next step
        // really meets a frozen server.
        self.wait_threads(|state| state == 'T' || state == 't', "stop");
    }

    /// Resumes a [`pause`](Self::pause)d process with SIGCONT.
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
        self.paused.store(false, Ordering::SeqCst);
        self.wait_threads(|state| state != 'T' && state != 't', "continue");
    }

    /// True between [`pause`](Self::pause) and [`resume`](Self::resume) (or a kill/restart).
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Puts the server in lame-duck mode (SIGUSR2): it stops accepting clients, asks connected
    /// clients to move elsewhere, then shuts down after `lame_duck_duration`
    /// (set it through `extra_config`, e.g. `lame_duck_duration: "5s"`).
    pub fn lame_duck(&self) {
        self.signal(Signal::SIGUSR2);
    }

    /// Waits until the process exits by itself (e.g. after lame duck); returns false on timeout.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GETs a monitoring endpoint (`"/varz"`, `"/jsz?streams=true"`, ...) and parses the JSON.
    ///
    /// Panics if the endpoint cannot be reached or does not return JSON.
    pub fn monitor_json(&self, path: &str) -> serde_json::Value {
        match self.try_monitor_json(path) {
            Ok(v) => v,
            Err(e) => panic!(
                "monitoring GET {path} on {}: {e}\n{}",
                self.name,
                self.log_tail()
            ),
        }
    }

    /// Like [`monitor_json`](Self::monitor_json) but returns the error instead of panicking.
    pub fn try_monitor_json(&self, path: &str) -> Result<serde_json::Value, String> {
        let (status, body) = http_get(self.monitor_port, path)?;
        if !(200..300).contains(&status) && status != 503 {
            return Err(format!("HTTP {status}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("not JSON ({e}): {body}"))
    }

    /// The last lines the server wrote to its log (stdout+stderr), for failure messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(30);
        let mut out = format!("--- last log lines of {} ---\n", self.name);
        for line in &lines[start..] {
            let _ = writeln!(out, "{line}");
        }
        out
    }

    /// Waits until the monitoring health check passes; panics with the log tail otherwise.
    pub(crate) fn wait_ready(&self) {
        let path = if self.jetstream && !self.wait_healthy {
            "/healthz?js-enabled-only=true"
        } else {
            "/healthz"
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last;
        loop {
            if !self.is_running() {
                panic!(
                    "nats-server {} ({}) exited during start-up\n{}",
                    self.name,
                    self.binary.display(),
                    self.log_tail()
                );
            }
            match http_get(self.monitor_port, path) {
                Ok((200, _)) => {
                    // The monitor can come up a moment before the client listener.
                    if TcpStream::connect_timeout(
                        &SocketAddr::from(([127, 0, 0, 1], self.port)),
                        HTTP_TIMEOUT,
                    )
                    .is_ok()
                    {
                        return;
                    }
                    last = "client port not accepting yet".into();
                }
                Ok((status, body)) => last = format!("HTTP {status}: {body}"),
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                panic!(
                    "nats-server {} not ready after {:?} ({path}: {last})\n{}",
                    self.name,
                    READY_TIMEOUT,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn_child(&self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open nats-server log file");
        let log_err = log.try_clone().expect("clone log file handle");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run nats-server at {}: {e}; run scripts/install-nats-server",
                    self.binary.display()
                )
            });
        *self.lock_child() = Some(child);
    }

    /// True if the child exited (within a short grace period) complaining about a taken port.
    pub(crate) fn exited_with_port_in_use(&self) -> bool {
        // A bind failure makes nats-server exit within milliseconds; a successful bind keeps
        // it running. Wait until either the monitor answers or the process has exited.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if !self.is_running() {
                let log = fs::read_to_string(&self.log_path).unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join("\n");
                return tail.contains("address already in use");
            }
            if http_get(self.monitor_port, "/healthz").is_ok() || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, signal: Signal) {
        let guard = self.lock_child();
        let child = guard
            .as_ref()
            .unwrap_or_else(|| panic!("{signal} to nats-server {}: not running", self.name));
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"));
        kill(pid, signal).unwrap_or_else(|e| panic!("{signal} to nats-server {}: {e}", self.name));
    }

    /// Waits until every thread of the child satisfies `ok` (Linux `/proc/<pid>/task/*/stat`
    /// state letter). Where `/proc` is unavailable there is nothing to wait on.
    fn wait_threads(&self, ok: impl Fn(char) -> bool, what: &str) {
        let Some(pid) = self.pid() else { return };
        let tasks = PathBuf::from(format!("/proc/{pid}/task"));
        if !tasks.is_dir() {
            return;
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let states = thread_states(&tasks);
            if !states.is_empty() && states.iter().all(|s| ok(*s)) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "nats-server {} did not {what}: thread states {states:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn lock_child(&self) -> MutexGuard<'_, Option<Child>> {
        // A panic while holding the lock leaves the Option intact; keep using it.
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        // `dir` (TempDir) is dropped after this and removes config, log and store.
    }
}

/// The state letter of each thread under `/proc/<pid>/task` (`R`, `S`, `T`, ...).
fn thread_states(tasks: &Path) -> Vec<char> {
    let Ok(entries) = fs::read_dir(tasks) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| fs::read_to_string(e.ok()?.path().join("stat")).ok())
        // Format: `pid (comm) S ...`; comm may contain spaces, so split after the last ')'.
        .filter_map(|stat| stat.rsplit_once(')')?.1.trim_start().chars().next())
        .collect()
}

fn render_config(
    name: &str,
    port: u16,
    monitor_port: u16,
    options: &ServerOptions,
    store_dir: &Path,
) -> String {
    let mut c = String::new();
    let _ = writeln!(c, "server_name: {}", quote(name));
    let _ = writeln!(c, "listen: \"127.0.0.1:{port}\"");
    let _ = writeln!(c, "http: \"127.0.0.1:{monitor_port}\"");
    if options.jetstream {
        let _ = writeln!(c, "jetstream {{");
        let _ = writeln!(
            c,
            "  store_dir: {}",
            quote(&store_dir.display().to_string())
        );
        let _ = writeln!(c, "  sync_interval: always");
        let _ = writeln!(c, "}}");
    }
    if !options.extra_config.is_empty() {
        let _ = writeln!(c, "{}", options.extra_config);
    }
    c
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A port that was free a moment ago (bind to port 0, read it, release it).
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct ports that were free a moment ago: all are held until all are picked, so the
/// same one is not handed out twice.
///
/// They are picked below the kernel's ephemeral range (`ip_local_port_range`), where the kernel
/// never puts the local end of an outgoing connection: a node that is killed and restarted on
/// its ports (fault scenarios) would otherwise find its port taken by some client's connection
/// made while it was down ("address already in use" on the route port, seen when many
/// scenarios run in parallel). Falls back to kernel-chosen ports when that range is too small.
pub fn free_ports(n: usize) -> Vec<u16> {
    let (low, _) = ephemeral_range();
    // Ports 10000..low: far from well-known services, outside the ephemeral range.
    let span = u32::from(low.saturating_sub(10_000));
    let mut listeners: Vec<TcpListener> = Vec::with_capacity(n);
    if span >= 1_000 {
        let mut state = seed();
        let mut tries = 0;
        while listeners.len() < n && tries < 50 * n {
            tries += 1;
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let port = 10_000 + ((state >> 33) as u32 % span) as u16;
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
                listeners.push(listener);
            }
        }
    }
    while listeners.len() < n {
        listeners
            .push(TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port"));
    }
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .expect("local address of a bound socket")
                .port()
        })
        .collect()
}

/// The kernel's ephemeral port range (`/proc/sys/net/ipv4/ip_local_port_range`), Linux's
/// default when it cannot be read.
fn ephemeral_range() -> (u16, u16) {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// A different starting point for every call in every process (time, process id, a counter).
fn seed() -> u64 {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let calls = CALLS.fetch_add(1, Ordering::Relaxed);
    nanos ^ (u64::from(std::process::id()) << 32) ^ calls.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Finds `nats-server`: `NATS_SERVER_BIN`, then `.tools/bin/nats-server` in this checkout (or in
/// the main checkout when this is a git worktree), then `PATH`.
///
/// Panics with a message saying to run `scripts/install-nats-server` if there is none.
pub fn nats_server_binary() -> PathBuf {
    locate_nats_server(
        std::env::var_os("NATS_SERVER_BIN"),
        // This crate is integration/ in the workspace; `.tools` is at the workspace root.
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the test-support crate is a directory inside the workspace"),
        std::env::var_os("PATH"),
    )
    .unwrap_or_else(|message| panic!("{message}"))
}

/// The lookup behind [`nats_server_binary`], with its inputs passed in (so it can be tested).
pub fn locate_nats_server(
    nats_server_bin: Option<std::ffi::OsString>,
    root: &Path,
    path: Option<std::ffi::OsString>,
) -> Result<PathBuf, String> {
    if let Some(bin) = nats_server_bin.filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return Ok(bin);
        }
        return Err(format!(
            "NATS_SERVER_BIN={} is not a file; unset it or run scripts/install-nats-server",
            bin.display()
        ));
    }
    let mut candidates = vec![root.join(".tools/bin/nats-server")];
    if let Some(main) = main_checkout(root) {
        candidates.push(main.join(".tools/bin/nats-server"));
    }
    if let Some(path) = path {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    }
    candidates.into_iter().find(|c| c.is_file()).ok_or_else(|| {
        format!(
            "nats-server not found (looked at NATS_SERVER_BIN, {}/.tools/bin/nats-server and \
             PATH); run scripts/install-nats-server",
            root.display()
        )
    })
}

/// In a git worktree, `.git` is a file `gitdir: <main>/.git/worktrees/<name>`; returns `<main>`.
fn main_checkout(root: &Path) -> Option<PathBuf> {
    let text = fs::read_to_string(root.join(".git")).ok()?;
    let gitdir = PathBuf::from(text.strip_prefix("gitdir:")?.trim());
    // <main>/.git/worktrees/<name> -> <main>
    Some(gitdir.parent()?.parent()?.parent()?.to_path_buf())
}

/// A minimal HTTP/1.0 GET against the local monitoring port: (status, body).
fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(HTTP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(HTTP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("malformed HTTP response: {text}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("malformed HTTP status line: {head}"))?;
    Ok((status, body.to_string()))
}
