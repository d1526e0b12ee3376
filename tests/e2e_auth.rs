//! Who may log in, and as whom, end to end: real TCP clients, the dev
//! gateway with a users file, and the adapter.
//!
//! The gateway chooses the authentication chain from the `proto_name` the
//! adapter sends, as EMQX does, in the manner of both releases it can
//! follow. On 5.8 any name but `exproto` would skip the users file, so the
//! refusals below fail the moment the adapter sends another name.

mod e2e_support;

use e2e_support::{Client, Stack};
use exproto_adapter::dev_gateway::{EmqxCompat, Users};
use exproto_adapter::protocol::ClientidPolicy;

const USERS: &str = "alice s3cret\nbob hunter2\n";

async fn with_users(compat: EmqxCompat, policy: ClientidPolicy) -> Stack {
    Stack::start(
        |g| {
            g.users = Some(Users::parse(USERS).unwrap());
            g.emqx_compat = compat;
        },
        |a| a.protocol.clientid_policy = policy,
    )
    .await
}

#[tokio::test]
async fn wrong_passwords_unknown_users_and_no_username_are_refused_on_both_releases() {
    for compat in [EmqxCompat::V5_1, EmqxCompat::V5_8] {
        let s = with_users(compat, ClientidPolicy::Username).await;
        let mut c = s.client().await;
        for line in [
            "CONNECT bob bob wrong",
            "CONNECT bob bob",
            "CONNECT sbad",
            "CONNECT mallory mallory x",
            "CONNECT mallory mallory",
            "CONNECT",
        ] {
            assert_eq!(
                c.ask(line).await,
                "ERR 401 :authentication refused",
                "{line} on {compat:?}"
            );
        }
        assert_eq!(c.ask("SUB chat/#").await, "ERR 401 :not connected");
        assert_eq!(c.ask("CONNECT bob bob hunter2").await, "OK CONNECT bob");
    }
}

/// Alice is online; Bob, logged in with his own password, asks for her
/// clientid to speak as her.
async fn bob_claims_alices_clientid(policy: ClientidPolicy) -> (Stack, Client, Client, String) {
    let s = with_users(EmqxCompat::V5_8, policy).await;
    let mut alice = s.connected_as("CONNECT alice alice s3cret", "alice").await;
    assert_eq!(alice.ask("SUB chat/lobby").await, "OK SUB chat/lobby 0");
    let mut bob = s.client().await;
    let answer = bob.ask("CONNECT alice bob hunter2").await;
    (s, alice, bob, answer)
}

#[tokio::test]
async fn a_user_cannot_take_anothers_clientid() {
    let (_s, mut alice, mut bob, answer) =
        bob_claims_alices_clientid(ClientidPolicy::Username).await;
    assert_eq!(answer, "ERR 403 :clientid not allowed for this user");
    // Nothing was granted, and Alice was not thrown out.
    assert_eq!(
        bob.ask("PUB chat/lobby :I am alice").await,
        "ERR 401 :not connected"
    );
    assert_eq!(alice.ask("PING").await, "PONG");
    // Bob may still log in as himself, and is seen as himself.
    assert_eq!(bob.ask("CONNECT bob bob hunter2").await, "OK CONNECT bob");
    assert_eq!(bob.ask("PUB chat/lobby :hi").await, "OK PUB chat/lobby");
    assert_eq!(alice.line().await, "MSG chat/lobby bob :hi");
}

#[tokio::test]
async fn the_any_policy_leaves_clientids_to_emqx() {
    let (_s, mut alice, mut bob, answer) = bob_claims_alices_clientid(ClientidPolicy::Any).await;
    assert_eq!(answer, "OK CONNECT alice");
    // EMQX discards the older connection of a clientid, without a word.
    assert_eq!(alice.eof().await, "");
    assert_eq!(bob.ask("PING").await, "PONG");
}

#[tokio::test]
async fn one_user_holds_several_sessions_under_suffixes() {
    let s = with_users(EmqxCompat::V5_8, ClientidPolicy::Username).await;
    let mut phone = s
        .connected_as("CONNECT alice/phone alice s3cret", "alice/phone")
        .await;
    let mut laptop = s
        .connected_as("CONNECT alice/laptop alice s3cret", "alice/laptop")
        .await;
    for c in [&mut phone, &mut laptop] {
        assert_eq!(c.ask("SUB chat/lobby").await, "OK SUB chat/lobby 0");
    }
    assert_eq!(
        phone.ask("PUB chat/lobby :from my phone").await,
        "OK PUB chat/lobby"
    );
    assert_eq!(
        phone.line().await,
        "MSG chat/lobby alice/phone :from my phone"
    );
    assert_eq!(
        laptop.line().await,
        "MSG chat/lobby alice/phone :from my phone"
    );
    // Still both online: neither discarded the other.
    assert_eq!(phone.ask("PING").await, "PONG");
    assert_eq!(laptop.ask("PING").await, "PONG");
    // The suffix belongs to the user: Bob gets neither form.
    let mut bob = s.client().await;
    for line in [
        "CONNECT alice/tablet bob hunter2",
        "CONNECT alicebob bob hunter2",
        "CONNECT bob/ bob hunter2",
    ] {
        assert_eq!(
            bob.ask(line).await,
            "ERR 403 :clientid not allowed for this user",
            "{line}"
        );
    }
    assert_eq!(
        bob.ask("CONNECT bob/tablet bob hunter2").await,
        "OK CONNECT bob/tablet"
    );
}

#[tokio::test]
async fn anonymous_clients_take_any_clientid() {
    let s = Stack::unary().await;
    let mut a = s.connected("alice").await;
    let mut b = s.connected("anything/at-all").await;
    assert_eq!(a.ask("PING").await, "PONG");
    assert_eq!(b.ask("PING").await, "PONG");
}
