//! The public gRPC API against the real router in front of the fake shards, spoken to with the
//! `lorax-client` crate (whose REST client gives the reference answers): unary and streamed
//! generations equal the REST ones, validation and adapter errors carry the REST `error_type` with the
//! mapped gRPC code, adapters are served and listed, a dropped stream cancels its request.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Deployment, Setup, HELLO_LAST};
use futures::StreamExt;
use lorax_client::{pb, Client, Error, FinishReason, GrpcClient, Parameters, StreamResponse};
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(10);

async fn clients(d: &Deployment) -> (Client, GrpcClient) {
    let rest = Client::new(d.base.clone()).expect("REST client");
    let grpc = GrpcClient::connect(d.grpc.clone()).await.expect("gRPC connection");
    (rest, grpc)
}

fn greedy(max_new_tokens: u32) -> Parameters {
    Parameters {
        max_new_tokens: Some(max_new_tokens),
        details: Some(true),
        ..Parameters::default()
    }
}

/// The gRPC code and `error_type` of a failed call, and its message.
fn grpc_error(error: Error) -> (Code, Option<String>, String) {
    match error {
        Error::Api(api) => (api.grpc_code.expect("a gRPC code"), api.error_type, api.message),
        other => panic!("not an API error: {other}"),
    }
}

async fn collect(stream: lorax_client::TokenStream) -> Vec<Result<StreamResponse, Error>> {
    stream.collect().await
}

#[tokio::test]
async fn unary_and_stream_equal_rest() {
    let d = Deployment::start(Setup::default()).await;
    let (rest, mut grpc) = clients(&d).await;
    let parameters = Parameters {
        return_k_alternatives: Some(2),
        decoder_input_details: Some(true),
        return_full_text: Some(true),
        ..greedy(4)
    };
    let over_grpc = grpc.generate("Hello", &parameters).await.expect("gRPC generate");
    let over_rest = rest.generate("Hello", &parameters).await.expect("REST generate");
    assert_eq!(over_grpc, over_rest);
    let details = over_grpc.details.expect("details");
    let ids: Vec<u32> = details.tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, common::fake_tokens_for("", HELLO_LAST, 4));
    assert_eq!(details.finish_reason, FinishReason::Length);
    assert_eq!(details.prompt_tokens, 2);
    assert_eq!(details.prefill.len(), 2);
    assert_eq!(
        details.prefill[0].logprob, None,
        "the first prompt token has no logprob"
    );
    assert_eq!(details.tokens[0].alternative_tokens.len(), 2);
    assert!(over_grpc.generated_text.starts_with("Hello"), "return_full_text");

    // Without `details`, none are sent.
    let plain = grpc.generate("Hello", &Parameters::default()).await.expect("plain");
    assert_eq!(plain.details, None);

    // Streams: one message per token, the last with the text and details, as the SSE events.
    let parameters = Parameters {
        return_k_alternatives: Some(1),
        ..greedy(5)
    };
    let over_grpc = collect(grpc.generate_stream("Hello", &parameters).await.expect("gRPC stream")).await;
    let over_rest = collect(rest.generate_stream("Hello", &parameters).await.expect("REST stream")).await;
    let over_grpc: Vec<StreamResponse> = over_grpc.into_iter().map(|m| m.expect("message")).collect();
    let over_rest: Vec<StreamResponse> = over_rest.into_iter().map(|m| m.expect("event")).collect();
    assert_eq!(over_grpc, over_rest);
    assert_eq!(over_grpc.len(), 5);
    let ids: Vec<u32> = over_grpc.iter().map(|m| m.token.id).collect();
    assert_eq!(ids, common::fake_tokens_for("", HELLO_LAST, 5));
    assert!(over_grpc[..4]
        .iter()
        .all(|m| m.generated_text.is_none() && m.details.is_none()));
    let last = over_grpc.last().expect("last message");
    let text: String = over_grpc.iter().map(|m| m.token.text.as_str()).collect();
    assert_eq!(last.generated_text.as_deref(), Some(text.as_str()));
    let details = last.details.as_ref().expect("details on the last message");
    assert_eq!((details.generated_tokens, details.prompt_tokens), (5, 2));
    assert_eq!(details.finish_reason, FinishReason::Length);

    // Stop sequences end the text right after the stop sequence, as on REST.
    let stop = over_grpc[2].token.text.clone();
    let stopped = Parameters {
        stop: vec![stop.clone()],
        ..greedy(10)
    };
    let over_grpc = grpc.generate("Hello", &stopped).await.expect("stopped");
    assert_eq!(over_grpc, rest.generate("Hello", &stopped).await.expect("REST stopped"));
    let details = over_grpc.details.as_ref().expect("details");
    assert_eq!(details.finish_reason, FinishReason::StopSequence);
    assert!(over_grpc.generated_text.ends_with(&stop), "{over_grpc:?}");

    // Tokenize and health.
    let tokens = grpc.tokenize("Hello world", true).await.expect("tokenize");
    assert_eq!(tokens, rest.tokenize("Hello world", true).await.expect("REST tokenize"));
    assert_eq!(tokens.iter().map(|t| t.id).collect::<Vec<_>>(), [1, 22557, 1526]);
    let bare = grpc.tokenize("Hello world", false).await.expect("tokenize");
    assert_eq!(bare.len(), 2);
    grpc.health().await.expect("healthy");
    d.shards[1].unhealthy.store(true, Ordering::SeqCst);
    let (code, error_type, _) = grpc_error(grpc.health().await.expect_err("a shard is unhealthy"));
    assert_eq!((code, error_type.as_deref()), (Code::Unavailable, Some("unhealthy")));
    d.shards[1].unhealthy.store(false, Ordering::SeqCst);
    grpc.health().await.expect("healthy again");
    d.assert_no_violations();
}

#[tokio::test]
async fn validation_errors_are_invalid_argument_with_the_rest_message() {
    let d = Deployment::start(Setup::default()).await;
    let (rest, mut grpc) = clients(&d).await;
    let long = "one two three ".repeat(400);
    let cases: Vec<(&str, Parameters)> = vec![
        (
            "Hello",
            Parameters {
                top_k: Some(0),
                ..greedy(3)
            },
        ),
        (
            "Hello",
            Parameters {
                temperature: Some(-1.0),
                ..greedy(3)
            },
        ),
        (
            "Hello",
            Parameters {
                max_new_tokens: Some(0),
                ..greedy(3)
            },
        ),
        (
            "Hello",
            Parameters {
                max_new_tokens: Some(100_000),
                ..greedy(3)
            },
        ),
        (
            "Hello",
            Parameters {
                return_k_alternatives: Some(21),
                ..greedy(3)
            },
        ),
        (
            "Hello",
            Parameters {
                stop: vec![String::new()],
                ..greedy(3)
            },
        ),
        (
            "Hello",
            Parameters {
                adapter_id: Some("org/a".into()),
                adapter_source: Some("s3".into()),
                ..greedy(3)
            },
        ),
        ("", greedy(3)),
        (long.as_str(), greedy(3)),
    ];
    for (inputs, parameters) in cases {
        let expected = match rest.generate(inputs, &parameters).await.expect_err("REST refuses") {
            Error::Api(api) => api,
            other => panic!("{other}"),
        };
        assert_eq!(expected.http_status, Some(422));
        for streamed in [false, true] {
            let error = if streamed {
                grpc.generate_stream(inputs, &parameters).await.err()
            } else {
                grpc.generate(inputs, &parameters).await.err()
            }
            .expect("gRPC refuses");
            let (code, error_type, message) = grpc_error(error);
            assert_eq!(code, Code::InvalidArgument, "{message}");
            assert_eq!(error_type.as_deref(), Some("validation"));
            assert_eq!(message, expected.message, "the REST message");
        }
    }
    // decoder_input_details is refused on streams only, as on REST.
    let prefill = Parameters {
        decoder_input_details: Some(true),
        ..greedy(2)
    };
    assert!(grpc.generate("Hello", &prefill).await.is_ok());
    let (code, error_type, message) = grpc_error(
        grpc.generate_stream("Hello", &prefill)
            .await
            .err()
            .expect("refused on streams"),
    );
    assert_eq!(
        (code, error_type.as_deref()),
        (Code::InvalidArgument, Some("validation"))
    );
    assert!(message.contains("decoder_input_details"), "{message}");
    // Unsupported parameters the REST API refuses are refused too.
    let mut raw = pb::GenerateRequest {
        inputs: "Hello".into(),
        parameters: Some(pb::GenerateParameters {
            apply_chat_template: Some(true),
            ..Default::default()
        }),
    };
    let rest_answer = d
        .post(
            "/generate",
            serde_json::json!({"inputs": "Hello", "parameters": {"apply_chat_template": true}}),
        )
        .await
        .status()
        .as_u16();
    let grpc_answer = grpc.raw().generate(raw.clone()).await;
    match rest_answer {
        200 => assert!(grpc_answer.is_ok(), "{grpc_answer:?}"),
        status => {
            let status_code = grpc_answer.expect_err("refused as on REST").code();
            assert_eq!((status, status_code), (422, Code::InvalidArgument));
        }
    }
    // LoRAX's `apply_chat_template` with a list of messages: rendered with the chat template, the same
    // prompt (and so the same answer) as on REST.
    let messages = r#"[{"role": "user", "content": "Hi there"}]"#;
    raw.inputs = messages.into();
    raw.parameters = Some(pb::GenerateParameters {
        apply_chat_template: Some(true),
        max_new_tokens: Some(3),
        decoder_input_details: Some(true),
        details: Some(true),
        ..Default::default()
    });
    let rendered = grpc.raw().generate(raw.clone()).await.expect("rendered").into_inner();
    let rest = d
        .post_ok(
            "/generate",
            serde_json::json!({"inputs": messages, "parameters": {"apply_chat_template": true,
                "max_new_tokens": 3, "decoder_input_details": true, "details": true}}),
        )
        .await;
    assert_eq!(
        rendered.generated_text,
        rest["generated_text"].as_str().expect("text"),
        "{rest}"
    );
    let prefill = rendered.details.as_ref().map_or(0, |d| d.prefill.len());
    assert_eq!(
        prefill,
        rest["details"]["prefill"].as_array().map_or(0, Vec::len),
        "{rest}"
    );
    assert!(prefill > 5, "the rendered prompt: {prefill} tokens");
    raw.inputs = "Hello".into();
    raw.parameters = None;
    assert!(
        grpc.raw().generate(raw.clone()).await.is_ok(),
        "no parameters: all defaults"
    );
    // Messages beyond --body-limit-bytes (2 MiB) are refused before any work.
    raw.inputs = "a".repeat(3 << 20);
    let refused = grpc.raw().generate(raw).await.expect_err("too large");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
}

#[tokio::test]
async fn adapters_are_served_listed_and_their_errors_mapped() {
    let d = Deployment::start(Setup::default()).await;
    let (_, mut grpc) = clients(&d).await;
    assert!(grpc.list_adapters().await.expect("list").is_empty());

    let parameters = Parameters {
        adapter_id: Some("org/a".into()),
        ..greedy(3)
    };
    let answer = grpc.generate("Hello", &parameters).await.expect("adapter generate");
    let details = answer.details.expect("details");
    assert_eq!(details.adapter_id.as_deref(), Some("org/a"));
    let ids: Vec<u32> = details.tokens.iter().map(|t| t.id).collect();
    assert_eq!(
        ids,
        common::fake_tokens_for("org/a", HELLO_LAST, 3),
        "generated by the adapter"
    );
    let messages = collect(grpc.generate_stream("Hello", &parameters).await.expect("stream")).await;
    let last = messages.last().expect("messages").as_ref().expect("last message");
    assert_eq!(
        last.details.as_ref().and_then(|d| d.adapter_id.as_deref()),
        Some("org/a")
    );
    assert_eq!(d.hub.downloads("org/a"), 1, "downloaded once");

    let listed = grpc.list_adapters().await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].adapter_id, "org/a");
    assert_eq!(listed[0].adapter_source, "hub");
    assert_eq!(listed[0].state(), pb::AdapterState::Active);
    assert!(!listed[0].draining);
    assert_eq!((listed[0].queued, listed[0].running), (0, 0));

    // A download in progress is listed with its queue.
    d.hub.hold("org/slow");
    let mut waiting = grpc.clone();
    let slow = tokio::spawn(async move {
        let parameters = Parameters {
            adapter_id: Some("org/slow".into()),
            adapter_source: Some("hub".into()),
            ..greedy(2)
        };
        waiting.generate("Hello", &parameters).await
    });
    common::eventually("org/slow is listed as downloading", DEADLINE, || {
        let mut grpc = grpc.clone();
        async move {
            grpc.list_adapters()
                .await
                .expect("list")
                .iter()
                .any(|a| a.adapter_id == "org/slow" && a.state() == pb::AdapterState::Downloading && a.queued == 1)
        }
    })
    .await;
    d.hub.release("org/slow");
    let answer = slow.await.expect("task").expect("served after the download");
    assert_eq!(answer.details.expect("details").adapter_id.as_deref(), Some("org/slow"));

    // Adapter failures: the shard's code decides the REST status, which decides the gRPC code.
    let cases = [
        ("org/missing", Code::NotFound, Code::NotFound, "adapter_not_found"),
        (
            "org/private",
            Code::PermissionDenied,
            Code::PermissionDenied,
            "adapter_forbidden",
        ),
        (
            "org/pickle",
            Code::InvalidArgument,
            Code::InvalidArgument,
            "adapter_invalid",
        ),
        (
            "org/offline",
            Code::Unavailable,
            Code::Unavailable,
            "adapter_unavailable",
        ),
    ];
    for (id, shard_code, grpc_code, error_type) in cases {
        d.hub.fail(id, shard_code, &format!("shard says no to {id}"));
        let parameters = Parameters {
            adapter_id: Some(id.into()),
            ..greedy(2)
        };
        let (code, sent_type, message) = grpc_error(grpc.generate("Hello", &parameters).await.expect_err(id));
        assert_eq!((code, sent_type.as_deref()), (grpc_code, Some(error_type)), "{message}");
        assert!(message.contains(&format!("shard says no to {id}")), "{message}");
        // A stream waits for its adapter before it starts, so its failure is the call's status too.
        let streamed = grpc.generate_stream("Hello", &parameters).await.err();
        let (code, sent_type, message) = grpc_error(streamed.expect("the stream call fails"));
        assert_eq!(
            (code, sent_type.as_deref()),
            (grpc_code, Some(error_type)),
            "stream: {message}"
        );
    }
    let listed: Vec<String> = grpc
        .list_adapters()
        .await
        .expect("list")
        .into_iter()
        .map(|a| a.adapter_id)
        .collect();
    assert_eq!(listed, ["org/a", "org/slow"], "failed adapters are forgotten");
    d.assert_no_violations();
}

#[tokio::test]
async fn bearer_metadata_is_the_api_token() {
    let d = Deployment::start(Setup::default()).await;
    let (_, mut grpc) = clients(&d).await;
    let mut request = tonic::Request::new(pb::GenerateRequest {
        inputs: "Hello".into(),
        parameters: Some(pb::GenerateParameters {
            adapter_id: Some("org/private".into()),
            max_new_tokens: Some(1),
            ..Default::default()
        }),
    });
    request.metadata_mut().insert(
        "authorization",
        "Bearer hf_from_metadata".parse().expect("metadata value"),
    );
    grpc.raw().generate(request).await.expect("generate");
    assert_eq!(d.hub.tokens("org/private"), [Some("hf_from_metadata".to_string())]);
}

#[tokio::test]
async fn overload_shard_failure_and_cancellation() {
    let d = Deployment::start(Setup {
        step_delay: Duration::from_millis(10),
        flags: vec!["--max-concurrent-requests".into(), "1".into()],
        ..Setup::default()
    })
    .await;
    let (_, mut grpc) = clients(&d).await;
    let long = greedy(1500);

    // One stream holds the only slot: the next call is RESOURCE_EXHAUSTED.
    let mut stream = grpc.generate_stream("Hello", &long).await.expect("stream");
    stream.next().await.expect("first token").expect("token");
    let (code, error_type, _) = grpc_error(grpc.generate("Hello", &greedy(1)).await.expect_err("overloaded"));
    assert_eq!(
        (code, error_type.as_deref()),
        (Code::ResourceExhausted, Some("overloaded"))
    );

    // Dropping the stream cancels the request (it leaves the shards' batch) and gives the slot back.
    // (KV blocks are checked through the same path by disconnect.rs, in a process of its own.)
    drop(stream);
    common::eventually("the dropped stream's request is cancelled", DEADLINE, || async {
        d.shards.iter().all(|s| s.live().is_empty())
    })
    .await;
    common::eventually("the slot is free again", DEADLINE, || {
        let mut grpc = grpc.clone();
        async move { grpc.generate("Hello", &greedy(1)).await.is_ok() }
    })
    .await;

    // A shard failing mid-stream ends the stream with ABORTED (`generation`).
    let mut stream = grpc.generate_stream("Hello", &long).await.expect("stream");
    stream.next().await.expect("first token").expect("token");
    d.shards[1].fail_next.store(true, Ordering::SeqCst);
    let last = stream.fold(None, |_, message| async move { Some(message) }).await;
    let (code, error_type, message) = grpc_error(last.expect("an end").expect_err("failed"));
    assert_eq!((code, error_type.as_deref()), (Code::Aborted, Some("generation")));
    assert!(message.contains("injected failure on rank 1"), "{message}");

    // A unary call whose client gives up is cancelled too.
    let mut impatient = grpc.clone();
    let call = tokio::spawn(async move { impatient.generate("Hello", &greedy(1500)).await });
    common::eventually("the unary request is generating", DEADLINE, || async {
        d.shards.iter().all(|s| !s.live().is_empty())
    })
    .await;
    call.abort();
    common::eventually("the abandoned unary request is cancelled", DEADLINE, || async {
        d.shards.iter().all(|s| s.live().is_empty())
    })
    .await;
    d.assert_no_violations();
}

#[tokio::test]
async fn api_keys_guard_every_call_but_health() {
    const KEY: &str = "grpc-test-key-0123";
    let d = Deployment::start(Setup {
        flags: vec!["--api-key".into(), KEY.into()],
        ..Setup::default()
    })
    .await;
    let (rest, mut anonymous) = clients(&d).await;
    anonymous.health().await.expect("Health is public, as REST /health");
    // The REST client sends its key as `X-API-Key`.
    let refused = rest.generate("Hello", &greedy(1)).await.expect_err("no key");
    assert_eq!(refused.error_type(), Some("unauthorized"));
    let rest = rest.with_api_key(KEY);
    rest.generate("Hello", &greedy(1)).await.expect("REST with the key");
    let unauthorized = |error: Error| {
        let (code, error_type, message) = grpc_error(error);
        assert_eq!(
            (code, error_type.as_deref()),
            (Code::Unauthenticated, Some("unauthorized"))
        );
        assert!(!message.contains(KEY), "{message}");
    };
    unauthorized(anonymous.generate("Hello", &greedy(1)).await.expect_err("no key"));
    unauthorized(
        anonymous
            .generate_stream("Hello", &greedy(1))
            .await
            .err()
            .expect("no key"),
    );
    unauthorized(anonymous.tokenize("Hello", true).await.expect_err("no key"));
    unauthorized(anonymous.list_adapters().await.expect_err("no key"));
    let mut wrong = anonymous.clone().with_api_key("not-the-key").expect("ascii");
    unauthorized(wrong.generate("Hello", &greedy(1)).await.expect_err("wrong key"));

    let mut keyed = anonymous.clone().with_api_key(KEY).expect("ascii");
    keyed.generate("Hello", &greedy(1)).await.expect("x-api-key accepted");
    assert_eq!(
        collect(keyed.generate_stream("Hello", &greedy(2)).await.expect("stream"))
            .await
            .len(),
        2
    );
    keyed.tokenize("Hello", true).await.expect("tokenize");
    keyed.list_adapters().await.expect("list");

    // As on REST: a key in `authorization: Bearer` is not a hub token; with the key in `x-api-key`,
    // `authorization: Bearer` is the hub token.
    for (id, metadata, hub_token) in [
        ("org/bearer-key", vec![("authorization", format!("Bearer {KEY}"))], None),
        (
            "org/key-and-token",
            vec![
                ("x-api-key", KEY.to_string()),
                ("authorization", "Bearer hf_hub".to_string()),
            ],
            Some("hf_hub".to_string()),
        ),
    ] {
        let mut request = tonic::Request::new(pb::GenerateRequest {
            inputs: "Hello".into(),
            parameters: Some(pb::GenerateParameters {
                adapter_id: Some(id.into()),
                max_new_tokens: Some(1),
                ..Default::default()
            }),
        });
        for (name, value) in metadata {
            request
                .metadata_mut()
                .insert(name, value.parse().expect("metadata value"));
        }
        anonymous.raw().generate(request).await.expect(id);
        assert_eq!(d.hub.tokens(id), [hub_token], "{id}: the token the hub saw");
    }
}
