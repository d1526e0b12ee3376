//! The TOML configuration file: one more layer under the flags' schema.
//!
//! Precedence is defaults < file < environment < flags. The file has no
//! schema of its own: its keys are `serve`'s flag names (`login_timeout` or
//! `login-timeout`), and a key is used only when neither its flag nor its
//! environment variable is given. Values go through the flags' own parsers,
//! so a value means the same in the file as on the command line, and a bad
//! one is an error that names the file and the key.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Args, Command, FromArgMatches};

use crate::config::ServeArgs;
use crate::redact::redact_url;

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("config file {path}: unknown key `{key}` (known keys: {known})")]
    UnknownKey {
        path: String,
        key: String,
        known: String,
    },
    #[error("config file {path}: key `{key}`: {message}")]
    BadValue {
        path: String,
        key: String,
        message: String,
    },
}

/// `serve`'s flags as a stand-alone command, to look up and check keys.
fn serve_command() -> Command {
    ServeArgs::augment_args(Command::new("serve").no_binary_name(true))
}

/// A binary's command line (`argv`, program name first) with the settings
/// of its `--config` file added, when its subcommand is one of
/// `subcommands` (each taking `serve`'s flags); and which settings came
/// from the file. A binary of its own that serves with [`ServeArgs`]
/// reads the file this way too.
///
/// # Errors
/// The file cannot be read or parsed, has an unknown key, or a bad value.
pub fn argv_with_file(
    mut argv: Vec<OsString>,
    subcommands: &[&str],
) -> Result<(Vec<OsString>, BTreeSet<String>), ConfigFileError> {
    let sub = argv
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy())
        .find(|a| !a.starts_with('-'));
    let uses_file = sub.is_some_and(|s| subcommands.contains(&s.as_ref()));
    let path = config_path(argv.get(1..).unwrap_or_default()).filter(|_| uses_file);
    let Some(path) = path else {
        return Ok((argv, BTreeSet::new()));
    };
    let (extra, from_file) = file_args(&path, &argv[1..])?;
    argv.extend(extra);
    Ok((argv, from_file))
}

/// The value of `--config` (or `EXPROTO_CONFIG`) in `argv`, if any.
pub fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut it = argv.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("EXPROTO_CONFIG").map(PathBuf::from)
}

/// Arguments that carry the file's settings, for every key whose flag is
/// not in `argv` and whose environment variable is not set; plus the keys
/// they came from.
///
/// # Errors
/// The file cannot be read or parsed, has an unknown key, or a bad value.
pub fn file_args(
    path: &Path,
    argv: &[OsString],
) -> Result<(Vec<OsString>, BTreeSet<String>), ConfigFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: shown.clone(),
        source,
    })?;
    let table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ConfigFileError::Syntax {
                path: shown.clone(),
                message: e.message().to_string(),
            })?;
    let cmd = serve_command();
    let given: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut extra = Vec::new();
    let mut from_file = BTreeSet::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
        else {
            let known: Vec<&str> = cmd
                .get_arguments()
                .filter_map(|a| a.get_long())
                .filter(|l| *l != "config")
                .collect();
            let known: Vec<String> = known.iter().map(|l| l.replace('-', "_")).collect();
            return Err(ConfigFileError::UnknownKey {
                path: shown,
                key: key.clone(),
                known: known.join(", "),
            });
        };
        let bad = |message: String| ConfigFileError::BadValue {
            path: shown.clone(),
            key: key.clone(),
            message,
        };
        let values: Vec<String> = match value {
            toml::Value::String(s) => vec![s.clone()],
            toml::Value::Integer(i) => vec![i.to_string()],
            toml::Value::Float(f) => vec![f.to_string()],
            toml::Value::Boolean(b) => vec![b.to_string()],
            toml::Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    other => Err(bad(format!("unexpected {} in a list", other.type_str()))),
                })
                .collect::<Result<_, _>>()?,
            // `[listener]` with `7994 = "lines"`: one `KEY=VALUE` each.
            toml::Value::Table(t) if arg.get_value_delimiter().is_some() => t
                .iter()
                .map(|(k, v)| match v {
                    toml::Value::String(s) => Ok(format!("{k}={s}")),
                    other => Err(bad(format!("unexpected {} in a table", other.type_str()))),
                })
                .collect::<Result<_, _>>()?,
            other => {
                return Err(bad(format!(
                    "expected a value, found a {}",
                    other.type_str()
                )))
            }
        };
        let flag = format!("--{long}");
        let on_command_line = given
            .iter()
            .any(|a| a == &flag || a.starts_with(&format!("{flag}=")));
        let in_env = arg
            .get_env()
            .is_some_and(|var| std::env::var_os(var).is_some());
        // Values checked by the flag's own parser, alone, so the error can
        // name the key rather than a flag the user never typed.
        let mut one: Vec<OsString> = Vec::with_capacity(2);
        let joined = values.join(",");
        let multiple = arg.get_value_delimiter().is_some();
        if multiple {
            one.push(flag.clone().into());
            one.push(joined.clone().into());
        } else if values.len() == 1 {
            one.push(flag.clone().into());
            one.push(values[0].clone().into());
        } else {
            return Err(bad("expected one value, found a list".into()));
        }
        let check = serve_command()
            .try_get_matches_from(&one)
            .map_err(|e| bad(first_line(&e.to_string())))?;
        ServeArgs::from_arg_matches(&check).map_err(|e| bad(first_line(&e.to_string())))?;
        if !on_command_line && !in_env {
            extra.extend(one);
            from_file.insert(arg.get_id().to_string());
        }
    }
    Ok((extra, from_file))
}

fn first_line(s: &str) -> String {
    s.lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string()
}

/// The effective configuration of `serve` as TOML, each value with where it
/// came from; secrets masked.
pub fn render(matches: &clap::ArgMatches, from_file: &BTreeSet<String>) -> String {
    use clap::parser::ValueSource;
    let cmd = serve_command();
    let mut out = String::from("# effective configuration of `exproto-adapter serve`\n");
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else { continue };
        if long == "config" {
            continue;
        }
        let key = long.replace('-', "_");
        let values: Vec<String> = matches
            .get_raw(id)
            .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let source = if from_file.contains(id) {
            "config file"
        } else {
            match matches.value_source(id) {
                Some(ValueSource::DefaultValue) => "default",
                Some(ValueSource::EnvVariable) => "environment",
                Some(ValueSource::CommandLine) => "flag",
                _ => "unset",
            }
        };
        let shown: Vec<String> = values
            .iter()
            .map(|v| {
                if key.contains("password") || key.contains("secret") || key.contains("token") {
                    "***".to_string()
                } else if key == "http_user" {
                    // USER:PASSWORD: the user may be shown.
                    match v.split_once(':') {
                        Some((user, _)) => format!("{user}:***"),
                        None => "***".to_string(),
                    }
                } else {
                    redact_url(v)
                }
            })
            .map(|v| format!("{v:?}"))
            .collect();
        let line = match shown.len() {
            0 => format!("# {key} is not set"),
            1 if arg.get_value_delimiter().is_none() => format!("{key} = {}", shown[0]),
            _ => format!("{key} = [{}]", shown.join(", ")),
        };
        out.push_str(&format!("{line:<60} # {source}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile_path::TempPath {
        tempfile_path::TempPath::new(text)
    }

    /// A file under the system temp dir that is removed when dropped.
    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn new(text: &str) -> Self {
                let p = std::env::temp_dir().join(format!(
                    "exproto-config-test-{}-{}.toml",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                std::fs::write(&p, text).unwrap();
                Self(p)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn parse(argv: &[&str], file: &str) -> Result<(ServeArgs, BTreeSet<String>), ConfigFileError> {
        let f = write(file);
        let mut argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        let (extra, from_file) = file_args(&f.0, &argv)?;
        argv.extend(extra);
        let m = serve_command().try_get_matches_from(&argv).unwrap();
        Ok((ServeArgs::from_arg_matches(&m).unwrap(), from_file))
    }

    #[test]
    fn the_file_sits_between_defaults_and_flags() {
        let (args, from_file) = parse(
            &["--keepalive", "5"],
            "login_timeout = 7\nkeepalive = 9\nmax-line = 1024\nlisten = \"127.0.0.1:9999\"\n",
        )
        .unwrap();
        assert_eq!(args.login_timeout.as_secs(), 7);
        assert_eq!(args.keepalive.as_secs(), 5, "a flag beats the file");
        assert_eq!(args.max_line, 1024);
        assert_eq!(args.listen.to_string(), "127.0.0.1:9999");
        assert!(from_file.contains("login_timeout"));
        assert!(!from_file.contains("keepalive"));
    }

    #[test]
    fn listeners_come_from_a_table_or_flags() {
        use crate::config::ListenerProtocol;
        let l = |port, protocol: &str| ListenerProtocol {
            port,
            protocol: protocol.into(),
        };
        let (args, from_file) =
            parse(&[], "[listener]\n7994 = \"lines\"\n7995 = \"binproto\"\n").unwrap();
        assert_eq!(args.listeners, [l(7994, "lines"), l(7995, "binproto")]);
        assert!(from_file.contains("listeners"));
        let (args, _) = parse(
            &["--listener", "8000=chat", "--listener", "8001=lines"],
            "[listener]\n7994 = \"lines\"\n",
        )
        .unwrap();
        assert_eq!(
            args.listeners,
            [l(8000, "chat"), l(8001, "lines")],
            "flags win"
        );
        let e = parse(&[], "[listener]\nx = \"lines\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("key `listener`") && e.contains("not a port"),
            "{e}"
        );
        let e = parse(&[], "[listener]\n7994 = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `listener`"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = parse(&[], "login_timeot = 3\n").unwrap_err().to_string();
        assert!(e.contains("unknown key `login_timeot`"), "{e}");
        let e = parse(&[], "login_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `login_timeout`"), "{e}");
        let e = parse(&[], "max_line = 3\n").unwrap_err().to_string();
        assert!(e.contains("key `max_line`"), "{e}");
        let e = parse(&[], "listen = [1, 2]\n").unwrap_err().to_string();
        assert!(e.contains("key `listen`"), "{e}");
        let e = parse(&[], "= broken").unwrap_err().to_string();
        assert!(e.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn the_effective_configuration_never_shows_a_password() {
        for (url, want) in [
            (
                "postgres://u:secret@db:5432/chat",
                "postgres://u:***@db:5432/chat",
            ),
            ("postgres://u:p@ss@db/chat", "postgres://u:***@db/chat"),
            ("postgres://u:p:s/s@db/chat", "postgres://u:***@db/chat"),
            ("postgres://u:p%40ss@db/chat", "postgres://u:***@db/chat"),
            (
                "postgres://u@db/chat?password=hunter2",
                "postgres://u@db/chat?password=***",
            ),
        ] {
            let (args, from_file) =
                parse(&["--store", url], "").unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(args.store.expose(), url);
            let m = serve_command()
                .try_get_matches_from(["--store", url])
                .unwrap();
            let shown = render(&m, &from_file);
            assert!(
                shown.contains(&format!("store = \"{want}\"")),
                "{url} shown as:\n{shown}"
            );
        }
    }

    #[test]
    fn the_http_credentials_are_masked() {
        let m = serve_command()
            .try_get_matches_from([
                "--http",
                "0.0.0.0:18080",
                "--http-token",
                "t0ken-xyz",
                "--http-user",
                "ann:pa55word",
            ])
            .unwrap();
        let shown = render(&m, &BTreeSet::new());
        assert!(shown.contains("http_token = \"***\""), "{shown}");
        assert!(shown.contains("http_user = \"ann:***\""), "{shown}");
        assert!(!shown.contains("t0ken-xyz") && !shown.contains("pa55word"));
    }
}
