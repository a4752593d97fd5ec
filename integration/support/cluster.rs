//! A 3-node (or n-node) JetStream cluster on loopback, with routes between all nodes.
