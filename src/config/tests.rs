//! Config parsing and validation tests.

use super::*;

fn errs(text: &str) -> Vec<String> {
    match Config::parse_with_env(text, &|_| None) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    }
}

const GOOD: &str = r#"
listen: 127.0.0.1:8080
admin: 127.0.0.1:9090
services:
  - name: hello
    hosts: [hello.localhost, "*.hello.test"]
    path_prefix: /api/
    backend:
      process:
        command: [demo, "--x"]
        address: 127.0.0.1:18081
        readiness: { path: /healthz, interval: 10ms }
    queue: { capacity: 5, timeout: 2s }
    idle_timeout: 5m
    concurrency: 3
  - name: fixed
    hosts: [fixed.localhost]
    backend:
      static: { addresses: [127.0.0.1:18082] }
"#;

#[test]
fn parses_a_full_config() {
    let c = Config::parse_with_env(GOOD, &|_| None).unwrap();
    assert_eq!(c.services.len(), 2);
    let s = &c.services[0];
    assert_eq!(s.hosts, vec!["hello.localhost", "*.hello.test"]);
    assert_eq!(s.path_prefix.as_deref(), Some("/api"));
    assert_eq!(s.queue.capacity, 5);
    assert_eq!(s.queue.timeout, Duration::from_secs(2));
    assert_eq!(s.idle_timeout, Duration::from_secs(300));
    assert_eq!(s.concurrency, Some(3));
    match &s.backend {
        Backend::Process(p) => {
            assert_eq!(p.readiness_path.as_deref(), Some("/healthz"));
            assert_eq!(p.probe_interval, Duration::from_millis(10));
            assert_eq!(p.start_attempts, DEFAULT_START_ATTEMPTS);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.services[1].concurrency, None);
    assert_eq!(c.services[1].queue.capacity, DEFAULT_QUEUE_CAPACITY);
}

#[test]
fn unknown_field_names_its_path() {
    let e = errs(
            "services:\n  - name: a\n    hosts: [a]\n    backend: { static: { addresses: [127.0.0.1:1] } }\n    queue: { capcity: 3 }\n",
        );
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("services[0].queue.capcity: unknown field `capcity`"),
        "{e:?}"
    );
}

#[test]
fn bad_duration_names_its_path_and_the_format() {
    let e = errs(
            "services:\n  - name: a\n    hosts: [a]\n    backend: { static: { addresses: [127.0.0.1:1] } }\n    idle_timeout: 5 minutes please\n",
        );
    assert!(
        e[0].starts_with("services[0].idle_timeout: invalid duration"),
        "{e:?}"
    );
    assert!(e[0].contains("500ms, 30s, 5m"), "{e:?}");
}

#[test]
fn every_semantic_problem_is_reported_at_once() {
    let e = errs(
        r#"
services:
  - name: Bad Name
    hosts: []
    backend: { static: { addresses: [] } }
    queue: { capacity: 0, timeout: 0s }
  - name: b
    hosts: ["a.*.com"]
    path_prefix: api
    backend:
      process: { command: [], address: 127.0.0.1:0 }
  - name: b
    hosts: [x]
    backend: {}
"#,
    );
    let want = [
        "services[0].name: \"Bad Name\" may use only lowercase letters, digits, '-' and '_'",
        "services[0].hosts: at least one host is required",
        "services[0].queue.capacity: must be at least 1",
        "services[0].queue.timeout: must be greater than 0",
        "services[0].backend.static.addresses: at least one address is required",
        "services[1].hosts[0]: \"a.*.com\": a wildcard is only allowed as a leading \"*.\" label",
        "services[1].path_prefix: must start with '/'",
        "services[1].backend.process.command: must name a program, like [prog, arg1]",
        "services[1].backend.process.address: port must not be 0",
        "services[2].name: duplicate name \"b\" (also services[1])",
        "services[2].backend: exactly one of `process`, `static` or `kubernetes` is required",
    ];
    for w in want {
        assert!(e.iter().any(|x| x == w), "missing {w:?} in {e:#?}");
    }
    assert_eq!(e.len(), want.len(), "{e:#?}");
}

#[test]
fn duplicate_route_is_an_error() {
    let e = errs(
        r#"
services:
  - { name: a, hosts: [x.test], backend: { static: { addresses: [127.0.0.1:1] } } }
  - { name: b, hosts: [X.test], backend: { static: { addresses: [127.0.0.1:2] } } }
"#,
    );
    assert_eq!(
            e,
            vec!["services[1].hosts[0]: host \"x.test\" with path_prefix \"/\" is already routed to services[0]"]
        );
}

#[test]
fn env_expansion_in_commands() {
    let text = "services:\n  - name: a\n    hosts: [a]\n    backend: { process: { command: [\"${EXE}\", \"$$HOME\", \"${MISSING}\"], address: 127.0.0.1:5 } }\n";
    let e =
        Config::parse_with_env(text, &|k| (k == "EXE").then(|| "/bin/x".to_string())).unwrap_err();
    assert_eq!(e.problems.len(), 1);
    assert_eq!(
            e.problems[0].to_string(),
            "services[0].backend.process.command[2]: environment variable MISSING is not set (in \"${MISSING}\")"
        );
    assert_eq!(
        expand_env("${EXE} $$x $y", &|_| Some("v".into())).unwrap(),
        "v $x $y"
    );
}

#[test]
fn keda_block_parses_with_defaults() {
    let c = Config::parse_with_env(GOOD, &|_| None).unwrap();
    assert_eq!(c.keda, Keda::default());
    assert_eq!(c.services[0].keda, ServiceKeda::default());
    let text = format!(
            "{GOOD}keda:\n  listen: 127.0.0.1:9091\n  peers: [127.0.0.1:9190, 127.0.0.1:9191]\n  peer_timeout: 100ms\n"
        )
        .replace(
            "    concurrency: 3\n",
            "    concurrency: 3\n    keda: { metric: rate, target: 2.5 }\n",
        );
    let c = Config::parse_with_env(&text, &|_| None).unwrap();
    assert_eq!(c.keda.listen, Some("127.0.0.1:9091".parse().unwrap()));
    assert_eq!(c.keda.peers.len(), 2);
    assert_eq!(c.keda.peer_timeout, Duration::from_millis(100));
    assert_eq!(c.keda.peer_stale_after, DEFAULT_PEER_STALE_AFTER);
    assert_eq!(c.services[0].keda.metric, ScalingMetric::Rate);
    assert_eq!(c.services[0].keda.target, Some(2.5));
}

#[test]
fn keda_problems_name_their_fields() {
    let e = errs(
        r#"
admin: 127.0.0.1:9090
keda:
  listen: 127.0.0.1:9090
  peers: [127.0.0.1:9090, 127.0.0.1:0, 127.0.0.1:9300, 127.0.0.1:9300]
  stream_interval: 0s
  rate_window: 10ms
services:
  - name: a
    hosts: [a]
    backend: { static: { addresses: [127.0.0.1:1] } }
    keda: { target: -1 }
"#,
    );
    let want = [
            "keda.listen: must differ from admin (127.0.0.1:9090)",
            "keda.peers[0]: 127.0.0.1:9090 is this replica's own admin address (it would be counted twice)",
            "keda.peers[1]: port must not be 0",
            "keda.peers[3]: duplicate peer 127.0.0.1:9300",
            "keda.stream_interval: must be greater than 0",
            "keda.rate_window: must be at least 1s",
            "services[0].keda.target: must be a number greater than 0",
        ];
    for w in want {
        assert!(e.iter().any(|x| x == w), "missing {w:?} in {e:#?}");
    }
    assert_eq!(e.len(), want.len(), "{e:#?}");
    let e = errs("services: []\nkeda: { lisen: 127.0.0.1:1 }\n");
    assert!(e[0].starts_with("keda.lisen: unknown field"), "{e:?}");
}

#[test]
fn no_services_is_an_error() {
    assert_eq!(
        errs("listen: 127.0.0.1:1\n"),
        vec!["services: at least one service is required"]
    );
}

#[test]
fn hardening_defaults_are_closed() {
    let c = Config::parse_with_env(GOOD, &|_| None).unwrap();
    assert!(!c.knative, "Knative routing is opt-in");
    assert!(c.services.iter().all(|s| !s.knative));
    assert!(c.drop_underscore_headers);
    assert_eq!(c.services[0].upgrades, vec!["websocket".to_string()]);
    assert_eq!(c.timeouts.client_idle, DEFAULT_CLIENT_IDLE_TIMEOUT);
    assert_eq!(c.timeouts.client_write, DEFAULT_CLIENT_WRITE_TIMEOUT);
    assert_eq!(c.timeouts.client_body, DEFAULT_CLIENT_BODY_TIMEOUT);
    assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    assert_eq!(
        c.limits.admin_max_connections,
        DEFAULT_ADMIN_MAX_CONNECTIONS
    );
}

#[test]
fn knative_is_enabled_at_the_top_or_per_service() {
    let text = "knative: { enabled: true }\nservices:\n  - name: a\n    hosts: [a]\n    backend: { static: { addresses: [127.0.0.1:1] } }\n  - name: b\n    hosts: [b]\n    knative: false\n    backend: { static: { addresses: [127.0.0.1:1] } }\n";
    let c = Config::parse_with_env(text, &|_| None).unwrap();
    assert!(c.knative);
    assert!(c.services[0].knative);
    assert!(!c.services[1].knative);
}

#[test]
fn h2c_cannot_be_an_allowed_upgrade_and_timeouts_must_be_positive() {
    let e = errs(
        "timeouts: { client_idle: 0s, client_write: 0s }\nservices:\n  - name: a\n    hosts: [a]\n    upgrades: [websocket, H2C, 'a b']\n    backend: { static: { addresses: [127.0.0.1:1] } }\n",
    );
    assert!(
        e.iter()
            .any(|l| l.starts_with("services[0].upgrades[1]: h2c cannot be allowed")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|l| l.starts_with("services[0].upgrades[2]: must be a protocol name")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|l| l.starts_with("timeouts.client_idle:")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|l| l.starts_with("timeouts.client_write:")),
        "{e:?}"
    );
}

#[test]
fn admin_is_an_address_or_listen_with_a_token_file() {
    let svc = "services:\n  - name: a\n    hosts: [a.test]\n    backend:\n      static: { addresses: [127.0.0.1:1] }\n";
    let c = Config::parse_with_env(&format!("admin: 127.0.0.1:9191\n{svc}"), &|_| None).unwrap();
    assert_eq!(c.admin, "127.0.0.1:9191".parse().unwrap());
    assert_eq!(
        c.admin_token_file, None,
        "commands off unless a token is set"
    );
    let c = Config::parse_with_env(
        &format!("admin: {{ listen: 127.0.0.1:9292, token_file: /run/secrets/admin }}\n{svc}"),
        &|_| None,
    )
    .unwrap();
    assert_eq!(c.admin, "127.0.0.1:9292".parse().unwrap());
    assert_eq!(
        c.admin_token_file.as_deref(),
        Some(std::path::Path::new("/run/secrets/admin"))
    );
    let e = errs(&format!(
        "admin: {{ listen: 127.0.0.1:9292, token_file: '' }}\n{svc}"
    ));
    assert!(e.iter().any(|e| e.starts_with("admin.token_file")), "{e:?}");
    let e = errs(&format!(
        "admin: {{ listen: 127.0.0.1:9292, tokn_file: x }}\n{svc}"
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("admin.tokn_file: unknown field `tokn_file`"),
        "{e:?}"
    );
    let e = errs(&format!("admin: 127.0.0.1\n{svc}"));
    assert!(e[0].starts_with("admin: invalid socket address"), "{e:?}");
}

#[test]
fn unknown_fields_are_reported_with_every_other_problem() {
    let e = errs(
        "services:\n  - name: a\n    hosts: [a]\n    idle_timout: 3s\n    backend: { static: { addresses: [127.0.0.1:1] } }\n    queue: { capacity: 0 }\n",
    );
    assert_eq!(
        e,
        vec![
            "services[0].idle_timout: unknown field `idle_timout`, expected one of `name`, \
             `namespace`, `protocol`, `upstream_tls`, `hosts`, `path_prefix`, `backend`, `queue`, \
             `idle_timeout`, `concurrency`, `keda`, `rollout`, `knative`, `upgrades`, `prewarm`, \
             `depends_on`",
            "services[0].queue.capacity: must be at least 1",
        ]
    );
}

#[test]
fn unknown_fields_are_found_at_every_depth() {
    let e = errs(
        r#"
lisen: 127.0.0.1:1
timeouts: { client_heder: 1s }
keda: { peers: [], extra: 1 }
tls: { listen: 127.0.0.1:0, cert: /nonexistent/c.pem, key: /nonexistent/k.pem, ca: x }
services:
  - name: a
    hosts: [a]
    backend:
      process: { command: [x], address: 127.0.0.1:5, readiness: { pth: /x } }
      extra: {}
    keda: { metrc: rate }
  - name: b
    hosts: [b]
    backend:
      kubernetes: { deployment: d, service: s, port: 80, replica: 2 }
    rollout:
      validation: [{ path: /x, expect_json: { path: $.a, equals: 1, extra: 2 } }]
    prewarm: { schedule: [{ start: "09:00", end: "10:00", dayz: [mon] }] }
    queue: { capacity: 0 }
"#,
    );
    let unknown: Vec<&str> = e
        .iter()
        .filter(|l| l.contains("unknown field"))
        .map(|l| l.split(':').next().unwrap())
        .collect();
    assert_eq!(
        unknown,
        [
            "lisen",
            "timeouts.client_heder",
            "keda.extra",
            "tls.ca",
            "services[0].backend.process.readiness.pth",
            "services[0].backend.extra",
            "services[0].keda.metrc",
            "services[1].backend.kubernetes.replica",
            "services[1].rollout.validation[0].expect_json.extra",
            "services[1].prewarm.schedule[0].dayz",
        ],
        "{e:#?}"
    );
    // Each names what the shape there accepts.
    assert!(
        e.iter().any(|l| l
            == "services[1].prewarm.schedule[0].dayz: unknown field `dayz`, expected one of \
                `days`, `start`, `end`, `timezone`"),
        "{e:#?}"
    );
    assert!(
        e.iter().any(|l| l
            == "services[0].backend.extra: unknown field `extra`, expected one of `process`, \
                `static`, `kubernetes`"),
        "{e:#?}"
    );
    // Validation still ran: its problems follow the unknown fields.
    assert!(
        e.iter()
            .any(|l| l == "services[1].queue.capacity: must be at least 1"),
        "{e:#?}"
    );
    assert!(
        e.iter().any(|l| l.starts_with("tls.cert: cannot read")),
        "{e:#?}"
    );
}

#[test]
fn a_value_of_the_wrong_type_stops_the_read_with_the_unknown_fields_before_it() {
    let e = errs(
        "services:\n  - name: a\n    hosts: [a]\n    idle_timout: 3s\n    backend: { static: { addresses: [127.0.0.1:1] } }\n    queue: { capacity: many }\n",
    );
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(
        e[0].starts_with("services[0].idle_timout: unknown field `idle_timout`, expected"),
        "{e:#?}"
    );
    assert!(e[1].starts_with("services[0].queue.capacity: "), "{e:#?}");
}

#[test]
fn config_types_compare_by_value() {
    let a = Config::parse_with_env(GOOD, &|_| None).unwrap();
    let b = Config::parse_with_env(GOOD, &|_| None).unwrap();
    assert_eq!(a, b);
    let c = Config::parse_with_env(&GOOD.replace("timeout: 2s", "timeout: 3s"), &|_| None).unwrap();
    assert_ne!(a.services[0], c.services[0]);
    assert_eq!(a.limits, c.limits);
    assert_eq!(a.timeouts, c.timeouts);
    assert_eq!(a.shutdown, c.shutdown);
}
