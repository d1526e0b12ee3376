//! The chat page in a real browser (headless Chromium through
//! chromedriver), against the demo's stack in this process: the dev
//! gateway with its embedded MQTT broker (TCP and WebSocket listeners) and
//! the adapter with presence, history and its HTTP listener. A raw TCP
//! chat client and an MQTT client (rumqttc) share the room with the page.
//!
//! Needs `chromium` and `chromedriver` (Debian's `chromium` and
//! `chromium-driver`; `CHROMIUM` and `CHROMEDRIVER` name others). Without
//! them the tests say they were skipped, unless EXPROTO_REQUIRE_SERVICES=1
//! makes that a failure. The main test saves a screenshot of the page in
//! the test's target directory, or at `EXPROTO_SCREENSHOT`.

mod e2e_support;
mod mqtt_support;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use e2e_support::{Client, Stack};
use exproto_adapter::dev_gateway::{BrokerListen, GatewayConfig, Users};
use exproto_adapter::web::{HttpConfig, PageSettings};
use fantoccini::{ClientBuilder, Locator};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

/// Browsers are slower to start than anything else here.
const BROWSER_WAIT: Duration = Duration::from_secs(30);

fn tool(env: &str, default: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var(env).unwrap_or_else(|_| default.to_owned()));
    path.exists().then_some(path)
}

/// chromedriver and the Chromium it drives, or `None` (said on stderr)
/// when either is missing.
fn tools() -> Option<(PathBuf, PathBuf)> {
    let found = (
        tool("CHROMEDRIVER", "/usr/bin/chromedriver"),
        tool("CHROMIUM", "/usr/bin/chromium"),
    );
    match found {
        (Some(driver), Some(browser)) => Some((driver, browser)),
        _ => {
            if std::env::var("EXPROTO_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!(
                    "chromedriver or chromium missing and EXPROTO_REQUIRE_SERVICES=1 \
                     (apt-get install chromium chromium-driver)"
                );
            }
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: browser test, no chromium/chromedriver (apt-get install chromium chromium-driver)"
            );
            None
        }
    }
}

/// A headless Chromium session; dropping it stops chromedriver (and so
/// the browser).
struct Browser {
    client: fantoccini::Client,
    _driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Option<Browser> {
        let (driver_path, browser_path) = tools()?;
        let mut driver = tokio::process::Command::new(driver_path)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        // chromedriver picks a free port and says which.
        let mut out = BufReader::new(driver.stdout.take().unwrap()).lines();
        let port = tokio::time::timeout(BROWSER_WAIT, async {
            while let Some(line) = out.next_line().await.unwrap() {
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    return rest.trim_end_matches('.').parse::<u16>().unwrap();
                }
            }
            panic!("chromedriver ended without saying its port");
        })
        .await
        .expect("chromedriver says its port in time");
        tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
        let profile = tempfile::tempdir().unwrap();
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": browser_path,
                "args": [
                    "--headless=new",
                    // Root in a container has no sandbox to enter.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-quic",
                    "--no-first-run",
                    // Nothing but the page: no update checks or sync
                    // calls to hosts a closed network refuses.
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    format!("--user-data-dir={}", profile.path().display()),
                    "--window-size=1000,760",
                ],
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a WebDriver session");
        Some(Browser {
            client,
            _driver: driver,
            _profile: profile,
        })
    }

    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .expect("script runs")
    }

    /// Polls `script` until `ok` accepts its value; returns that value.
    async fn until(&self, what: &str, script: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + BROWSER_WAIT;
        loop {
            let v = self.js(script).await;
            if ok(&v) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                let status = self
                    .js("return document.getElementById('status').textContent")
                    .await;
                panic!("{what}: still {v} (page status: {status})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The message list as `[class, from, text]` rows.
    async fn messages_until(&self, what: &str, ok: impl Fn(&[(String, String, String)]) -> bool) {
        const SCRIPT: &str = "return Array.from(document.querySelectorAll('#messages li'))\
            .map(li => [li.className, li.dataset.from || '', \
                        (li.querySelector('.text') || li).textContent.trim()]);";
        self.until(what, SCRIPT, |v| ok(&rows(v))).await;
    }

    async fn type_into(&self, id: &str, text: &str) {
        let input = self.client.find(Locator::Id(id)).await.unwrap();
        input.clear().await.unwrap();
        input.send_keys(text).await.unwrap();
    }

    async fn press_enter(&self, id: &str) {
        let input = self.client.find(Locator::Id(id)).await.unwrap();
        input
            .send_keys(&char::from(fantoccini::key::Key::Enter).to_string())
            .await
            .unwrap();
    }
}

fn rows(v: &Value) -> Vec<(String, String, String)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let s = |i: usize| r[i].as_str().unwrap_or_default().to_owned();
            (s(0), s(1), s(2))
        })
        .collect()
}

fn has(rows: &[(String, String, String)], class: &str, from: &str, text: &str) -> bool {
    rows.iter()
        .any(|(c, f, t)| c.split(' ').any(|w| w == class) && f == from && t == text)
}

/// The demo's stack with both broker listeners and the HTTP listener, the
/// page pointed at the broker's WebSocket.
async fn demo_stack(gateway: impl FnOnce(&mut GatewayConfig), login: bool) -> Stack {
    Stack::presence_and(
        "sqlite::memory:",
        |g| {
            g.broker = BrokerListen {
                mqtt: Some("127.0.0.1:0".parse().unwrap()),
                ws: Some("127.0.0.1:0".parse().unwrap()),
            };
            gateway(g);
        },
        |_| {},
        move |gw, a| {
            a.http = Some(HttpConfig {
                addr: "127.0.0.1:0".parse().unwrap(),
                token: None,
                user: None,
                page: PageSettings {
                    ws_url: Some(format!("ws://{}/mqtt", gw.ws_addr().unwrap())),
                    login,
                    ..PageSettings::default()
                },
            })
        },
    )
    .await
}

/// An MQTT 3.1.1 client subscribed to `filter`; what it receives comes out
/// of the channel.
async fn mqtt_subscriber(
    id: &str,
    at: SocketAddr,
    filter: &str,
) -> (AsyncClient, mpsc::UnboundedReceiver<String>) {
    let mut opts = MqttOptions::new(id, at.ip().to_string(), at.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 16);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    mqtt_support::until(&mut el, BROWSER_WAIT, "SUBACK", |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_)))
    })
    .await;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                let _ = tx.send(String::from_utf8_lossy(&p.payload).into_owned());
            }
        }
    });
    (client, rx)
}

async fn received(rx: &mut mpsc::UnboundedReceiver<String>, want: &str) {
    tokio::time::timeout(BROWSER_WAIT, async {
        while let Some(got) = rx.recv().await {
            if got == want {
                return;
            }
        }
        panic!("the MQTT client's event loop ended");
    })
    .await
    .unwrap_or_else(|_| panic!("the MQTT client never got {want:?}"));
}

/// Reads lines until `want`, ignoring others (another client's echo).
async fn line_until(c: &mut Client, want: &str) {
    tokio::time::timeout(BROWSER_WAIT, async {
        loop {
            if c.line().await == want {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the TCP client never got {want:?}"));
}

fn screenshot_path() -> PathBuf {
    match std::env::var_os("EXPROTO_SCREENSHOT") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chat-page.png"),
    }
}

#[tokio::test]
async fn the_page_chats_with_a_tcp_client_and_an_mqtt_client() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let s = demo_stack(|_| {}, false).await;
    let web = s.adapter.web().unwrap().addr();
    let mqtt_at = s.gateway.mqtt_addr().unwrap();

    // Before the page comes: one message from each kind of client.
    let mut tara = s.connected("tara").await;
    assert_eq!(tara.ask("SUB chat/lobby").await, "OK SUB chat/lobby 0");
    assert_eq!(
        tara.ask("PUB chat/lobby :hello from the terminal").await,
        "OK PUB chat/lobby"
    );
    line_until(&mut tara, "MSG chat/lobby tara :hello from the terminal").await;
    let (mo, mut mo_rx) = mqtt_subscriber("mo", mqtt_at, "chat/lobby").await;
    mo.publish("chat/lobby", QoS::AtLeastOnce, false, "hello from mqtt")
        .await
        .unwrap();
    line_until(&mut tara, "MSG chat/lobby mo :hello from mqtt").await;
    received(&mut mo_rx, "hello from mqtt").await;
    wait_history(&mut tara, 2).await;

    browser
        .client
        .goto(&format!("http://{web}/?room=chat/lobby"))
        .await
        .unwrap();
    browser
        .until(
            "the page connects",
            "return document.getElementById('status').textContent",
            |v| {
                v.as_str()
                    .unwrap_or_default()
                    .starts_with("Connected as guest-")
            },
        )
        .await;
    let name = browser
        .js("return document.getElementById('name').value")
        .await
        .as_str()
        .unwrap()
        .to_owned();
    assert!(name.starts_with("guest-"), "{name}");
    assert_eq!(
        browser
            .js("return document.getElementById('room').value")
            .await,
        "chat/lobby"
    );

    // History on entering, with who said it.
    browser
        .messages_until("the room's history", |m| {
            has(m, "history", "tara", "hello from the terminal")
                && has(m, "history", "mo", "hello from mqtt")
        })
        .await;
    // Who is online: all three kinds.
    browser
        .until(
            "the presence list",
            "return Array.from(document.querySelectorAll('#presence li')).map(li => li.textContent)",
            |v| {
                let ids: Vec<&str> = v.as_array().unwrap().iter().filter_map(Value::as_str).collect();
                ids.contains(&"tara") && ids.contains(&"mo") && ids.contains(&name.as_str())
            },
        )
        .await;

    // The page sends; both other clients receive it from the page's name.
    browser.type_into("text", "hello from the browser").await;
    browser.press_enter("text").await;
    line_until(
        &mut tara,
        &format!("MSG chat/lobby {name} :hello from the browser"),
    )
    .await;
    received(&mut mo_rx, "hello from the browser").await;
    browser
        .messages_until("its own message", |m| {
            has(m, "live", &name, "hello from the browser")
        })
        .await;

    // And shows theirs, live, with the sender.
    assert_eq!(
        tara.ask("PUB chat/lobby :reply from the terminal").await,
        "OK PUB chat/lobby"
    );
    mo.publish("chat/lobby", QoS::AtLeastOnce, false, "reply from mqtt")
        .await
        .unwrap();
    browser
        .messages_until("the others' live messages", |m| {
            has(m, "live", "tara", "reply from the terminal")
                && has(m, "live", "mo", "reply from mqtt")
        })
        .await;

    let png = browser.client.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = screenshot_path();
    std::fs::write(&path, &png).unwrap();
    let _ = writeln!(std::io::stderr(), "screenshot: {}", path.display());

    // Another room from the picker: empty, and the address says which.
    browser.type_into("room", "chat/other").await;
    browser.press_enter("room").await;
    browser
        .messages_until("the new room", |m| {
            m.len() == 1 && m[0].2 == "No messages in chat/other yet."
        })
        .await;
    let url = browser.client.current_url().await.unwrap();
    assert!(url.as_str().ends_with("?room=chat%2Fother"), "{url}");

    let _ = browser.client.close().await;
    s.gateway.shutdown().await;
}

/// Waits until the store holds `n` messages of chat/lobby, so the page's
/// history read on entering finds them all.
async fn wait_history(c: &mut Client, n: usize) {
    let deadline = tokio::time::Instant::now() + BROWSER_WAIT;
    loop {
        let got = c.reply("HISTORY chat/lobby 10").await;
        if got.len() == n + 1 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "history: {got:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn with_a_users_file_the_page_asks_for_credentials_first() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let s = demo_stack(
        |g| g.users = Some(Users::parse("ann s3cret").unwrap()),
        true,
    )
    .await;
    let web = s.adapter.web().unwrap().addr();
    browser
        .client
        .goto(&format!("http://{web}/"))
        .await
        .unwrap();
    browser
        .until(
            "the sign-in form",
            "return !document.getElementById('login').hidden && document.getElementById('chat').hidden",
            |v| v == &Value::Bool(true),
        )
        .await;

    browser.type_into("login-user", "ann").await;
    browser.type_into("login-pass", "wrong").await;
    browser.press_enter("login-pass").await;
    browser
        .until(
            "the refusal",
            "return document.getElementById('login-error').textContent",
            |v| v == "Wrong username or password.",
        )
        .await;

    browser.type_into("login-pass", "s3cret").await;
    browser.press_enter("login-pass").await;
    browser
        .until(
            "signed in",
            "return document.getElementById('status').textContent",
            |v| v == "Connected as ann.",
        )
        .await;
    let mut ann_tcp = s
        .connected_as("CONNECT ann/tcp ann s3cret", "ann/tcp")
        .await;
    ann_tcp.ask_until("WHO", &["OK WHO 2 :ann ann/tcp"]).await;
    let _ = browser.client.close().await;
    s.gateway.shutdown().await;
}
