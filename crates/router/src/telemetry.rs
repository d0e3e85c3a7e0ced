//! Logs and traces. Every log line goes to stdout through `tracing` (text, or JSON lines with
//! `--json-output`; `RUST_LOG` filters, default `info`). With `--otlp-endpoint` the same spans are also
//! exported as OpenTelemetry traces over OTLP/gRPC (service name `--otlp-service-name`, default
//! `lorax-router`). [`http_span`] opens one server span per HTTP request, continuing the caller's trace
//! when the request carries a W3C `traceparent` header; the handlers' and the batching task's spans
//! nest under it.

use std::time::Duration;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Instrument, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::args::TelemetryArgs;

/// Why logging or trace export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `--otlp-endpoint` is not a usable URL.
    #[error("--otlp-endpoint: {0}")]
    Endpoint(String),
    /// The OTLP exporter could not be built.
    #[error("cannot build the OTLP trace exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// Another global subscriber was installed first.
    #[error("cannot install the log subscriber: {0}")]
    Install(#[from] tracing_subscriber::util::TryInitError),
}

/// Holds the trace exporter, if any; [`Telemetry::shutdown`] sends the spans still buffered.
#[derive(Debug, Default)]
#[must_use = "dropping it without shutdown() loses the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the buffered spans and stops the exporter (waits at most a few seconds).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK blocks while it flushes; the OTLP client needs this runtime to make progress.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(Duration::from_secs(5))).await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("trace export did not shut down cleanly: {e}"),
            Err(e) => tracing::warn!("trace export shutdown task failed: {e}"),
        }
    }
}

/// Installs the process-wide subscriber built by [`subscriber`] (and routes `log` records into it).
/// Call it inside the Tokio runtime: the OTLP client runs on it.
pub fn init(json_output: bool, args: &TelemetryArgs) -> Result<Telemetry, TelemetryError> {
    use tracing_subscriber::util::SubscriberInitExt;
    let (subscriber, telemetry) = subscriber(json_output, args)?;
    subscriber.try_init()?;
    Ok(telemetry)
}

/// The subscriber: `RUST_LOG` filter (default `info`), text or JSON log lines on stdout, and the
/// OpenTelemetry layer when `--otlp-endpoint` is set (which also installs the W3C trace-context
/// propagator that [`http_span`] reads `traceparent` with).
pub fn subscriber(
    json_output: bool,
    args: &TelemetryArgs,
) -> Result<(Box<dyn Subscriber + Send + Sync>, Telemetry), TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = if json_output {
        tracing_subscriber::fmt::layer().json().flatten_event(true).boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    let provider = match &args.otlp_endpoint {
        Some(endpoint) => Some(tracer_provider(endpoint, &args.otlp_service_name)?),
        None => None,
    };
    let traces = provider.as_ref().map(|provider| {
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        tracing_opentelemetry::layer().with_tracer(provider.tracer("lorax-router"))
    });
    let subscriber = tracing_subscriber::registry().with(filter).with(logs).with(traces);
    Ok((Box::new(subscriber), Telemetry { provider }))
}

/// A batch-exporting tracer provider sending to `endpoint` over OTLP/gRPC.
fn tracer_provider(endpoint: &str, service_name: &str) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig;
    let endpoint = endpoint.trim();
    if endpoint.starts_with("https://") {
        return Err(TelemetryError::Endpoint(format!(
            "`{endpoint}`: this build has no TLS for OTLP; use an http:// collector (e.g. a local agent)"
        )));
    }
    if !endpoint.starts_with("http://") {
        return Err(TelemetryError::Endpoint(format!(
            "`{endpoint}` is not an http:// URL (e.g. http://127.0.0.1:4317)"
        )));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(10))
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_string())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Middleware: runs the request inside an `http_request` server span named `"<METHOD> <route>"`, child
/// of the caller's span when a `traceparent` header names one, and records the response status.
pub async fn http_span(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| request.uri().path().to_string(), |p| p.as_str().to_string());
    let span = tracing::info_span!(
        "http_request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    let parent =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&Headers(request.headers())));
    // Fails only when the span is disabled (filtered out), when there is nothing to attach.
    let _ = span.set_parent(parent);
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    response
}

/// Reads trace-context headers for the propagator.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(axum::http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(endpoint: Option<&str>) -> TelemetryArgs {
        TelemetryArgs {
            otlp_endpoint: endpoint.map(str::to_string),
            otlp_service_name: "lorax-router".into(),
        }
    }

    #[tokio::test]
    async fn endpoints_are_checked() {
        let (_, telemetry) = subscriber(false, &args(None)).expect("no export");
        assert!(!telemetry.exporting());
        for bad in ["127.0.0.1:4317", "grpc://x:4317", "https://collector:4317"] {
            let error = subscriber(false, &args(Some(bad))).err().expect("refused");
            assert!(matches!(error, TelemetryError::Endpoint(_)), "{bad}: {error}");
        }
        let (_, telemetry) = subscriber(true, &args(Some("http://127.0.0.1:4317"))).expect("exporter");
        assert!(telemetry.exporting());
        // Nothing listens there: shutdown still returns (the export fails and is logged).
        telemetry.shutdown().await;
    }

    #[test]
    fn header_extractor() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .expect("value"),
        );
        let extractor = Headers(&headers);
        assert_eq!(
            extractor.get("traceparent"),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(extractor.keys(), ["traceparent"]);
        assert_eq!(extractor.get("tracestate"), None);
    }
}
