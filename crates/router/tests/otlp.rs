//! Trace export (`--otlp-endpoint`): the router's real subscriber ([`lorax_router::telemetry::init`])
//! exports its spans over OTLP/gRPC to a fake collector (the OTLP `TraceService` on 127.0.0.1:0) that
//! keeps what it receives. Requests become `http_request` server spans named `"POST /generate"`, under
//! the caller's trace when a `traceparent` header is sent, with the handler's span as a child, all with
//! `service.name` = `lorax-router`. Its own test binary: the subscriber is process-wide.

mod common;

use std::sync::{Arc, Mutex};

use common::{Deployment, Setup};
use lorax_router::args::TelemetryArgs;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::json;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// One exported span with its resource's `service.name`.
#[derive(Debug, Clone)]
struct Received {
    service: Option<String>,
    name: String,
    kind: i32,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: Vec<KeyValue>,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<String> {
        self.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                AnyValue::StringValue(s) => s.clone(),
                AnyValue::IntValue(i) => i.to_string(),
                other => format!("{other:?}"),
            })
    }
}

/// A fake OTLP collector keeping every span it is sent.
#[derive(Default, Clone)]
struct Collector {
    exports: Arc<Mutex<usize>>,
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        *self.exports.lock().expect("lock") += 1;
        let mut spans = self.spans.lock().expect("lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans.resource.as_ref().and_then(|r| {
                r.attributes.iter().find(|kv| kv.key == "service.name").and_then(|kv| {
                    match kv.value.as_ref()?.value.as_ref()? {
                        AnyValue::StringValue(s) => Some(s.clone()),
                        _ => None,
                    }
                })
            });
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: span.name,
                        kind: span.kind,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent_span_id: span.parent_span_id,
                        attributes: span.attributes,
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let telemetry = lorax_router::telemetry::init(
        false,
        &TelemetryArgs {
            otlp_endpoint: Some(endpoint),
            otlp_service_name: "lorax-router".into(),
        },
    )
    .expect("telemetry");
    assert!(telemetry.exporting());

    let d = Deployment::start(Setup::default()).await;
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = d
        .http
        .post(format!("{}/generate", d.base))
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .json(&json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2}}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    let response = d.post("/tokenize", json!({"inputs": "Hello"})).await;
    assert_eq!(response.status(), 200);

    // Shutdown flushes the batch exporter and returns once the collector has answered.
    telemetry.shutdown().await;
    assert!(*collector.exports.lock().expect("lock") >= 1, "nothing exported");
    let spans = collector.spans.lock().expect("lock").clone();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert!(
        spans.iter().all(|s| s.service.as_deref() == Some("lorax-router")),
        "service names: {:?}",
        spans.iter().map(|s| &s.service).collect::<Vec<_>>()
    );

    let server = spans
        .iter()
        .find(|s| s.name == "POST /generate")
        .unwrap_or_else(|| panic!("no POST /generate span in {names:?}"));
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(hex(&server.trace_id), caller_trace, "the caller's trace is continued");
    assert_eq!(
        hex(&server.parent_span_id),
        caller_span,
        "the caller's span is the parent"
    );
    assert_eq!(server.attribute("http.route").as_deref(), Some("/generate"));
    assert_eq!(server.attribute("http.request.method").as_deref(), Some("POST"));
    assert_eq!(server.attribute("http.response.status_code").as_deref(), Some("200"));

    let handler = spans
        .iter()
        .find(|s| s.name == "generate" && s.trace_id == server.trace_id)
        .unwrap_or_else(|| panic!("no generate span in the request's trace: {names:?}"));
    assert_eq!(
        handler.parent_span_id, server.span_id,
        "the handler's span is the server span's child"
    );

    let tokenize = spans
        .iter()
        .find(|s| s.name == "POST /tokenize")
        .unwrap_or_else(|| panic!("no POST /tokenize span in {names:?}"));
    assert_ne!(
        hex(&tokenize.trace_id),
        caller_trace,
        "a request without traceparent starts a new trace"
    );
    assert!(tokenize.parent_span_id.is_empty(), "a root span");
}
