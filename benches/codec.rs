//! Codec micro-benchmark: events/s for encoding and decoding a small event in both content
//! modes, against cloudevents-sdk's own serde JSON (`serde_json::to_vec` / `from_slice`) in the
//! same run. Run with `cargo bench --bench codec`.
//!
//! Each figure is the best of several rounds, on one thread.
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ce_messaging::cloudevents::Event;
use ce_messaging::codec::{decode, encode, ContentMode};
use ce_messaging::event::new_event;

const ROUNDS: usize = 7;
const ROUND_TIME: Duration = Duration::from_millis(300);

/// Events per second of `f`, best of `ROUNDS` rounds.
fn rate(mut f: impl FnMut()) -> f64 {
    // Warm up and size a batch to about 10 ms.
    let mut batch = 1u64;
    loop {
        let start = Instant::now();
        for _ in 0..batch {
            f();
        }
        if start.elapsed() >= Duration::from_millis(10) {
            break;
        }
        batch *= 2;
    }
    let mut best = 0f64;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < ROUND_TIME {
            for _ in 0..batch {
                f();
            }
            n += batch;
        }
        let r = n as f64 / start.elapsed().as_secs_f64();
        best = best.max(r);
    }
    best
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
    assert_eq!(
        decode(Some(&structured.headers), &structured.payload).expect("structured decode"),
        event
    );
    assert_eq!(
        decode(Some(&binary.headers), &binary.payload).expect("binary decode"),
        event
    );
    println!(
        "event: structured payload {} bytes; binary payload {} bytes + {} headers",
        structured.payload.len(),
        binary.payload.len(),
        binary.headers.len()
    );

    let sdk_encode = rate(|| {
        black_box(serde_json::to_vec(black_box(&event)).ok());
    });
    let sdk_decode = rate(|| {
        black_box(serde_json::from_slice::<Event>(black_box(&sdk_json)).ok());
    });
    let enc_structured = rate(|| {
        black_box(encode(black_box(&event), ContentMode::Structured).ok());
    });
    let enc_binary = rate(|| {
        black_box(encode(black_box(&event), ContentMode::Binary).ok());
    });
    let dec_structured = rate(|| {
        black_box(decode(Some(&structured.headers), black_box(&structured.payload)).ok());
    });
    let dec_structured_no_ct = rate(|| {
        black_box(decode(None, black_box(&structured.payload)).ok());
    });
    let dec_binary = rate(|| {
        black_box(decode(Some(&binary.headers), black_box(&binary.payload)).ok());
    });

    // The same event without data: the share of binary decode spent typing JSON data.
    let mut no_data = event.clone();
    no_data.take_data();
    let binary_no_data = encode(&no_data, ContentMode::Binary).expect("binary encode");
    let dec_binary_no_data = rate(|| {
        black_box(
            decode(
                Some(&binary_no_data.headers),
                black_box(&binary_no_data.payload),
            )
            .ok(),
        );
    });

    let row = |name: &str, r: f64, base: f64, base_name: &str| {
        println!(
            "{name:<40} {:>12.0} events/s  {:>6.2}x {base_name}",
            r,
            r / base
        );
    };
    row(
        "sdk serde_json::to_vec",
        sdk_encode,
        sdk_encode,
        "sdk to_vec",
    );
    row(
        "sdk serde_json::from_slice",
        sdk_decode,
        sdk_decode,
        "sdk from_slice",
    );
    row(
        "ours encode structured",
        enc_structured,
        sdk_encode,
        "sdk to_vec",
    );
    row("ours encode binary", enc_binary, sdk_encode, "sdk to_vec");
    row(
        "ours decode structured",
        dec_structured,
        sdk_decode,
        "sdk from_slice",
    );
    row(
        "ours decode structured (no Content-Type)",
        dec_structured_no_ct,
        sdk_decode,
        "sdk from_slice",
    );
    row(
        "ours decode binary",
        dec_binary,
        sdk_decode,
        "sdk from_slice",
    );
    row(
        "ours decode binary (event without data)",
        dec_binary_no_data,
        sdk_decode,
        "sdk from_slice",
    );
}
