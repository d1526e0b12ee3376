//! MQTT topic names and filters: validation and matching.
//!
//! EMQX does no topic validation for ExProto calls, so the adapter checks
//! topics the way an MQTT broker would before any call is made. Matching
//! lets the adapter tell whether a subscription covers a topic without
//! asking EMQX.

/// The longest topic MQTT can carry (a 16-bit length prefix).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Why a topic name or filter is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("empty topic")]
    Empty,
    #[error("topic longer than 65535 bytes")]
    TooLong,
    #[error("topic contains NUL")]
    Nul,
    #[error("'+' and '#' must fill a whole level, and '#' must be last")]
    BadWildcard,
    #[error("a topic name takes no '+' or '#'")]
    WildcardInName,
}

fn check_common(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    if topic.as_bytes().contains(&0) {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// Checks a topic name, the kind a message is published to.
///
/// # Errors
/// The first rule it breaks: empty, too long, NUL, or a wildcard anywhere.
pub fn validate_name(topic: &str) -> Result<(), TopicError> {
    check_common(topic)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter, the kind a subscription names.
///
/// # Errors
/// The first rule it breaks: empty, too long, NUL, or a wildcard that does
/// not fill a whole level (`#` also only as the last level).
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let wild = match level {
            "+" => false,
            "#" => levels.peek().is_some(),
            _ => level.contains(['+', '#']),
        };
        if wild {
            return Err(TopicError::BadWildcard);
        }
    }
    Ok(())
}

/// Whether `filter` matches the topic name `topic`, as MQTT defines it:
/// `+` matches one level, `#` any number of levels including the parent
/// (`a/#` matches `a`), and a filter starting with a wildcard does not
/// match a topic starting with `$`.
///
/// Both arguments are assumed valid ([`validate_filter`], [`validate_name`]);
/// for other input the answer is unspecified but there is no panic.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// Whether a subscription made with `filter` receives messages published
/// to `topic`: as [`matches`], after taking off a shared subscription's
/// `$share/<group>/` or `$queue/` prefix, which name how messages are
/// shared, not which topics they come from.
pub fn subscription_matches(filter: &str, topic: &str) -> bool {
    let real = if let Some(rest) = filter.strip_prefix("$share/") {
        match rest.split_once('/') {
            Some((_group, real)) => real,
            None => return false,
        }
    } else if let Some(real) = filter.strip_prefix("$queue/") {
        real
    } else {
        filter
    };
    matches(real, topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_subscriptions_match_their_real_filter() {
        for (filter, topic, want) in [
            ("chat/#", "chat/a", true),
            ("$share/g/chat/#", "chat/a", true),
            ("$share/g/chat/+", "chat/a/b", false),
            ("$queue/chat/a", "chat/a", true),
            ("$share/g", "g", false),
            ("$share/g/#", "$SYS/x", false),
            ("other/#", "chat/a", false),
        ] {
            assert_eq!(
                subscription_matches(filter, topic),
                want,
                "{filter} {topic}"
            );
        }
    }

    #[test]
    fn names() {
        let cases: &[(&str, Result<(), TopicError>)] = &[
            ("a", Ok(())),
            ("a/b/c", Ok(())),
            ("/", Ok(())),
            ("//", Ok(())),
            ("a//b", Ok(())),
            ("$SYS/x", Ok(())),
            ("a b/ü", Ok(())),
            ("", Err(TopicError::Empty)),
            ("a\0b", Err(TopicError::Nul)),
            ("a/+", Err(TopicError::WildcardInName)),
            ("#", Err(TopicError::WildcardInName)),
            ("a#", Err(TopicError::WildcardInName)),
            ("a/b#", Err(TopicError::WildcardInName)),
        ];
        for (topic, want) in cases {
            assert_eq!(validate_name(topic), *want, "{topic:?}");
        }
        assert_eq!(validate_name(&"a".repeat(MAX_TOPIC_LEN)), Ok(()));
        assert_eq!(
            validate_name(&"a".repeat(MAX_TOPIC_LEN + 1)),
            Err(TopicError::TooLong)
        );
    }

    #[test]
    fn filters() {
        let cases: &[(&str, Result<(), TopicError>)] = &[
            ("a/b", Ok(())),
            ("#", Ok(())),
            ("+", Ok(())),
            ("+/+", Ok(())),
            ("a/+/b", Ok(())),
            ("a/#", Ok(())),
            ("/#", Ok(())),
            ("+/#", Ok(())),
            ("$share/g/a/+", Ok(())),
            ("", Err(TopicError::Empty)),
            ("a\0", Err(TopicError::Nul)),
            ("a/#/b", Err(TopicError::BadWildcard)),
            ("#/", Err(TopicError::BadWildcard)),
            ("a#", Err(TopicError::BadWildcard)),
            ("a/b#", Err(TopicError::BadWildcard)),
            ("a+", Err(TopicError::BadWildcard)),
            ("a/b+", Err(TopicError::BadWildcard)),
            ("+a", Err(TopicError::BadWildcard)),
            ("a//b", Ok(())),
            ("a b", Ok(())),
            ("a/+b", Err(TopicError::BadWildcard)),
            ("++", Err(TopicError::BadWildcard)),
            ("##", Err(TopicError::BadWildcard)),
        ];
        for (filter, want) in cases {
            assert_eq!(validate_filter(filter), *want, "{filter:?}");
        }
    }

    #[test]
    fn matching() {
        let cases: &[(&str, &str, bool)] = &[
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a", false),
            ("a/+", "a/", true),
            ("+/b", "a/b", true),
            ("+", "a", true),
            ("+", "/a", false),
            ("+/+", "/a", true),
            ("#", "a/b/c", true),
            ("#", "/", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/#", "ab", false),
            ("a/+/#", "a/b", true),
            ("a/+/#", "a", false),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("$SYS/+", "$SYS/x", true),
            ("a/$x", "a/$x", true),
            ("a/+", "a/$x", true),
        ];
        for (filter, topic, want) in cases {
            assert_eq!(matches(filter, topic), *want, "{filter} vs {topic}");
        }
    }
}
