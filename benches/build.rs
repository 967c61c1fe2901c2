fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, as in `client/`: no system protobuf compiler is needed.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/etcd_kv.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
