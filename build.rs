//! Generates the gRPC code for EMQX's ExProto and ExHook interfaces.
//!
//! protox compiles the .proto files in pure Rust, so a fresh machine needs no
//! system `protoc`. Both ExHook versions are compiled: EMQX 5.0-5.8 speak
//! `emqx.exhook.v2`, 5.9 and later `emqx.exhook.v3`, and one hook server
//! serves both.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/exproto.proto",
        "proto/exhook/v2/exhook.proto",
        "proto/exhook/v3/exhook.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // The same descriptors serve gRPC reflection, so grpcurl can list and
    // call the handler services without the .proto files.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Bytes fields as `bytes::Bytes`: chunks and payloads pass through
        // the adapter without being copied.
        .bytes(".")
        // Small initial buffers: see src/codec.rs.
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(fds)?;
    Ok(())
}
