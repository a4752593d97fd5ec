//! Time in events (issue 17): deferred and recurring publishes and per-event expiry, the same
//! on every event backend. JetStream fires schedules on whole seconds, so the cases use delays
//! of a few seconds and assert instants against the `@at` the publish sent; they never sleep
//! to synchronise (a marker event published after the fact, handled by the same listener,
//! proves that nothing else arrived).

use std::time::Duration;

use ce_messaging::config::Config;
use ce_messaging::error::PublishErrorKind;
use ce_messaging::event::new_event_auto_source;
use ce_messaging::events::{
    event_handler_fn, priority_durable, set_priority, Backoff, EventConnection, EventHandlers,
    EventListenOptions, PublishOptions, Schedule, NATS_SCHEDULER,
};
use ce_messaging::handler::HandlerError;
use ce_messaging::{Event, ReceivedEvent};
use cloudevents::AttributesReader;
use serde_json::json;

use super::events::{listen, new_type, wait_settled};
use super::{eventually, within, within_for, Gate, Seen};
use crate::backend::{unique, ConsumerState, EventBackend};

fn options(durable: &str, workers: usize, buffer: usize) -> EventListenOptions {
    EventListenOptions {
        pool: ce_messaging::WorkerOptions::new(workers, buffer).with_grace(Duration::from_secs(5)),
        durable_name: Some(durable.to_owned()),
        max_deliver: Some(5),
        ack_wait: Some(Duration::from_secs(5)),
        handler_timeout: None,
        start_position: Some(ce_messaging::StartPosition::All),
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        },
    }
}

fn event(event_type: &str, n: u64) -> Event {
    new_event_auto_source(event_type, &json!({ "n": n })).expect("event")
}

/// An event's data as JSON (a decoded event may hold it as bytes).
fn json_data(event: &Event) -> serde_json::Value {
    match event.data() {
        Some(cloudevents::Data::Json(v)) => v.clone(),
        Some(cloudevents::Data::Binary(b)) => serde_json::from_slice(b).expect("JSON data"),
        Some(cloudevents::Data::String(s)) => serde_json::from_str(s).expect("JSON data"),
        None => serde_json::Value::Null,
    }
}

/// What a handler saw: the event and the wall time it was handled at.
type Handled = (ReceivedEvent, chrono::DateTime<chrono::Utc>);

/// Records every delivered event of `types` with the time it was handled, and acks it.
fn recording(types: &[&str], seen: &Seen<Handled>) -> EventHandlers {
    let mut handlers = EventHandlers::new();
    for ty in types {
        let seen = seen.clone();
        handlers = handlers.on(
            *ty,
            event_handler_fn(move |event, _| {
                let seen = seen.clone();
                async move {
                    seen.push((event, chrono::Utc::now()));
                    Ok(())
                }
            }),
        );
    }
    handlers
}

/// The wall time `@at` will name for a delay from now: rounded up to a whole second, as the
/// library sends it; a firing before it is early.
fn due_after(
    published: chrono::DateTime<chrono::Utc>,
    delay: Duration,
) -> chrono::DateTime<chrono::Utc> {
    let due = published + chrono::Duration::from_std(delay).expect("delay");
    let whole = due - chrono::Duration::nanoseconds(i64::from(due.timestamp_subsec_nanos()));
    if whole < due {
        whole + chrono::Duration::seconds(1)
    } else {
        whole
    }
}

/// Publishes a marker event of `marker_type` and waits until the listener handled it: every
/// event stored before it that the listener would handle has had its turn by then.
async fn marker<E: EventConnection>(connection: &E, marker_type: &str, seen: &Seen<Handled>) {
    let marker = event(marker_type, 0);
    let id = marker.id().to_owned();
    within("marker publish", connection.publish(marker))
        .await
        .expect("marker published");
    seen.wait_until("the marker to be handled", |s| {
        s.iter().any(|(e, _)| e.id() == id)
    })
    .await;
}

/// The accounting each case ends with: the durable has nothing pending, unacknowledged or
/// parked, and the dead-letter stream is empty (`why` says why none is expected).
async fn assert_settled_nothing_dead<B: EventBackend>(
    env: &B,
    config: &Config,
    events: &B::Events,
    durable: &str,
    why: &str,
) {
    let info = B::durable_info(events, durable).await;
    assert_eq!(
        (info.pending, info.ack_pending, info.parked),
        (0, 0, 0),
        "{info:?}"
    );
    assert!(env.stored(&config.js_dlq_stream).await.is_empty(), "{why}");
}

/// A deferred event is delivered once, as an ordinary event on its type, not before its time;
/// its schedule is gone after the firing.
pub async fn deferred_event_fires_once_not_before_its_time<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("sched");
    let events = env.events(&config).await;
    let (ty, marker_type) = (new_type("reminder"), new_type("marker"));
    let durable = format!("conf-{}", unique());
    let seen = Seen::new();
    let listener = listen(
        &events,
        recording(&[&ty, &marker_type], &seen),
        options(&durable, 4, 16),
    )
    .await;
    let reminder = event(&ty, 1);
    let id = reminder.id().to_owned();
    let delay = Duration::from_secs(2);
    let published = chrono::Utc::now();
    within(
        "scheduled publish",
        events.publish_with(reminder, PublishOptions::after(delay)),
    )
    .await
    .expect("schedule stored");
    let due = due_after(published, delay);
    let listed = within("schedules", events.schedules())
        .await
        .expect("schedules");
    assert!(
        listed
            .iter()
            .any(|s| s.id == id && s.schedule.starts_with("@at ")),
        "the pending schedule is listed: {listed:?}"
    );
    let handled = seen
        .wait_until("the deferred event", |s| {
            s.iter().any(|(e, _)| e.ty() == ty)
        })
        .await;
    let (fired, at) = handled
        .iter()
        .find(|(e, _)| e.ty() == ty)
        .cloned()
        .expect("handled");
    assert!(at >= due, "handled at {at}, before its time {due}");
    assert_eq!(fired.id(), id, "a one-shot firing keeps the event id");
    assert_eq!(json_data(&fired), json!({ "n": 1 }), "data intact");
    marker(&events, &marker_type, &seen).await;
    let firings: Vec<_> = seen
        .snapshot()
        .into_iter()
        .filter(|(e, _)| e.ty() == ty)
        .collect();
    assert_eq!(firings.len(), 1, "fired once: {firings:?}");
    let stored = env.stored(&config.js_stream).await;
    let on_type: Vec<_> = stored
        .iter()
        .filter(|m| m.subject == config.events_subject(&ty))
        .collect();
    assert_eq!(
        on_type.len(),
        1,
        "one firing stored on the event's own subject"
    );
    assert!(
        on_type[0].header(NATS_SCHEDULER).is_some(),
        "the firing names its schedule"
    );
    assert!(
        !within("schedules", events.schedules())
            .await
            .expect("schedules")
            .iter()
            .any(|s| s.id == id),
        "a fired one-shot schedule is gone"
    );
    wait_settled(&env, &config, &durable).await;
    within("stop", listener.stop(Duration::from_secs(5))).await;
    B::close_events(&events).await;
}

/// A cancelled schedule never fires; one due at the same time beside it does.
pub async fn cancelled_schedule_never_fires<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("sched");
    let events = env.events(&config).await;
    let (ty, marker_type) = (new_type("job"), new_type("marker"));
    let durable = format!("conf-{}", unique());
    let seen = Seen::new();
    let listener = listen(
        &events,
        recording(&[&ty, &marker_type], &seen),
        options(&durable, 4, 16),
    )
    .await;
    let (kept, cancelled) = (event(&ty, 1), event(&ty, 2));
    let (kept_id, cancelled_id) = (kept.id().to_owned(), cancelled.id().to_owned());
    let at = chrono::Utc::now() + chrono::Duration::seconds(3);
    for e in [kept, cancelled] {
        within(
            "scheduled publish",
            events.publish_with(e, PublishOptions::at(at)),
        )
        .await
        .expect("schedule stored");
    }
    assert!(
        within("cancel", events.cancel_schedule(&cancelled_id))
            .await
            .expect("cancel"),
        "the schedule existed"
    );
    assert!(
        !within("cancel again", events.cancel_schedule(&cancelled_id))
            .await
            .expect("cancel again"),
        "a cancelled schedule is gone"
    );
    seen.wait_until("the kept schedule's event", |s| {
        s.iter().any(|(e, _)| e.id() == kept_id)
    })
    .await;
    marker(&events, &marker_type, &seen).await;
    let ids: Vec<String> = seen
        .snapshot()
        .iter()
        .filter(|(e, _)| e.ty() == ty)
        .map(|(e, _)| e.id().to_owned())
        .collect();
    assert_eq!(ids, vec![kept_id], "only the kept schedule fired");
    assert!(within("schedules", events.schedules())
        .await
        .expect("schedules")
        .is_empty());
    wait_settled(&env, &config, &durable).await;
    within("stop", listener.stop(Duration::from_secs(5))).await;
    B::close_events(&events).await;
}

/// A recurring schedule fires again and again, each firing with its own id derived from the
/// schedule (`<event id>@<next firing>`), until it is cancelled.
pub async fn recurring_schedule_fires_n_times_with_own_ids<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("sched");
    let events = env.events(&config).await;
    let (ty, marker_type) = (new_type("tick"), new_type("marker"));
    let durable = format!("conf-{}", unique());
    let seen = Seen::new();
    let listener = listen(
        &events,
        recording(&[&ty, &marker_type], &seen),
        options(&durable, 4, 16),
    )
    .await;
    let tick = event(&ty, 1);
    let id = tick.id().to_owned();
    let started = chrono::Utc::now();
    within(
        "recurring publish",
        events.publish_with(tick, PublishOptions::every(Duration::from_secs(1))),
    )
    .await
    .expect("schedule stored");
    let firings = within_for(
        Duration::from_secs(20),
        "three firings",
        seen.wait_until("three firings", |s| {
            s.iter().filter(|(e, _)| e.ty() == ty).count() >= 3
        }),
    )
    .await;
    assert!(
        within("cancel", events.cancel_schedule(&id))
            .await
            .expect("cancel"),
        "the recurring schedule was there until cancelled"
    );
    let firings: Vec<Handled> = firings.into_iter().filter(|(e, _)| e.ty() == ty).collect();
    let ids: std::collections::BTreeSet<String> =
        firings.iter().map(|(e, _)| e.id().to_owned()).collect();
    assert_eq!(
        ids.len(),
        firings.len(),
        "every firing has its own id: {ids:?}"
    );
    for fid in &ids {
        assert!(
            fid.starts_with(&format!("{id}@")),
            "firing id {fid} derives from {id}"
        );
    }
    let first = firings.iter().map(|(_, at)| *at).min().expect("firings");
    assert!(
        first >= started + chrono::Duration::milliseconds(500),
        "the first firing is an interval after the publish ({started} -> {first})"
    );
    marker(&events, &marker_type, &seen).await;
    let after_cancel = seen.snapshot().iter().filter(|(e, _)| e.ty() == ty).count();
    // A firing stored in the instant of the cancel may still arrive; none after the marker.
    marker(&events, &marker_type, &seen).await;
    assert_eq!(
        seen.snapshot().iter().filter(|(e, _)| e.ty() == ty).count(),
        after_cancel,
        "no firing after the cancel"
    );
    assert!(!within("schedules", events.schedules())
        .await
        .expect("schedules")
        .iter()
        .any(|s| s.id == id));
    wait_settled(&env, &config, &durable).await;
    within("stop", listener.stop(Duration::from_secs(5))).await;
    B::close_events(&events).await;
}

/// An event whose time-to-live passed while it waited for a worker is never given to a
/// handler; it is settled (nothing left pending) and not dead-lettered.
pub async fn expired_event_is_never_handled<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("ttl");
    let events = env.events(&config).await;
    let (ty, marker_type) = (new_type("quote"), new_type("marker"));
    let durable = format!("conf-{}", unique());
    let seen: Seen<Handled> = Seen::new();
    let gate = Gate::new();
    let started = Seen::<u64>::new();
    let gated = |seen: Seen<Handled>, gate: Gate, started: Seen<u64>| {
        event_handler_fn(move |event: ReceivedEvent, _| {
            let (seen, gate, started) = (seen.clone(), gate.clone(), started.clone());
            async move {
                started.push(1);
                // The first event holds the only worker until the gate opens.
                gate.wait().await;
                seen.push((event, chrono::Utc::now()));
                Ok(())
            }
        })
    };
    let handlers = EventHandlers::new()
        .on(&ty, gated(seen.clone(), gate.clone(), started.clone()))
        .on(
            &marker_type,
            gated(seen.clone(), gate.clone(), started.clone()),
        );
    let listener = listen(&events, handlers, options(&durable, 1, 4)).await;
    within("blocker publish", events.publish(event(&ty, 1)))
        .await
        .expect("published");
    started.wait_len("the blocker to hold the worker", 1).await;
    let quote = event(&ty, 2);
    let quote_id = quote.id().to_owned();
    within(
        "expiring publish",
        events.publish_with(
            quote,
            PublishOptions::default().with_ttl(Duration::from_secs(2)),
        ),
    )
    .await
    .expect("published with a time-to-live");
    // The listener holds the quote (delivered, unacknowledged, queued behind the blocker)
    // before its time-to-live passes: what happens to it next is the listener's decision.
    eventually("the quote to reach the listener", || async {
        env.consumer_state(&config.js_stream, &durable).await
            == Some(ConsumerState {
                pending: 0,
                ack_pending: 2,
            })
    })
    .await;
    // The stream drops it when its time-to-live passes (the listener holds it meanwhile).
    eventually("the expired quote to leave the stream", || async {
        !env.stored(&config.js_stream).await.iter().any(|m| {
            ce_messaging::codec::decode(Some(&m.headers), &m.payload)
                .is_ok_and(|e| e.id() == quote_id)
        })
    })
    .await;
    gate.open();
    marker(&events, &marker_type, &seen).await;
    assert!(
        !seen.snapshot().iter().any(|(e, _)| e.id() == quote_id),
        "the expired quote was given to a handler"
    );
    wait_settled(&env, &config, &durable).await;
    // Blocker, quote, marker: each delivered once, so the quote was settled by the listener's
    // expiry check (acked without a handler run), not left to a redelivery.
    assert_eq!(
        env.deliveries(&config.js_stream, &durable).await,
        Some(3),
        "the quote was delivered to the listener once and settled there"
    );
    assert_settled_nothing_dead(
        &env,
        &config,
        &events,
        &durable,
        "expired events are counted, not dead-lettered",
    )
    .await;
    within("stop", listener.stop(Duration::from_secs(5))).await;
    B::close_events(&events).await;
}

/// An event whose handler failed retryably, with a back-off longer than its time-to-live, is
/// never handled again: it expires while it waits for the redelivery, ends settled (nothing
/// pending or unacknowledged) and is not dead-lettered.
pub async fn event_expired_while_waiting_for_redelivery_is_not_handled_again<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("ttl");
    let events = env.events(&config).await;
    let (ty, marker_type) = (new_type("quote"), new_type("marker"));
    let durable = format!("conf-{}", unique());
    let seen: Seen<Handled> = Seen::new();
    let runs = Seen::<String>::new();
    let r = runs.clone();
    let handlers = recording(&[&marker_type], &seen).on(
        &ty,
        event_handler_fn(move |event: ReceivedEvent, _| {
            let runs = r.clone();
            async move {
                runs.push(event.id().to_owned());
                // Retry later than the event's time-to-live.
                Err(HandlerError::new("not now").retry_after(Duration::from_secs(6)))
            }
        }),
    );
    let listener = listen(&events, handlers, options(&durable, 2, 4)).await;
    let quote = event(&ty, 1);
    let quote_id = quote.id().to_owned();
    within(
        "expiring publish",
        events.publish_with(
            quote,
            PublishOptions::default().with_ttl(Duration::from_secs(2)),
        ),
    )
    .await
    .expect("published with a time-to-live");
    runs.wait_len("the first (failing) handler run", 1).await;
    eventually("the expired quote to leave the stream", || async {
        !env.stored(&config.js_stream).await.iter().any(|m| {
            ce_messaging::codec::decode(Some(&m.headers), &m.payload)
                .is_ok_and(|e| e.id() == quote_id)
        })
    })
    .await;
    // Settled: the redelivery it waited for is gone (nothing pending, nothing unacknowledged).
    eventually("the expired quote settled", || async {
        env.consumer_state(&config.js_stream, &durable).await
            == Some(ConsumerState {
                pending: 0,
                ack_pending: 0,
            })
    })
    .await;
    marker(&events, &marker_type, &seen).await;
    assert_eq!(
        runs.snapshot(),
        vec![quote_id.clone()],
        "handled once, never again after it expired"
    );
    wait_settled(&env, &config, &durable).await;
    assert_settled_nothing_dead(
        &env,
        &config,
        &events,
        &durable,
        "an expired event is not dead-lettered",
    )
    .await;
    within("stop", listener.stop(Duration::from_secs(5))).await;
    B::close_events(&events).await;
}

/// A 6-field cron schedule firing every second fires again and again, each firing with its
/// own id derived from the schedule, until it is cancelled; every firing is handled once and
/// at the end nothing is pending, unacknowledged, parked or dead-lettered.
pub async fn cron_schedule_fires_every_second_until_cancelled<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("sched");
    let events = env.events(&config).await;
    let (ty, marker_type) = (new_type("cron"), new_type("marker"));
    let durable = format!("conf-{}", unique());
    let seen = Seen::new();
    let listener = listen(
        &events,
        recording(&[&ty, &marker_type], &seen),
        options(&durable, 4, 16),
    )
    .await;
    let tick = event(&ty, 7);
    let id = tick.id().to_owned();
    within(
        "cron publish",
        events.publish_with(tick, PublishOptions::cron("* * * * * *")),
    )
    .await
    .expect("schedule stored");
    let listed = within("schedules", events.schedules())
        .await
        .expect("schedules");
    assert!(
        listed.iter().any(|s| s.id == id
            && s.schedule == "* * * * * *"
            && s.target == config.events_subject(&ty)),
        "the cron schedule is listed: {listed:?}"
    );
    within_for(
        Duration::from_secs(20),
        "three cron firings",
        seen.wait_until("three cron firings", |s| {
            s.iter().filter(|(e, _)| e.ty() == ty).count() >= 3
        }),
    )
    .await;
    assert!(
        within("cancel", events.cancel_schedule(&id))
            .await
            .expect("cancel"),
        "the cron schedule was there until cancelled"
    );
    marker(&events, &marker_type, &seen).await;
    let after_cancel = seen.snapshot().iter().filter(|(e, _)| e.ty() == ty).count();
    // A firing stored in the instant of the cancel may still arrive; none after the marker.
    marker(&events, &marker_type, &seen).await;
    let handled = seen.snapshot();
    let firings: Vec<&Handled> = handled.iter().filter(|(e, _)| e.ty() == ty).collect();
    assert_eq!(firings.len(), after_cancel, "no firing after the cancel");
    let ids: std::collections::BTreeSet<String> =
        firings.iter().map(|(e, _)| e.id().to_owned()).collect();
    assert_eq!(
        ids.len(),
        firings.len(),
        "every firing has its own id: {ids:?}"
    );
    for fid in &ids {
        assert!(
            fid.starts_with(&format!("{id}@")),
            "firing id {fid} derives from {id}"
        );
    }
    for (fired, _) in &firings {
        assert_eq!(json_data(fired), json!({ "n": 7 }), "data intact");
    }
    assert!(!within("schedules", events.schedules())
        .await
        .expect("schedules")
        .iter()
        .any(|s| s.id == id));
    let stored = env.stored(&config.js_stream).await;
    let on_type = stored
        .iter()
        .filter(|m| m.subject == config.events_subject(&ty) && m.header(NATS_SCHEDULER).is_some())
        .count();
    assert_eq!(
        on_type,
        firings.len(),
        "every stored firing was handled once"
    );
    wait_settled(&env, &config, &durable).await;
    assert_eq!(
        env.deliveries(&config.js_stream, &durable).await,
        Some(handled.len() as u64),
        "one delivery per handled event (firings and markers), no redelivery"
    );
    assert_settled_nothing_dead(&env, &config, &events, &durable, "no dead letters").await;
    within("stop", listener.stop(Duration::from_secs(5))).await;
    B::close_events(&events).await;
}

/// Cron time zones: a zone that is UTC all year (`Etc/UTC`) is read by every backend (the
/// schedule is listed with its zone and fires); another zone (`Europe/Berlin`) is read by
/// JetStream and refused at once by the memory backend with `Unsupported`, nothing stored
/// (the wire contract, "Scheduled and expiring events").
pub async fn cron_time_zones_utc_everywhere_others_on_jetstream_only<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("sched");
    let events = env.events(&config).await;
    let ty = new_type("zoned");
    let durable = format!("conf-{}", unique());
    let seen = Seen::new();
    let listener = listen(&events, recording(&[&ty], &seen), options(&durable, 2, 8)).await;
    let utc = event(&ty, 1);
    let utc_id = utc.id().to_owned();
    within(
        "cron publish in Etc/UTC",
        events.publish_with(
            utc,
            PublishOptions::on(Schedule::Cron {
                expression: "* * * * * *".to_owned(),
                time_zone: Some("Etc/UTC".to_owned()),
            }),
        ),
    )
    .await
    .expect("a UTC zone is read everywhere");
    let listed = within("schedules", events.schedules())
        .await
        .expect("schedules");
    assert!(
        listed
            .iter()
            .any(|s| s.id == utc_id && s.time_zone.as_deref() == Some("Etc/UTC")),
        "listed with its zone: {listed:?}"
    );
    seen.wait_until("an Etc/UTC firing", |s| {
        s.iter()
            .any(|(e, _)| e.id().starts_with(&format!("{utc_id}@")))
    })
    .await;
    assert!(within("cancel", events.cancel_schedule(&utc_id))
        .await
        .expect("cancel"));
    let berlin = event(&ty, 2);
    let berlin_id = berlin.id().to_owned();
    let result = within(
        "cron publish in Europe/Berlin",
        events.publish_with(
            berlin,
            PublishOptions::on(Schedule::Cron {
                expression: "0 0 3 * * *".to_owned(),
                time_zone: Some("Europe/Berlin".to_owned()),
            }),
        ),
    )
    .await;
    let listed = within("schedules", events.schedules())
        .await
        .expect("schedules");
    match B::caps().cron_time_zones {
        Some(why) => {
            let err = result.expect_err(why);
            assert_eq!(err.kind(), PublishErrorKind::Unsupported, "{err}");
            assert!(err.to_string().contains("Europe/Berlin"), "{err}");
            assert!(err.into_event().is_some(), "the event is handed back");
            assert!(
                !listed.iter().any(|s| s.id == berlin_id),
                "nothing stored: {listed:?}"
            );
        }
        None => {
            result.expect("JetStream reads any IANA zone");
            assert!(
                listed
                    .iter()
                    .any(|s| s.id == berlin_id && s.time_zone.as_deref() == Some("Europe/Berlin")),
                "listed with its zone: {listed:?}"
            );
            assert!(within("cancel", events.cancel_schedule(&berlin_id))
                .await
                .expect("cancel"));
        }
    }
    wait_settled(&env, &config, &durable).await;
    within("stop", listener.stop(Duration::from_secs(5))).await;
    assert!(
        env.stored(&config.js_dlq_stream).await.is_empty(),
        "no dead letters"
    );
    B::close_events(&events).await;
}

/// A deferred event with a priority (`js_priority_levels` 2, priority 0): the schedule
/// targets its level's subject, the firing is stored there (`<prefix>._priority.0.<type>`)
/// and handled by the level-0 consumer, once; the lowest level's consumer delivers nothing.
pub async fn scheduled_event_with_priority_fires_on_its_level<B: EventBackend>() {
    let env = B::start().await;
    let mut config = env.config("sched");
    config.js_priority_levels = 2;
    let events = env.events(&config).await;
    let ty = new_type("urgent");
    let durable = format!("conf-{}", unique());
    let seen = Seen::new();
    let listener = listen(&events, recording(&[&ty], &seen), options(&durable, 2, 8)).await;
    let mut urgent = event(&ty, 1);
    set_priority(&mut urgent, 0);
    let id = urgent.id().to_owned();
    let level_subject = format!("{}._priority.0.{ty}", config.js_subject_prefix);
    within(
        "scheduled publish with a priority",
        events.publish_with(urgent, PublishOptions::after(Duration::from_secs(1))),
    )
    .await
    .expect("schedule stored");
    let listed = within("schedules", events.schedules())
        .await
        .expect("schedules");
    assert!(
        listed
            .iter()
            .any(|s| s.id == id && s.target == level_subject),
        "the schedule targets the level-0 subject: {listed:?}"
    );
    let handled = seen
        .wait_until("the prioritised firing", |s| {
            s.iter().any(|(e, _)| e.id() == id)
        })
        .await;
    assert_eq!(handled.len(), 1, "{handled:?}");
    let stored = env.stored(&config.js_stream).await;
    let firings: Vec<_> = stored
        .iter()
        .filter(|m| m.header(NATS_SCHEDULER).is_some())
        .collect();
    assert_eq!(firings.len(), 1, "one firing stored");
    assert_eq!(
        firings[0].subject, level_subject,
        "stored on its level's subject"
    );
    let (level0, level1) = (
        priority_durable(&durable, 0, 2),
        priority_durable(&durable, 1, 2),
    );
    wait_settled(&env, &config, &level0).await;
    wait_settled(&env, &config, &level1).await;
    assert_eq!(
        env.deliveries(&config.js_stream, &level0).await,
        Some(1),
        "the level-0 consumer delivered the firing once"
    );
    assert_eq!(
        env.deliveries(&config.js_stream, &level1).await,
        Some(0),
        "the lowest level's consumer delivered nothing"
    );
    within("stop", listener.stop(Duration::from_secs(5))).await;
    assert!(
        env.stored(&config.js_dlq_stream).await.is_empty(),
        "no dead letters"
    );
    B::close_events(&events).await;
}

/// Bad options are refused at once with typed errors, and the event is handed back.
pub async fn invalid_schedules_are_refused_at_once<B: EventBackend>() {
    let env = B::start().await;
    let config = env.config("sched");
    let events = env.events(&config).await;
    let ty = new_type("bad");
    for options in [
        PublishOptions::every(Duration::from_millis(200)),
        PublishOptions::cron("61 * * * * *"),
        PublishOptions::cron("* * *"),
        PublishOptions::default().with_ttl(Duration::from_millis(10)),
    ] {
        let err = within(
            "refusal",
            events.publish_with(event(&ty, 1), options.clone()),
        )
        .await
        .expect_err("refused");
        assert_eq!(
            err.kind(),
            PublishErrorKind::InvalidSchedule,
            "{options:?}: {err}"
        );
        assert!(err.into_event().is_some(), "the event is handed back");
    }
    let mut odd = event(&ty, 1);
    cloudevents::AttributesWriter::set_id(&mut odd, "has.dots");
    let err = within(
        "refusal",
        events.publish_with(odd, PublishOptions::after(Duration::from_secs(5))),
    )
    .await
    .expect_err("an id that is no subject token cannot name a schedule");
    assert_eq!(err.kind(), PublishErrorKind::InvalidSchedule);
    assert!(within("schedules", events.schedules())
        .await
        .expect("schedules")
        .is_empty());
    B::close_events(&events).await;
}
