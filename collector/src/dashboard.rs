//! The operator dashboard: a small single-page app (`collector/assets/dashboard/`)
//! compiled into the binary, so a collector serves it with nothing loaded from the
//! internet. It reads everything through `/api/v1` with the operator's token.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../assets/dashboard/app.js");
const APP_CSS: &str = include_str!("../assets/dashboard/app.css");

/// Routes `/` and `/assets/{file}`.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/assets/{file}", get(asset))
}

/// The asset called `name`, with its content type.
pub fn asset_named(name: &str) -> Option<(&'static str, &'static str)> {
    match name {
        "app.js" => Some(("text/javascript; charset=utf-8", APP_JS)),
        "app.css" => Some(("text/css; charset=utf-8", APP_CSS)),
        "index.html" => Some(("text/html; charset=utf-8", INDEX)),
        _ => None,
    }
}

async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX)
}

async fn asset(Path(file): Path<String>) -> Response {
    match asset_named(&file) {
        Some((kind, body)) => page(kind, body),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

fn page(kind: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    // Assets change with the binary; a reload after an upgrade must not mix versions.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_loads_is_embedded() {
        for name in ["app.js", "app.css"] {
            assert!(INDEX.contains(&format!("/assets/{name}")), "{name}");
            assert!(asset_named(name).is_some_and(|(_, body)| !body.is_empty()));
        }
        assert!(asset_named("../Cargo.toml").is_none());
        // Nothing from the internet.
        for body in [INDEX, APP_JS, APP_CSS] {
            assert!(!body.contains("http://") || body.contains("http://www.w3.org/2000/svg"));
            assert!(!body.contains("https://"));
        }
    }
}
