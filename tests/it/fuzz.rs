//! Property-based fuzzing of request decoding and validation (proptest, a fixed number of cases
//! per run): no input panics, and whatever is accepted satisfies the contract's rules. The live
//! server is fuzzed by schemathesis in `scripts/schemathesis`.

use proptest::prelude::*;
use serde_json::{Map, Value};

use downlink::ansible::{params, playbook};
use downlink::api::fields::{is_node, RunRequest};
use downlink::settings::Settings;

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
    fn run_validation_never_panics_and_accepts_only_valid_requests(body in run_body()) {
        let settings = Settings::defaults();
        if let Ok(r) = RunRequest::from_json(&body, &settings) {
            prop_assert!(!r.nodes.is_empty() && r.nodes.len() <= settings.max_nodes);
            prop_assert!(r.nodes.iter().all(|n| is_node(n)));
            prop_assert!((1..=settings.max_fork_num).contains(&r.fork_num));
            prop_assert!(!r.name.is_empty() && r.name.chars().count() <= 255);
            prop_assert!(!r.name.chars().any(char::is_control));
            prop_assert!(playbook::classify(&r.content).is_ok());
            let f = r.forks(settings.max_forks);
            prop_assert!(f >= 1 && f <= settings.max_forks && f <= r.fork_num);
        }
    }

    #[test]
    fn playbook_classification_never_panics(text in prop_oneof![edgy(), ".{0,300}"]) {
        let _ = playbook::classify(&text);
    }

    #[test]
    fn params_decoding_never_panics_and_gives_objects(value in prop_oneof![json(), edgy().prop_map(Value::from)]) {
        if let Ok(map) = params::parse(&value) {
            // Whatever is accepted is written as a JSON object of extra vars.
            prop_assert!(serde_json::to_string(&Value::Object(map)).is_ok());
        }
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
