//! A real KEDA-like peer in another language: a Python client built with `grpcio` and
//! `grpcio-tools` compiles `proto/externalscaler.proto` itself, calls all four RPCs, holds a
//! stream, and times the pushed `true` after it sends a request that gets held.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::keda::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_sees_every_rpc_and_the_push() {
    if !tool_available(
        "grpcio and grpcio-tools for python3",
        "pip install grpcio grpcio-tools",
        std::process::Command::new("python3").args(["-c", "import grpc, grpc_tools"]),
    ) {
        return;
    }
    let port = free_port();
    let yaml = format!(
        "{}keda: {{ listen: 127.0.0.1:0, stream_interval: 1h }}\n",
        process_config(port, "1s", &["queue: { capacity: 10, timeout: 30s }"])
    );
    let r = start(&yaml).await;
    let root = env!("CARGO_MANIFEST_DIR");
    let out_dir = tempdir("python");
    let run = tokio::process::Command::new("python3")
        .arg(format!("{root}/tests/python/keda_client.py"))
        .arg(format!("{root}/proto"))
        .arg(&out_dir)
        .arg(r.keda_addr.unwrap().to_string())
        .arg(r.proxy_addr.to_string())
        .arg("hello.test")
        .arg("hello")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("python client finished within 120 s")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client failed:\n{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad output ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    eprintln!("python client: {v}");
    assert_eq!(v["is_active_before"], false);
    assert_eq!(v["spec_name"], "reveille-hello-concurrency");
    assert_eq!(v["spec_target"], 5.0);
    assert_eq!(v["value_before"], 0.0);
    assert_eq!(v["unknown_code"], "NOT_FOUND");
    assert!(
        v["unknown_message"]
            .as_str()
            .unwrap()
            .contains("\"no-such-service\" is not configured"),
        "{v}"
    );
    assert_eq!(v["stream_first"], false);
    assert_eq!(v["stream_pushed"], true);
    let push_ms = v["push_ms"].as_f64().unwrap();
    assert!(push_ms < 100.0, "push took {push_ms} ms");
    assert_eq!(v["is_active_held"], true);
    assert_eq!(v["value_held"], 1.0);
    assert_eq!(v["answer_status"], "200");
    let _ = std::fs::remove_dir_all(&out_dir);
    stop(r).await;
}
