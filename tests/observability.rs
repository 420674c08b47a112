//! The docs and deploy files agree with what Reveille exports: the metrics catalogue
//! (docs/metrics.md) lists every exported family with its type and nothing undefined, the Grafana
//! dashboard only queries exported metrics, and the KEDA examples' metadata and GJSON path work
//! against a running Reveille.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::keda::*;
use support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `name -> type` from the catalogue table.
fn catalogue() -> BTreeMap<String, String> {
    read("docs/metrics.md")
        .lines()
        .filter(|l| l.starts_with("| `reveille_"))
        .map(|l| {
            let cols: Vec<&str> = l.split('|').map(str::trim).collect();
            (cols[1].trim_matches('`').to_string(), cols[2].to_string())
        })
        .collect()
}

/// Metric names used in a PromQL expression, histogram suffixes removed.
fn names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("reveille_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.push(base.to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_keda_example_config_is_valid() {
    let text = read("examples/keda.yaml");
    let cfg = reveille::Config::parse_with_env(&text, &|_| Some("/bin/true".into()))
        .unwrap_or_else(|e| panic!("examples/keda.yaml: {e}"));
    assert_eq!(cfg.keda.listen, Some("127.0.0.1:9091".parse().unwrap()));
    assert_eq!(cfg.keda.peers, vec!["127.0.0.1:9190".parse().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_dashboard_and_keda_examples_match_reveille() {
    let port = free_port();
    let dead_peer = free_port();
    let yaml = format!(
        "{}keda: {{ listen: 127.0.0.1:0, peers: [\"127.0.0.1:{dead_peer}\"], peer_timeout: 200ms }}\n",
        process_config(port, "0s", &["queue: { capacity: 10, timeout: 30s }"])
    );
    let r = start(&yaml).await;
    let c = client();
    let mut g = grpc(r.keda_addr.unwrap());
    // Make every family have a series: a stream (pushes), a cold start (wake-ups), an
    // unrouted request (rejections), a peer read (the dead peer: dropped).
    let mut stream = g
        .stream_is_active(sor("hello", &[]))
        .await
        .unwrap()
        .into_inner();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
    assert_eq!(get(&c, r.proxy_addr, "hello.test", "/").await.status, 200);
    assert_eq!(get(&c, r.proxy_addr, "nobody.test", "/").await.status, 404);

    // The metrics-api example's GJSON path points at a number in /api/scaling.
    let example: serde_json::Value =
        serde_norway::from_str(&read("deploy/keda/metrics-api.yaml")).unwrap();
    let trigger = &example["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "metrics-api");
    let url = trigger["metadata"]["url"].as_str().unwrap();
    let path = &url[url.find("/api/").unwrap()..];
    let scaling: serde_json::Value =
        serde_json::from_str(&get(&c, r.admin_addr, "a", path).await.body).unwrap();
    let mut v = &scaling;
    for key in trigger["metadata"]["valueLocation"]
        .as_str()
        .unwrap()
        .split('.')
    {
        v = &v[key];
    }
    assert!(v.is_u64(), "valueLocation leads to {v} in {scaling}");
    assert_eq!(
        scaling["services"]["hello"]["replicas"], 1,
        "dead peer left out"
    );

    // The external-push example's metadata is understood.
    let example: serde_json::Value =
        serde_norway::from_str(&read("deploy/keda/external-push.yaml")).unwrap();
    let trigger = &example["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "external-push");
    let meta: Vec<(String, String)> = trigger["metadata"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "scalerAddress")
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let name = example["metadata"]["name"].as_str().unwrap();
    let spec = g
        .get_metric_spec(sor(name, &meta))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs[0].target_size_float, 10.0);

    // The catalogue lists exactly the exported families, with their types.
    let text = get(&c, r.admin_addr, "a", "/metrics").await.body;
    let exported: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (n, t) = l.split_once(' ').unwrap();
            (n.to_string(), t.to_string())
        })
        .collect();
    let documented = catalogue();
    for (name, kind) in &exported {
        assert_eq!(
            documented.get(name),
            Some(kind),
            "{name} ({kind}) is exported but not in docs/metrics.md (or with another type)"
        );
    }
    // Families without a series yet are not exported; they must still be defined.
    // The metrics module: src/telemetry/metrics.rs and its submodules (src/telemetry/metrics/*.rs).
    let mut source = read("src/telemetry/metrics.rs");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/telemetry/metrics");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            source.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    for name in documented.keys() {
        assert!(
            source.contains(&format!("\"{name}\"")),
            "{name} is in docs/metrics.md but not defined in src/telemetry/metrics.rs"
        );
    }
    assert!(exported.len() >= 15, "{exported:?}");

    // Every dashboard query and the prometheus example only use exported metrics.
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/reveille.json")).unwrap();
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 9, "{exprs:?}");
    let example: serde_json::Value =
        serde_norway::from_str(&read("deploy/keda/prometheus.yaml")).unwrap();
    exprs.push(
        example["spec"]["triggers"][0]["metadata"]["query"]
            .as_str()
            .unwrap()
            .into(),
    );
    for e in &exprs {
        let names = names_in(e);
        assert!(!names.is_empty(), "{e}");
        for n in names {
            assert!(documented.contains_key(&n), "{n} (in {e}) is not exported");
        }
    }
    drop(stream);
    stop(r).await;
}
