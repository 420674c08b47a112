//! A real Prometheus server (Debian's `prometheus` package) scrapes the admin port and PromQL
//! over its HTTP API returns the held count; `promtool check metrics` accepts `/metrics`.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::keda::*;
use support::*;

/// One service whose backend never becomes ready (`sleep`), so requests stay held.
fn config() -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: hello\n    hosts: [hello.test]\n    backend:\n      process:\n        command: [sleep, \"30\"]\n        address: 127.0.0.1:{}\n        start_timeout: 60s\n        start_attempts: 1\n        stop_grace: 1s\n    queue: {{ capacity: 10, timeout: 60s }}\n",
        free_port()
    )
}

fn hold(c: &TestClient, proxy: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    let c = c.clone();
    tokio::spawn(async move {
        let _ = get(&c, proxy, "hello.test", "/held").await;
    })
}

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Percent-encodes a query parameter value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query over Prometheus' HTTP API; `None` while it does not answer.
async fn promql(c: &TestClient, web: std::net::SocketAddr, q: &str) -> Option<serde_json::Value> {
    let uri = format!("http://{web}/api/v1/query?query={}", encode(q));
    let req = http::Request::get(uri).body(Default::default()).unwrap();
    let resp = c.request(req).await.ok()?;
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .ok()?
        .to_bytes();
    serde_json::from_slice(&body).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_exposition() {
    if !tool_available(
        "promtool",
        "apt-get install prometheus",
        Command::new("promtool").arg("--version"),
    ) {
        return;
    }
    let r = start(&config()).await;
    let c = client();
    let held = hold(&c, r.proxy_addr);
    wait_until("held", Duration::from_secs(10), || async {
        r.gates()[0].held() == 1
    })
    .await;
    let text = get(&c, r.admin_addr, "a", "/metrics").await.body;
    let mut check = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = check.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, text.as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), check.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    held.abort();
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_held_count() {
    if !tool_available(
        "prometheus",
        "apt-get install prometheus",
        Command::new("prometheus").arg("--version"),
    ) {
        return;
    }
    let r = start(&config()).await;
    let c = client();
    let held = [hold(&c, r.proxy_addr), hold(&c, r.proxy_addr)];
    wait_until("2 held", Duration::from_secs(10), || async {
        r.gates()[0].held() == 2
    })
    .await;

    let dir = tempdir("prometheus");
    let web = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: reveille\n    static_configs:\n      - targets: [\"{}\"]\n",
            r.admin_addr
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let mut prom = ChildGuard(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let value = loop {
        if let Some(v) = promql(&c, web, "reveille_requests_held{service=\"hello\"}").await {
            if let Some(s) = v["data"]["result"][0]["value"][1].as_str() {
                break s.to_string();
            }
            last = v.to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no result from Prometheus; last answer: {last}; log: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(value, "2");

    // The KEDA prometheus example's query gives held + in flight for the cluster.
    let example: serde_json::Value =
        serde_norway::from_str(&read("deploy/keda/prometheus.yaml")).unwrap();
    let q = example["spec"]["triggers"][0]["metadata"]["query"]
        .as_str()
        .unwrap();
    let v = promql(&c, web, q).await.expect("answer");
    assert_eq!(v["data"]["result"][0]["value"][1], "2", "{q}: {v}");

    // Every dashboard query is valid PromQL that Prometheus evaluates.
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/reveille.json")).unwrap();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let q = t["expr"]
                .as_str()
                .unwrap()
                .replace("$service", ".*")
                .replace("$__rate_interval", "1m");
            let v = promql(&c, web, &q).await.expect("answer");
            assert_eq!(v["status"], "success", "{}: {q}: {v}", p["title"]);
        }
    }
    prom.terminate();
    let _ = std::fs::remove_dir_all(&dir);
    for h in held {
        h.abort();
    }
    stop(r).await;
}
