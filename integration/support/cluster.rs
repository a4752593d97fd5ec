//! A JetStream cluster of `nats-server` processes on loopback (usually 3 nodes), each routed to
//! all the others. [`NatsCluster::start`] returns once the nodes agree on a meta leader.

use std::time::{Duration, Instant};

use async_nats::jetstream;

use super::server::{free_ports, NatsServer, ServerOptions};

/// How long the cluster may take to form (routes up, meta leader elected).
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`NatsCluster::meta_leader`] and [`NatsCluster::stream_leader`] wait for a leader:
/// the fault tests' own bound on a new leader after a kill (40 s), since an election after
/// repeated kills took longer than 20 s once on a loaded 2-core machine.
const LEADER_TIMEOUT: Duration = Duration::from_secs(40);
/// How long one stream-info request of [`NatsCluster::stream_leader`] may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// How many times a start picks new ports after losing a port race to another process.
const PORT_RACE_ATTEMPTS: usize = 3;

/// Nodes are named `n0`, `n1`, ...; the index in the name is the index in the cluster.
fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// A cluster of [`NatsServer`]s. Dropping it kills every node and deletes every store.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` JetStream nodes with routes to each other and waits until every node is
    /// healthy and they agree on a meta leader. Panics (with the nodes' log tails) otherwise.
    pub fn start(size: usize) -> NatsCluster {
        NatsCluster::start_with(size, "")
    }

    /// Like [`start`](Self::start), appending `extra_config` to every node's config file.
    pub fn start_with(size: usize, extra_config: &str) -> NatsCluster {
        assert!(size >= 1, "a cluster needs at least one node");
        let mut attempt = 0;
        let cluster = loop {
            attempt += 1;
            // client, monitor and route port per node, all distinct.
            let ports = free_ports(3 * size);
            let route_ports: Vec<u16> = (0..size).map(|i| ports[3 * i + 2]).collect();
            let cluster_name = format!("ce-test-{}", route_ports[0]);
            let nodes: Vec<NatsServer> = (0..size)
                .map(|i| {
                    let routes: Vec<String> = route_ports
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, p)| format!("\"nats-route://127.0.0.1:{p}\""))
                        .collect();
                    let cluster_block = format!(
                        "cluster {{\n  name: \"{cluster_name}\"\n  listen: \"127.0.0.1:{}\"\n  \
                         routes: [{}]\n}}\n{extra_config}",
                        route_ports[i],
                        routes.join(", ")
                    );
                    NatsServer::spawn(ServerOptions {
                        jetstream: true,
                        extra_config: cluster_block,
                        server_name: Some(node_name(i)),
                        port: Some(ports[3 * i]),
                        monitor_port: Some(ports[3 * i + 1]),
                        wait_healthy: false,
                    })
                })
                .collect();
            let lost_race = nodes.iter().any(NatsServer::exited_with_port_in_use);
            if lost_race && attempt < PORT_RACE_ATTEMPTS {
                continue; // `nodes` dropped: all killed, stores deleted.
            }
            break NatsCluster { nodes };
        };
        for node in &cluster.nodes {
            node.wait_ready();
        }
        cluster.wait_formed();
        cluster
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True for a cluster of no nodes (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// All nodes.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// Client URLs of all nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// Client URLs of all nodes, comma-separated (what `NATS_URL` and [`super::connect`] take).
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    /// SIGKILLs node `i`.
    pub fn kill(&self, i: usize) {
        self.nodes[i].kill();
    }

    /// Restarts node `i` on its ports with its store and waits until it serves again.
    pub fn restart(&self, i: usize) {
        self.nodes[i].restart();
    }

    /// SIGSTOPs node `i`.
    pub fn pause(&self, i: usize) {
        self.nodes[i].pause();
    }

    /// SIGCONTs node `i`.
    pub fn resume(&self, i: usize) {
        self.nodes[i].resume();
    }

    /// Index of the current JetStream meta leader, as seen by the running, unpaused nodes
    /// (they must agree). Waits for an election if there is no leader right now.
    pub async fn meta_leader(&self) -> usize {
        let deadline = Instant::now() + LEADER_TIMEOUT;
        loop {
            if let Some(i) = self.agreed_meta_leader() {
                return i;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no JetStream meta leader within {LEADER_TIMEOUT:?}\n{}",
                    self.log_tails()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Index of the node leading `stream` (from the stream info's cluster leader). Waits for
    /// an election if the stream has no leader right now.
    pub async fn stream_leader(&self, client: &async_nats::Client, stream: &str) -> usize {
        let js = jetstream::new(client.clone());
        let deadline = Instant::now() + LEADER_TIMEOUT;
        let mut last;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Each attempt bounded on its own: a request sent while the client reconnects
            // after a kill can hang, and must not use up the whole window.
            match tokio::time::timeout(left.min(ATTEMPT_TIMEOUT), js.get_stream(stream)).await {
                Ok(Ok(mut s)) => match s.info().await {
                    Ok(info) => {
                        let leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
                        match leader.as_deref().and_then(|name| self.index_of(name)) {
                            Some(i) => return i,
                            None => last = format!("leader {leader:?}"),
                        }
                    }
                    Err(e) => last = e.to_string(),
                },
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "stream info timed out".into(),
            }
            if Instant::now() >= deadline {
                panic!("no leader for stream {stream} within {LEADER_TIMEOUT:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name() == name)
    }

    /// The meta leader all running, unpaused nodes report, if they agree on one.
    fn agreed_meta_leader(&self) -> Option<usize> {
        let mut agreed: Option<String> = None;
        let mut asked = 0;
        for node in self
            .nodes
            .iter()
            .filter(|n| n.is_running() && !n.is_paused())
        {
            let jsz = node.try_monitor_json("/jsz").ok()?;
            let leader = jsz["meta_cluster"]["leader"].as_str().unwrap_or("");
            if leader.is_empty() {
                return None;
            }
            match &agreed {
                Some(l) if l != leader => return None,
                _ => agreed = Some(leader.to_string()),
            }
            asked += 1;
        }
        if asked == 0 {
            return None;
        }
        self.index_of(agreed.as_deref()?)
    }

    /// Waits until every node is fully healthy (`/healthz`, which includes JetStream meta
    /// state) and all agree on a meta leader.
    fn wait_formed(&self) {
        let deadline = Instant::now() + FORM_TIMEOUT;
        loop {
            let healthy = self.nodes.iter().all(|n| {
                n.try_monitor_json("/healthz")
                    .map(|v| v["status"] == "ok")
                    .unwrap_or(false)
            });
            if healthy && self.agreed_meta_leader().is_some() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "cluster did not form within {FORM_TIMEOUT:?}\n{}",
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tails(&self) -> String {
        self.nodes.iter().map(NatsServer::log_tail).collect()
    }
}
