//! Codec micro-benchmark: events/s for encoding and decoding a small event in both content
//! modes, against cloudevents-sdk's own serde JSON (`serde_json::to_vec` / `from_slice`) in the
//! same run. Run with `cargo bench --bench codec`.
//!
//! Each figure is the best of several rounds, on one thread; rounds of all cases are
//! interleaved so that load from other processes affects them alike.
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ce_messaging::cloudevents::Event;
use ce_messaging::codec::{decode, encode, ContentMode};
use ce_messaging::event::{new_event, EventExt};

const ROUNDS: usize = 9;
const ROUND_TIME: Duration = Duration::from_millis(200);

/// One measured operation.
struct Case<'a> {
    name: &'static str,
    run: Box<dyn FnMut() + 'a>,
    batch: u64,
    best: f64,
}

impl<'a> Case<'a> {
    fn new(name: &'static str, run: impl FnMut() + 'a) -> Self {
        Case {
            name,
            run: Box::new(run),
            batch: 1,
            best: 0.0,
        }
    }

    /// Warms up and sizes a batch to about 5 ms.
    fn warm_up(&mut self) {
        loop {
            let start = Instant::now();
            for _ in 0..self.batch {
                (self.run)();
            }
            if start.elapsed() >= Duration::from_millis(5) {
                break;
            }
            self.batch *= 2;
        }
    }

    /// Runs one round and keeps the best events/s seen.
    fn round(&mut self) {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < ROUND_TIME {
            for _ in 0..self.batch {
                (self.run)();
            }
            n += self.batch;
        }
        self.best = self.best.max(n as f64 / start.elapsed().as_secs_f64());
    }
}

/// Measures every case, rounds interleaved so that load from other processes hits all cases
/// alike; each figure is the best round.
fn measure(cases: &mut [Case<'_>]) {
    for case in cases.iter_mut() {
        case.warm_up();
    }
    for _ in 0..ROUNDS {
        for case in cases.iter_mut() {
            case.round();
        }
    }
}

fn main() {
    #[derive(serde::Serialize)]
    struct Workspace<'a> {
        name: &'a str,
        owner: &'a str,
        size: u64,
        tags: [&'a str; 2],
    }
    let event = new_event(
        "org.cyverse.workspace.created",
        "workspace-service",
        &Workspace {
            name: "my workspace",
            owner: "alice",
            size: 1024,
            tags: ["a", "b"],
        },
    )
    .expect("the benchmark event builds");

    let structured = encode(&event, ContentMode::Structured).expect("structured encode");
    let binary = encode(&event, ContentMode::Binary).expect("binary encode");
    let sdk_json = Bytes::from(serde_json::to_vec(&event).expect("sdk serialize"));
    for msg in [&structured, &binary] {
        let mut back = decode(Some(&msg.headers.to_header_map()), &msg.payload).expect("decode");
        // JSON data decodes as its JSON text (read with data_as): compare it as JSON.
        let value: serde_json::Value = back.data_as().expect("JSON data");
        back.set_data_unchecked(value);
        assert_eq!(back, event);
    }
    println!(
        "event: structured payload {} bytes; binary payload {} bytes + {} headers",
        structured.payload.len(),
        binary.payload.len(),
        binary.headers.len()
    );

    // The same event without data: the share of binary decode spent typing JSON data.
    let mut no_data = event.clone();
    no_data.take_data();
    let binary_no_data = encode(&no_data, ContentMode::Binary).expect("binary encode");
    // The decode cases read headers as async-nats hands them over.
    let structured_headers = structured.headers.to_header_map();
    let binary_headers = binary.headers.to_header_map();
    let binary_no_data_headers = binary_no_data.headers.to_header_map();

    let mut cases = vec![
        Case::new("sdk serde_json::to_vec", || {
            black_box(serde_json::to_vec(black_box(&event)).ok());
        }),
        Case::new("sdk serde_json::from_slice", || {
            black_box(serde_json::from_slice::<Event>(black_box(&sdk_json)).ok());
        }),
        Case::new("ours encode structured", || {
            black_box(encode(black_box(&event), ContentMode::Structured).ok());
        }),
        Case::new("ours encode binary", || {
            black_box(encode(black_box(&event), ContentMode::Binary).ok());
        }),
        Case::new("ours decode structured", || {
            black_box(decode(Some(&structured_headers), black_box(&structured.payload)).ok());
        }),
        Case::new("ours decode structured (no Content-Type)", || {
            black_box(decode(None, black_box(&structured.payload)).ok());
        }),
        Case::new("ours decode binary", || {
            black_box(decode(Some(&binary_headers), black_box(&binary.payload)).ok());
        }),
        Case::new("ours decode binary (event without data)", || {
            black_box(
                decode(
                    Some(&binary_no_data_headers),
                    black_box(&binary_no_data.payload),
                )
                .ok(),
            );
        }),
    ];
    measure(&mut cases);
    let (sdk_encode, sdk_decode) = (cases[0].best, cases[1].best);
    for case in &cases {
        let (base, base_name) = if case.name.contains("encode") || case.name.contains("to_vec") {
            (sdk_encode, "sdk to_vec")
        } else {
            (sdk_decode, "sdk from_slice")
        };
        println!(
            "{:<42} {:>10.0} events/s  {:>6.2}x {base_name}",
            case.name,
            case.best,
            case.best / base
        );
    }
}
