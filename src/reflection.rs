//! gRPC reflection for each port the crate serves, listing and describing
//! exactly what that port serves. Used by the handler server and the hook
//! server alike, below both.

use anyhow::Context as _;

/// gRPC reflection for one port, in both versions clients ask for: `v1`
/// (grpcurl) and `v1alpha` (grpcui, Postman, Python's grpcio-reflection).
/// Each lists exactly `services` and the two reflection services, and
/// describes only those, from the crate's .proto files of `packages` plus
/// `extra` encoded descriptor sets: a port that described every vendored
/// file would advertise services that live on another port, or nowhere.
///
/// # Errors
/// Descriptor sets that cannot be decoded.
pub(crate) fn services(
    packages: &[&str],
    extra: &[&'static [u8]],
    services: &[&'static str],
) -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    use prost::Message;
    use tonic_reflection::pb::{v1, v1alpha};

    let mut own = prost_types::FileDescriptorSet::decode(crate::DESCRIPTORS)
        .context("the crate's own descriptors")?;
    own.file.retain(|f| packages.contains(&f.package()));
    // exproto.proto also holds EMQX's own ConnectionAdapter, which a
    // client would otherwise find by name here and call in vain.
    for file in &mut own.file {
        let package = file.package().to_owned();
        file.service
            .retain(|s| services.contains(&format!("{package}.{}", s.name()).as_str()));
    }
    // Both versions are served, so each lists and describes both; the
    // builder's own inclusion would give each only its own version.
    let configure = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_file_descriptor_set(own.clone())
            .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(v1alpha::FILE_DESCRIPTOR_SET);
        for set in extra {
            b = b.register_encoded_file_descriptor_set(set);
        }
        let reflection = [
            v1::server_reflection_server::SERVICE_NAME,
            v1alpha::server_reflection_server::SERVICE_NAME,
        ];
        for name in services.iter().chain(&reflection) {
            b = b.with_service_name(*name);
        }
        b
    };
    Ok((
        configure().build_v1().context("reflection service")?,
        configure().build_v1alpha().context("reflection service")?,
    ))
}
