//! Prometheus metrics: the names (LoRAX's, plus `lorax_adapter_*`, `lorax_active_adapters`,
//! `lorax_kv_blocks_*`, `lorax_batch_forward_duration` and `lorax_batch_decode_size`), their descriptions
//! and histogram buckets, and the one process-wide recorder whose [`PrometheusHandle`] renders
//! `GET /metrics` (and, through [`crate::metrics_json`], `GET /metrics?format=json`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests received (counter).
pub const REQUEST_COUNT: &str = "lorax_request_count";
/// Requests answered successfully (counter).
pub const REQUEST_SUCCESS: &str = "lorax_request_success";
/// Requests that failed (counter, label `err` = the error_type).
pub const REQUEST_FAILURE: &str = "lorax_request_failure";
/// End-to-end request duration in seconds (histogram).
pub const REQUEST_DURATION: &str = "lorax_request_duration";
/// Time from arrival until the request is validated and tokenized, seconds (histogram).
pub const REQUEST_VALIDATION_DURATION: &str = "lorax_request_validation_duration";
/// Time from enqueue to admission into the batch, seconds (histogram).
pub const REQUEST_QUEUE_DURATION: &str = "lorax_request_queue_duration";
/// Time from admission to the last token, seconds (histogram).
pub const REQUEST_INFERENCE_DURATION: &str = "lorax_request_inference_duration";
/// Mean time per generated token, seconds (histogram).
pub const REQUEST_MEAN_TIME_PER_TOKEN: &str = "lorax_request_mean_time_per_token_duration";
/// Prompt tokens per request (histogram).
pub const REQUEST_INPUT_LENGTH: &str = "lorax_request_input_length";
/// Generated tokens per request (histogram).
pub const REQUEST_GENERATED_TOKENS: &str = "lorax_request_generated_tokens";
/// `max_new_tokens` per request after defaults (histogram).
pub const REQUEST_MAX_NEW_TOKENS: &str = "lorax_request_max_new_tokens";
/// Shard forward time per call, seconds (histogram, label `method` = prefill|decode|mixed: a Prefill call
/// with nothing to decode, a Decode call, a Prefill call that also decodes the running batch).
pub const BATCH_FORWARD_DURATION: &str = "lorax_batch_forward_duration";
/// The shard's own time per call (its engine step), as the shard reports it.
pub const BATCH_SHARD_DURATION: &str = "lorax_batch_shard_duration";
/// The shard's handler per call, from its first line to its answer (lock, blocking pool, engine step,
/// building the answer), as the shard reports it.
pub const BATCH_SHARD_HANDLER_DURATION: &str = "lorax_batch_shard_handler_duration";
/// A shard call's request on its way, from the router's call to the shard's handler (clocks of one host).
pub const BATCH_SHARD_SEND_DURATION: &str = "lorax_batch_shard_send_duration";
/// A shard call's answer on its way back: the call less its way there and the handler.
pub const BATCH_SHARD_RETURN_DURATION: &str = "lorax_batch_shard_return_duration";
/// A shard call and the handling of its answer (tokens sent, finished requests retired), seconds
/// (histogram, label `method` = prefill|decode|mixed).
pub const BATCH_INFERENCE_DURATION: &str = "lorax_batch_inference_duration";
/// Requests added by each Prefill call (histogram); with chunked prefill their prompts may run over
/// several steps.
pub const BATCH_NEXT_SIZE: &str = "lorax_batch_next_size";
/// Sequences advanced by each decode or mixed step (how many requests share a step; the prefilling
/// requests of a mixed step are not counted).
pub const BATCH_DECODE_SIZE: &str = "lorax_batch_decode_size";
/// Shard calls made (counter, label `method`).
pub const BATCH_INFERENCE_COUNT: &str = "lorax_batch_inference_count";
/// Shard calls that succeeded (counter, label `method`).
pub const BATCH_INFERENCE_SUCCESS: &str = "lorax_batch_inference_success";
/// Shard calls that failed (counter, label `method`).
pub const BATCH_INFERENCE_FAILURE: &str = "lorax_batch_inference_failure";
/// Requests waiting for admission (gauge).
pub const QUEUE_SIZE: &str = "lorax_queue_size";
/// Requests in the running batch (gauge).
pub const BATCH_CURRENT_SIZE: &str = "lorax_batch_current_size";
/// Tokens reserved by the running batch: sum of prompt + max_new_tokens (gauge).
pub const BATCH_CURRENT_MAX_TOKENS: &str = "lorax_batch_current_max_tokens";
/// KV blocks granted to requests (gauge).
pub const KV_BLOCKS_USED: &str = "lorax_kv_blocks_used";
/// KV blocks the router may grant (gauge).
pub const KV_BLOCKS_TOTAL: &str = "lorax_kv_blocks_total";
/// Requests admitted into the batch (counter, label `adapter` = adapter id, or
/// [`crate::adapters::BASE_MODEL_LABEL`] for the base model). Counted at admission, so only adapters
/// that loaded get a series: ids that fail cannot grow the label set.
pub const ADAPTER_REQUEST_COUNT: &str = "lorax_adapter_request_count";
/// Tokens generated (counter, label `adapter` as above).
pub const ADAPTER_GENERATED_TOKENS: &str = "lorax_adapter_generated_tokens";
/// Seconds from the start of an adapter's download (or of its reload after an offload) until every
/// shard has loaded it (histogram).
pub const ADAPTER_LOAD_DURATION: &str = "lorax_adapter_load_duration";
/// Adapter downloads or loads that failed (counter, label `err` = the error_type given to its requests;
/// no adapter label, since any client can name adapters that do not exist).
pub const ADAPTER_LOAD_FAILURES: &str = "lorax_adapter_load_failures";
/// Adapters loaded on the shards and usable by requests (gauge).
pub const ACTIVE_ADAPTERS: &str = "lorax_active_adapters";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder on first use and returns its handle; later calls (a second router
/// in the same process, as in tests) share it. `max_total_tokens` shapes the token-count buckets.
pub fn install(max_total_tokens: u32) -> PrometheusHandle {
    HANDLE.get_or_init(|| build(max_total_tokens)).clone()
}

/// Buckets of per-step durations (shard calls, time per token, validation): 100 µs to 10 s.
const STEP_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of per-request durations (end to end, queue, inference, adapter loads): 5 ms to 5 min.
const REQUEST_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// Powers of two up to `max`, then `max` itself: buckets of token and sequence counts.
fn count_buckets(max: u32) -> Vec<f64> {
    let max = f64::from(max.max(2));
    let mut buckets = Vec::new();
    let mut t = 1.0_f64;
    while t < max {
        buckets.push(t);
        t *= 2.0;
    }
    buckets.push(max);
    buckets
}

fn build(max_total_tokens: u32) -> PrometheusHandle {
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in histogram_buckets(max_total_tokens) {
        builder = set_buckets(builder, name, &buckets);
    }
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if let Err(e) = metrics::set_global_recorder(recorder) {
        tracing::warn!("another metrics recorder is installed; /metrics will stay empty: {e}");
    }
    describe();
    handle
}

/// Every histogram with its buckets (a histogram missing here would be rendered as a summary).
fn histogram_buckets(max_total_tokens: u32) -> Vec<(&'static str, Vec<f64>)> {
    let tokens = count_buckets(max_total_tokens);
    let mut all: Vec<(&'static str, Vec<f64>)> = Vec::new();
    for name in [
        REQUEST_VALIDATION_DURATION,
        REQUEST_MEAN_TIME_PER_TOKEN,
        BATCH_FORWARD_DURATION,
        BATCH_SHARD_DURATION,
        BATCH_SHARD_HANDLER_DURATION,
        BATCH_SHARD_SEND_DURATION,
        BATCH_SHARD_RETURN_DURATION,
        BATCH_INFERENCE_DURATION,
    ] {
        all.push((name, STEP_BUCKETS.to_vec()));
    }
    for name in [
        REQUEST_DURATION,
        REQUEST_QUEUE_DURATION,
        REQUEST_INFERENCE_DURATION,
        ADAPTER_LOAD_DURATION,
    ] {
        all.push((name, REQUEST_BUCKETS.to_vec()));
    }
    for name in [
        REQUEST_INPUT_LENGTH,
        REQUEST_GENERATED_TOKENS,
        REQUEST_MAX_NEW_TOKENS,
        BATCH_DECODE_SIZE,
        BATCH_NEXT_SIZE,
    ] {
        all.push((name, tokens.clone()));
    }
    all
}

fn set_buckets(builder: PrometheusBuilder, name: &str, buckets: &[f64]) -> PrometheusBuilder {
    // Only fails on empty buckets, which the callers never pass.
    builder
        .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
        .expect("buckets are non-empty")
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REQUEST_COUNT, "Requests received");
    describe_counter!(REQUEST_SUCCESS, "Requests answered successfully");
    describe_counter!(REQUEST_FAILURE, "Requests failed, by error_type");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "End-to-end request duration");
    describe_histogram!(
        REQUEST_VALIDATION_DURATION,
        Unit::Seconds,
        "Time until the request was validated and tokenized"
    );
    describe_histogram!(REQUEST_QUEUE_DURATION, Unit::Seconds, "Time spent queued");
    describe_histogram!(REQUEST_INFERENCE_DURATION, Unit::Seconds, "Time spent in the batch");
    describe_histogram!(
        REQUEST_MEAN_TIME_PER_TOKEN,
        Unit::Seconds,
        "Mean time per generated token"
    );
    describe_histogram!(REQUEST_INPUT_LENGTH, Unit::Count, "Prompt tokens per request");
    describe_histogram!(REQUEST_GENERATED_TOKENS, Unit::Count, "Generated tokens per request");
    describe_histogram!(REQUEST_MAX_NEW_TOKENS, Unit::Count, "max_new_tokens per request");
    describe_histogram!(BATCH_FORWARD_DURATION, Unit::Seconds, "Shard forward time per call");
    describe_histogram!(
        BATCH_SHARD_DURATION,
        Unit::Seconds,
        "Engine time per call inside the shard (the rest of the call is the RPC and the shard's handler)"
    );
    describe_histogram!(
        BATCH_SHARD_HANDLER_DURATION,
        Unit::Seconds,
        "The shard's handler time per call (lock, blocking pool, engine, answer), as the shard reports it"
    );
    describe_histogram!(
        BATCH_SHARD_SEND_DURATION,
        Unit::Seconds,
        "A shard call's request on its way to the shard's handler"
    );
    describe_histogram!(
        BATCH_SHARD_RETURN_DURATION,
        Unit::Seconds,
        "A shard call's answer on its way back from the shard's handler"
    );
    describe_histogram!(
        BATCH_DECODE_SIZE,
        Unit::Count,
        "Sequences advanced per step, by method: decode, or mixed (its decoding rows)"
    );
    describe_histogram!(
        BATCH_INFERENCE_DURATION,
        Unit::Seconds,
        "Shard call and handling of its answer"
    );
    describe_histogram!(BATCH_NEXT_SIZE, Unit::Count, "Requests prefilled per Prefill call");
    describe_counter!(BATCH_INFERENCE_COUNT, "Shard calls");
    describe_counter!(BATCH_INFERENCE_SUCCESS, "Successful shard calls");
    describe_counter!(BATCH_INFERENCE_FAILURE, "Failed shard calls");
    describe_gauge!(QUEUE_SIZE, "Requests waiting for admission");
    describe_gauge!(BATCH_CURRENT_SIZE, "Requests in the running batch");
    describe_gauge!(BATCH_CURRENT_MAX_TOKENS, "Tokens reserved by the running batch");
    describe_gauge!(KV_BLOCKS_USED, "KV-cache blocks granted to requests");
    describe_gauge!(KV_BLOCKS_TOTAL, "KV-cache blocks the router may grant");
    describe_counter!(ADAPTER_REQUEST_COUNT, "Requests admitted into the batch, by adapter");
    describe_counter!(ADAPTER_GENERATED_TOKENS, "Tokens generated, by adapter");
    describe_histogram!(
        ADAPTER_LOAD_DURATION,
        Unit::Seconds,
        "Adapter download (or reload) until loaded on every shard"
    );
    describe_counter!(
        ADAPTER_LOAD_FAILURES,
        "Adapter downloads or loads that failed, by error_type"
    );
    describe_gauge!(ACTIVE_ADAPTERS, "Adapters loaded on the shards");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_sorted_and_cover_the_limits() {
        assert_eq!(count_buckets(100), [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 100.0]);
        assert_eq!(count_buckets(64), [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]);
        assert_eq!(count_buckets(0), [1.0, 2.0]);
        let all = histogram_buckets(2048);
        for (name, buckets) in &all {
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{name}: {buckets:?}");
        }
        let mut names: Vec<&str> = all.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len(), "a histogram is listed twice");
    }
}
