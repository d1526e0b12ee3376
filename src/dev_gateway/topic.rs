//! MQTT topic rules as EMQX applies them: filter matching (used by the
//! in-memory router and by deny rules) and the validity checks the stand-in
//! runs before it routes anything. The rules themselves are the ones the
//! chat protocol checks; this module words them as the gateway asks.

use crate::protocol::topic as shared;

/// Whether the topic `name` is matched by `filter` (MQTT 3.1.1 §4.7).
///
/// A topic whose first level starts with `$` (`$SYS/...`) is not matched by
/// a filter whose first level is `+` or `#`, as MQTT requires. `#` also
/// matches its parent level (`a/#` matches `a`).
///
/// Deny rules reuse this with a subscription filter as `name`: wildcards in
/// it are then plain words, as in EMQX's `emqx_topic:match/2` (a rule for
/// `admin/#` denies `admin/#` and `admin/x`, not `#`).
pub fn matches(name: &str, filter: &str) -> bool {
    shared::matches(filter, name)
}

/// A topic name that can be published to: not empty, no NUL, no wildcard.
pub fn valid_name(name: &str) -> bool {
    shared::validate_name(name).is_ok()
}

/// A topic filter that can be subscribed to: not empty, no NUL, `+` and `#`
/// only as whole levels, `#` only as the last level.
pub fn valid_filter(filter: &str) -> bool {
    shared::validate_filter(filter).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_known_answers() {
        let table = [
            ("a/b/c", "a/b/c", true),
            ("a/b/c", "a/+/c", true),
            ("a/b/c", "a/#", true),
            ("a", "a/#", true),
            ("a/b/c", "#", true),
            ("a/b/c", "+/+/+", true),
            ("a/b/c", "+/+", false),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            ("a/b/c", "a/+", false),
            ("/finance", "+/+", true),
            ("/finance", "/+", true),
            ("/finance", "+", false),
            ("a//c", "a/+/c", true),
            ("$SYS/x", "#", false),
            ("$SYS/x", "+/x", false),
            ("$SYS/x", "$SYS/#", true),
            ("$SYS/x", "$SYS/+", true),
            ("a/$b", "a/+", true),
            ("chat/lobby", "chat/lobby/", false),
            ("Chat", "chat", false),
        ];
        for (name, filter, want) in table {
            assert_eq!(matches(name, filter), want, "{name} vs {filter}");
        }
    }

    #[test]
    fn deny_rule_semantics_treat_wildcards_in_the_name_literally() {
        assert!(matches("admin/#", "admin/#"));
        assert!(matches("admin/+", "admin/#"));
        assert!(!matches("#", "admin/#"));
        assert!(!matches("+/x", "admin/x"));
    }

    #[test]
    fn validity() {
        for ok in ["a", "a/b", "/", "a//b", "$SYS/x", "a b"] {
            assert!(valid_name(ok), "{ok}");
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/+", "#", "a\0b", "a/b#"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        for ok in ["#", "+", "a/#", "+/+/#", "a/+/b"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "+a", "a\0", "#/"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
        assert!(!valid_name(&"x".repeat(shared::MAX_TOPIC_LEN + 1)));
    }
}
