//! [`ConnectionAdapter`] over tonic: one shared, lazily connected channel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::outage::{Line, OutageLog};
use super::{ConnectionAdapter, EmqxError, Op};
use crate::pb::connection_adapter_client::ConnectionAdapterClient;
use crate::pb::{self, ResultCode};
use crate::protocol::{Call, EMQX_PROTO_NAME};
use crate::telemetry;

/// EMQX's ConnectionAdapter reached over gRPC.
#[derive(Clone)]
pub struct GrpcAdapter {
    /// Cheap to clone: every clone multiplexes over the same HTTP/2
    /// connection, so thousands of sessions share one socket to EMQX.
    client: ConnectionAdapterClient<Channel>,
    /// Bounds every call, so a stalled EMQX turns into a 503 instead of a
    /// session that hangs forever.
    timeout: Duration,
    /// Set while EMQX is unreachable: answered calls check it without a
    /// lock, and only take `outages` around an outage.
    down: Arc<AtomicBool>,
    /// When an outage is logged: once when it starts and once when it
    /// ends, with flapping counted rather than logged.
    outages: Arc<Mutex<OutageLog>>,
}

/// After a logged outage, further short outages within this time are
/// counted rather than logged.
const OUTAGE_QUIET: Duration = Duration::from_secs(30);

impl GrpcAdapter {
    /// A client for `url` (e.g. `http://127.0.0.1:9100`). Nothing is
    /// connected until the first call.
    ///
    /// # Errors
    /// When `url` is not a valid URI.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, tonic::transport::Error> {
        Self::with_tls(url, timeout, None)
    }

    /// A client for `url` over TLS when `tls` is set (an `https://` URL;
    /// see [`crate::tls::emqx_config`]). Nothing is connected until the
    /// first call.
    ///
    /// # Errors
    /// When `url` is not a valid URI, or the TLS settings are unusable.
    pub fn with_tls(
        url: &str,
        timeout: Duration,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Self, tonic::transport::Error> {
        let mut endpoint = Endpoint::from_shared(url.to_string())?;
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls)?;
        }
        let endpoint = endpoint
            .tcp_nodelay(true)
            .connect_timeout(timeout)
            .initial_connection_window_size(crate::H2_CONNECTION_WINDOW)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        Ok(Self::from_channel(endpoint.connect_lazy(), timeout))
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: Channel, timeout: Duration) -> Self {
        Self {
            client: ConnectionAdapterClient::new(channel),
            timeout,
            down: Arc::new(AtomicBool::new(false)),
            outages: Arc::new(Mutex::new(OutageLog::new(OUTAGE_QUIET))),
        }
    }

    fn note_reachable(&self, reachable: bool, detail: &str) {
        if reachable && !self.down.load(Ordering::Relaxed) {
            return;
        }
        let line = {
            let mut log = self.outages.lock().unwrap_or_else(|e| e.into_inner());
            let line = log.note(reachable, Instant::now());
            self.down.store(log.is_down(), Ordering::Relaxed);
            line
        };
        match line {
            Some(Line::Down { unlogged: 0 }) => {
                tracing::warn!(error = %detail, "EMQX ConnectionAdapter unreachable")
            }
            Some(Line::Down { unlogged }) => tracing::warn!(
                error = %detail,
                short_outages_since_last_warning = unlogged,
                "EMQX ConnectionAdapter unreachable"
            ),
            Some(Line::Up) => tracing::info!("EMQX ConnectionAdapter reachable again"),
            None => {}
        }
    }
}

fn code_to_result(resp: pb::CodeResponse) -> Result<(), EmqxError> {
    match ResultCode::try_from(resp.code) {
        Ok(ResultCode::Success) => Ok(()),
        Ok(ResultCode::ConnProcessNotAlive) => Err(EmqxError::Gone),
        Ok(ResultCode::PermissionDeny) => Err(EmqxError::Denied(resp.message)),
        _ => Err(EmqxError::Rejected {
            code: resp.code,
            message: resp.message,
        }),
    }
}

/// Whether a gRPC status means "EMQX did not answer" rather than "EMQX
/// answered with an error".
///
/// tonic gives a failure below gRPC (refused, reset, broken connection)
/// the code `Unknown` when it finds no better one; the cause then sits in
/// the status's source chain, which is read instead of its text.
fn is_unreachable(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => true,
        tonic::Code::Unknown => caused_by_transport(status),
        _ => false,
    }
}

fn caused_by_transport(status: &tonic::Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        if e.is::<tonic::transport::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        cause = e.source();
    }
    false
}

impl ConnectionAdapter for GrpcAdapter {
    fn call(&self, conn: &str, op: Op) -> BoxFuture<'static, Result<(), EmqxError>> {
        let mut client = self.client.clone();
        let conn = conn.to_string();
        let this = self.clone();
        let method = op.method();
        Box::pin(async move {
            let started = std::time::Instant::now();
            let fut = async {
                match op {
                    Op::Send(bytes) => client.send(pb::SendBytesRequest { conn, bytes }).await,
                    Op::Call(call) => match call {
                        Call::Close => client.close(pb::CloseSocketRequest { conn }).await,
                        Call::Authenticate {
                            protocol,
                            clientid,
                            username,
                            password,
                        } => {
                            client
                                .authenticate(pb::AuthenticateRequest {
                                    conn,
                                    clientinfo: Some(pb::ClientInfo {
                                        proto_name: EMQX_PROTO_NAME.to_owned(),
                                        proto_ver: protocol.to_string(),
                                        clientid,
                                        username,
                                        mountpoint: String::new(),
                                    }),
                                    password: password.expose().to_string(),
                                })
                                .await
                        }
                        Call::StartKeepalive { interval_s } => {
                            client
                                .start_timer(pb::TimerRequest {
                                    conn,
                                    r#type: pb::TimerType::Keepalive as i32,
                                    interval: interval_s,
                                })
                                .await
                        }
                        Call::Subscribe { filter, qos } => {
                            client
                                .subscribe(pb::SubscribeRequest {
                                    conn,
                                    topic: filter,
                                    qos: u32::from(qos),
                                })
                                .await
                        }
                        Call::Unsubscribe { filter } => {
                            client
                                .unsubscribe(pb::UnsubscribeRequest {
                                    conn,
                                    topic: filter,
                                })
                                .await
                        }
                        Call::Publish {
                            topic,
                            qos,
                            payload,
                        } => {
                            client
                                .publish(pb::PublishRequest {
                                    conn,
                                    topic,
                                    qos: u32::from(qos),
                                    payload,
                                })
                                .await
                        }
                        Call::RawPublish {
                            topic,
                            qos,
                            payload,
                        } => {
                            client
                                .raw_publish(pb::RawPublishRequest {
                                    topic,
                                    qos: u32::from(qos),
                                    payload,
                                })
                                .await
                        }
                    },
                }
            };
            let result = match tokio::time::timeout(this.timeout, fut).await {
                Err(_) => {
                    let e = format!("no answer within {:?}", this.timeout);
                    this.note_reachable(false, &e);
                    Err(EmqxError::Unreachable(e))
                }
                Ok(Err(status)) if is_unreachable(&status) => {
                    this.note_reachable(false, status.message());
                    Err(EmqxError::Unreachable(status.message().to_string()))
                }
                Ok(Err(status)) => {
                    this.note_reachable(true, "");
                    Err(EmqxError::Rejected {
                        code: ResultCode::Unknown as i32,
                        message: format!("gRPC status {:?}: {}", status.code(), status.message()),
                    })
                }
                Ok(Ok(resp)) => {
                    this.note_reachable(true, "");
                    code_to_result(resp.into_inner())
                }
            };
            let outcome = match &result {
                Ok(()) => "success",
                Err(EmqxError::Gone) => "conn_process_not_alive",
                Err(EmqxError::Denied(_)) => "permission_deny",
                Err(EmqxError::Rejected { code, .. }) => match ResultCode::try_from(*code) {
                    Ok(ResultCode::RequiredParamsMissed) => "required_params_missed",
                    Ok(ResultCode::ParamsTypeError) => "params_type_error",
                    _ => "unknown",
                },
                Err(EmqxError::Unreachable(_)) => "unreachable",
            };
            telemetry::emqx_call(method, outcome, started.elapsed());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_codes_map_to_errors() {
        let r = |code: ResultCode, m: &str| {
            code_to_result(pb::CodeResponse {
                code: code as i32,
                message: m.into(),
            })
        };
        assert_eq!(r(ResultCode::Success, ""), Ok(()));
        assert_eq!(r(ResultCode::ConnProcessNotAlive, ""), Err(EmqxError::Gone));
        assert_eq!(
            r(ResultCode::PermissionDeny, "Authorization deny"),
            Err(EmqxError::Denied("Authorization deny".into()))
        );
        assert_eq!(
            r(ResultCode::Unknown, "{error,'PARAMS_TYPE_ERROR'}"),
            Err(EmqxError::Rejected {
                code: 1,
                message: "{error,'PARAMS_TYPE_ERROR'}".into()
            })
        );
        // A code this build does not know is still a failure, not a success.
        assert!(code_to_result(pb::CodeResponse {
            code: 42,
            message: String::new()
        })
        .is_err());
    }

    #[test]
    fn unreachable_is_read_from_the_code_and_the_cause_not_the_text() {
        assert!(is_unreachable(&tonic::Status::unavailable("x")));
        assert!(is_unreachable(&tonic::Status::deadline_exceeded("x")));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let below_grpc = tonic::Status::from_error(Box::new(io));
        assert_eq!(below_grpc.code(), tonic::Code::Unknown);
        assert!(is_unreachable(&below_grpc));
        // An answer whose words happen to say "transport" is an answer.
        assert!(!is_unreachable(&tonic::Status::unknown("transport error")));
        assert!(!is_unreachable(&tonic::Status::internal("x")));
    }

    #[tokio::test]
    async fn unreachable_emqx_is_an_unreachable_error() {
        // Port 1 on loopback: nothing listens there, the connect is refused.
        let a = GrpcAdapter::new("http://127.0.0.1:1", Duration::from_secs(2)).unwrap();
        let e = a.call("c", Op::Send(bytes::Bytes::new())).await;
        assert!(matches!(e, Err(EmqxError::Unreachable(_))), "{e:?}");
    }
}
