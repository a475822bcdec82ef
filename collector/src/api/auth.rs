//! Who may call what: request ids, bearer tokens, roles and rate limits, all enforced
//! here, in one place, for every route.
//!
//! The access rule of each route comes from the OpenAPI document generated from the
//! handlers (`security(("bearer" = ["operator"]))` on the handler): an operation with a
//! bearer requirement needs a token with at least that role; one without any is public.
//! A route the document does not describe is refused (fail closed).

use super::error::ApiError;
use super::tls::{ApiPeer, ClientCert};
use super::ApiState;
use crate::store::tokens::{self, Role, TokenInfo, TokenRefusal};
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Header carrying the request id (taken from the client when well formed).
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest request id accepted from a client.
pub const MAX_REQUEST_ID: usize = 64;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being served (inside the request-id layer).
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// The request's id, in the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The authenticated caller, in the request's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    /// What it may do.
    pub role: Role,
    /// How it proved who it is.
    pub identity: Identity,
}

/// How a caller authenticated.
#[derive(Debug, Clone)]
pub enum Identity {
    /// A bearer token.
    Token(TokenInfo),
    /// An operator certificate on the HTTPS port (`[api.tls]`), by operator name.
    Certificate(String),
}

impl Caller {
    /// A token's caller.
    pub fn token(token: TokenInfo) -> Caller {
        Caller {
            role: token.role,
            identity: Identity::Token(token),
        }
    }

    /// The token's id, for a token caller.
    pub fn token_id(&self) -> Option<i64> {
        match &self.identity {
            Identity::Token(t) => Some(t.id),
            Identity::Certificate(_) => None,
        }
    }

    /// Who, as audit rows name it: the token's name, or `cert:<operator>`.
    pub fn who(&self) -> String {
        match &self.identity {
            Identity::Token(t) => t.name.clone(),
            Identity::Certificate(name) => format!("cert:{name}"),
        }
    }

    /// A unique key of the caller (`token:<id>:<name>` or `cert:<operator>`): rate
    /// limits, idempotency keys and log follows are per caller.
    pub fn key(&self) -> String {
        match &self.identity {
            Identity::Token(t) => format!("token:{}:{}", t.id, t.name),
            Identity::Certificate(name) => format!("cert:{name}"),
        }
    }
}

/// What a route requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    Role(Role),
}

/// Access per (method, route template), read from the OpenAPI document.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: HashMap<(Method, String), Access>,
}

impl RouteTable {
    /// The table of an OpenAPI document (as JSON): each operation's `bearer` security
    /// requirement names its role; no `security` makes it public.
    pub fn from_openapi(doc: &serde_json::Value) -> Result<RouteTable, String> {
        let mut routes = HashMap::new();
        let paths = doc
            .get("paths")
            .and_then(|p| p.as_object())
            .ok_or("the document has no paths")?;
        for (path, item) in paths {
            let Some(item) = item.as_object() else {
                continue;
            };
            for (method, op) in item {
                let Ok(method) = method.to_ascii_uppercase().parse::<Method>() else {
                    continue;
                };
                let access = match op.get("security").and_then(|s| s.as_array()) {
                    None => Access::Public,
                    Some(reqs) => {
                        let roles: Vec<Role> = reqs
                            .iter()
                            .filter_map(|r| r.get("bearer"))
                            .filter_map(|r| r.as_array())
                            .flat_map(|r| r.iter().filter_map(|s| s.as_str()))
                            .map(|s| Role::parse(s).ok_or(format!("{method} {path}: role {s:?}")))
                            .collect::<Result<_, _>>()?;
                        match roles.iter().min() {
                            Some(role) => Access::Role(*role),
                            None => {
                                return Err(format!("{method} {path}: security without a role"))
                            }
                        }
                    }
                };
                routes.insert((method, path.clone()), access);
            }
        }
        Ok(RouteTable { routes })
    }

    pub fn access(&self, method: &Method, path: &str) -> Option<Access> {
        self.routes.get(&(method.clone(), path.to_owned())).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Method, &str, Access)> {
        self.routes.iter().map(|((m, p), a)| (m, p.as_str(), *a))
    }
}

/// Token buckets per caller ([`Caller::key`]): `rate` requests a second, bursts of
/// `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// One token's bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub tokens: f64,
    pub at: Instant,
}

/// Takes one request from `bucket` at `now`, or says how long until one is available
/// (pure).
pub fn take(bucket: &mut Bucket, now: Instant, rate: f64, burst: f64) -> Result<(), Duration> {
    let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
    bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
    bucket.at = now;
    if bucket.tokens >= 1.0 {
        bucket.tokens -= 1.0;
        Ok(())
    } else {
        Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
    }
}

impl RateLimiter {
    pub fn new(rate: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::default(),
        }
    }

    /// Takes a request of the caller `key` now.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // Full buckets carry no information: forget them now and then.
        if buckets.len() > 10_000 {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
        if !buckets.contains_key(key) {
            buckets.insert(
                key.to_owned(),
                Bucket {
                    tokens: self.burst,
                    at: now,
                },
            );
        }
        let Some(bucket) = buckets.get_mut(key) else {
            return Ok(());
        };
        take(bucket, now, self.rate, self.burst)
    }
}

/// Whether a client's request id may be used as ours.
fn acceptable_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Gives every request an id (the client's `x-request-id` when well formed, a random
/// one otherwise): in the request's extensions, the log span, error bodies and the
/// response header.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| acceptable_request_id(id))
        .map(str::to_owned)
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>()));
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("api", request_id = %id, method = %req.method(), uri = %req.uri().path());
    let mut response = {
        use tracing::Instrument;
        REQUEST_ID
            .scope(id.clone(), next.run(req))
            .instrument(span)
            .await
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    response
}

/// Enforces the route's access rule: a bearer token, usable (not revoked, not expired),
/// or else (on the HTTPS port) an operator certificate mapped to a role in
/// `[api.tls] operators`; with the role, within its rate limit. Puts the [`Caller`] in
/// the request.
pub async fn authorize(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let Some(path) = path else {
        return ApiError::not_found("no such route").into_response();
    };
    let Some(access) = state.routes.access(req.method(), &path) else {
        // A route the document does not describe: refused rather than guessed.
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "route has no access rule",
        )
        .into_response();
    };
    let Access::Role(needed) = access else {
        return next.run(req).await;
    };
    let Some(ready) = state.ready.get() else {
        return ApiError::unavailable().into_response();
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        let peer = req
            .extensions()
            .get::<ConnectInfo<ApiPeer>>()
            .map(|c| c.0.cert.clone());
        let caller = match peer {
            None | Some(ClientCert::None) => {
                return unauthorized(&state, "missing bearer token");
            }
            Some(ClientCert::NotOperator(reason)) => {
                return refuse(
                    &state,
                    "cert_not_operator",
                    format!("certificate is not an operator certificate: {reason}"),
                );
            }
            Some(ClientCert::Operator(name)) => match state.cert_roles.get(&name) {
                Some(role) => Caller {
                    role: *role,
                    identity: Identity::Certificate(name),
                },
                None => {
                    return refuse(
                        &state,
                        "cert_unmapped",
                        format!("certificate not mapped to a role (operator {name:?})"),
                    );
                }
            },
        };
        return admit(&state, caller, needed, req, next).await;
    };
    let token = match tokens::verify(&ready.pool, presented).await {
        Ok(Ok(token)) => token,
        Ok(Err(refusal)) => {
            let reason = match refusal {
                TokenRefusal::Malformed => "malformed",
                TokenRefusal::Unknown => "unknown",
                TokenRefusal::Revoked => "revoked",
                TokenRefusal::Expired => "expired",
            };
            state
                .metrics
                .auth_refused
                .with_label_values(&[reason])
                .inc();
            return unauthorized(&state, &refusal.to_string());
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    admit(&state, Caller::token(token), needed, req, next).await
}

/// An authenticated caller: within its rate limit and with the role `needed`, the
/// request goes on with the [`Caller`] in its extensions.
async fn admit(
    state: &ApiState,
    caller: Caller,
    needed: Role,
    mut req: Request,
    next: Next,
) -> Response {
    if let Err(wait) = state.limiter.check(&caller.key()) {
        state.metrics.rate_limited.inc();
        let who = match &caller.identity {
            Identity::Token(t) => format!("token {}", t.id),
            Identity::Certificate(name) => format!("certificate {name:?}"),
        };
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("{who} is over its rate limit"),
        );
        e.retry_after = Some(wait.as_secs().max(1));
        return e.into_response();
    }
    if caller.role < needed {
        return refuse(
            state,
            "role",
            format!("role {} may not do this (needs {needed})", caller.role),
        );
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// 403, counted under `reason`.
fn refuse(state: &ApiState, reason: &str, message: String) -> Response {
    state
        .metrics
        .auth_refused
        .with_label_values(&[reason])
        .inc();
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message).into_response()
}

fn unauthorized(_state: &ApiState, message: &str) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_the_rate_and_caps_at_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket {
            tokens: 2.0,
            at: t0,
        };
        assert!(take(&mut b, t0, 1.0, 2.0).is_ok());
        assert!(take(&mut b, t0, 1.0, 2.0).is_ok());
        let wait = take(&mut b, t0, 1.0, 2.0).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
        assert!(take(&mut b, t0 + Duration::from_millis(1100), 1.0, 2.0).is_ok());
        // A long pause refills to the burst only.
        let later = t0 + Duration::from_secs(3600);
        assert!(take(&mut b, later, 1.0, 2.0).is_ok());
        assert!(take(&mut b, later, 1.0, 2.0).is_ok());
        assert!(take(&mut b, later, 1.0, 2.0).is_err());
    }

    #[test]
    fn rate_limits_are_per_caller_certificates_included() {
        let token = Caller::token(TokenInfo {
            id: 7,
            name: "ci".into(),
            role: Role::Operator,
            created_at: chrono::Utc::now(),
            expires_at: None,
            revoked_at: None,
            last_used: None,
        });
        let cert = Caller {
            role: Role::Viewer,
            identity: Identity::Certificate("alice".into()),
        };
        assert_eq!(
            (token.who(), token.key()),
            ("ci".into(), "token:7:ci".into())
        );
        assert_eq!(
            (cert.who(), cert.key()),
            ("cert:alice".into(), "cert:alice".into())
        );
        assert_eq!((token.token_id(), cert.token_id()), (Some(7), None));
        let limiter = RateLimiter::new(1, 1);
        assert!(limiter.check(&cert.key()).is_ok());
        assert!(
            limiter.check(&cert.key()).is_err(),
            "the certificate's bucket is empty"
        );
        assert!(
            limiter.check(&token.key()).is_ok(),
            "the token has its own bucket"
        );
        assert!(limiter.check("cert:bob").is_ok(), "another certificate too");
    }

    #[test]
    fn request_ids_from_clients_are_checked() {
        assert!(acceptable_request_id("abc-123_x.y"));
        assert!(!acceptable_request_id(""));
        assert!(!acceptable_request_id("a b"));
        assert!(!acceptable_request_id("x'; DROP TABLE"));
        assert!(!acceptable_request_id(&"a".repeat(65)));
    }

    #[test]
    fn route_table_reads_roles_from_the_document() {
        let doc = serde_json::json!({"paths": {
            "/a": {"get": {}, "post": {"security": [{"bearer": ["operator"]}]}},
            "/b/{id}": {"delete": {"security": [{"bearer": ["admin"]}]}},
        }});
        let t = RouteTable::from_openapi(&doc).unwrap();
        assert_eq!(t.access(&Method::GET, "/a"), Some(Access::Public));
        assert_eq!(
            t.access(&Method::POST, "/a"),
            Some(Access::Role(Role::Operator))
        );
        assert_eq!(
            t.access(&Method::DELETE, "/b/{id}"),
            Some(Access::Role(Role::Admin))
        );
        assert_eq!(t.access(&Method::PUT, "/a"), None);
        let bad =
            serde_json::json!({"paths": {"/a": {"get": {"security": [{"bearer": ["root"]}]}}}});
        assert!(RouteTable::from_openapi(&bad).is_err());
    }
}
