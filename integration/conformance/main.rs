//! The conformance suite: one set of cases ([`cases`]), written against the traits, run against
//! every backend through a small factory per backend ([`backends`]).
//!
//! Test names say case and backend: `conformance::memory::request_times_out`,
//! `conformance::nats::request_times_out`, `conformance::jetstream::max_deliveries_go_to_dead_letter`.
//! The memory backend runs without features; core NATS with the `nats_integration` feature,
//! JetStream with `natsjs_integration` (each against its own nats-server per test).
//!
//! Query cases run on query backends (memory, core NATS); event cases on event backends (memory,
//! JetStream). A case a backend honestly cannot run checks the backend's capability flags and
//! says why it skips (today no backend needs to skip one: both event backends can store raw
//! bytes for the `decode` dead-letter case).
//!
//! Not covered here, because the traits cannot produce it: the scatter-gather sentinel (an
//! empty reply without `Reply-Stream-Total`; `ReplyWriter` sends an event or the end marker of
//! an empty stream; unit-tested in `src/query/tests.rs`, `sentinel_ends_the_stream`) and a
//! replier's stream cut short of its `Reply-Stream-Total`.
//!
//! Run: `cargo test -p ce-messaging-test-support --test conformance` (memory);
//! `cargo test -p ce-messaging-test-support --test conformance --features natsjs_integration` (all
//! three backends).

mod backend;
mod backends;
mod cases;

#[cfg(feature = "nats_integration")]
use ce_messaging_test_support as support;

/// One `#[tokio::test]` per listed case, calling `cases::<module>::<case>::<backend>()`.
macro_rules! instantiate {
    ($module:ident, $backend:ty; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                crate::cases::$module::$case::<$backend>().await;
            }
        )*
    };
}

/// Every query case, for one backend.
macro_rules! query_cases {
    ($backend:ty) => {
        instantiate!(queries, $backend;
            request_reply_keeps_data_and_attributes,
            request_reply_in_binary_mode,
            reply_carries_the_request_transaction_id,
            concurrent_requests_get_their_own_replies,
            request_times_out,
            events_receivers_refuse_are_refused_when_sent,
            request_without_listener_is_no_responders,
            handler_error_is_remote_error_with_code,
            unknown_op_on_wildcard_listener_is_404,
            undeserializable_request_data_is_400,
            listener_continues_after_handler_errors,
            handler_panicking_before_its_future_is_500_and_the_worker_survives,
            reply_stream_ends_after_its_total,
            scatter_gather_ends_at_max_replies,
            scatter_gather_ends_after_stall,
            scatter_gather_ends_at_deadline,
            reply_stream_without_replies_times_out_once,
            queue_group_shares_requests,
            ops_are_isolated,
            query_worker_bound_is_never_exceeded,
            query_graceful_stop_finishes_in_flight_and_refuses_new,
            query_stop_after_grace_answers_503,
            query_listener_restart_serves_again,
            query_cancelled_token_stops_listener,
            query_listeners_close_concurrently,
            closing_the_connection_stops_its_listeners,
            invalid_ops_are_refused_at_once,
            request_type_must_match_its_subject,
            wildcard_listener_dispatches_by_type,
            oversized_reply_is_answered_500,
            full_queue_is_answered_busy,
            busy_listener_bounds_serves_queued_and_stop_drains_all,
            request_whose_caller_gave_up_is_not_handled,
            empty_reply_stream_ends_without_an_item,
            reply_stream_without_listener_yields_no_responders_first,
            requests_and_replies_are_read_in_place,
        );
    };
}

/// Every event case, for one backend.
macro_rules! event_cases {
    ($backend:ty) => {
        instantiate!(events, $backend;
            publish_subscribe_keeps_data_and_attributes,
            publish_subscribe_in_binary_mode,
            publish_acks_are_ordered,
            duplicate_publish_within_window_is_stored_once,
            too_large_event_is_refused_and_handed_back,
            publish_without_stream_is_stream_not_found,
            new_durable_receives_earlier_events,
            event_types_are_isolated,
            durables_fan_out_and_instances_share,
            concurrent_listeners_share_one_durable,
            failed_event_is_redelivered_after_its_delay,
            listener_continues_after_errors,
            listener_survives_a_handler_panicking_before_its_future,
            listener_stop_and_restart_continues,
            unacked_event_is_redelivered_after_ack_wait,
            long_handler_is_not_redelivered,
            max_deliveries_go_to_dead_letter,
            rejected_event_goes_to_dead_letter,
            undecodable_message_goes_to_dead_letter,
            event_worker_bound_is_never_exceeded,
            event_graceful_stop_finishes_in_flight_and_refuses_new,
            event_stop_after_grace_hands_the_event_back,
            stop_then_close_hands_back_every_queued_event,
            cancelled_token_stops_event_listener,
            event_listeners_close_concurrently,
            publisher_close_keeps_acknowledged_publishes,
            promise_gets_response_by_transaction_id,
            promise_catches_an_immediate_response,
            concurrent_promises_do_not_cross,
            promise_times_out_without_response,
            event_source_add_remove_once,
            event_source_filters_by_transaction,
            event_source_reads_transaction_ids_as_decode_does,
            invalid_event_types_are_refused_at_once,
            events_receivers_refuse_are_refused_when_published,
            poison_with_directives_is_dead_lettered_without_them,
            oversized_poison_is_dead_lettered_as_a_reference,
            one_durable_refuses_a_second_type_set,
            consumer_info_reports_the_same_numbers,
            repeated_stops_over_a_backlog_cost_no_deliveries,
            slow_handler_never_redelivers_queued_events,
            crash_on_the_last_allowed_delivery_ends_dead_lettered,
            handler_time_limit_frees_the_worker_and_dead_letters_at_the_limit,
            new_durables_start_where_told_and_existing_ones_keep_their_position,
            retried_request_reports_its_duplicate_publish,
            consumer_info_through_the_trait_reports_the_lag,
            priorities_serve_a_mixed_backlog_highest_first,
            priority_publish_is_checked_and_off_changes_nothing,
            priority_listener_waits_on_every_level,
            priority_levels_are_part_of_a_durables_type_set,
            promise_gets_a_prioritised_response,
            received_events_are_read_in_place,
        );
    };
}

/// Every schedule and expiry case (issue 17), for one backend.
macro_rules! schedule_cases {
    ($backend:ty) => {
        instantiate!(schedules, $backend;
            deferred_event_fires_once_not_before_its_time,
            cancelled_schedule_never_fires,
            recurring_schedule_fires_n_times_with_own_ids,
            expired_event_is_never_handled,
            event_expired_while_waiting_for_redelivery_is_not_handled_again,
            cron_schedule_fires_every_second_until_cancelled,
            cron_time_zones_utc_everywhere_others_on_jetstream_only,
            scheduled_event_with_priority_fires_on_its_level,
            invalid_schedules_are_refused_at_once,
        );
    };
}

mod conformance {
    /// In-process broker: every case.
    mod memory {
        query_cases!(crate::backends::memory::Memory);
        event_cases!(crate::backends::memory::Memory);
        schedule_cases!(crate::backends::memory::Memory);
    }

    /// Core NATS (`NatsQueries`): the query cases. It has no persistence, so the event cases
    /// run in `jetstream`.
    #[cfg(feature = "nats_integration")]
    mod nats {
        query_cases!(crate::backends::nats::CoreNats);
    }

    /// JetStream (`JetStreamEvents`): the event cases. Its queries are `NatsQueries`, covered by
    /// `nats`.
    #[cfg(feature = "natsjs_integration")]
    mod jetstream {
        event_cases!(crate::backends::jetstream::JetStream);
        schedule_cases!(crate::backends::jetstream::JetStream);
    }
}
