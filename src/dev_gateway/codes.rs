//! The `CodeResponse`s EMQX's ConnectionAdapter answers, with the messages in
//! the printed Erlang form that EMQX puts in them.
//!
//! Where EMQX 5.1.0 differs from later versions (it sends PARAMS_TYPE_ERROR
//! and UNKNOWN errors as code UNKNOWN with the whole error term as message),
//! the stand-in answers like 5.1.0, the oldest version the adapter supports,
//! so that an adapter which only checks "SUCCESS or not" is what gets tested.

use crate::pb::{CodeResponse, ResultCode};

fn response(code: ResultCode, message: impl Into<String>) -> CodeResponse {
    CodeResponse {
        code: code as i32,
        message: message.into(),
    }
}

pub(crate) fn success() -> CodeResponse {
    response(ResultCode::Success, "")
}

/// The connection process has exited (or never lived on this gateway).
pub(crate) fn not_alive() -> CodeResponse {
    response(
        ResultCode::ConnProcessNotAlive,
        "<<\"Connection process is not alive\">>",
    )
}

/// A `conn` string this gateway cannot decode.
pub(crate) fn unknown_crash() -> CodeResponse {
    response(
        ResultCode::Unknown,
        "{error,'UNKNOWN',<<\"Unknown crashes\">>}",
    )
}

/// The connection process did not answer within the call timeout.
pub(crate) fn not_answered() -> CodeResponse {
    response(
        ResultCode::Unknown,
        "{error,'UNKNOWN',<<\"Connection is not answered\">>}",
    )
}

/// qos above 2, or StartTimer with interval 0 or an unknown type.
pub(crate) fn params_type_error() -> CodeResponse {
    response(ResultCode::Unknown, "{error,'PARAMS_TYPE_ERROR'}")
}

/// Publish/Subscribe/Unsubscribe on a connection that is not connected.
pub(crate) fn unexpected_call() -> CodeResponse {
    response(ResultCode::Unknown, "{error,unexpected_call}")
}

/// A topic the stand-in refuses to route. EMQX itself does not validate
/// exproto topics (a bad one can crash the connection process); the
/// stand-in answers instead, so an adapter that forgets to validate is
/// caught without losing the connection.
pub(crate) fn invalid_topic() -> CodeResponse {
    response(ResultCode::Unknown, "{error,invalid_topic}")
}

pub(crate) fn required_params_missed() -> CodeResponse {
    response(ResultCode::RequiredParamsMissed, "")
}

/// `reason` is already in printed Erlang form.
pub(crate) fn permission_deny(reason: impl Into<String>) -> CodeResponse {
    response(ResultCode::PermissionDeny, reason)
}

pub(crate) fn authorization_deny() -> CodeResponse {
    permission_deny("<<\"Authorization deny\">>")
}

/// Prints `text` as an Erlang binary literal, `<<"...">>`.
pub(crate) fn erl_binary(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 6);
    out.push_str("<<\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{{{:X}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push_str("\">>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erlang_binaries_escape_quotes_and_controls() {
        assert_eq!(erl_binary("a \"b\"\\\n"), r#"<<"a \"b\"\\\n">>"#);
        assert_eq!(erl_binary("\u{1}"), r#"<<"\x{1}">>"#);
    }

    #[test]
    fn codes_are_emqx_codes() {
        assert_eq!(success().code, 0);
        assert_eq!(params_type_error().code, ResultCode::Unknown as i32);
        assert_eq!(not_alive().code, ResultCode::ConnProcessNotAlive as i32);
        assert!(authorization_deny().message.contains("Authorization deny"));
    }
}
