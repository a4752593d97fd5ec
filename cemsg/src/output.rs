//! What `cemsg` prints: one JSON line per result on stdout (flushed at once, so a reader sees
//! each line as it happens), notes on stderr, and a progress counter on stderr when stderr is
//! a terminal.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use ce_messaging::Event;

use crate::fail::{Failure, EXIT_OTHER};

/// Writes one line on stdout and flushes it.
pub fn line(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|e| Failure::new(EXIT_OTHER, format!("cannot write to stdout: {e}")))
}

/// Writes a JSON value as one line on stdout.
pub fn json(value: &serde_json::Value) -> Result<(), Failure> {
    line(&value.to_string())
}

/// The event in the structured CloudEvents JSON format, on one line. (Through the codec, so
/// that JSON data a decoded event carries as its text prints as a `data` member.)
pub fn event_line(event: &Event) -> Result<String, Failure> {
    let cannot = |e: &dyn std::fmt::Display| {
        Failure::new(EXIT_OTHER, format!("cannot print the event as JSON: {e}"))
    };
    let encoded = ce_messaging::codec::encode(event, ce_messaging::codec::ContentMode::Structured)
        .map_err(|e| cannot(&e))?;
    String::from_utf8(encoded.payload.to_vec()).map_err(|e| cannot(&e))
}

/// A note for the person at the terminal (stderr); never part of the results.
pub fn note(text: &str) {
    eprintln!("cemsg: {text}");
}

/// A `\r` counter on stderr, drawn only when stderr is a terminal, at most every 100 ms.
pub struct Progress {
    enabled: bool,
    total: u64,
    label: &'static str,
    last_draw: Option<Instant>,
    drawn: Option<u64>,
}

impl Progress {
    pub fn new(label: &'static str, total: u64) -> Self {
        Progress {
            enabled: std::io::stderr().is_terminal(),
            total,
            label,
            last_draw: None,
            drawn: None,
        }
    }

    pub fn update(&mut self, done: u64) {
        if !self.enabled {
            return;
        }
        let due = self
            .last_draw
            .is_none_or(|at| at.elapsed() >= Duration::from_millis(100));
        if due || done == self.total {
            self.last_draw = Some(Instant::now());
            self.draw(done);
        }
    }

    fn draw(&mut self, done: u64) {
        self.drawn = Some(done);
        let percent = (done * 100).checked_div(self.total).unwrap_or(100);
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{} {done}/{} ({percent}%)", self.label, self.total);
        let _ = err.flush();
    }

    /// Ends the counter's line.
    pub fn finish(&mut self, done: u64) {
        if self.enabled {
            if self.drawn != Some(done) {
                self.draw(done);
            }
            eprintln!();
            self.enabled = false;
        }
    }
}
