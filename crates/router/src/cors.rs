//! Cross-origin rules (`--cors-*`): the tower-http [`CorsLayer`] in front of every route. The flags are
//! checked when the router starts, so a bad value stops it with a message (tower-http would panic on
//! some combinations, such as credentials with a `*` origin).

use std::time::Duration;

use axum::http::{header, HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer, ExposeHeaders};

use crate::args::CorsArgs;

/// The layer `args` describe, or `None` when no origin is allowed (no CORS headers at all).
pub fn layer(args: &CorsArgs) -> Result<Option<CorsLayer>, String> {
    let origins = cleaned(&args.cors_allow_origin);
    if origins.is_empty() {
        let others = !args.cors_allow_method.is_empty()
            || !args.cors_allow_header.is_empty()
            || !args.cors_expose_header.is_empty()
            || args.cors_allow_credentials
            || args.cors_max_age.is_some();
        if others {
            return Err("the --cors-* flags need --cors-allow-origin (CORS is off without it)".into());
        }
        return Ok(None);
    }
    let credentials = args.cors_allow_credentials;
    let wildcard = |flag: &str, values: &[&str]| -> Result<bool, String> {
        if !values.contains(&"*") {
            return Ok(false);
        }
        if values.len() > 1 {
            return Err(format!("--{flag}: `*` cannot be combined with other values"));
        }
        if credentials {
            return Err(format!(
                "--{flag} `*` cannot be used with --cors-allow-credentials (browsers refuse it): list the values"
            ));
        }
        Ok(true)
    };

    let origin = if wildcard("cors-allow-origin", &origins)? {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().map(|o| origin(o)).collect::<Result<Vec<_>, _>>()?)
    };

    let methods = cleaned(&args.cors_allow_method);
    let methods = if methods.is_empty() {
        AllowMethods::list([Method::GET, Method::POST])
    } else if wildcard("cors-allow-method", &methods)? {
        AllowMethods::any()
    } else {
        let parsed = methods
            .iter()
            .map(|m| {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| format!("--cors-allow-method: `{m}` is not an HTTP method"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowMethods::list(parsed)
    };

    let headers = cleaned(&args.cors_allow_header);
    let headers = if headers.is_empty() {
        AllowHeaders::list([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            HeaderName::from_static(crate::auth::API_KEY_HEADER),
        ])
    } else if wildcard("cors-allow-header", &headers)? {
        AllowHeaders::any()
    } else {
        AllowHeaders::list(header_names("cors-allow-header", &headers)?)
    };

    let exposed = cleaned(&args.cors_expose_header);
    let exposed = if exposed.is_empty() {
        ExposeHeaders::list([])
    } else if wildcard("cors-expose-header", &exposed)? {
        ExposeHeaders::any()
    } else {
        ExposeHeaders::list(header_names("cors-expose-header", &exposed)?)
    };

    let mut layer = CorsLayer::new()
        .allow_origin(origin)
        .allow_methods(methods)
        .allow_headers(headers)
        .expose_headers(exposed)
        .allow_credentials(credentials);
    if let Some(seconds) = args.cors_max_age {
        layer = layer.max_age(Duration::from_secs(seconds));
    }
    Ok(Some(layer))
}

/// Trimmed, non-empty values (so `--cors-allow-origin ""` means none).
fn cleaned(values: &[String]) -> Vec<&str> {
    values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()).collect()
}

/// An origin exactly as browsers send it: `scheme://host[:port]`, no path, no trailing slash.
fn origin(value: &str) -> Result<HeaderValue, String> {
    let invalid =
        || format!("--cors-allow-origin: `{value}` is not an origin (scheme://host[:port], no path or trailing slash)");
    let (scheme, host) = value.split_once("://").ok_or_else(invalid)?;
    let scheme_ok = !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok || host.is_empty() || host.contains('/') || host.chars().any(char::is_whitespace) {
        return Err(invalid());
    }
    HeaderValue::from_str(value).map_err(|_| invalid())
}

fn header_names(flag: &str, values: &[&str]) -> Result<Vec<HeaderName>, String> {
    values
        .iter()
        .map(|h| HeaderName::from_bytes(h.as_bytes()).map_err(|_| format!("--{flag}: `{h}` is not a header name")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(origins: &[&str]) -> CorsArgs {
        CorsArgs {
            cors_allow_origin: origins.iter().map(ToString::to_string).collect(),
            ..CorsArgs::default()
        }
    }

    fn error(args: &CorsArgs) -> String {
        layer(args).expect_err("refused")
    }

    #[test]
    fn off_without_origins() {
        assert!(layer(&CorsArgs::default()).expect("valid").is_none());
        assert!(layer(&args(&[" "])).expect("valid").is_none(), "blank counts as absent");
        let mut a = args(&[]);
        a.cors_allow_method = vec!["GET".into()];
        assert!(error(&a).contains("need --cors-allow-origin"));
    }

    #[test]
    fn valid_configurations() {
        assert!(layer(&args(&["*"])).expect("valid").is_some());
        let mut a = args(&["https://app.example.com", "http://localhost:8080"]);
        a.cors_allow_method = vec!["get".into(), "POST".into()];
        a.cors_allow_header = vec!["content-type".into(), "x-custom".into()];
        a.cors_expose_header = vec!["x-generated-tokens".into()];
        a.cors_allow_credentials = true;
        a.cors_max_age = Some(60);
        assert!(layer(&a).expect("valid").is_some());
    }

    #[test]
    fn bad_values_are_refused_with_the_flag() {
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://a.example/x",
            "://x",
            "https://",
        ] {
            assert!(error(&args(&[bad])).contains("is not an origin"), "{bad}");
        }
        assert!(error(&args(&["*", "https://a.example"])).contains("cannot be combined"));
        let mut a = args(&["*"]);
        a.cors_allow_credentials = true;
        assert!(error(&a).contains("--cors-allow-origin `*` cannot be used with --cors-allow-credentials"));
        let mut a = args(&["https://a.example"]);
        a.cors_allow_credentials = true;
        a.cors_allow_header = vec!["*".into()];
        assert!(error(&a).contains("--cors-allow-header `*`"));
        let mut a = args(&["https://a.example"]);
        a.cors_allow_method = vec!["GE T".into()];
        assert!(error(&a).contains("not an HTTP method"));
        let mut a = args(&["https://a.example"]);
        a.cors_expose_header = vec!["bad header".into()];
        assert!(error(&a).contains("--cors-expose-header: `bad header` is not a header name"));
    }
}
