//! The two thin tonic services, `emqx.exhook.v2.HookProvider` (EMQX 5.0 to
//! 5.8) and `emqx.exhook.v3.HookProvider` (EMQX 5.9 and later), over one
//! [`HookCore`].
//!
//! The two packages differ only in fields this server does not read, so
//! one macro writes both: decode, hand to the core, answer at once.

/// Writes `pub mod $ver` with a `HookProvider` service for `pb::$ver`.
macro_rules! hook_provider {
    ($ver:ident, $what:literal) => {
        #[doc = concat!("The `HookProvider` of `emqx.exhook.", stringify!($ver), "` (", $what, ").")]
        pub mod $ver {
            use std::sync::Arc;

            use tonic::{Request, Response, Status};
            use tracing::info;

            use crate::exhook::core::HookCore;
            use crate::exhook::pb::$ver as pb;
            use crate::store::StoredMessage;
            use pb::hook_provider_server::{HookProvider, HookProviderServer};
            use pb::valued_response::ResponsedType;

            /// The service; cheap to clone.
            #[derive(Clone)]
            pub struct Service {
                core: Arc<HookCore>,
            }

            impl Service {
                /// The tonic server for `core`.
                pub fn server(core: Arc<HookCore>) -> HookProviderServer<Self> {
                    HookProviderServer::new(Self { core })
                }
            }

            fn empty() -> Result<Response<pb::EmptySuccess>, Status> {
                Ok(Response::new(pb::EmptySuccess {}))
            }

            /// "Leave it as it is": the chain goes on with the value EMQX
            /// had. EMQX reads CONTINUE as "use my value", and CONTINUE
            /// without a value makes it log `unknown_responsed_value` and
            /// then ignore it anyway; IGNORE says the same without the log.
            fn unchanged() -> Result<Response<pb::ValuedResponse>, Status> {
                Ok(Response::new(pb::ValuedResponse {
                    r#type: ResponsedType::Ignore as i32,
                    value: None,
                }))
            }

            // async_trait must see each method spelled out. Hooks that are
            // not registered are never called by EMQX; they answer at once
            // all the same.
            #[tonic::async_trait]
            impl HookProvider for Service {
                async fn on_provider_loaded(
                    &self,
                    req: Request<pb::ProviderLoadedRequest>,
                ) -> Result<Response<pb::LoadedResponse>, Status> {
                    let r = req.into_inner();
                    let (broker, uptime_ms) = r
                        .broker
                        .map(|b| (b.version, u64::try_from(b.uptime).ok()))
                        .unwrap_or_default();
                    let node = r.meta.map(|m| m.node).unwrap_or_default();
                    info!(api = stringify!($ver), %broker, %node, ?uptime_ms, "EMQX loaded the hook provider");
                    self.core.provider_loaded(&node, uptime_ms);
                    let hooks = self
                        .core
                        .hooks()
                        .into_iter()
                        .map(|h| pb::HookSpec {
                            name: h.name.to_string(),
                            topics: h.topics,
                        })
                        .collect();
                    Ok(Response::new(pb::LoadedResponse { hooks }))
                }

                async fn on_provider_unloaded(
                    &self,
                    req: Request<pb::ProviderUnloadedRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    let node = req.into_inner().meta.map(|m| m.node).unwrap_or_default();
                    info!(api = stringify!($ver), %node, "EMQX unloaded the hook provider");
                    self.core.provider_unloaded(&node);
                    empty()
                }

                async fn on_client_connected(
                    &self,
                    req: Request<pb::ClientConnectedRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    if let Some(c) = req.into_inner().clientinfo {
                        self.core.client_connected(c.clientid, c.username, c.node);
                    }
                    empty()
                }

                async fn on_client_disconnected(
                    &self,
                    req: Request<pb::ClientDisconnectedRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    if let Some(c) = req.into_inner().clientinfo {
                        self.core.client_disconnected(c.clientid, c.node);
                    }
                    empty()
                }

                async fn on_message_publish(
                    &self,
                    req: Request<pb::MessagePublishRequest>,
                ) -> Result<Response<pb::ValuedResponse>, Status> {
                    if let Some(m) = req.into_inner().message {
                        self.core.message_published(StoredMessage {
                            id: m.id,
                            // Out-of-range values cannot come from EMQX;
                            // clamp rather than refuse.
                            qos: u8::try_from(m.qos.min(2)).unwrap_or(2),
                            from: m.from,
                            topic: m.topic,
                            payload: m.payload,
                            timestamp_ms: m.timestamp,
                        });
                    }
                    unchanged()
                }

                async fn on_client_connect(
                    &self,
                    _: Request<pb::ClientConnectRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    empty()
                }

                async fn on_client_connack(
                    &self,
                    _: Request<pb::ClientConnackRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    empty()
                }

                async fn on_client_authenticate(
                    &self,
                    _: Request<pb::ClientAuthenticateRequest>,
                ) -> Result<Response<pb::ValuedResponse>, Status> {
                    unchanged()
                }

                async fn on_client_authorize(
                    &self,
                    _: Request<pb::ClientAuthorizeRequest>,
                ) -> Result<Response<pb::ValuedResponse>, Status> {
                    unchanged()
                }

                async fn on_client_subscribe(
                    &self,
                    _: Request<pb::ClientSubscribeRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    empty()
                }

                async fn on_client_unsubscribe(
                    &self,
                    _: Request<pb::ClientUnsubscribeRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    empty()
                }

                async fn on_session_created(
                    &self,
                    _: Request<pb::SessionCreatedRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    empty()
                }

                async fn on_session_subscribed(
                    &self,
                    _: Request<pb::SessionSubscribedRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    empty()
                }

                async fn on_session_unsubscribed(
                    &self,
                    _: Request<pb::SessionUnsubscribedRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    empty()
                }

                async fn on_session_resumed(
                    &self,
                    _: Request<pb::SessionResumedRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    empty()
                }

                async fn on_session_discarded(
                    &self,
                    _: Request<pb::SessionDiscardedRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    empty()
                }

                async fn on_session_takenover(
                    &self,
                    _: Request<pb::SessionTakenoverRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    empty()
                }

                async fn on_session_terminated(
                    &self,
                    _: Request<pb::SessionTerminatedRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    empty()
                }

                async fn on_message_delivered(
                    &self,
                    _: Request<pb::MessageDeliveredRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    empty()
                }

                async fn on_message_dropped(
                    &self,
                    _: Request<pb::MessageDroppedRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    empty()
                }

                async fn on_message_acked(
                    &self,
                    _: Request<pb::MessageAckedRequest>,
                ) -> Result<Response<pb::EmptySuccess>, Status> {
                    empty()
                }
            }
        }
    };
}

hook_provider!(v2, "EMQX 5.0 to 5.8");
hook_provider!(v3, "EMQX 5.9 and later");
