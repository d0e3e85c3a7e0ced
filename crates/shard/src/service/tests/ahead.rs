//! Decode steps run ahead (`DecodeRequest.run_ahead`): every sequence gets the tokens it gets without
//! running ahead, in order and none twice, across FilterBatch (a removed sequence's token from the step
//! run ahead is dropped), a Prefill that joins a sequence (the step run ahead comes first in its answer)
//! and the end of a sequence's cache room (no step is run ahead past it).

use super::*;

fn decode(run_ahead: bool) -> Request<pb::DecodeRequest> {
    Request::new(pb::DecodeRequest { run_ahead })
}

fn prefill(requests: Vec<pb::Request>, decode_running: bool) -> Request<pb::PrefillRequest> {
    Request::new(pb::PrefillRequest {
        requests,
        decode_running,
        max_prompt_tokens: if decode_running { 64 } else { 0 },
    })
}

/// Appends each generation's (token, logprob) to its sequence's list.
fn collect(gens: &[pb::Generation], got: &mut HashMap<u64, Vec<(u32, f32)>>) {
    for g in gens {
        let t = g.token.unwrap();
        got.entry(g.request_id).or_default().push((t.id, t.logprob));
    }
}

/// The same tokens as `want`'s first ones (the sequence may have been stopped early), each logprob within
/// 1e-4 (a product's rounding depends on its batch's rows).
fn assert_prefix(got: &[(u32, f32)], want: &[(u32, u32)], what: &str) {
    assert!(
        got.len() <= want.len(),
        "{what}: {} tokens, alone {}",
        got.len(),
        want.len()
    );
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.0, w.0, "{what}: token {i}");
        let lp = f32::from_bits(w.1);
        assert!((g.1 - lp).abs() <= 1e-4, "{what}: token {i} logprob {} vs {lp}", g.1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_run_ahead_give_every_sequence_its_own_tokens() {
    let svc = server(gated().0, 4).await;
    let mut got: HashMap<u64, Vec<(u32, f32)>> = HashMap::new();
    // Two sequences; three decode calls, each running the next step ahead.
    let p = svc
        .prefill(prefill(vec![sequence(1, 0, ""), sequence(2, 10, "")], false))
        .await
        .unwrap();
    collect(&p.into_inner().generations, &mut got);
    for _ in 0..3 {
        let d = svc.decode(decode(true)).await.unwrap().into_inner();
        assert_eq!(d.generations.len(), 2, "one token each");
        collect(&d.generations, &mut got);
    }
    assert!(svc.state.lock().unwrap().ahead.is_some(), "a step was run ahead");
    // Sequence 2 ends: FilterBatch drops it, and its token from the step run ahead with it.
    let f = svc
        .filter_batch(Request::new(pb::FilterBatchRequest { keep_ids: vec![1] }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.remaining, 1);
    let d = svc.decode(decode(true)).await.unwrap().into_inner();
    assert_eq!(
        d.generations.iter().map(|g| g.request_id).collect::<Vec<_>>(),
        vec![1],
        "the filtered sequence's token from the step run ahead is dropped"
    );
    collect(&d.generations, &mut got);
    let before_join = got[&1].len();
    // Sequence 3 joins in a mixed step: the step run ahead comes first (sequence 1 gets two tokens).
    let m = svc
        .prefill(prefill(vec![sequence(3, 20, "")], true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        m.generations.iter().map(|g| g.request_id).collect::<Vec<_>>(),
        vec![1, 1, 3],
        "the step run ahead, then the mixed step"
    );
    collect(&m.generations, &mut got);
    // Sequence 1 has room for 32 tokens (8 blocks of 4): decode until it is full; no step may run ahead
    // past it (that step would fail for want of a slot).
    while got[&1].len() + 10 < 32 {
        let d = svc.decode(decode(true)).await.unwrap().into_inner();
        collect(&d.generations, &mut got);
    }
    {
        let s = svc.state.lock().unwrap();
        let full = s.batch.seqs.iter().find(|q| q.id == 1).unwrap();
        assert!(
            full.tokens.len() <= 33,
            "sequence 1 ran past its room: {} tokens",
            full.tokens.len()
        );
        assert!(
            !s.engine.can_decode(&s.batch),
            "a full sequence leaves no room for a step"
        );
    }
    // The step run ahead (if any) is handed out; then no step may run ahead any more.
    if svc.state.lock().unwrap().ahead.is_some() {
        let d = svc.decode(decode(true)).await.unwrap().into_inner();
        collect(&d.generations, &mut got);
    }
    assert!(svc.state.lock().unwrap().ahead.is_none());

    // Each sequence alone, without running ahead, on a fresh shard.
    for (id, first_block) in [(1, 0), (2, 10), (3, 20)] {
        let fresh = server(gated().0, 4).await;
        let want = generate(&fresh, sequence(id, first_block, ""), 22).await;
        assert_prefix(&got[&id], &want, &format!("sequence {id}"));
    }
    assert_eq!(
        got[&2].len(),
        4,
        "sequence 2: the prefill's token and three decode steps'"
    );
    assert_eq!(
        got[&3].len(),
        got[&1].len() - before_join - 1,
        "sequence 3: a token in every step since it joined (sequence 1 also got the step run ahead)"
    );
    assert_eq!(
        got[&1].len(),
        23,
        "sequence 1 decoded to its room (32 slots hold 33 tokens: the last is not cached)"
    );
}

/// A Prefill that fails keeps the step run ahead for the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_prefill_keeps_the_step_run_ahead() {
    let svc = server(gated().0, 4).await;
    svc.prefill(prefill(vec![sequence(1, 0, "")], false)).await.unwrap();
    let first = svc.decode(decode(true)).await.unwrap().into_inner();
    let err = svc
        .prefill(prefill(vec![sequence(2, 20, "lora-r8")], true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let next = svc.decode(decode(false)).await.unwrap().into_inner();
    assert_eq!(next.generations.len(), 1);
    let fresh = server(gated().0, 4).await;
    let want = generate(&fresh, sequence(1, 0, ""), 2).await;
    assert_eq!(first.generations[0].token.unwrap().id, want[1].0);
    assert_eq!(
        next.generations[0].token.unwrap().id,
        want[2].0,
        "the step run ahead, not a third one"
    );
}

/// A FilterBatch that comes while a step holds the state (as a step run ahead does) answers at once and
/// takes effect before the next step: the next Decode's tokens are the kept sequences' only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // the held lock stands for a step in progress; FilterBatch must not wait on it
async fn a_filter_during_a_step_applies_before_the_next() {
    let svc = server(gated().0, 4).await;
    svc.prefill(prefill(vec![sequence(1, 0, ""), sequence(2, 10, "")], false))
        .await
        .unwrap();
    svc.decode(decode(true)).await.unwrap();
    let held = svc.state.lock().unwrap();
    let f = svc
        .filter_batch(Request::new(pb::FilterBatchRequest { keep_ids: vec![2] }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.remaining, 1, "the ids kept, while the state is held");
    assert_eq!(held.batch.len(), 2, "not applied under the step");
    drop(held);
    for _ in 0..2 {
        let d = svc.decode(decode(true)).await.unwrap().into_inner();
        assert_eq!(d.generations.iter().map(|g| g.request_id).collect::<Vec<_>>(), vec![2]);
    }
    assert_eq!(svc.state.lock().unwrap().batch.len(), 1);
}
