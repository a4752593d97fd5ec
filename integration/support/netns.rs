//! A 3-node (or n-node) JetStream cluster split across Linux network namespaces, for the
//! partition tests (`integration/partitions.rs`, issue 19).
//!
//! Topology: every `nats-server` runs in its own namespace (`ip netns exec <ns> nats-server`),
//! and the client side (the library under test) in one more. Every pair of namespaces is joined
//! by its own point-to-point veth link, so any single link can be cut:
//!
//! ```text
//!            n0 ─────── n1          node i: 10.77.0.(i+1)/32 on its loopback device
//!             \        /            client: 10.77.0.100/32
//!              \      /             a link: a veth pair with a /32 route to the peer
//!                 n2                each node also has a link to the client
//!   (client ── n0, client ── n1, client ── n2)
//! ```
//!
//! The addresses exist only inside these namespaces, so concurrent tests (each with its own
//! namespaces) use the same ones without meeting. Nothing is added to the root namespace: the
//! test's client runs on a tokio runtime whose threads all enter the client namespace
//! ([`NetCluster::block_on`]); sockets stay in the namespace they were created in.
//!
//! A link is cut with `ip link set <end> down` (the routes through it go with it; TCP data in
//! flight stays buffered and is retransmitted after the heal, as after a real outage) and
//! healed with `ip link set <end> up` plus the routes again. `tc netem` is not available, so
//! links are cut and restored, never slowed or made lossy.
//!
//! Monitoring requests go to each server's `127.0.0.1:8222` from a thread inside that server's
//! namespace, so they work whatever links are cut.
//!
//! Clean-up: dropping a [`NetCluster`] (also while a test panics) kills every server and
//! deletes every namespace (which deletes the veths) and the config/store directory. A run that
//! was killed leaves them behind; the first cluster started by a later process sweeps every
//! namespace and directory whose name carries the pid of a process that no longer exists
//! (names: `cemsg-<pid>-<n>-<role>`).
//!
//! Where namespaces cannot be created (not root, no `ip`), [`NetCluster::start`] returns
//! [`Unavailable`] and the tests skip with that message.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::server::nats_server_binary;

/// Every namespace and directory this module creates starts with this.
pub const PREFIX: &str = "cemsg-";
/// Client port of every node (each node has its own namespace, so they can share it).
pub const CLIENT_PORT: u16 = 4222;
/// Route port of every node.
const ROUTE_PORT: u16 = 6222;
/// Monitoring port of every node, on 127.0.0.1 inside the node's namespace.
const MONITOR_PORT: u16 = 8222;
/// How long a cluster may take to form (servers up, routes up, meta leader elected).
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of one monitoring request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an `ip` command may take.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why partition tests cannot run here (the message to print when skipping).
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "network namespaces unavailable ({}); partition tests need root and iproute2",
            self.0
        )
    }
}

/// One end of a link: a node (by index) or the client namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum End {
    /// Node `i` of the cluster.
    Node(usize),
    /// The namespace the test's client runtime lives in.
    Client,
}

impl End {
    fn tag(self) -> String {
        match self {
            End::Node(i) => format!("n{i}"),
            End::Client => "c".to_owned(),
        }
    }

    fn addr(self) -> Ipv4Addr {
        match self {
            End::Node(i) => Ipv4Addr::new(10, 77, 0, 1 + i as u8),
            End::Client => Ipv4Addr::new(10, 77, 0, 100),
        }
    }
}

/// A link between two ends, stored in a fixed order (node before client, lower index first).
pub type Link = (End, End);

fn link(a: End, b: End) -> Link {
    assert_ne!(a, b, "a link joins two different ends");
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// One `nats-server` inside its namespace.
struct Node {
    name: String,
    ns: String,
    log_path: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Node {
    fn lock_child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_running(&self) -> bool {
        match self.lock_child().as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn kill(&self) {
        if let Some(mut child) = self.lock_child().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(30);
        let mut out = format!("--- last log lines of {} ---\n", self.name);
        for line in &lines[start..] {
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

/// A JetStream cluster whose nodes and client live in separate network namespaces joined by
/// point-to-point links that can be cut and healed. Dropping it removes everything it created.
pub struct NetCluster {
    /// `cemsg-<pid>-<n>`: the prefix of every namespace of this cluster.
    tag: String,
    nodes: Vec<Node>,
    client_ns: String,
    /// Namespaces created so far (all are deleted on drop).
    namespaces: Vec<String>,
    /// Links currently cut.
    cut: Mutex<BTreeSet<Link>>,
    // Dropped last: configs, logs and stores.
    dir: TempDir,
}

impl std::fmt::Debug for NetCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetCluster")
            .field("tag", &self.tag)
            .field("url", &self.url())
            .field("cut", &self.cut_links())
            .finish()
    }
}

impl NetCluster {
    /// Creates the namespaces and links, starts `size` JetStream nodes (3-node clusters are
    /// what the tests use) and waits until they are healthy and agree on a meta leader.
    ///
    /// Returns [`Unavailable`] (skip the test) when namespaces cannot be created; panics, with
    /// the servers' logs, on any later failure.
    pub fn start(size: usize) -> Result<NetCluster, Unavailable> {
        assert!((1..=9).contains(&size), "1 to 9 nodes");
        check_available()?;
        sweep_leftovers();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let tag = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("{tag}-"))
            .tempdir()
            .expect("create temp dir for the partition cluster");
        let mut cluster = NetCluster {
            client_ns: format!("{tag}-c"),
            tag,
            nodes: Vec::new(),
            namespaces: Vec::new(),
            cut: Mutex::new(BTreeSet::new()),
            dir,
        };
        let ends: Vec<End> = (0..size)
            .map(End::Node)
            .chain(std::iter::once(End::Client))
            .collect();
        for end in &ends {
            let ns = cluster.ns_of(*end);
            ip(&["netns", "add", &ns]).unwrap_or_else(|e| panic!("{e}"));
            cluster.namespaces.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]).unwrap_or_else(|e| panic!("{e}"));
            let addr = format!("{}/32", end.addr());
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "lo"]).unwrap_or_else(|e| panic!("{e}"));
        }
        for (i, a) in ends.iter().enumerate() {
            for b in &ends[i + 1..] {
                cluster.create_link(*a, *b);
            }
        }
        let binary = nats_server_binary();
        for i in 0..size {
            let node = cluster.spawn_node(i, size, &binary);
            cluster.nodes.push(node);
        }
        cluster.wait_formed();
        Ok(cluster)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True for a cluster of no nodes (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `nats://10.77.0.<i+1>:4222`, reachable from the client namespace.
    pub fn node_url(&self, i: usize) -> String {
        format!("nats://{}:{CLIENT_PORT}", End::Node(i).addr())
    }

    /// Client URLs of all nodes.
    pub fn urls(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.node_url(i)).collect()
    }

    /// All client URLs, comma-separated (what `NATS_URL` takes).
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    /// The `server_name` of node `i` (`n<i>`).
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Index of the node named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Every link: node pairs first, then each node's link to the client.
    pub fn links(&self) -> Vec<Link> {
        let mut links = Vec::new();
        for i in 0..self.len() {
            for j in i + 1..self.len() {
                links.push(link(End::Node(i), End::Node(j)));
            }
        }
        for i in 0..self.len() {
            links.push(link(End::Node(i), End::Client));
        }
        links
    }

    /// The links currently cut.
    pub fn cut_links(&self) -> Vec<Link> {
        self.lock_cut().iter().copied().collect()
    }

    /// Cuts the link between `a` and `b` (no packet passes either way until [`heal`]).
    /// Cutting a cut link does nothing.
    ///
    /// [`heal`]: Self::heal
    pub fn cut(&self, a: End, b: End) {
        let l = link(a, b);
        let mut cut = self.lock_cut();
        if cut.contains(&l) {
            return;
        }
        // The first end (a node) goes down; the other end loses its carrier.
        let ns = self.ns_of(l.0);
        ip(&["-n", &ns, "link", "set", &ifname(l.1), "down"]).unwrap_or_else(|e| panic!("{e}"));
        cut.insert(l);
    }

    /// Restores the link between `a` and `b` and its routes. Healing a working link does
    /// nothing.
    pub fn heal(&self, a: End, b: End) {
        let l = link(a, b);
        let mut cut = self.lock_cut();
        if !cut.contains(&l) {
            return;
        }
        let ns = self.ns_of(l.0);
        ip(&["-n", &ns, "link", "set", &ifname(l.1), "up"]).unwrap_or_else(|e| panic!("{e}"));
        self.add_routes(l.0, l.1);
        cut.remove(&l);
    }

    /// Cuts node `i` from every other node, and from the client too if `client`.
    pub fn isolate(&self, i: usize, client: bool) {
        for j in (0..self.len()).filter(|j| *j != i) {
            self.cut(End::Node(i), End::Node(j));
        }
        if client {
            self.cut(End::Node(i), End::Client);
        }
    }

    /// Heals every cut link.
    pub fn heal_all(&self) {
        for (a, b) in self.cut_links() {
            self.heal(a, b);
        }
    }

    /// Runs `future` to completion on a fresh multi-threaded tokio runtime whose threads (and
    /// the thread driving `future`) all live in the client namespace: every connection the
    /// future opens goes through the client's links. A panic in `future` is passed on.
    pub fn block_on<T: Send>(&self, future: impl Future<Output = T> + Send) -> T {
        let ns = self.client_ns.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                // Invariant: the namespace exists while the runtime does (the cluster owns
                // both, and the runtime ends first); entering it needs what creating it did.
                enter_netns(&ns).unwrap_or_else(|e| panic!("enter {ns}: {e}"));
            })
            .build()
            .expect("client runtime");
        let outcome = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    enter_netns(&self.client_ns)
                        .unwrap_or_else(|e| panic!("enter {}: {e}", self.client_ns));
                    runtime.block_on(future)
                })
                .join()
        });
        runtime.shutdown_timeout(Duration::from_secs(10));
        match outcome {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// GETs a monitoring endpoint of node `i` (from inside its namespace) and parses the JSON.
    pub fn try_monitor_json(&self, i: usize, path: &str) -> Result<serde_json::Value, String> {
        let ns = &self.nodes[i].ns;
        let (status, body) = in_netns(ns, || http_get(MONITOR_PORT, path))?;
        if !(200..300).contains(&status) && status != 503 {
            return Err(format!("HTTP {status}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("not JSON ({e}): {body}"))
    }

    /// Like [`try_monitor_json`](Self::try_monitor_json), panicking with the log tail.
    pub fn monitor_json(&self, i: usize, path: &str) -> serde_json::Value {
        self.try_monitor_json(i, path).unwrap_or_else(|e| {
            panic!(
                "monitoring GET {path} on {}: {e}\n{}",
                self.nodes[i].name,
                self.nodes[i].log_tail()
            )
        })
    }

    /// Node `i`'s own view of `stream` (from its `/jsz`): `(last sequence, leader name)`, or
    /// `None` if it does not know the stream (or cannot say right now).
    pub fn stream_view(&self, i: usize, stream: &str) -> Option<(u64, String)> {
        let jsz = self
            .try_monitor_json(i, "/jsz?accounts=true&streams=true")
            .ok()?;
        let detail = jsz["account_details"]
            .as_array()?
            .iter()
            .filter_map(|a| a["stream_detail"].as_array())
            .flatten()
            .find(|s| s["name"] == stream)?;
        let last = detail["state"]["last_seq"].as_u64()?;
        let leader = detail["cluster"]["leader"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        Some((last, leader))
    }

    /// The meta leader node `i` sees (empty name if none).
    pub fn meta_leader_seen_by(&self, i: usize) -> Option<String> {
        let jsz = self.try_monitor_json(i, "/jsz").ok()?;
        Some(
            jsz["meta_cluster"]["leader"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        )
    }

    /// The last lines of every node's log, for failure messages.
    pub fn log_tails(&self) -> String {
        self.nodes.iter().map(Node::log_tail).collect()
    }

    fn lock_cut(&self) -> MutexGuard<'_, BTreeSet<Link>> {
        self.cut.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ns_of(&self, end: End) -> String {
        format!("{}-{}", self.tag, end.tag())
    }

    /// A veth pair between the namespaces of `a` and `b`, named after the peer on each side
    /// (`p-n1` in n0's namespace leads to n1), up, with a /32 route to the peer's address.
    fn create_link(&self, a: End, b: End) {
        let (ns_a, ns_b) = (self.ns_of(a), self.ns_of(b));
        // Created inside a's namespace with its peer directly in b's: no name ever exists in
        // the root namespace, so concurrent runs cannot collide.
        ip(&[
            "-n",
            &ns_a,
            "link",
            "add",
            &ifname(b),
            "type",
            "veth",
            "peer",
            "name",
            &ifname(a),
            "netns",
            &ns_b,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        ip(&["-n", &ns_a, "link", "set", &ifname(b), "up"]).unwrap_or_else(|e| panic!("{e}"));
        ip(&["-n", &ns_b, "link", "set", &ifname(a), "up"]).unwrap_or_else(|e| panic!("{e}"));
        self.add_routes(a, b);
    }

    /// `ip route replace <peer>/32 dev p-<peer> src <own>` on both sides (idempotent).
    fn add_routes(&self, a: End, b: End) {
        for (from, to) in [(a, b), (b, a)] {
            let ns = self.ns_of(from);
            let dst = format!("{}/32", to.addr());
            let src = from.addr().to_string();
            ip(&[
                "-n",
                &ns,
                "route",
                "replace",
                &dst,
                "dev",
                &ifname(to),
                "src",
                &src,
            ])
            .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    fn spawn_node(&self, i: usize, size: usize, binary: &Path) -> Node {
        let end = End::Node(i);
        let name = format!("n{i}");
        let ns = self.ns_of(end);
        let node_dir = self.dir.path().join(&name);
        fs::create_dir_all(&node_dir).expect("node directory");
        let config_path = node_dir.join("nats-server.conf");
        let log_path = node_dir.join("nats-server.log");
        let store = node_dir.join("jetstream");
        let addr = end.addr();
        let routes: Vec<String> = (0..size)
            .filter(|j| *j != i)
            .map(|j| format!("\"nats-route://{}:{ROUTE_PORT}\"", End::Node(j).addr()))
            .collect();
        let mut c = String::new();
        let _ = writeln!(c, "server_name: \"{name}\"");
        let _ = writeln!(c, "listen: \"{addr}:{CLIENT_PORT}\"");
        let _ = writeln!(c, "http: \"127.0.0.1:{MONITOR_PORT}\"");
        // Routes and clients that stop answering are dropped after ~3 s instead of the
        // default ~4 min (2 min interval, 2 outstanding), so a cut is noticed and a heal
        // reconnects quickly. Raft itself does not depend on this.
        let _ = writeln!(c, "ping_interval: \"1s\"");
        let _ = writeln!(c, "ping_max: 3");
        let _ = writeln!(c, "jetstream {{");
        let _ = writeln!(c, "  store_dir: \"{}\"", store.display());
        let _ = writeln!(c, "  sync_interval: always");
        let _ = writeln!(c, "}}");
        let _ = writeln!(c, "cluster {{");
        let _ = writeln!(c, "  name: \"{}\"", self.tag);
        let _ = writeln!(c, "  listen: \"{addr}:{ROUTE_PORT}\"");
        let _ = writeln!(c, "  routes: [{}]", routes.join(", "));
        let _ = writeln!(c, "}}");
        fs::write(&config_path, c).expect("write nats-server config");
        let log = File::create(&log_path).expect("create nats-server log");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(binary)
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start nats-server in {ns}: {e}"));
        Node {
            name,
            ns,
            log_path,
            child: Mutex::new(Some(child)),
        }
    }

    /// Waits until every node is healthy (`/healthz`, which includes JetStream meta state) and
    /// all agree on a meta leader.
    fn wait_formed(&self) {
        let deadline = Instant::now() + FORM_TIMEOUT;
        loop {
            for node in &self.nodes {
                if !node.is_running() {
                    panic!(
                        "nats-server {} exited during start-up\n{}",
                        node.name,
                        node.log_tail()
                    );
                }
            }
            let healthy = (0..self.len()).all(|i| {
                self.try_monitor_json(i, "/healthz")
                    .map(|v| v["status"] == "ok")
                    .unwrap_or(false)
            });
            let leaders: BTreeSet<Option<String>> = (0..self.len())
                .map(|i| self.meta_leader_seen_by(i))
                .collect();
            let agreed = leaders.len() == 1
                && leaders
                    .iter()
                    .next()
                    .and_then(|l| l.as_deref())
                    .is_some_and(|l| !l.is_empty());
            if healthy && agreed {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "partition cluster did not form within {FORM_TIMEOUT:?}\n{}",
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.kill();
        }
        for ns in &self.namespaces {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("partition cluster clean-up: {e}");
            }
        }
        // `dir` is removed after this.
    }
}

/// The interface leading to `peer` (same name in every namespace; max 15 characters).
fn ifname(peer: End) -> String {
    format!("p-{}", peer.tag())
}

/// Runs `ip <args>`; the error names the command and carries its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "`ip` (iproute2) not found in PATH".to_owned(),
            _ => format!("ip {}: {e}", args.join(" ")),
        })?;
    let deadline = Instant::now() + IP_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut stderr = String::new();
                if let Some(mut s) = child.stderr.take() {
                    let _ = s.read_to_string(&mut stderr);
                }
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "ip {}: {status}: {}",
                        args.join(" "),
                        stderr.trim()
                    ))
                };
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "ip {}: no answer within {IP_TIMEOUT:?}",
                    args.join(" ")
                ));
            }
            Err(e) => return Err(format!("ip {}: {e}", args.join(" "))),
        }
    }
}

/// Runs `ip <args>` and returns its stdout.
fn ip_output(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this process can create network namespaces: tried once (a probe namespace is
/// created and deleted), the answer kept.
pub fn check_available() -> Result<(), Unavailable> {
    static ANSWER: OnceLock<Result<(), Unavailable>> = OnceLock::new();
    ANSWER
        .get_or_init(|| {
            let probe = format!("{PREFIX}{}-probe", std::process::id());
            ip(&["netns", "add", &probe]).map_err(Unavailable)?;
            // Also what the clusters need besides a namespace: veth links, and entering it.
            let works = ip(&[
                "-n", &probe, "link", "add", "probe-a", "type", "veth", "peer", "name", "probe-b",
            ])
            .and_then(|()| in_netns(&probe, || Ok(())));
            let _ = ip(&["netns", "del", &probe]);
            works.map_err(Unavailable)
        })
        .clone()
}

/// Removes what killed runs left: for every namespace and temp directory named
/// `cemsg-<pid>-...` whose process is gone, kills the processes still in the namespace and
/// deletes it. Runs once per process.
pub fn sweep_leftovers() {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        let listing = ip_output(&["netns", "list"]).unwrap_or_default();
        for line in listing.lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            if !owner_is_gone(name) {
                continue;
            }
            if let Ok(pids) = ip_output(&["netns", "pids", name]) {
                for pid in pids
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            match ip(&["netns", "del", name]) {
                Ok(()) => eprintln!("partition tests: removed leftover namespace {name}"),
                Err(e) => eprintln!("partition tests: leftover namespace {name}: {e}"),
            }
        }
        if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if owner_is_gone(&name) {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
    });
}

/// True for a `cemsg-<pid>-...` name whose pid is not a running process.
fn owner_is_gone(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return false;
    };
    let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
}

/// Moves the calling thread into the network namespace `ns` (`/var/run/netns/<ns>`, where
/// `ip netns add` mounts it). Sockets it opens from then on belong to that namespace.
pub fn enter_netns(ns: &str) -> Result<(), String> {
    let path = format!("/var/run/netns/{ns}");
    let file = File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
    // SAFETY: setns(2) with a valid open namespace file descriptor and CLONE_NEWNET only
    // changes the calling thread's network namespace; no memory is shared with the kernel.
    let rc = unsafe { nix::libc::setns(file.as_raw_fd(), nix::libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Runs `f` on a new thread inside the namespace `ns` and returns its result.
pub fn in_netns<T: Send>(
    ns: &str,
    f: impl FnOnce() -> Result<T, String> + Send,
) -> Result<T, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_netns(ns)?;
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A minimal HTTP/1.0 GET to `127.0.0.1:<port>` in the calling thread's namespace.
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
