//! Authentication and authorization, as EMQX's gateway authenticator and
//! authorization sources would answer them: a users file for the first, deny
//! rules for the second. Both are optional; without them anyone may connect,
//! publish and subscribe, as with a listener that has no authenticator.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use super::topic;

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
        self.by_name
            .get(username)
            .is_some_and(|p| p.expose() == password)
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
        if !topic::valid_filter(filter) {
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

/// The access decisions of one gateway.
#[derive(Debug, Clone, Default)]
pub(crate) struct Access {
    pub users: Option<Users>,
    pub deny: Vec<DenyRule>,
}

impl Access {
    /// `Ok` or EMQX's authentication failure reason in printed form.
    pub fn authenticate(&self, username: &str, password: &str) -> Result<(), &'static str> {
        match &self.users {
            Some(users) if !users.check(username, password) => Err("not_authorized"),
            _ => Ok(()),
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
            (rule.action == action || rule.action == DenyAction::All)
                && topic::matches(topic_or_filter, &rule.filter)
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
            deny: vec![
                "publish:chat/secret/#".parse().unwrap(),
                "subscribe:admin/#".parse().unwrap(),
                "all:private".parse().unwrap(),
            ],
        };
        assert!(access.authenticate("alice", "pw").is_ok());
        assert_eq!(access.authenticate("alice", "x"), Err("not_authorized"));
        assert!(access.authenticate("", "").is_err());
        assert!(access.publish_denied("chat/secret/x"));
        assert!(!access.publish_denied("chat/lobby"));
        assert!(!access.subscribe_denied("chat/secret/x"));
        assert!(access.subscribe_denied("admin/#"));
        assert!(access.subscribe_denied("admin/users"));
        assert!(!access.subscribe_denied("#"));
        assert!(access.publish_denied("private"));
        assert!(access.subscribe_denied("private"));
        assert!(Access::default().authenticate("any", "").is_ok());
    }
}
