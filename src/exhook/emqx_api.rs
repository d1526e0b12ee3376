//! A small client of EMQX's REST API (`/api/v5`, the dashboard listener,
//! 18083 by default), for what hooks cannot tell: which clients a node has
//! now. An API key and secret authenticate every request (HTTP basic
//! auth); the secret is never logged.
//!
//! EMQX lists MQTT clients at `/clients` and each gateway's clients (the
//! exproto clients among them) at `/gateways/{name}/clients`; both page
//! with `page` and `limit` (at most 1000 on EMQX 5.1, 10000 on 5.8) and
//! say `meta.hasnext`. Paging rescans, so a client that connects or
//! leaves meanwhile may be missed or seen twice: a reconciliation reads
//! its result with that in mind.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::protocol::Secret;

/// Clients per page: what EMQX 5.1 allows at most.
const PAGE: usize = 1000;
/// Bound on each request.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Where EMQX's REST API is and the key that opens it.
#[derive(Clone)]
pub struct EmqxApi {
    client: Client<HttpConnector, Empty<Bytes>>,
    /// `http://host:port`, no trailing `/`.
    base: String,
    auth: Secret,
}

impl std::fmt::Debug for EmqxApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmqxApi")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// The connected clients of one node, by clientid, with their usernames.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub clients: HashMap<String, String>,
    /// The list is whole: a client missing from it is gone. `false` when
    /// a list took more than one page (1,000 clients: paging may skip one)
    /// or the node has more clients than one pass reads.
    pub complete: bool,
}

#[derive(Deserialize)]
struct Page {
    data: Vec<Client_>,
    #[serde(default)]
    meta: Meta,
}

#[derive(Deserialize)]
struct Client_ {
    clientid: String,
    #[serde(default)]
    username: Option<String>,
    #[serde(default = "yes")]
    connected: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(default)]
    hasnext: bool,
}

#[derive(Deserialize)]
struct Gateway {
    name: String,
    #[serde(default)]
    status: String,
}

#[derive(Deserialize)]
struct Node {
    node: String,
    #[serde(default)]
    node_status: String,
}

impl EmqxApi {
    /// A client of the API at `url` (`http://127.0.0.1:18083`, with or
    /// without `/api/v5`).
    ///
    /// # Errors
    /// A URL that is not plain `http://`, or an empty key.
    pub fn new(url: &str, key: &str, secret: &Secret) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/');
        let base = base.strip_suffix("/api/v5").unwrap_or(base);
        if !base.starts_with("http://") {
            bail!(
                "EMQX API URL {:?}: use http:// (EMQX's dashboard listener, e.g. http://127.0.0.1:18083)",
                crate::redact::redact_url(url)
            );
        }
        let uri = base
            .parse::<hyper::Uri>()
            .with_context(|| format!("bad EMQX API URL {:?}", crate::redact::redact_url(url)))?;
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            bail!("EMQX API URL: give the key with --emqx-api-key, not in the URL");
        }
        if key.is_empty() {
            bail!("an EMQX API URL needs an API key (--emqx-api-key) and secret");
        }
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("{key}:{}", secret.expose()));
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(TIMEOUT));
        connector.set_nodelay(true);
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            base: base.to_owned(),
            auth: Secret::new(format!("Basic {token}")),
        })
    }

    /// Where the API is, for logs.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let uri = format!("{}/api/v5{path}", self.base);
        let req = hyper::Request::get(&uri)
            .header(hyper::header::AUTHORIZATION, self.auth.expose())
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::new())
            .context("request")?;
        let resp = tokio::time::timeout(TIMEOUT, self.client.request(req))
            .await
            .with_context(|| format!("GET {path}: no answer within {TIMEOUT:?}"))?
            .with_context(|| format!("GET {path}"))?;
        let status = resp.status();
        let body = tokio::time::timeout(TIMEOUT, resp.into_body().collect())
            .await
            .with_context(|| format!("GET {path}: body not read within {TIMEOUT:?}"))?
            .with_context(|| format!("GET {path}"))?
            .to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            bail!("GET {path}: {status}: {text}");
        }
        serde_json::from_slice(&body).with_context(|| format!("GET {path}: unexpected answer"))
    }

    /// The running nodes of the cluster.
    ///
    /// # Errors
    /// EMQX cannot be reached, refuses the key, or answers oddly.
    pub async fn nodes(&self) -> anyhow::Result<Vec<String>> {
        let nodes: Vec<Node> = self.get("/nodes").await?;
        Ok(nodes
            .into_iter()
            .filter(|n| n.node_status.is_empty() || n.node_status == "running")
            .map(|n| n.node)
            .collect())
    }

    /// The clients connected to `node` now, MQTT and every running
    /// gateway's, reading at most `max` of them.
    ///
    /// # Errors
    /// EMQX cannot be reached, refuses the key, or answers oddly.
    pub async fn connected(&self, node: &str, max: usize) -> anyhow::Result<Listing> {
        let gateways: Vec<Gateway> = self.get("/gateways").await?;
        let mut lists = vec!["/clients".to_owned()];
        lists.extend(
            gateways
                .into_iter()
                .filter(|g| g.status == "running")
                .map(|g| format!("/gateways/{}/clients", g.name)),
        );
        let mut listing = Listing {
            clients: HashMap::new(),
            complete: true,
        };
        let node_q = node_query(node);
        // EMQX pages by rescanning: a client that leaves between two pages
        // shifts the rest, and one may be skipped. A list of one page is
        // whole; a longer one proves no client gone.
        let mut one_page_each = true;
        let max_pages = max / PAGE + 1;
        for list in lists {
            for page in 1..=max_pages {
                if listing.clients.len() > max {
                    break;
                }
                let path = format!("{list}?{node_q}&conn_state=connected&page={page}&limit={PAGE}");
                let got: Page = self.get(&path).await?;
                let empty = got.data.is_empty();
                for c in got.data.into_iter().filter(|c| c.connected) {
                    listing
                        .clients
                        .insert(c.clientid, c.username.unwrap_or_default());
                }
                if !got.meta.hasnext || empty {
                    break;
                }
                one_page_each = false;
            }
        }
        listing.complete = one_page_each && listing.clients.len() <= max;
        Ok(listing)
    }
}

/// `node=NODE`, encoded (node names hold `@`).
fn node_query(node: &str) -> String {
    serde_urlencoded::to_string([("node", node)]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_keys_are_checked() {
        let secret = Secret::new("s");
        assert!(EmqxApi::new("https://emqx:18084", "k", &secret).is_err());
        assert!(EmqxApi::new("http://127.0.0.1:18083", "", &secret).is_err());
        let api = EmqxApi::new("http://127.0.0.1:18083/api/v5/", "k", &secret).unwrap();
        assert_eq!(api.base(), "http://127.0.0.1:18083");
        assert!(!format!("{api:?}").contains("Basic"), "{api:?}");
        assert_eq!(node_query("emqx@127.0.0.1"), "node=emqx%40127.0.0.1");
    }
}
