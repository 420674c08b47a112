//! Config parsing: arbitrary and YAML-ish text never panics and always names a problem;
//! random valid configs come back as the same typed config.

use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::select;
use reveille::config::{Backend, Config, Protocol};

use crate::cfg;

fn parse(text: &str) -> Result<Config, reveille::config::ConfigError> {
    Config::parse_with_env(text, &|k| (k == "EXE").then(|| "/bin/true".to_string()))
}

/// Parsing either succeeds or names at least one problem, each with a printable line.
fn parses_or_explains(text: &str) -> Result<(), TestCaseError> {
    if let Err(e) = parse(text) {
        prop_assert!(
            !e.problems.is_empty(),
            "an error without problems for {text:?}"
        );
        for p in &e.problems {
            prop_assert!(!p.to_string().is_empty());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Config: arbitrary and YAML-ish text.

const YAML_TOKENS: &[&str] = &[
    "services:",
    "\n",
    "\n  ",
    "\n    ",
    "  ",
    "- ",
    "name: ",
    "hello",
    "hosts: ",
    "[",
    "]",
    "{",
    "}",
    ", ",
    ": ",
    "backend:",
    "static:",
    "addresses: ",
    "127.0.0.1:1",
    "[::1]:80",
    "process:",
    "command: ",
    "address: ",
    "queue:",
    "capacity: ",
    "-1",
    "0",
    "7",
    "99999999999999999999999",
    "timeout: ",
    "5s",
    "0s",
    "1 fortnight",
    "tls:",
    "listen: ",
    "cert: ",
    "key: ",
    "\"",
    "'",
    "*",
    "&a ",
    "*a",
    "!!str ",
    "!!binary ",
    "~",
    "null",
    "true",
    "${EXE}",
    "${NOPE}",
    "$$",
    "${",
    "path_prefix: ",
    "/",
    "api",
    "limits:",
    "max_held: ",
    "namespace: ",
    "protocol: ",
    "h2c",
    "idle_timeout: ",
    "concurrency: ",
    "timeouts:",
    "client_header: ",
    "shutdown:",
    "# c",
    "é",
    "\u{0}",
    "\t",
    "*.x.test",
    "a.*.b",
    "---",
    "...",
    "? ",
    "|",
    ">",
    "%YAML 1.2",
];

fn yamlish() -> impl Strategy<Value = String> {
    proptest::collection::vec(select(YAML_TOKENS), 0..80).prop_map(|t| t.concat())
}

// ---------------------------------------------------------------------------------------------
// Config: a structured model, rendered to YAML, must come back as the same typed config.

#[derive(Debug, Clone)]
struct ModelService {
    name: String,
    namespace: Option<String>,
    h2c: Option<bool>,
    hosts: Vec<String>,
    path_prefix: Option<String>,
    static_ports: Option<Vec<u16>>,
    command: Vec<String>,
    capacity: Option<u32>,
    hold_ms: Option<u64>,
    idle_ms: Option<u64>,
    concurrency: Option<u16>,
}

#[derive(Debug, Clone)]
struct Model {
    listen: u16,
    admin: u16,
    client_header_ms: Option<u64>,
    max_held: Option<u32>,
    services: Vec<ModelService>,
}

fn label() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9]([a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?"
}

fn model_service() -> impl Strategy<Value = ModelService> {
    (
        "[a-z][a-z0-9_-]{0,10}",
        proptest::option::of("[a-z0-9][a-z0-9-]{0,10}"),
        proptest::option::of(any::<bool>()),
        proptest::collection::vec(
            (any::<bool>(), proptest::collection::vec(label(), 1..4)),
            1..4,
        ),
        proptest::option::of(("(/[a-z0-9._~-]{1,6}){0,3}", any::<bool>())),
        proptest::option::of(proptest::collection::vec(1u16..=65535, 1..4)),
        proptest::collection::vec("[a-zA-Z0-9 ._/=-]{0,12}", 0..3),
        (
            proptest::option::of(1u32..1_000_000),
            proptest::option::of(1u64..10_000_000),
            proptest::option::of(1u64..10_000_000),
            proptest::option::of(0u16..1000),
        ),
    )
        .prop_map(
            |(name, namespace, h2c, hosts, prefix, static_ports, args, limits)| {
                let hosts = hosts
                    .into_iter()
                    .map(|(wild, labels)| {
                        let h = labels.join(".");
                        if wild {
                            format!("*.{h}")
                        } else {
                            h
                        }
                    })
                    .collect();
                let path_prefix = prefix.map(|(p, slash)| {
                    if slash || p.is_empty() {
                        format!("{p}/")
                    } else {
                        p
                    }
                });
                let mut command = vec!["${EXE}".to_string()];
                command.extend(args);
                ModelService {
                    name,
                    namespace,
                    h2c,
                    hosts,
                    path_prefix,
                    static_ports,
                    command,
                    capacity: limits.0,
                    hold_ms: limits.1,
                    idle_ms: limits.2,
                    concurrency: limits.3,
                }
            },
        )
}

fn model() -> impl Strategy<Value = Model> {
    (
        1000u16..30000,
        30001u16..40000,
        proptest::option::of(1u64..100_000),
        proptest::option::of(1u32..1_000_000),
        proptest::collection::vec(model_service(), 1..5),
    )
        .prop_map(
            |(listen, admin, client_header_ms, max_held, mut services)| {
                // Unique names, and hosts that cannot collide across services: a suffix label per
                // service. Case is left mixed: the config lowercases it.
                for (i, s) in services.iter_mut().enumerate() {
                    s.name = format!("{}{i}", s.name);
                    for h in &mut s.hosts {
                        h.push_str(&format!(".S{i}"));
                    }
                }
                Model {
                    listen,
                    admin,
                    client_header_ms,
                    max_held,
                    services,
                }
            },
        )
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn render(m: &Model) -> String {
    let mut y = format!(
        "listen: 127.0.0.1:{}\nadmin: 127.0.0.1:{}\n",
        m.listen, m.admin
    );
    if let Some(ms) = m.client_header_ms {
        y.push_str(&format!("timeouts:\n  client_header: {ms}ms\n"));
    }
    if let Some(n) = m.max_held {
        y.push_str(&format!("limits: {{ max_held: {n} }}\n"));
    }
    y.push_str("services:\n");
    for (i, s) in m.services.iter().enumerate() {
        y.push_str(&format!("  - name: {}\n", quoted(&s.name)));
        if let Some(ns) = &s.namespace {
            y.push_str(&format!("    namespace: {}\n", quoted(ns)));
        }
        if let Some(h2c) = s.h2c {
            y.push_str(&format!(
                "    protocol: {}\n",
                if h2c { "h2c" } else { "http1" }
            ));
        }
        let hosts: Vec<String> = s.hosts.iter().map(|h| quoted(h)).collect();
        y.push_str(&format!("    hosts: [{}]\n", hosts.join(", ")));
        if let Some(p) = &s.path_prefix {
            y.push_str(&format!("    path_prefix: {}\n", quoted(p)));
        }
        match &s.static_ports {
            Some(ports) => {
                let a: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
                y.push_str(&format!(
                    "    backend: {{ static: {{ addresses: [{}] }} }}\n",
                    a.join(", ")
                ));
            }
            None => {
                let c: Vec<String> = s.command.iter().map(|a| quoted(a)).collect();
                y.push_str(&format!(
                    "    backend:\n      process:\n        command: [{}]\n        address: 127.0.0.1:{}\n",
                    c.join(", "),
                    40000 + i
                ));
            }
        }
        if s.capacity.is_some() || s.hold_ms.is_some() {
            y.push_str("    queue:\n");
            if let Some(c) = s.capacity {
                y.push_str(&format!("      capacity: {c}\n"));
            }
            if let Some(ms) = s.hold_ms {
                y.push_str(&format!("      timeout: {ms}ms\n"));
            }
        }
        if let Some(ms) = s.idle_ms {
            y.push_str(&format!("    idle_timeout: {ms}ms\n"));
        }
        if let Some(c) = s.concurrency {
            y.push_str(&format!("    concurrency: {c}\n"));
        }
    }
    y
}

fn check_round_trip(m: &Model, c: &Config) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        c.listen,
        format!("127.0.0.1:{}", m.listen)
            .parse::<SocketAddr>()
            .unwrap()
    );
    prop_assert_eq!(
        c.admin,
        format!("127.0.0.1:{}", m.admin)
            .parse::<SocketAddr>()
            .unwrap()
    );
    prop_assert_eq!(
        c.timeouts.client_header,
        m.client_header_ms
            .map(Duration::from_millis)
            .unwrap_or(reveille::config::DEFAULT_CLIENT_HEADER_TIMEOUT)
    );
    prop_assert_eq!(
        c.limits.max_held,
        m.max_held
            .map(|n| n as usize)
            .unwrap_or(reveille::config::DEFAULT_MAX_HELD)
    );
    prop_assert!(c.tls.is_none());
    prop_assert_eq!(c.services.len(), m.services.len());
    for (i, (s, ms)) in c.services.iter().zip(&m.services).enumerate() {
        prop_assert_eq!(&s.name, &ms.name);
        prop_assert_eq!(
            &s.namespace,
            ms.namespace
                .as_deref()
                .unwrap_or(reveille::config::DEFAULT_NAMESPACE)
        );
        let want_protocol = if ms.h2c == Some(true) {
            Protocol::H2c
        } else {
            Protocol::Http1
        };
        prop_assert_eq!(s.protocol, want_protocol);
        let hosts: Vec<String> = ms.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        prop_assert_eq!(&s.hosts, &hosts);
        let prefix = ms
            .path_prefix
            .as_deref()
            .map(|p| p.trim_end_matches('/'))
            .filter(|p| !p.is_empty());
        prop_assert_eq!(s.path_prefix.as_deref(), prefix);
        match (&s.backend, &ms.static_ports) {
            (Backend::Static(st), Some(ports)) => {
                let want: Vec<SocketAddr> = ports
                    .iter()
                    .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                    .collect();
                prop_assert_eq!(&st.addresses, &want);
            }
            (Backend::Process(p), None) => {
                let mut want = ms.command.clone();
                want[0] = "/bin/true".into();
                prop_assert_eq!(&p.command, &want);
                prop_assert_eq!(p.address.port() as usize, 40000 + i);
            }
            (b, want) => prop_assert!(false, "backend {b:?}, wanted static {want:?}"),
        }
        prop_assert_eq!(
            s.queue.capacity,
            ms.capacity
                .map(|c| c as usize)
                .unwrap_or(reveille::config::DEFAULT_QUEUE_CAPACITY)
        );
        prop_assert_eq!(
            s.queue.timeout,
            ms.hold_ms
                .map(Duration::from_millis)
                .unwrap_or(reveille::config::DEFAULT_HOLD_TIMEOUT)
        );
        prop_assert_eq!(
            s.idle_timeout,
            ms.idle_ms
                .map(Duration::from_millis)
                .unwrap_or(reveille::config::DEFAULT_IDLE_TIMEOUT)
        );
        prop_assert_eq!(
            s.concurrency,
            ms.concurrency.filter(|c| *c > 0).map(|c| c as usize)
        );
    }
    Ok(())
}

/// An edit to a valid config: delete a span, insert a token, or duplicate a line.
#[derive(Debug, Clone)]
enum Edit {
    Delete { at: usize, len: usize },
    Insert { at: usize, token: &'static str },
    DuplicateLine { line: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1usize..20).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), select(YAML_TOKENS)).prop_map(|(at, token)| Edit::Insert { at, token }),
        any::<usize>().prop_map(|line| Edit::DuplicateLine { line }),
    ]
}

fn apply(text: &str, e: &Edit) -> String {
    let chars: Vec<char> = text.chars().collect();
    match *e {
        Edit::Delete { at, len } => {
            let at = at % (chars.len() + 1);
            let end = (at + len).min(chars.len());
            chars[..at].iter().chain(&chars[end..]).collect()
        }
        Edit::Insert { at, token } => {
            let at = at % (chars.len() + 1);
            let mut s: String = chars[..at].iter().collect();
            s.push_str(token);
            s.extend(&chars[at..]);
            s
        }
        Edit::DuplicateLine { line } => {
            let mut lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let i = line % lines.len();
                lines.insert(i, lines[i]);
            }
            lines.join("\n")
        }
    }
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn config_arbitrary_text_never_panics(text in any::<String>()) {
        parses_or_explains(&text)?;
    }

    #[test]
    fn config_yamlish_text_never_panics(text in yamlish()) {
        parses_or_explains(&text)?;
    }

    #[test]
    fn config_valid_models_round_trip(m in model()) {
        let text = render(&m);
        match parse(&text) {
            Ok(c) => check_round_trip(&m, &c)?,
            Err(e) => prop_assert!(false, "valid config rejected:\n{e}\n---\n{text}"),
        }
    }

    #[test]
    fn config_edited_valid_text_never_panics(
        m in model(),
        edits in proptest::collection::vec(edit(), 1..4),
    ) {
        let mut text = render(&m);
        for e in &edits {
            text = apply(&text, e);
        }
        parses_or_explains(&text)?;
    }
}
