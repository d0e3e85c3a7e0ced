//! Prefill's mixed-step fields: `decode_running` advances the running batch in the same call,
//! `max_prompt_tokens` runs prompts in chunks (a sequence mid-prefill gets nothing and is listed in
//! `prefilling_ids`), Decode skips prefilling sequences, FilterBatch drops one mid-prefill, and every
//! token is the one of whole-prompt Prefill then Decode, with its logprob and the prompt logprobs within
//! 1e-4 (a product's rounding depends on how many rows its batch has).

use super::*;

/// `(token, logprob)` of a generation.
fn bits(g: &pb::Generation) -> (u32, f32) {
    let t = g.token.unwrap();
    (t.id, t.logprob)
}

/// The same tokens, each logprob within 1e-4 of the other's (NaN where the other is NaN).
fn assert_close(got: &[(u32, f32)], want: &[(u32, f32)], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.0, w.0, "{what}: token");
        let same = (g.1.is_nan() && w.1.is_nan()) || (g.1 - w.1).abs() <= 1e-4;
        assert!(same, "{what}: token {} logprob {} vs {}", g.0, g.1, w.1);
    }
}

fn step(requests: Vec<pb::Request>, decode_running: bool, max_prompt_tokens: u32) -> Request<pb::PrefillRequest> {
    Request::new(pb::PrefillRequest {
        requests,
        decode_running,
        max_prompt_tokens,
    })
}

fn ids(gens: &[pb::Generation]) -> Vec<u64> {
    gens.iter().map(|g| g.request_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_steps_chunk_prompts_and_decode_the_running_batch() {
    let svc = server(gated().0, 4).await;
    let with_logprobs = |mut r: pb::Request| {
        r.prefill_logprobs = true;
        r
    };
    // A runs; B (prompt logprobs) and C join in chunks of 4 prompt tokens while A decodes.
    let a = svc
        .prefill(step(vec![sequence(1, 0, "")], false, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&a.generations), vec![1]);
    assert!(a.prefilling_ids.is_empty());
    let mut got_a = vec![bits(&a.generations[0])];

    let s1 = svc
        .prefill(step(
            vec![with_logprobs(sequence(2, 20, "")), sequence(3, 40, "")],
            true,
            4,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&s1.generations), vec![1], "only the running sequence gets a token");
    assert_eq!(s1.prefilling_ids, vec![2, 3]);
    got_a.push(bits(&s1.generations[0]));

    let s2 = svc.prefill(step(vec![], true, 4)).await.unwrap().into_inner();
    assert_eq!(ids(&s2.generations), vec![1]);
    assert_eq!(s2.prefilling_ids, vec![2, 3]);
    got_a.push(bits(&s2.generations[0]));

    // Decode leaves the prefilling sequences alone.
    let d = svc
        .decode(Request::new(pb::DecodeRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&d.generations), vec![1]);
    got_a.push(bits(&d.generations[0]));

    // B's last 2 prompt tokens and C's first 2: B's first token, with its 10 prompt logprobs.
    let s3 = svc.prefill(step(vec![], true, 4)).await.unwrap().into_inner();
    assert_eq!(ids(&s3.generations), vec![1, 2]);
    assert_eq!(s3.prefilling_ids, vec![3]);
    got_a.push(bits(&s3.generations[0]));
    let b_first = s3.generations[1].clone();
    assert_eq!(b_first.prefill_tokens.len(), 10);
    assert!(b_first.prefill_tokens[0].logprob.is_nan());

    // C is cancelled mid-prefill: FilterBatch drops it; the next mixed step runs A and B only.
    let f = svc
        .filter_batch(Request::new(pb::FilterBatchRequest { keep_ids: vec![1, 2] }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.remaining, 2);
    let s4 = svc.prefill(step(vec![], true, 4)).await.unwrap().into_inner();
    assert_eq!(ids(&s4.generations), vec![1, 2]);
    assert!(s4.prefilling_ids.is_empty());
    got_a.push(bits(&s4.generations[0]));
    let got_b = [bits(&b_first), bits(&s4.generations[1])];

    // The same sequences through whole-prompt Prefill and Decode on a fresh shard, one at a time.
    let fresh = server(gated().0, 4).await;
    let want_a: Vec<(u32, f32)> = generate(&fresh, sequence(1, 0, ""), 5)
        .await
        .into_iter()
        .map(|(t, lp)| (t, f32::from_bits(lp)))
        .collect();
    assert_close(&got_a, &want_a, "the running sequence");
    fresh
        .filter_batch(Request::new(pb::FilterBatchRequest { keep_ids: vec![] }))
        .await
        .unwrap();
    let plain = fresh
        .prefill(step(vec![with_logprobs(sequence(2, 20, ""))], false, 0))
        .await
        .unwrap()
        .into_inner();
    let want_b = &plain.generations[0];
    let prompt =
        |g: &pb::Generation| -> Vec<(u32, f32)> { g.prefill_tokens.iter().map(|t| (t.id, t.logprob)).collect() };
    assert_close(&prompt(&b_first), &prompt(want_b), "prompt logprobs across chunks");
    let next = fresh
        .decode(Request::new(pb::DecodeRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_close(
        &got_b,
        &[bits(want_b), bits(&next.generations[0])],
        "the sequence that joined",
    );
}

/// A Prefill that fails (an adapter that is not loaded) adds none of its requests, and the running
/// sequences it was to decode are left as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_mixed_step_adds_nothing() {
    let svc = server(gated().0, 4).await;
    svc.prefill(step(vec![sequence(1, 0, "")], false, 0)).await.unwrap();
    let err = svc
        .prefill(step(vec![sequence(2, 20, "lora-r8")], true, 4))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let f = svc
        .filter_batch(Request::new(pb::FilterBatchRequest { keep_ids: vec![1, 2] }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.remaining, 1);
}
