//! Secrets out of text meant for people: URLs that may carry a password,
//! as logs, `--help` and `exproto-adapter config` show them.
//!
//! One function for every place, so a URL is never masked one way in a log
//! line and another way in the effective configuration.

/// Query parameters that carry a secret (libpq's `password` and
/// `sslpassword`, which PostgreSQL URLs accept).
const SECRET_PARAMS: &[&str] = &["password", "sslpassword"];

/// `url` with its password replaced by `***`, for logs and listings.
///
/// The user info ends at the *last* `@`: a password may hold `@`, `:`, `/`,
/// `?` or `#` unencoded (`postgres://u:p@ss/w?rd@db/x`), which a
/// by-the-book parse would split in the wrong place and then print part of.
/// An `@` later in the URL (in a query value, say) makes it mask more than
/// the password, never less. Passwords given as query parameters are masked
/// too.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let masked = match rest.rsplit_once('@') {
        Some((userinfo, after)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{after}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    };
    mask_params(&masked)
}

/// Masks the values of [`SECRET_PARAMS`] in the query, if there is one.
fn mask_params(url: &str) -> String {
    let Some((head, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((name, _)) if SECRET_PARAMS.contains(&decoded_lowercase(name).as_str()) => {
                format!("{name}=***")
            }
            _ => param.to_string(),
        })
        .collect();
    let mut out = format!("{head}?{}", params.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// A query parameter's name as a URL parser reads it (`pass%77ord` is
/// `password`), in lower case. Invalid escapes stay as written.
fn decoded_lowercase(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let v = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_with_any_character_never_show() {
        let cases = [
            (
                "postgres://u:secret@db:5432/x",
                "postgres://u:***@db:5432/x",
            ),
            ("postgres://u:p@ss@db/x", "postgres://u:***@db/x"),
            ("postgres://u:p:ss@db/x", "postgres://u:***@db/x"),
            ("postgres://u:p/ss@db/x", "postgres://u:***@db/x"),
            ("postgres://u:p?ss@db/x", "postgres://u:***@db/x"),
            ("postgres://u:p#ss@db/x", "postgres://u:***@db/x"),
            ("postgres://u:a@b:c/d@db/x", "postgres://u:***@db/x"),
            ("postgres://u:p%40ss%3A%2F@db/x", "postgres://u:***@db/x"),
            (
                "postgres://u:secret@db/x?sslmode=require",
                "postgres://u:***@db/x?sslmode=require",
            ),
            ("mqtt://bob:pw@broker:1883", "mqtt://bob:***@broker:1883"),
        ];
        for (url, want) in cases {
            let shown = redact_url(url);
            assert_eq!(shown, want, "{url}");
        }
        for url in [
            "postgres://u:p@ss@db/x",
            "postgres://u:p/ss@db/x",
            "postgres://u:p%40ss@db/x",
            "postgres://u:a@b:c/d@db/x",
        ] {
            let password = &url["postgres://u:".len()..url.rfind('@').unwrap()];
            assert!(!redact_url(url).contains(password), "{url}");
        }
    }

    #[test]
    fn urls_without_a_password_are_unchanged() {
        for url in [
            "postgres://u@db/x",
            "postgres://db/x",
            "sqlite:data/x.db",
            "sqlite::memory:",
            "http://127.0.0.1:9100",
            "postgres://u@db/x?application_name=a",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn password_parameters_are_masked() {
        assert_eq!(
            redact_url("postgres://u@db/x?password=secret&sslmode=require"),
            "postgres://u@db/x?password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://db/x?sslmode=verify-full&SSLPassword=k#frag"),
            "postgres://db/x?sslmode=verify-full&SSLPassword=***#frag"
        );
        // Names are read as a URL parser reads them.
        assert_eq!(
            redact_url("postgres://db/x?pass%77ord=secret&p%61ssword=s2"),
            "postgres://db/x?pass%77ord=***&p%61ssword=***"
        );
    }

    #[test]
    fn an_at_sign_after_the_host_masks_more_never_less() {
        let shown = redact_url("postgres://u:pw@db/x?application_name=a@b");
        assert!(!shown.contains("pw"), "{shown}");
    }
}
