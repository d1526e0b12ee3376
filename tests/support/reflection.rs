//! Asks a gRPC port what it serves through reflection, in each version
//! clients use: `v1` (grpcurl) and `v1alpha` (grpcui, Postman, Python's
//! grpcio-reflection). The two packages differ only in name, so one macro
//! writes a client module for each.

use tonic::transport::Channel;

/// Writes `pub mod $ver` over `tonic_reflection::pb::$ver`.
macro_rules! reflection_client {
    ($ver:ident) => {
        pub mod $ver {
            use tonic::transport::Channel;
            use tonic_reflection::pb::$ver::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$ver::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$ver::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$ver::ServerReflectionRequest;

            /// One request on a reflection stream; tonic-reflection
            /// answers a symbol it does not know with a stream error.
            async fn ask(
                channel: Channel,
                request: MessageRequest,
            ) -> Result<MessageResponse, tonic::Status> {
                let request = ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(request),
                };
                let mut responses = ServerReflectionClient::new(channel)
                    .server_reflection_info(tokio_stream::iter([request]))
                    .await
                    .unwrap_or_else(|e| panic!("{} reflection: {e}", stringify!($ver)))
                    .into_inner();
                let response = responses.message().await?.expect("an answer");
                Ok(response.message_response.expect("an answer"))
            }

            /// The services the port lists, sorted.
            pub async fn services(channel: Channel) -> Vec<String> {
                let answer = ask(channel, MessageRequest::ListServices(String::new()))
                    .await
                    .unwrap();
                let MessageResponse::ListServicesResponse(list) = answer else {
                    panic!("unexpected reflection answer {answer:?}");
                };
                let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
                names.sort();
                names
            }

            /// Whether the port describes `symbol` (a service name, say).
            pub async fn describes(channel: Channel, symbol: &str) -> bool {
                match ask(channel, MessageRequest::FileContainingSymbol(symbol.into())).await {
                    Ok(MessageResponse::FileDescriptorResponse(r)) => {
                        !r.file_descriptor_proto.is_empty()
                    }
                    Ok(other) => panic!("unexpected reflection answer {other:?}"),
                    Err(e) if e.code() == tonic::Code::NotFound => false,
                    Err(e) => panic!("{} reflection: {e}", stringify!($ver)),
                }
            }
        }
    };
}

reflection_client!(v1);
reflection_client!(v1alpha);

/// Checks that both versions list exactly `want` (sorted) and describe each
/// of them, and describe none of `absent`.
pub async fn assert_reflects(channel: &Channel, want: &[&str], absent: &[&str]) {
    for (version, listed) in [
        ("v1", v1::services(channel.clone()).await),
        ("v1alpha", v1alpha::services(channel.clone()).await),
    ] {
        assert_eq!(listed, want, "{version} list_services");
    }
    for name in want {
        assert!(v1::describes(channel.clone(), name).await, "v1 {name}");
        assert!(
            v1alpha::describes(channel.clone(), name).await,
            "v1alpha {name}"
        );
    }
    for name in absent {
        assert!(!v1::describes(channel.clone(), name).await, "v1 {name}");
        assert!(
            !v1alpha::describes(channel.clone(), name).await,
            "v1alpha {name}"
        );
    }
}
