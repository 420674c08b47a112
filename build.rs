//! Generates the KEDA external scaler gRPC code from `proto/externalscaler.proto` with a
//! pure-Rust protobuf compiler (protox), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/externalscaler.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Reveille serves with its own hyper listener; no tonic transport is linked.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
