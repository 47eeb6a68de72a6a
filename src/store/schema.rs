//! Diesel table definitions shared by both backends (see `migrations/`).

diesel::table! {
    /// The task status codes of the API.
    task_statuses (code) {
        code -> Integer,
        name -> Text,
        description -> Text,
    }
}

diesel::table! {
    /// One row per task.
    tasks (id) {
        id -> BigInt,
        name -> Text,
        nodes -> Text,
        remote_user -> Text,
        content -> Text,
        params -> Text,
        fork_num -> Integer,
        forks -> Integer,
        status -> Integer,
        err -> Nullable<Text>,
        correlation_id -> Text,
        source -> Text,
        created_at -> Timestamp,
        started_at -> Nullable<Timestamp>,
        ended_at -> Nullable<Timestamp>,
        updated_at -> Timestamp,
        exit_code -> Nullable<Integer>,
        pid -> Nullable<Integer>,
        pid_start_time -> Nullable<BigInt>,
        events_offset -> BigInt,
        instance -> Nullable<Text>,
        agent -> Nullable<Text>,
        cpu_usec -> Nullable<BigInt>,
        memory_peak_bytes -> Nullable<BigInt>,
        purged_at -> Nullable<Timestamp>,
        stop_requested_at -> Nullable<Timestamp>,
        stop_reason -> Nullable<Text>,
        remote_mark -> Nullable<Text>,
        requested_by -> Nullable<Text>,
        requested_via -> Nullable<Text>,
        stop_requested_by -> Nullable<Text>,
        stop_requested_via -> Nullable<Text>,
    }
}

diesel::table! {
    /// One row per (task, host).
    task_hosts (id) {
        id -> BigInt,
        task_id -> BigInt,
        host -> Text,
        result -> Nullable<Text>,
        ok -> Integer,
        changed -> Integer,
        failed -> Integer,
        unreachable -> Integer,
        skipped -> Integer,
        rescued -> Integer,
        ignored -> Integer,
        msg -> Nullable<Text>,
        correlation_id -> Text,
        source -> Text,
        created_at -> Timestamp,
        ended_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    /// The event stream of each task.
    task_events (id) {
        id -> BigInt,
        task_id -> BigInt,
        seq -> Integer,
        host -> Nullable<Text>,
        kind -> Text,
        task_name -> Nullable<Text>,
        payload -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    /// Every agent that serves this database.
    agents (name) {
        name -> Text,
        host -> Text,
        pid -> Integer,
        boot_id -> Text,
        version -> Text,
        started_at -> Timestamp,
        heartbeat_at -> Timestamp,
        max_forks -> Integer,
        state -> Text,
    }
}

diesel::joinable!(tasks -> task_statuses (status));
diesel::joinable!(task_hosts -> tasks (task_id));
diesel::joinable!(task_events -> tasks (task_id));
diesel::allow_tables_to_appear_in_same_query!(
    task_statuses,
    tasks,
    task_hosts,
    task_events,
    agents
);
