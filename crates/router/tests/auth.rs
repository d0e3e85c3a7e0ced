//! `--api-key` / `--api-key-file` over real HTTP (fake shards): every route but `/health`, `/metrics` and
//! the API documentation needs a key; a missing or wrong key gets 401 `unauthorized`; the key works in
//! `Authorization: Bearer` and in `X-API-Key`; a key sent in `Authorization` is never taken for a hub
//! token, while `X-API-Key` leaves `Authorization` to the hub token (LoRAX clients); keys never appear
//! in logs, metrics or answers. Its own binary: it installs a log subscriber for its runtime.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{Deployment, Setup};
use serde_json::{json, Value};

const FLAG_KEY: &str = "lorax-flag-key-0123456789";
const FILE_KEYS: [&str; 2] = ["lorax-file-key-old-abcdef", "lorax-file-key-new-ghijkl"];

/// Log lines written by the router, captured for one test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends `method path` (with a small JSON body for POST) and the given headers; (status, headers, body).
async fn call(
    d: &Deployment,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = d.http.request(method.clone(), format!("{}{path}", d.base));
    if method == reqwest::Method::POST {
        let body = match path {
            "/v1/completions" => json!({"model": "fake/model", "prompt": "Hello", "max_tokens": 2}),
            "/v1/chat/completions" => {
                json!({"model": "fake/model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            }
            _ => json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2}}),
        };
        request = request.json(&body);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("answered");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn api_keys_guard_every_route_but_health_metrics_and_docs() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "lorax_router=trace,tower_http=trace",
        ))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // The test runtime has one thread, so every task of the router logs through this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().expect("tempdir");
    let keys_file = dir.path().join("keys");
    std::fs::write(
        &keys_file,
        format!("# rotated keys\n{}\n\n{}\n", FILE_KEYS[0], FILE_KEYS[1]),
    )
    .expect("keys file");
    let d = Deployment::start(Setup {
        flags: vec![
            "--api-key".into(),
            FLAG_KEY.into(),
            "--api-key-file".into(),
            keys_file.display().to_string(),
        ],
        ..Setup::default()
    })
    .await;
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;

    // Public routes need no key.
    for path in ["/health", "/metrics", "/api-doc/openapi.json", "/docs"] {
        let (status, _, body) = call(&d, get.clone(), path, &[]).await;
        assert_eq!(status, 200, "{path}: {body}");
    }

    // Everything else: 401 without a key, with a wrong one, or with one in the wrong place.
    let guarded = [
        (post.clone(), "/generate"),
        (post.clone(), "/generate_stream"),
        (post.clone(), "/"),
        (post.clone(), "/tokenize"),
        (post.clone(), "/v1/completions"),
        (post.clone(), "/v1/chat/completions"),
        (get.clone(), "/info"),
        (get.clone(), "/v1/models"),
        (get.clone(), "/no/such/route"),
    ];
    let wrong_key = format!("{FLAG_KEY}x");
    let wrong_bearer = format!("Bearer {wrong_key}");
    let basic = format!("Basic {FLAG_KEY}");
    let refused: [&[(&str, &str)]; 5] = [
        &[],
        &[("authorization", &wrong_bearer)],
        &[("x-api-key", &wrong_key)],
        &[("authorization", &basic)],
        &[("api-key", FLAG_KEY)],
    ];
    for (method, path) in &guarded {
        for headers in refused {
            let (status, response_headers, body) = call(&d, method.clone(), path, headers).await;
            assert_eq!(status, 401, "{method} {path} {headers:?}: {body}");
            // OpenAI's error shape under /v1/, the native one elsewhere.
            let error_type = match path.starts_with("/v1/") {
                true => &body["error"]["type"],
                false => &body["error_type"],
            };
            assert_eq!(error_type, "unauthorized", "{method} {path}: {body}");
            assert_eq!(response_headers["www-authenticate"], "Bearer");
        }
    }

    // Each key works, in either header.
    for key in [FLAG_KEY, FILE_KEYS[0], FILE_KEYS[1]] {
        let bearer = format!("Bearer {key}");
        for headers in [[("authorization", bearer.as_str())], [("x-api-key", key)]] {
            for (method, path) in &guarded[..8] {
                let (status, _, body) = call(&d, method.clone(), path, &headers).await;
                assert_eq!(status, 200, "{method} {path} {headers:?}: {body}");
            }
        }
    }

    // Hub tokens: a key in Authorization is not a hub token; with the key in X-API-Key, Authorization
    // carries the hub token as in LoRAX; the body's api_token works with either.
    let adapter = |id: &str, token: Option<&str>| {
        let mut parameters = json!({"adapter_id": id, "max_new_tokens": 2});
        if let Some(token) = token {
            parameters["api_token"] = json!(token);
        }
        json!({"inputs": "Hello", "parameters": parameters})
    };
    // (adapter, body, headers, the token the hub must see)
    type Case<'a> = (&'a str, Value, Vec<(&'a str, String)>, Option<&'a str>);
    let cases: [Case; 3] = [
        (
            "org/key-in-authorization",
            adapter("org/key-in-authorization", None),
            vec![("authorization", format!("Bearer {FLAG_KEY}"))],
            None,
        ),
        (
            "org/hub-token-in-authorization",
            adapter("org/hub-token-in-authorization", None),
            vec![
                ("x-api-key", FLAG_KEY.to_string()),
                ("authorization", "Bearer hf_HUB_FROM_HEADER".to_string()),
            ],
            Some("hf_HUB_FROM_HEADER"),
        ),
        (
            "org/hub-token-in-body",
            adapter("org/hub-token-in-body", Some("hf_HUB_FROM_BODY")),
            vec![("authorization", format!("Bearer {FLAG_KEY}"))],
            Some("hf_HUB_FROM_BODY"),
        ),
    ];
    for (id, body, headers, hub_token) in cases {
        let mut request = d.http.post(format!("{}/generate", d.base)).json(&body);
        for (name, value) in &headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.expect("answered");
        assert_eq!(response.status(), 200, "{id}");
        assert_eq!(
            d.hub.tokens(id),
            [hub_token.map(str::to_string)],
            "{id}: the token the hub saw"
        );
    }

    // Keys never show in logs, metrics or answers (the 401 message names no key).
    let metrics = call(&d, get.clone(), "/metrics", &[]).await.2.to_string();
    let text = String::from_utf8(logs.0.lock().expect("lock").clone()).expect("utf-8 logs");
    assert!(text.contains("API keys required"), "the logs were captured:\n{text}");
    for key in [
        FLAG_KEY,
        FILE_KEYS[0],
        FILE_KEYS[1],
        "hf_HUB_FROM_HEADER",
        "hf_HUB_FROM_BODY",
    ] {
        assert!(!text.contains(key), "{key} was logged");
        assert!(!metrics.contains(key), "{key} is in /metrics");
    }
    let (_, _, refusal) = call(&d, post, "/generate", &[("authorization", &wrong_bearer)]).await;
    assert!(!refusal.to_string().contains(&wrong_key), "{refusal}");
}

/// A keys file that cannot be used stops the router at startup.
#[tokio::test]
async fn bad_key_settings_stop_the_router() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "# no keys here\n").expect("write");
    for (flags, needle) in [
        (
            vec!["--api-key-file".to_string(), empty.display().to_string()],
            "holds no key",
        ),
        (
            vec![
                "--api-key-file".to_string(),
                dir.path().join("missing").display().to_string(),
            ],
            "cannot read --api-key-file",
        ),
    ] {
        let error = match Deployment::try_start(Setup {
            flags,
            ..Setup::default()
        })
        .await
        {
            Ok(_) => panic!("the router started despite {needle:?}"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains(needle), "{error}");
        assert!(!error.contains(FLAG_KEY), "{error}");
    }
}
