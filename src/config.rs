//! Configuration from environment variables (being written).
