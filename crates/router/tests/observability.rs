//! The router's self-description and operational surface over real HTTP: the OpenAPI document and
//! Swagger UI, `/metrics?format=json` against the text format, LoRAX's metric names, and the CORS flags
//! (preflight and actual requests).

mod common;

use common::{error_of, Deployment, Setup};
use lorax_router::api_doc;
use reqwest::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, CONTENT_TYPE, ORIGIN,
};
use serde_json::{json, Value};

fn header(response: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII header").to_string())
}

#[tokio::test]
async fn openapi_document_and_swagger_ui() {
    let d = Deployment::start(Setup::default()).await;
    let response = d.get("/api-doc/openapi.json").await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, CONTENT_TYPE).as_deref(), Some("application/json"));
    let served: Value = response.json().await.expect("json");
    assert_eq!(served, serde_json::to_value(api_doc::document()).expect("json"));
    let problems = api_doc::undocumented_routes(lorax_router::server::routes().registered(), api_doc::document());
    assert!(problems.is_empty(), "{problems:#?}");
    for path in [
        "/generate",
        "/generate_stream",
        "/",
        "/health",
        "/info",
        "/tokenize",
        "/metrics",
    ] {
        assert!(served["paths"].get(path).is_some(), "{path} not documented");
    }

    let page = d.get("/docs").await;
    assert_eq!(page.status(), 200);
    assert!(header(&page, CONTENT_TYPE).expect("type").starts_with("text/html"));
    let page = page.text().await.expect("html");
    assert!(
        page.contains("api-doc/openapi.json") && page.contains("SwaggerUIBundle"),
        "{page}"
    );
    for (asset, content_type, marker) in [
        ("swagger-ui-bundle.js", "text/javascript", "SwaggerUIBundle"),
        ("swagger-ui.css", "text/css", ".swagger-ui"),
        ("swagger-ui-bundle.js.LICENSE.txt", "text/plain", "license"),
    ] {
        assert!(
            asset.contains("LICENSE") || page.contains(&format!("docs/{asset}")),
            "{asset} not loaded"
        );
        let response = d.get(&format!("/docs/{asset}")).await;
        assert_eq!(response.status(), 200, "{asset}");
        assert!(
            header(&response, CONTENT_TYPE).expect("type").starts_with(content_type),
            "{asset}"
        );
        assert!(response.text().await.expect("body").contains(marker), "{asset}");
    }
    // Any other file: the router's 404 in its error shape.
    let missing = d.get("/docs/swagger-ui-bundle.js.map").await;
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.expect("a JSON error body");
    assert_eq!(body["error_type"], "not_found", "{body}");
    assert_eq!(d.get("/docs/..%2FCargo.toml").await.status(), 404);
}

#[tokio::test]
async fn metrics_json_matches_the_text_format() {
    let d = Deployment::start(Setup::default()).await;
    for _ in 0..3 {
        let response = d
            .post(
                "/generate",
                json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2}}),
            )
            .await;
        assert_eq!(response.status(), 200);
    }
    let (status, _) = error_of(d.post("/generate", json!({"inputs": ""})).await).await;
    assert_eq!(status, 422);

    // The recorder is process-wide: take both views after all traffic of this test binary has settled.
    let text = d.get("/metrics").await.text().await.expect("text");
    let json: Value = d.get("/metrics?format=json").await.json().await.expect("json");
    let again = d.get("/metrics").await.text().await.expect("text");
    let parsed = serde_json::to_value(lorax_router::metrics_json::parse(&text)).expect("json");
    if text == again {
        assert_eq!(json, parsed, "the JSON view differs from the text it was made from");
    }

    let families = json["metrics"].as_array().expect("families");
    let family = |name: &str| {
        families
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing from {json}"))
    };
    let value = |name: &str| family(name)["samples"][0]["value"].as_f64().expect("value");
    assert!(value("lorax_request_count") >= 4.0);
    assert!(value("lorax_request_success") >= 3.0);
    assert_eq!(family("lorax_request_count")["type"], "counter");
    assert_eq!(family("lorax_request_count")["help"], "Requests received");
    let failures = &family("lorax_request_failure")["samples"];
    assert!(
        failures
            .as_array()
            .expect("samples")
            .iter()
            .any(|s| s["labels"]["err"] == "validation"),
        "{failures}"
    );
    for name in [
        "lorax_request_duration",
        "lorax_request_validation_duration",
        "lorax_request_queue_duration",
        "lorax_request_inference_duration",
        "lorax_request_mean_time_per_token_duration",
        "lorax_request_input_length",
        "lorax_request_generated_tokens",
        "lorax_request_max_new_tokens",
        "lorax_batch_inference_duration",
        "lorax_batch_forward_duration",
        "lorax_batch_shard_duration",
        "lorax_batch_next_size",
        "lorax_batch_decode_size",
    ] {
        let f = family(name);
        assert_eq!(f["type"], "histogram", "{name} is not a histogram: {f}");
        let sample = &f["samples"][0];
        assert!(sample["count"].as_f64().expect("count") >= 1.0, "{name}: {sample}");
        let buckets = sample["buckets"].as_array().expect("buckets");
        assert!(buckets.len() >= 8, "{name} has {} buckets", buckets.len());
    }
    for f in families {
        assert_ne!(f["type"], "summary", "{} has no buckets configured: {f}", f["name"]);
    }
    let success = &family("lorax_batch_inference_success")["samples"];
    let methods: Vec<&str> = success
        .as_array()
        .expect("samples")
        .iter()
        .map(|s| s["labels"]["method"].as_str().expect("method"))
        .collect();
    assert!(
        methods.contains(&"prefill") && methods.contains(&"decode"),
        "{methods:?}"
    );
    for gauge in [
        "lorax_queue_size",
        "lorax_batch_current_size",
        "lorax_batch_current_max_tokens",
    ] {
        assert_eq!(family(gauge)["type"], "gauge");
    }
    assert!(text.contains("lorax_batch_inference_count{method=\"decode\"}"));

    let (status, error) = error_of(d.get("/metrics?format=xml").await).await;
    assert_eq!(
        (status, error["error_type"].as_str()),
        (422, Some("validation")),
        "{error}"
    );
    let text_again = d.get("/metrics?format=text").await;
    assert_eq!(
        header(&text_again, CONTENT_TYPE).as_deref(),
        Some("text/plain; version=0.0.4")
    );
}

async fn preflight(d: &Deployment, path: &str, origin: &str, method: &str) -> reqwest::Response {
    d.http
        .request(reqwest::Method::OPTIONS, format!("{}{path}", d.base))
        .header(ORIGIN, origin)
        .header(ACCESS_CONTROL_REQUEST_METHOD, method)
        .header(ACCESS_CONTROL_REQUEST_HEADERS, "content-type")
        .send()
        .await
        .expect("preflight sent")
}

#[tokio::test]
async fn cors_is_off_by_default() {
    let d = Deployment::start(Setup::default()).await;
    let response = preflight(&d, "/generate", "https://app.example", "POST").await;
    assert_eq!(header(&response, ACCESS_CONTROL_ALLOW_ORIGIN), None);
    let response = d
        .http
        .get(format!("{}/info", d.base))
        .header(ORIGIN, "https://app.example")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, ACCESS_CONTROL_ALLOW_ORIGIN), None);
}

#[tokio::test]
async fn cors_flags() {
    let flags = [
        "--cors-allow-origin",
        "https://app.example,http://localhost:8080",
        "--cors-expose-header",
        "x-generated-tokens,x-adapter-id",
        "--cors-allow-credentials",
        "--cors-max-age",
        "600",
    ];
    let d = Deployment::start(Setup {
        flags: flags.iter().map(ToString::to_string).collect(),
        ..Setup::default()
    })
    .await;

    // Preflight of an allowed origin: answered by the CORS layer with the configured rules.
    for path in ["/generate", "/v1/chat/completions", "/tokenize"] {
        let response = preflight(&d, path, "https://app.example", "POST").await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(
            header(&response, ACCESS_CONTROL_ALLOW_ORIGIN).as_deref(),
            Some("https://app.example")
        );
        let methods = header(&response, ACCESS_CONTROL_ALLOW_METHODS).expect("methods");
        assert!(methods.contains("POST") && methods.contains("GET"), "{methods}");
        let headers = header(&response, ACCESS_CONTROL_ALLOW_HEADERS).expect("headers");
        assert!(
            headers.contains("content-type") && headers.contains("authorization") && headers.contains("x-api-key"),
            "{headers}"
        );
        assert_eq!(
            header(&response, ACCESS_CONTROL_ALLOW_CREDENTIALS).as_deref(),
            Some("true")
        );
        assert_eq!(header(&response, ACCESS_CONTROL_MAX_AGE).as_deref(), Some("600"));
    }
    let response = preflight(&d, "/generate", "http://localhost:8080", "POST").await;
    assert_eq!(
        header(&response, ACCESS_CONTROL_ALLOW_ORIGIN).as_deref(),
        Some("http://localhost:8080")
    );

    // Another origin gets no permission.
    let response = preflight(&d, "/generate", "https://evil.example", "POST").await;
    assert_eq!(header(&response, ACCESS_CONTROL_ALLOW_ORIGIN), None);

    // The actual request carries the allow-origin and expose headers.
    let response = d
        .http
        .post(format!("{}/generate", d.base))
        .header(ORIGIN, "https://app.example")
        .json(&json!({"inputs": "Hello", "parameters": {"max_new_tokens": 1}}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, ACCESS_CONTROL_ALLOW_ORIGIN).as_deref(),
        Some("https://app.example")
    );
    let exposed = header(&response, ACCESS_CONTROL_EXPOSE_HEADERS).expect("expose");
    assert!(
        exposed.contains("x-generated-tokens") && exposed.contains("x-adapter-id"),
        "{exposed}"
    );
    assert_eq!(
        header(&response, ACCESS_CONTROL_ALLOW_CREDENTIALS).as_deref(),
        Some("true")
    );
}

#[tokio::test]
async fn bad_cors_flags_stop_the_router() {
    for (flags, message) in [
        (vec!["--cors-allow-origin", "https://app.example/"], "is not an origin"),
        (
            vec!["--cors-allow-origin", "*", "--cors-allow-credentials"],
            "cannot be used with",
        ),
        (vec!["--cors-allow-method", "GET"], "need --cors-allow-origin"),
    ] {
        let setup = Setup {
            flags: flags.iter().map(ToString::to_string).collect(),
            ..Setup::default()
        };
        let error = match Deployment::try_start(setup).await {
            Ok(_) => panic!("{flags:?} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains(message), "{flags:?}: {error}");
    }
}

/// A `--max-total-tokens` past the model's `max_position_embeddings` (the fake shard's 4096) stops the
/// router at start-up, naming both; the model's own limit is accepted.
#[tokio::test]
async fn max_total_tokens_past_the_models_positions_stops_the_router() {
    let flags = |total: &str| Setup {
        flags: [
            "--max-total-tokens",
            total,
            "--max-input-length",
            "1024",
            "--max-batch-prefill-tokens",
            "4096",
        ]
        .iter()
        .map(ToString::to_string)
        .collect(),
        ..Setup::default()
    };
    let error = match Deployment::try_start(flags("8192")).await {
        Ok(_) => panic!("--max-total-tokens 8192 accepted for a model of 4096 positions"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("--max-total-tokens (8192)") && error.contains("factor: 4096)"),
        "{error}"
    );
    assert!(Deployment::try_start(flags("4096")).await.is_ok());
}
