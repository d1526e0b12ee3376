//! Generates the gRPC code for EMQX's ExProto interface.
//!
//! protox compiles the .proto files in pure Rust, so a fresh machine needs no
//! system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/exproto.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
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
