//! The collector's HTTP API over reqwest (blocking): JSON requests with the Bearer token,
//! the API's `{code, message}` errors as [`ClientError::Api`], and server-sent event
//! streams (events, log follow) read line by line through [`SseParser`].

use crate::settings::TlsFiles;
use reqwest::blocking::{Client as Http, RequestBuilder, Response};
use reqwest::Url;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::ops::ControlFlow;
use std::time::Duration;

/// Most bytes of a non-JSON error body shown.
const MAX_ERROR_BODY: usize = 300;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached or the connection broke.
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    /// The API answered with an error (`{code, message}` when it sent one).
    #[error("{message} (HTTP {status}, {code}){hint}")]
    Api {
        status: u16,
        code: String,
        message: String,
        hint: &'static str,
    },
    /// The API answered success with a body that is not JSON.
    #[error("{url}: the answer is not JSON: {message}")]
    Decode { url: String, message: String },
    /// The server setting does not make a URL.
    #[error("bad server URL {0:?}: {1}")]
    BadUrl(String, String),
    /// A certificate, key or CA file cannot be read or used.
    #[error("{path}: {message}")]
    Tls { path: String, message: String },
}

/// One server-sent event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Server-sent events from lines (the text/event-stream format): `data:` lines join
/// with `\n`, a blank line ends an event, `:` lines are comments (keep-alives).
#[derive(Debug, Default)]
pub struct SseParser {
    current: SseEvent,
    has_data: bool,
}

impl SseParser {
    /// Feeds one line (without its line ending); returns the event it completes.
    pub fn line(&mut self, line: &str) -> Option<SseEvent> {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            let has_data = std::mem::take(&mut self.has_data);
            let event = std::mem::take(&mut self.current);
            return has_data.then_some(event);
        }
        if line.starts_with(':') {
            return None;
        }
        let (name, value) = match line.split_once(':') {
            Some((n, v)) => (n, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match name {
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.current.id = Some(value.to_owned()),
            "event" => self.current.event = Some(value.to_owned()),
            _ => {}
        }
        None
    }
}

/// A client of one collector.
#[derive(Debug, Clone)]
pub struct Client {
    http: Http,
    stream: Http,
    base: Url,
    token: Option<String>,
}

impl Client {
    #[cfg(test)]
    pub fn new(server: &str, token: Option<String>) -> Result<Client, ClientError> {
        Client::with_tls(server, token, &TlsFiles::default())
    }

    /// [`Client::new`] that trusts `tls.ca` for an https:// server (instead of no CA)
    /// and presents `tls.identity` (an operator certificate) when the server asks.
    pub fn with_tls(
        server: &str,
        token: Option<String>,
        tls: &TlsFiles,
    ) -> Result<Client, ClientError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| ClientError::Tls {
                path: path.display().to_string(),
                message: e.to_string(),
            })
        };
        let ca = match &tls.ca {
            Some(path) => Some(reqwest::Certificate::from_pem(&read(path)?).map_err(|e| {
                ClientError::Tls {
                    path: path.display().to_string(),
                    message: format!("not a PEM certificate: {}", transport_message(&e)),
                }
            })?),
            None => None,
        };
        let identity = match &tls.identity {
            Some((cert, key)) => {
                let mut pem = read(cert)?;
                pem.push(b'\n');
                pem.extend(read(key)?);
                Some(
                    reqwest::Identity::from_pem(&pem).map_err(|e| ClientError::Tls {
                        path: format!("{} and {}", cert.display(), key.display()),
                        message: format!(
                            "not a PEM certificate and key: {}",
                            transport_message(&e)
                        ),
                    })?,
                )
            }
            None => None,
        };
        let base =
            Url::parse(server).map_err(|e| ClientError::BadUrl(server.into(), e.to_string()))?;
        if base.cannot_be_a_base() {
            return Err(ClientError::BadUrl(server.into(), "not a base URL".into()));
        }
        let agent = concat!("razar/", env!("CARGO_PKG_VERSION"));
        let build = |timeout: Option<Duration>| {
            let mut builder = Http::builder()
                .user_agent(agent)
                .connect_timeout(Duration::from_secs(10))
                .timeout(timeout)
                .use_rustls_tls();
            if let Some(ca) = &ca {
                builder = builder.add_root_certificate(ca.clone());
            }
            if let Some(identity) = &identity {
                builder = builder.identity(identity.clone());
            }
            builder
                .build()
                .map_err(|e| ClientError::BadUrl(server.into(), transport_message(&e)))
        };
        Ok(Client {
            http: build(Some(Duration::from_secs(60)))?,
            // Streams last as long as the operator watches.
            stream: build(None)?,
            base,
            token,
        })
    }

    /// `base/api/v1/<segments>` (each segment percent-encoded).
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["api", "v1"]).extend(segments);
        }
        url
    }

    fn authorized(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
    }

    /// `GET /api/v1/<segments>?query`.
    pub fn get(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Value, ClientError> {
        let url = self.url(segments);
        let response = self
            .authorized(self.http.get(url.clone()).query(query))
            .send();
        json(&url, checked(&url, response)?)
    }

    /// `POST /api/v1/<segments>` with a JSON body.
    pub fn post(&self, segments: &[&str], body: &Value) -> Result<Value, ClientError> {
        let url = self.url(segments);
        let response = self
            .authorized(self.http.post(url.clone()).json(body))
            .send();
        json(&url, checked(&url, response)?)
    }

    /// Reads a server-sent event stream until it ends or `each` breaks. `last_id` is
    /// sent as `Last-Event-ID` (a resumed stream). Returns the last event id seen (or
    /// `last_id`).
    pub fn stream(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
        last_id: Option<&str>,
        each: &mut dyn FnMut(SseEvent) -> ControlFlow<()>,
    ) -> Result<Option<String>, ClientError> {
        let url = self.url(segments);
        let mut request = self
            .authorized(self.stream.get(url.clone()).query(query))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = checked(&url, request.send())?;
        let mut parser = SseParser::default();
        let mut last = last_id.map(str::to_owned);
        let mut reader = BufReader::new(response);
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader
                .read_line(&mut line)
                .map_err(|e| ClientError::Transport {
                    url: url.to_string(),
                    message: format!("stream broke: {e}"),
                })?;
            if n == 0 {
                return Ok(last);
            }
            if let Some(event) = parser.line(line.trim_end_matches('\n')) {
                if event.id.is_some() {
                    last.clone_from(&event.id);
                }
                if each(event).is_break() {
                    return Ok(last);
                }
            }
        }
    }
}

fn checked(url: &Url, response: Result<Response, reqwest::Error>) -> Result<Response, ClientError> {
    let response = response.map_err(|e| ClientError::Transport {
        url: url.to_string(),
        message: transport_message(&e),
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().unwrap_or_default();
    Err(api_error(status.as_u16(), &body))
}

/// The API's error from its status and body: `{code, message}` (also nested under
/// `error`), else the body's text.
pub fn api_error(status: u16, body: &str) -> ClientError {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let inner = parsed
        .as_ref()
        .map(|v| v.get("error").filter(|e| e.is_object()).unwrap_or(v));
    let text = |key: &str| {
        inner
            .and_then(|v| v.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let code = text("code").unwrap_or_else(|| match status {
        401 => "unauthorized".into(),
        403 => "forbidden".into(),
        404 => "not_found".into(),
        _ => format!("http_{status}"),
    });
    let message = text("message").unwrap_or_else(|| {
        let body = body.trim();
        if body.is_empty() {
            "no details".to_owned()
        } else {
            body.chars().take(MAX_ERROR_BODY).collect()
        }
    });
    let hint = match status {
        401 => "; check --token, RAZAR_TOKEN or the config file's token (or --cert/--key)",
        403 => "; this token's (or certificate's) role does not allow it",
        _ => "",
    };
    ClientError::Api {
        status,
        code,
        message,
        hint,
    }
}

fn json(url: &Url, response: Response) -> Result<Value, ClientError> {
    let text = response.text().map_err(|e| ClientError::Transport {
        url: url.to_string(),
        message: transport_message(&e),
    })?;
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).map_err(|e| ClientError::Decode {
        url: url.to_string(),
        message: e.to_string(),
    })
}

/// reqwest's error with its causes (the interesting part is usually the innermost).
fn transport_message(e: &reqwest::Error) -> String {
    let mut message = if e.is_connect() {
        "cannot connect".to_owned()
    } else if e.is_timeout() {
        "timed out".to_owned()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_from_lines() {
        let mut p = SseParser::default();
        let mut got = Vec::new();
        for line in [
            ": keep-alive",
            "id: 41",
            "event: event",
            "data: {\"a\":",
            "data:1}",
            "",
            "",
            "id: 42\r",
            "data: x",
            "",
        ] {
            got.extend(p.line(line));
        }
        assert_eq!(
            got,
            vec![
                SseEvent {
                    id: Some("41".into()),
                    event: Some("event".into()),
                    data: "{\"a\":\n1}".into()
                },
                SseEvent {
                    id: Some("42".into()),
                    event: None,
                    data: "x".into()
                },
            ]
        );
    }

    #[test]
    fn api_errors_read_code_and_message() {
        let e = api_error(401, r#"{"code":"unauthorized","message":"unknown token"}"#);
        let text = e.to_string();
        assert!(
            text.starts_with("unknown token (HTTP 401, unauthorized)"),
            "{text}"
        );
        assert!(text.contains("RAZAR_TOKEN"), "{text}");
        let nested = api_error(
            422,
            r#"{"error":{"code":"bad_request","message":"limit: too big"}}"#,
        );
        assert_eq!(nested.to_string(), "limit: too big (HTTP 422, bad_request)");
        let plain = api_error(404, "");
        assert_eq!(plain.to_string(), "no details (HTTP 404, not_found)");
        let text = api_error(502, &"e".repeat(1000)).to_string();
        assert!(text.len() < 400, "{text}");
    }

    #[test]
    fn urls_encode_each_segment() {
        let c = Client::new("http://collector:7080/base/", None).expect("client");
        assert_eq!(
            c.url(&["hosts", "a/b c", "components"]).as_str(),
            "http://collector:7080/base/api/v1/hosts/a%2Fb%20c/components"
        );
        let c = Client::new("http://collector:7080", None).expect("client");
        assert_eq!(
            c.url(&["health"]).as_str(),
            "http://collector:7080/api/v1/health"
        );
        assert!(Client::new("mailto:x@y", None).is_err());
    }
}
