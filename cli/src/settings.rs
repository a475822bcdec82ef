//! Where the CLI finds its server and token (and an operator certificate, key and CA
//! for a collector with `[api.tls]`): a flag, else the environment (`RAZAR_SERVER`,
//! `RAZAR_TOKEN`, `RAZAR_CERT`, `RAZAR_KEY`, `RAZAR_CA`), else the config file (`--config`, `RAZAR_CONFIG`,
//! or `$XDG_CONFIG_HOME/razar/cli.toml`, or `~/.config/razar/cli.toml`), else the
//! default server (the collector's default HTTP address) and no token.
//!
//! Resolution is pure ([`resolve`]): the environment is passed in as a lookup, so tests
//! never touch the process environment.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The collector's default HTTP address.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7080";

/// The config file (`cli.toml`): every key optional.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Base URL of the collector's HTTP API, e.g. `http://collector:7080`.
    pub server: Option<String>,
    /// An API token (`razar-collector token create`).
    pub token: Option<String>,
    /// An operator certificate (PEM, `razar-certs issue operator`), for HTTPS.
    pub cert: Option<String>,
    /// Its private key (PEM).
    pub key: Option<String>,
    /// The CA (PEM) that signed the collector's API certificate, for https:// servers.
    pub ca: Option<String>,
}

/// What the command line said.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub server: Option<String>,
    pub token: Option<String>,
    pub config: Option<PathBuf>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub ca: Option<String>,
}

/// TLS files of an https:// server.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The operator certificate and its key, presented to the server.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The CA to trust for the server's certificate.
    pub ca: Option<PathBuf>,
}

/// Where a setting came from (shown by `razar config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
    File,
    Default,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::Env => "environment",
            Source::File => "config file",
            Source::Default => "default",
        }
    }
}

/// The resolved settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub server: String,
    pub server_from: Source,
    pub token: Option<String>,
    pub token_from: Source,
    pub tls: TlsFiles,
}

/// Why the settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The config file exists but cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown keys.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// The server is not an http(s) URL.
    #[error("server {0:?} ({1}) is not an http:// or https:// URL")]
    BadServer(String, &'static str),
    /// A certificate without its key, or a key without its certificate.
    #[error(
        "--cert and --key (RAZAR_CERT, RAZAR_KEY, `cert` and `key`) go together: {0} is not set"
    )]
    HalfIdentity(&'static str),
}

/// The config file's path: `--config`, `RAZAR_CONFIG`, then the XDG location.
pub fn config_path(flag: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(p) = flag {
        return Some(p.to_path_buf());
    }
    if let Some(p) = env("RAZAR_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(dir) = env("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Some(Path::new(&dir).join("razar").join("cli.toml"));
    }
    env("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| Path::new(&h).join(".config").join("razar").join("cli.toml"))
}

/// Reads the config file: a missing file is no file, unless it was named explicitly.
pub fn read_file(path: &Path, explicit: bool) -> Result<Option<FileConfig>, SettingsError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Ok(None),
        Err(source) => {
            return Err(SettingsError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| SettingsError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_owned(),
        })
}

/// Flag > environment > file > default, for the server and the token separately.
/// Empty values count as absent.
pub fn resolve(
    flags: &Flags,
    env: &dyn Fn(&str) -> Option<String>,
    file: Option<&FileConfig>,
) -> Result<Settings, SettingsError> {
    let pick = |flag: &Option<String>, var: &str, from_file: Option<&String>| {
        let present = |v: &String| !v.trim().is_empty();
        if let Some(v) = flag.as_ref().filter(|v| present(v)) {
            return Some((v.trim().to_owned(), Source::Flag));
        }
        if let Some(v) = env(var).filter(present) {
            return Some((v.trim().to_owned(), Source::Env));
        }
        from_file
            .filter(|v| present(v))
            .map(|v| (v.trim().to_owned(), Source::File))
    };
    let (server, server_from) = pick(
        &flags.server,
        "RAZAR_SERVER",
        file.and_then(|f| f.server.as_ref()),
    )
    .unwrap_or_else(|| (DEFAULT_SERVER.to_owned(), Source::Default));
    let (token, token_from) = match pick(
        &flags.token,
        "RAZAR_TOKEN",
        file.and_then(|f| f.token.as_ref()),
    ) {
        Some((t, from)) => (Some(t), from),
        None => (None, Source::Default),
    };
    if !(server.starts_with("http://") || server.starts_with("https://")) {
        return Err(SettingsError::BadServer(server, server_from.as_str()));
    }
    let path = |flag: &Option<String>, var: &str, from_file: Option<&String>| {
        pick(flag, var, from_file).map(|(p, _)| PathBuf::from(p))
    };
    let cert = path(
        &flags.cert,
        "RAZAR_CERT",
        file.and_then(|f| f.cert.as_ref()),
    );
    let key = path(&flags.key, "RAZAR_KEY", file.and_then(|f| f.key.as_ref()));
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => return Err(SettingsError::HalfIdentity("the key")),
        (None, Some(_)) => return Err(SettingsError::HalfIdentity("the certificate")),
    };
    let ca = path(&flags.ca, "RAZAR_CA", file.and_then(|f| f.ca.as_ref()));
    Ok(Settings {
        server: server.trim_end_matches('/').to_owned(),
        server_from,
        token,
        token_from,
        tls: TlsFiles { identity, ca },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn file(server: Option<&str>, token: Option<&str>) -> FileConfig {
        FileConfig {
            server: server.map(Into::into),
            token: token.map(Into::into),
            ..FileConfig::default()
        }
    }

    fn flags(server: Option<&str>, token: Option<&str>) -> Flags {
        Flags {
            server: server.map(Into::into),
            token: token.map(Into::into),
            ..Flags::default()
        }
    }

    #[test]
    fn certificate_key_and_ca_resolve_like_the_rest() {
        let f = FileConfig {
            cert: Some("/file/op.pem".into()),
            key: Some("/file/op.key".into()),
            ca: Some("/file/ca.pem".into()),
            ..FileConfig::default()
        };
        let s = resolve(
            &Flags {
                cert: Some("/flag/op.pem".into()),
                ..Flags::default()
            },
            &env(&[("RAZAR_KEY", "/env/op.key")]),
            Some(&f),
        )
        .expect("resolves");
        assert_eq!(
            s.tls.identity,
            Some((PathBuf::from("/flag/op.pem"), PathBuf::from("/env/op.key")))
        );
        assert_eq!(s.tls.ca, Some(PathBuf::from("/file/ca.pem")));
        let none = resolve(&Flags::default(), &env(&[]), None).expect("resolves");
        assert_eq!(none.tls, TlsFiles::default());
        let half = resolve(
            &Flags {
                cert: Some("/op.pem".into()),
                ..Flags::default()
            },
            &env(&[]),
            None,
        )
        .unwrap_err();
        assert!(half.to_string().contains("the key is not set"), "{half}");
    }

    /// One case: flag, environment and file values, and the expected winner.
    fn check(
        flag: Option<&str>,
        var: Option<&str>,
        in_file: Option<&str>,
        expected: (&str, Source),
    ) {
        let vars: Vec<(&str, &str)> = var
            .map(|v| vec![("RAZAR_SERVER", v), ("RAZAR_TOKEN", v)])
            .unwrap_or_default();
        let f = file(in_file, in_file);
        let s = resolve(&flags(flag, flag), &env(&vars), Some(&f)).expect("resolves");
        assert_eq!((s.server.as_str(), s.server_from), expected, "server");
        let token = (expected.1 != Source::Default).then(|| expected.0.to_owned());
        assert_eq!((s.token, s.token_from), (token, expected.1), "token");
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let (f, e, c) = ("http://flag:1", "http://env:2", "http://file:3");
        check(Some(f), Some(e), Some(c), (f, Source::Flag));
        check(None, Some(e), Some(c), (e, Source::Env));
        check(None, None, Some(c), (c, Source::File));
        check(Some(f), None, Some(c), (f, Source::Flag));
        check(Some(f), Some(e), None, (f, Source::Flag));
        check(None, None, None, (DEFAULT_SERVER, Source::Default));
        // Empty values are absent: an exported but empty variable does not hide the file.
        check(Some(""), Some(" "), Some(c), (c, Source::File));
    }

    #[test]
    fn server_and_token_resolve_separately() {
        let s = resolve(
            &flags(None, Some("t-flag")),
            &env(&[("RAZAR_SERVER", "https://env/")]),
            Some(&file(Some("http://file"), Some("t-file"))),
        )
        .expect("resolves");
        assert_eq!(s.server, "https://env");
        assert_eq!(s.server_from, Source::Env);
        assert_eq!(s.token.as_deref(), Some("t-flag"));
    }

    #[test]
    fn a_server_that_is_not_a_url_is_refused() {
        let e = resolve(&flags(Some("collector:7080"), None), &env(&[]), None).unwrap_err();
        assert!(e.to_string().contains("collector:7080"), "{e}");
    }

    #[test]
    fn config_path_order() {
        let p = |flag: Option<&str>, vars: &[(&str, &str)]| {
            config_path(flag.map(Path::new), &env(vars)).map(|p| p.display().to_string())
        };
        assert_eq!(
            p(Some("/x.toml"), &[("RAZAR_CONFIG", "/y")]).as_deref(),
            Some("/x.toml")
        );
        assert_eq!(
            p(None, &[("RAZAR_CONFIG", "/y"), ("HOME", "/h")]).as_deref(),
            Some("/y")
        );
        assert_eq!(
            p(None, &[("XDG_CONFIG_HOME", "/c"), ("HOME", "/h")]).as_deref(),
            Some("/c/razar/cli.toml")
        );
        assert_eq!(
            p(None, &[("HOME", "/h")]).as_deref(),
            Some("/h/.config/razar/cli.toml")
        );
        assert_eq!(p(None, &[]), None);
    }

    #[test]
    fn file_is_read_strictly() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("cli.toml");
        assert_eq!(read_file(&path, false).expect("missing is fine"), None);
        assert!(read_file(&path, true).is_err(), "named but missing");
        std::fs::write(&path, "server = \"http://c:7080\"\ntoken = \"abc\"\n").expect("write");
        assert_eq!(
            read_file(&path, false).expect("reads"),
            Some(file(Some("http://c:7080"), Some("abc")))
        );
        std::fs::write(&path, "sever = \"typo\"\n").expect("write");
        let e = read_file(&path, false).unwrap_err();
        assert!(e.to_string().contains("sever"), "{e}");
    }
}
