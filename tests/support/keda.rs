//! A KEDA-like gRPC client (the generated ExternalScaler client over a plain HTTP/2 client),
//! helpers for external tools, and child-process guards.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Child;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use reveille::keda::proto::external_scaler_client::ExternalScalerClient;
use reveille::keda::proto::{GetMetricsRequest, ScaledObjectRef};

/// The generated client over a hyper HTTP/2 (prior knowledge) client.
pub type Grpc = ExternalScalerClient<Client<HttpConnector, tonic::body::Body>>;

/// A client for the external scaler at `addr`.
pub fn grpc(addr: SocketAddr) -> Grpc {
    let http = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    ExternalScalerClient::with_origin(http, format!("http://{addr}").parse().unwrap())
}

/// A ScaledObjectRef named `name` with `meta`.
pub fn sor(name: &str, meta: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: name.into(),
        namespace: "default".into(),
        scaler_metadata: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
    }
}

/// `IsActive` for `name`.
pub async fn is_active(g: &mut Grpc, name: &str) -> bool {
    g.is_active(sor(name, &[]))
        .await
        .unwrap()
        .into_inner()
        .result
}

/// `GetMetrics` for `name` (default metric): the float value.
pub async fn metric_value(g: &mut Grpc, name: &str) -> f64 {
    let r = g
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(sor(name, &[])),
            metric_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    r.metric_values[0].metric_value_float
}

/// Whether an external tool is usable. When it is not: panics under CI (env `CI` set),
/// otherwise prints why the test is skipped and returns false.
pub fn tool_available(what: &str, install: &str, check: &mut std::process::Command) -> bool {
    let ok = check
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what} is required under CI: {install}");
    }
    // Written past the test harness's capture, so the skip shows in a plain `cargo test`.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: install {what} ({install})");
    false
}

/// Kills (SIGKILL) and reaps a child process when dropped, so a failing test leaves nothing.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// SIGKILL now and reap.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM (graceful stop) and wait up to 30 s, then SIGKILL.
    pub fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.kill();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.kill();
        }
    }
}

/// A fresh directory under the system temp dir.
pub fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "reveille-{tag}-{}-{}",
        std::process::id(),
        super::free_port()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}
