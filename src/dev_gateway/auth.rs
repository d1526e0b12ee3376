//! Authentication and authorization, as EMQX's gateway authenticator and
//! authorization sources would answer them: a users file for the first, deny
//! rules for the second. Both are optional; without them anyone may connect,
//! publish and subscribe, as with a listener that has no authenticator.
//!
//! The users file is the gateway's own chain (`gateway.exproto.
//! authentication`), and like EMQX the gateway reaches it only through the
//! `proto_name` of `Authenticate` ([`chain_for`]): with another name a
//! client meets another chain, or none, and gets in without a password. An
//! adapter that sends the wrong name fails the tests instead of shipping.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::protocol::topic;

/// Errors in the users file or in a deny rule.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("cannot read users file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("users file line {line}: expected `username password`")]
    BadUserLine { line: usize },
    #[error("deny rule {rule:?}: expected `publish:FILTER`, `subscribe:FILTER` or `all:FILTER`")]
    BadRule { rule: String },
    #[error("deny rule {rule:?}: {filter:?} is not a valid topic filter")]
    BadRuleFilter { rule: String, filter: String },
}

pub use crate::protocol::Secret;

/// The known users, like EMQX's built-in database authenticator.
#[derive(Debug, Clone, Default)]
pub struct Users {
    by_name: HashMap<String, Secret>,
}

impl Users {
    /// Parses one `username password` pair per line; blank lines and lines
    /// starting with `#` are skipped.
    ///
    /// # Errors
    /// A line that does not hold exactly two words.
    pub fn parse(text: &str) -> Result<Self, AuthConfigError> {
        let mut by_name = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(user), Some(pass), None) => {
                    by_name.insert(user.to_owned(), Secret::new(pass));
                }
                _ => return Err(AuthConfigError::BadUserLine { line: i + 1 }),
            }
        }
        Ok(Self { by_name })
    }

    /// Reads and parses a users file.
    ///
    /// # Errors
    /// The file cannot be read or has a bad line.
    pub fn load(path: &Path) -> Result<Self, AuthConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Adds or replaces one user.
    pub fn insert(&mut self, username: impl Into<String>, password: impl Into<String>) {
        self.by_name
            .insert(username.into(), Secret::new(password.into()));
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Whether `username` exists and `password` is its password.
    pub fn check(&self, username: &str, password: &str) -> bool {
        self.check_bytes(username, password.as_bytes())
    }

    /// [`Users::check`] for a password as bytes (MQTT's are binary).
    pub fn check_bytes(&self, username: &str, password: &[u8]) -> bool {
        self.by_name
            .get(username)
            .is_some_and(|p| p.matches(password))
    }
}

/// What a deny rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyAction {
    Publish,
    Subscribe,
    All,
}

/// One authorization rule: deny `action` on topics matched by `filter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyRule {
    pub action: DenyAction,
    /// Topics it covers: a publish topic, or a subscription filter taken
    /// word by word (EMQX's ACL matching).
    pub filter: String,
}

impl FromStr for DenyRule {
    type Err = AuthConfigError;

    fn from_str(rule: &str) -> Result<Self, Self::Err> {
        let bad = || AuthConfigError::BadRule {
            rule: rule.to_owned(),
        };
        let (action, filter) = rule.split_once(':').ok_or_else(bad)?;
        let action = match action.trim().to_ascii_lowercase().as_str() {
            "publish" | "pub" => DenyAction::Publish,
            "subscribe" | "sub" => DenyAction::Subscribe,
            "all" => DenyAction::All,
            _ => return Err(bad()),
        };
        if topic::validate_filter(filter).is_err() {
            return Err(AuthConfigError::BadRuleFilter {
                rule: rule.to_owned(),
                filter: filter.to_owned(),
            });
        }
        Ok(Self {
            action,
            filter: filter.to_owned(),
        })
    }
}

impl fmt::Display for DenyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            DenyAction::Publish => "publish",
            DenyAction::Subscribe => "subscribe",
            DenyAction::All => "all",
        };
        write!(f, "{action}:{}", self.filter)
    }
}

/// Which EMQX release the gateway behaves like (`--emqx-compat`): they
/// pick the authentication chain from `proto_name` differently, and only
/// the older one waits for a handler it cannot reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EmqxCompat {
    /// EMQX 5.1.0 to 5.8.7: any name but another gateway's meets the
    /// gateway's chain (`'unknown:global'`). A handler call that cannot
    /// reach the handler waits for it, up to `handler_retry` (seen on
    /// 5.1.0).
    #[value(name = "5.1")]
    V5_1,
    /// EMQX 5.8.8 and later: only `exproto` meets the gateway's chain; an
    /// unknown name fails inside the authenticate hook, which EMQX logs
    /// (`failed_to_execute`) and then lets the client in. A handler call
    /// that cannot reach the handler fails at once (seen on 5.8.9).
    #[default]
    #[value(name = "5.8")]
    V5_8,
}

/// The authentication chain an `Authenticate` meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chain {
    /// `gateway.exproto.authentication`: the users file.
    Gateway,
    /// Another protocol's global chain (`mqtt:global`, ...), which the dev
    /// gateway leaves empty, so anyone gets in, as EMQX lets anyone
    /// through an empty chain.
    Other(&'static str),
    /// No chain at all: EMQX 5.8.8+ raises `invalid_protocol_name` inside
    /// the hook, and the hook's failure counts as "no authenticator".
    Invalid,
}

/// EMQX's choice of chain for `proto_name` (`emqx_exproto_channel:
/// proto_name_to_protocol/1`, then `global_chain/1` of the authn app).
pub(crate) fn chain_for(compat: EmqxCompat, proto_name: &str) -> Chain {
    // Every version maps these gateways' names to chains of their own.
    const OTHERS_5_1: &[&str] = &["mqtt", "mqtt-sn", "coap", "lwm2m", "stomp"];
    const OTHERS_5_8: &[&str] = &[
        "mqtt", "mqtt-sn", "coap", "lwm2m", "stomp", "ocpp", "gbt32960", "jt808",
    ];
    // An empty name stands for `exproto` in both.
    let name = if proto_name.is_empty() {
        "exproto"
    } else {
        proto_name
    };
    let others = match compat {
        EmqxCompat::V5_1 => OTHERS_5_1,
        EmqxCompat::V5_8 => OTHERS_5_8,
    };
    if let Some(other) = others.iter().find(|o| **o == name) {
        return Chain::Other(other);
    }
    match compat {
        EmqxCompat::V5_1 => Chain::Gateway,
        EmqxCompat::V5_8 if name == "exproto" => Chain::Gateway,
        EmqxCompat::V5_8 => Chain::Invalid,
    }
}

/// The access decisions of one gateway.
#[derive(Debug, Clone, Default)]
pub(crate) struct Access {
    pub users: Option<Users>,
    pub deny: Vec<DenyRule>,
    pub compat: EmqxCompat,
}

impl Access {
    /// `Ok` or EMQX's authentication failure reason in printed form.
    pub fn authenticate(
        &self,
        proto_name: &str,
        username: &str,
        password: &str,
    ) -> Result<(), &'static str> {
        match chain_for(self.compat, proto_name) {
            Chain::Gateway => match &self.users {
                Some(users) if !users.check(username, password) => Err("not_authorized"),
                _ => Ok(()),
            },
            Chain::Other(chain) => {
                tracing::info!(
                    proto_name,
                    chain = %format_args!("{chain}:global"),
                    "authenticated by another protocol's chain, which is empty: anyone gets in"
                );
                Ok(())
            }
            Chain::Invalid => {
                // EMQX's own words (`emqx_hooks:safe_execute/2`), so a log
                // search that finds them behind EMQX finds them here too.
                tracing::error!(
                    exception = "error",
                    reason = "invalid_protocol_name",
                    proto_name,
                    hook = "client.authenticate",
                    "failed_to_execute"
                );
                Ok(())
            }
        }
    }

    /// Whether publishing to `topic_name` is denied.
    pub fn publish_denied(&self, topic_name: &str) -> bool {
        self.denied(DenyAction::Publish, topic_name)
    }

    /// Whether subscribing to `filter` is denied.
    pub fn subscribe_denied(&self, filter: &str) -> bool {
        self.denied(DenyAction::Subscribe, filter)
    }

    fn denied(&self, action: DenyAction, topic_or_filter: &str) -> bool {
        self.deny.iter().any(|rule| {
            // A subscription filter is checked as if it were a topic name:
            // its wildcards are then plain words, as in EMQX's
            // `emqx_topic:match/2`, so a rule for `admin/#` denies
            // `admin/#` and `admin/+` but not `#`.
            (rule.action == action || rule.action == DenyAction::All)
                && topic::matches(&rule.filter, topic_or_filter)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_file_parses_pairs_and_comments() {
        let users = Users::parse("# who\nalice s3cret\n\n  bob   pw  \n").unwrap();
        assert_eq!(users.len(), 2);
        assert!(users.check("alice", "s3cret"));
        assert!(users.check("bob", "pw"));
        assert!(!users.check("alice", "wrong"));
        assert!(!users.check("carol", ""));
        assert!(matches!(
            Users::parse("alice\n"),
            Err(AuthConfigError::BadUserLine { line: 1 })
        ));
        assert!(Users::parse("a b c").is_err());
    }

    #[test]
    fn secrets_are_redacted() {
        let users = Users::parse("alice s3cret").unwrap();
        assert!(!format!("{users:?}").contains("s3cret"));
    }

    #[test]
    fn deny_rules_parse_and_print() {
        let r: DenyRule = "publish:chat/secret/#".parse().unwrap();
        assert_eq!(r.action, DenyAction::Publish);
        assert_eq!(r.to_string(), "publish:chat/secret/#");
        assert_eq!(
            "subscribe:admin/#".parse::<DenyRule>().unwrap().action,
            DenyAction::Subscribe
        );
        assert_eq!("all:x".parse::<DenyRule>().unwrap().action, DenyAction::All);
        assert!("nope".parse::<DenyRule>().is_err());
        assert!("write:a".parse::<DenyRule>().is_err());
        assert!("publish:a/#/b".parse::<DenyRule>().is_err());
    }

    #[test]
    fn access_decisions() {
        let access = Access {
            users: Some(Users::parse("alice pw").unwrap()),
            compat: EmqxCompat::V5_8,
            deny: vec![
                "publish:chat/secret/#".parse().unwrap(),
                "subscribe:admin/#".parse().unwrap(),
                "all:private".parse().unwrap(),
            ],
        };
        assert!(access.authenticate("exproto", "alice", "pw").is_ok());
        assert_eq!(
            access.authenticate("exproto", "alice", "x"),
            Err("not_authorized")
        );
        assert!(access.authenticate("exproto", "", "").is_err());
        assert!(access.publish_denied("chat/secret/x"));
        assert!(!access.publish_denied("chat/lobby"));
        assert!(!access.subscribe_denied("chat/secret/x"));
        assert!(access.subscribe_denied("admin/#"));
        assert!(access.subscribe_denied("admin/users"));
        assert!(!access.subscribe_denied("#"));
        assert!(access.publish_denied("private"));
        assert!(access.subscribe_denied("private"));
        assert!(Access::default().authenticate("exproto", "any", "").is_ok());
    }

    #[test]
    fn deny_rules_take_wildcards_in_a_checked_filter_as_words() {
        let access = Access {
            deny: vec![
                "all:admin/#".parse().unwrap(),
                "all:admin/x".parse().unwrap(),
            ],
            ..Access::default()
        };
        assert!(access.subscribe_denied("admin/#"));
        assert!(access.subscribe_denied("admin/+"));
        assert!(!access.subscribe_denied("#"));
        assert!(!access.subscribe_denied("+/x"));
    }

    #[test]
    fn the_chain_follows_proto_name_as_each_emqx_release_does() {
        use EmqxCompat::{V5_1, V5_8};
        for compat in [V5_1, V5_8] {
            assert_eq!(chain_for(compat, "exproto"), Chain::Gateway);
            assert_eq!(chain_for(compat, ""), Chain::Gateway, "empty is exproto");
            assert_eq!(chain_for(compat, "mqtt"), Chain::Other("mqtt"));
            assert_eq!(chain_for(compat, "mqtt-sn"), Chain::Other("mqtt-sn"));
        }
        assert_eq!(chain_for(V5_1, "chat"), Chain::Gateway);
        assert_eq!(chain_for(V5_8, "chat"), Chain::Invalid);
        assert_eq!(chain_for(V5_1, "ocpp"), Chain::Gateway);
        assert_eq!(chain_for(V5_8, "ocpp"), Chain::Other("ocpp"));
        assert_eq!(
            chain_for(V5_8, "Exproto"),
            Chain::Invalid,
            "atoms are exact"
        );
        assert_eq!(EmqxCompat::default(), V5_8);
    }

    #[test]
    fn a_wrong_proto_name_on_5_8_lets_every_password_in() {
        let users = Some(Users::parse("bob hunter2").unwrap());
        let v58 = Access {
            users: users.clone(),
            compat: EmqxCompat::V5_8,
            ..Access::default()
        };
        let v51 = Access {
            users,
            compat: EmqxCompat::V5_1,
            ..Access::default()
        };
        assert!(v58.authenticate("chat", "bob", "wrong").is_ok());
        assert!(v58.authenticate("chat", "", "").is_ok());
        assert!(v58.authenticate("exproto", "bob", "wrong").is_err());
        assert!(v51.authenticate("chat", "bob", "wrong").is_err());
        assert!(v51.authenticate("exproto", "bob", "wrong").is_err());
        assert!(v51.authenticate("exproto", "bob", "hunter2").is_ok());
        // Another gateway's chain is empty here: EMQX lets anyone through.
        assert!(v51.authenticate("mqtt", "bob", "wrong").is_ok());
    }
}
