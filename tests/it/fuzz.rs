//! Property-based fuzzing of request decoding and validation (proptest, a fixed number of cases
//! per run): no input panics the decoders, and through a live server every generated `/api/run`
//! has one of the contract's outcomes, judged from outside: accepted, and then stored exactly as
//! asked (rows read with plain SQL); or refused with a contract error, and then nothing is stored.
//! The live server is also fuzzed by schemathesis in `scripts/schemathesis`.

use proptest::prelude::*;
use serde_json::{Map, Value};

use downlink::ansible::{params, playbook};
use downlink::api::fields::RunRequest;
use downlink::settings::Settings;

use crate::harness::{Backend, TestServer};

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        ".{0,24}".prop_map(Value::from),
        "[0-9]{1,4}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,8}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Strings near the edges of the rules: addresses, names, YAML of both shapes and broken YAML.
fn edgy() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,4}",
        "[a-zA-Z0-9.-]{0,70}",
        "[:0-9a-f]{0,40}",
        "[a-z_$;|&` -]{0,12}",
        "(- (hosts: all|ping:|command: id|import_playbook: x\\.yml|\\{|\\[|: |- )\n){0,4}",
        ".{0,64}",
    ]
}

/// Bodies built from the contract's fields, each mostly plausible, sometimes arbitrary, sometimes
/// missing, so that validation is exercised to its end as well as at each refusal.
fn run_body() -> impl Strategy<Value = Map<String, Value>> {
    let field = |plausible: BoxedStrategy<Value>| prop_oneof![6 => plausible, 1 => json(), 1 => Just(Value::Null)];
    let node = prop_oneof![
        "127\\.0\\.0\\.[0-9]{1,2}",
        "[a-z]{1,10}(\\.[a-z]{2,5})?",
        "::[0-9a-f]{1,4}",
        edgy()
    ];
    let yaml = prop_oneof![
        Just("- ping:\n".to_owned()),
        Just("- hosts: all\n  tasks: []\n".to_owned()),
        edgy()
    ];
    let params = prop_oneof![
        Just(Value::from("")),
        Just(Value::from("a=1 b='two words'")),
        Just(Value::from("{\"k\": [1, 2]}")),
        json()
    ];
    let fork_num = prop_oneof![
        (0i64..600).prop_map(Value::from),
        "[0-9]{1,3}".prop_map(Value::from),
        any::<i64>().prop_map(Value::from)
    ];
    (
        field(
            prop::collection::vec(node.prop_map(Value::from), 0..6)
                .prop_map(Value::Array)
                .boxed(),
        ),
        field(
            prop_oneof!["[a-z_][a-z0-9_-]{0,10}", edgy()]
                .prop_map(Value::from)
                .boxed(),
        ),
        field(
            prop_oneof!["[a-z0-9_-]{1,20}", edgy()]
                .prop_map(Value::from)
                .boxed(),
        ),
        field(yaml.prop_map(Value::from).boxed()),
        field(params.boxed()),
        field(fork_num.boxed()),
        prop::collection::vec(prop::bool::weighted(0.9), 6),
    )
        .prop_map(|(nodes, user, name, tasks, params, fork_num, present)| {
            let fields = [
                ("nodes", nodes),
                ("user", user),
                ("name", name),
                ("tasks", tasks),
                ("params", params),
                ("fork_num", fork_num),
            ];
            fields
                .into_iter()
                .zip(present)
                .filter(|(_, keep)| *keep)
                .map(|((k, v), _)| (k.to_owned(), v))
                .collect()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn run_validation_never_panics(body in run_body()) {
        let settings = Settings::defaults();
        if let Ok(r) = RunRequest::from_json(&body, &settings) {
            // The forks a task is charged never panic either, whatever it asked.
            r.forks(settings.max_forks);
        }
    }

    #[test]
    fn playbook_classification_never_panics(text in prop_oneof![edgy(), ".{0,300}"]) {
        let _ = playbook::classify(&text);
    }

    #[test]
    fn params_decoding_never_panics(value in prop_oneof![json(), edgy().prop_map(Value::from)]) {
        // An object or a reason, never a panic.
        let _ = params::parse(&value);
    }
}

/// The generator is only useful if it also reaches requests that pass every check.
#[test]
fn the_generator_reaches_accepted_and_refused_requests() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = run_body();
    let settings = Settings::defaults();
    let accepted = (0..4000)
        .filter(|_| {
            let body = strategy.new_tree(&mut runner).expect("sample").current();
            RunRequest::from_json(&body, &settings).is_ok()
        })
        .count();
    crate::harness::figure("fuzz_generated_run_bodies_accepted_of_4000", accepted);
    assert!(accepted > 0 && accepted < 4000, "{accepted}");
}

/// Generated bodies through a live server: each one is either accepted, and its row holds
/// exactly the name, user and nodes asked for; or refused with one of the contract's messages,
/// and no row is added. Rows are counted and read with plain SQL. `ansible_playbook` is
/// `/bin/true` here: what the tasks do is not the question.
#[test]
fn generated_runs_are_stored_as_asked_or_refused_without_a_trace() {
    use proptest::strategy::ValueTree;
    let server = TestServer::start_with(Backend::Sqlite, |s| {
        s.ansible_playbook = "/bin/true".into();
        s.max_queued = 10_000;
    });
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = run_body();
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..300 {
        let body = strategy.new_tree(&mut runner).expect("sample").current();
        let before = server.view.task_count();
        let (status, text) = server.post("/api/run", &Value::Object(body.clone()).to_string());
        assert_eq!(status, 200, "{text}");
        let answer: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        match answer["code"].as_i64() {
            Some(0) => {
                accepted += 1;
                let id = answer["content"]["id"].as_i64().expect("an id");
                let row = server.view.task(id);
                assert_eq!(Some(row.name.as_str()), body["name"].as_str(), "{text}");
                assert_eq!(Some(row.remote_user.as_str()), body["user"].as_str());
                let nodes: Vec<String> = serde_json::from_str(&row.nodes).expect("nodes are JSON");
                // The contract: duplicates dropped, order kept.
                let mut asked: Vec<String> = Vec::new();
                for n in body["nodes"].as_array().into_iter().flatten() {
                    let n = n.as_str().expect("accepted nodes are strings").to_owned();
                    if !asked.contains(&n) {
                        asked.push(n);
                    }
                }
                assert_eq!(nodes, asked, "nodes stored as asked");
                assert_eq!(server.view.task_count(), before + 1);
            }
            Some(-1) => {
                refused += 1;
                let message = answer["message"].as_str().unwrap_or_default();
                assert!(
                    message.starts_with("param error, error: ")
                        || message == "task name is duplicate"
                        || message == "json encode error",
                    "{message}"
                );
                assert_eq!(
                    server.view.task_count(),
                    before,
                    "a refused run stored a row"
                );
            }
            _ => panic!("an answer outside the contract: {text}"),
        }
    }
    crate::harness::figure(
        "fuzz_live_runs_accepted_refused_of_300",
        format!("{accepted}/{refused}"),
    );
    assert!(
        accepted > 0 && refused > 0,
        "{accepted} accepted, {refused} refused"
    );
}
