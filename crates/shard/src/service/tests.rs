//! The service's adapter loading against a CPU engine whose uploads (after the read, or beside it) wait
//! for the test's word: decode steps complete while an upload is in progress (the upload holds no engine
//! lock), the loaded adapter serves exactly as one loaded into an engine directly, concurrent loads keep
//! one copy of an adapter and the slot limit, and a download that also loads does so when a slot is
//! free.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use lorax_engine::backend::{AttnMeta, LoraSegment};
use lorax_engine::comm::{Communicator, SingleRank};
use lorax_engine::lora::HostAdapter;
use lorax_engine::weights::HostTensor;
use lorax_engine::{CpuBackend, CpuTensor, LoadFormat};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::*;

/// The CPU backend, except that each `upload_many` and each `begin_file_upload` says it started, then
/// waits for a release.
struct Gated {
    started: UnboundedSender<()>,
    release: std::sync::Mutex<mpsc::Receiver<()>>,
    /// While set, uploads fail as out of device memory (without waiting) and none runs beside a read.
    oom: Arc<std::sync::atomic::AtomicBool>,
}

/// The test's ends of a [`Gated`] backend.
struct Gate {
    started: UnboundedReceiver<()>,
    release: mpsc::Sender<()>,
    oom: Arc<std::sync::atomic::AtomicBool>,
}

fn gated() -> (Gated, Gate) {
    let (started_tx, started) = unbounded_channel();
    let (release, release_rx) = mpsc::channel();
    let oom = Arc::new(std::sync::atomic::AtomicBool::new(false));
    (
        Gated {
            started: started_tx,
            release: std::sync::Mutex::new(release_rx),
            oom: Arc::clone(&oom),
        },
        Gate { started, release, oom },
    )
}

impl Backend for Gated {
    type Tensor = CpuTensor;
    type LoraIndex = ();
    type LoraStep = ();

    fn name(&self) -> String {
        "gated cpu".into()
    }
    fn weight(&self, t: &HostTensor<'_>) -> lorax_engine::Result<CpuTensor> {
        CpuBackend.weight(t)
    }
    fn upload_many(&self, tensors: &[HostTensor<'_>]) -> lorax_engine::Result<Vec<CpuTensor>> {
        if self.oom.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(EngineError::DeviceMemory("CUDA allocating 4096 bytes".into()));
        }
        let _ = self.started.send(());
        self.release.lock().unwrap().recv().unwrap();
        CpuBackend.upload_many(tensors)
    }
    fn begin_file_upload(&self) -> Option<Box<dyn lorax_engine::backend::FileUpload<CpuTensor> + '_>> {
        static CPU: CpuBackend = CpuBackend;
        if self.oom.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        let _ = self.started.send(());
        self.release.lock().unwrap().recv().unwrap();
        CPU.begin_file_upload()
    }
    fn tensor_from_f32(&self, shape: &[usize], data: &[f32]) -> lorax_engine::Result<CpuTensor> {
        CpuBackend.tensor_from_f32(shape, data)
    }
    fn to_f32(&self, t: &CpuTensor) -> lorax_engine::Result<Vec<f32>> {
        CpuBackend.to_f32(t)
    }
    fn zeros(&self, shape: &[usize]) -> lorax_engine::Result<CpuTensor> {
        CpuBackend.zeros(shape)
    }
    fn shape<'a>(&self, t: &'a CpuTensor) -> &'a [usize] {
        &t.shape
    }
    fn embedding(&self, table: &CpuTensor, ids: &[u32]) -> lorax_engine::Result<CpuTensor> {
        CpuBackend.embedding(table, ids)
    }
    fn linear(&self, x: &CpuTensor, w: &CpuTensor, bias: Option<&CpuTensor>) -> lorax_engine::Result<CpuTensor> {
        CpuBackend.linear(x, w, bias)
    }
    fn rms_norm(&self, x: &CpuTensor, w: &CpuTensor, eps: f32) -> lorax_engine::Result<CpuTensor> {
        CpuBackend.rms_norm(x, w, eps)
    }
    fn add_rms_norm(
        &self,
        residual: &mut CpuTensor,
        x: &CpuTensor,
        w: &CpuTensor,
        eps: f32,
    ) -> lorax_engine::Result<CpuTensor> {
        CpuBackend.add_rms_norm(residual, x, w, eps)
    }
    fn add_assign(&self, dst: &mut CpuTensor, src: &CpuTensor) -> lorax_engine::Result<()> {
        CpuBackend.add_assign(dst, src)
    }
    fn silu_mul(&self, gate_up: &CpuTensor) -> lorax_engine::Result<CpuTensor> {
        CpuBackend.silu_mul(gate_up)
    }
    fn rope_kv_write(
        &self,
        qkv: &CpuTensor,
        k_cache: &mut CpuTensor,
        v_cache: &mut CpuTensor,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &[f32],
        slots: &[u32],
    ) -> lorax_engine::Result<CpuTensor> {
        CpuBackend.rope_kv_write(qkv, k_cache, v_cache, head_dim, positions, inv_freq, slots)
    }
    fn concat_rows(&self, parts: &[&CpuTensor]) -> lorax_engine::Result<CpuTensor> {
        CpuBackend.concat_rows(parts)
    }
    fn attention(
        &self,
        q: &CpuTensor,
        k_cache: &CpuTensor,
        v_cache: &CpuTensor,
        meta: &AttnMeta<'_>,
    ) -> lorax_engine::Result<CpuTensor> {
        CpuBackend.attention(q, k_cache, v_cache, meta)
    }
    fn lora(
        &self,
        y: &mut CpuTensor,
        x: &CpuTensor,
        segments: &[LoraSegment<'_, CpuTensor>],
    ) -> lorax_engine::Result<()> {
        CpuBackend.lora(y, x, segments)
    }
    fn all_reduce_sum(&self, t: &mut CpuTensor, comm: &dyn Communicator) -> lorax_engine::Result<()> {
        CpuBackend.all_reduce_sum(t, comm)
    }
    /// Row counts to warm, as a device backend names them (the CPU backend names none).
    fn decode_warmup_rows(&self) -> Vec<usize> {
        vec![16, 8, 4, 2, 1]
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> lorax_engine::Result<CpuTensor> {
        CpuBackend.gather_rows(x, rows)
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

const BLOCK: u32 = 4;

async fn server(backend: Gated, device_slots: usize) -> Arc<ShardServer<Gated>> {
    server_in(backend, device_slots, &fixtures().join("adapters")).await
}

/// [`server`] with local adapters under `root`.
async fn server_in(backend: Gated, device_slots: usize, root: &std::path::Path) -> Arc<ShardServer<Gated>> {
    let cfg = ShardConfig {
        model_dir: fixtures().join("models/llama"),
        model_id: "tiny-llama".into(),
        rank: 0,
        world_size: 1,
        num_blocks: 256,
        block_size: BLOCK,
        urls: vec![],
        adapters: AdapterSettings {
            local_roots: adapters::canonical_roots(&[root.to_path_buf()]).unwrap(),
            max_rank: 128,
            host_cache_bytes: 1 << 30,
            device_slots,
        },
        download_timeout: Duration::from_secs(30),
        dtype: DType::F32,
        comm: Arc::new(SingleRank),
        load_format: LoadFormat::Safetensors,
    };
    Arc::new(ShardServer::load(cfg, move || Ok(backend)).await.unwrap())
}

fn load_request(id: &str) -> Request<pb::LoadAdapterRequest> {
    Request::new(pb::LoadAdapterRequest {
        adapter_id: id.into(),
        adapter_source: "local".into(),
    })
}

/// Sequence `id` with a 10-token prompt (room for 30 tokens in blocks from `first_block`) on `adapter`.
fn sequence(id: u64, first_block: u32, adapter: &str) -> pb::Request {
    pb::Request {
        id,
        input_ids: (0..10).map(|i| (i * 17 + 3 + id as u32) % 200).collect(),
        blocks: (first_block..first_block + 30 / BLOCK + 1).collect(),
        adapter_id: adapter.into(),
        adapter_source: if adapter.is_empty() {
            String::new()
        } else {
            "local".into()
        },
        ..Default::default()
    }
}

fn loaded_keys(svc: &ShardServer<Gated>) -> Vec<String> {
    let mut keys = lock_state(&svc.state, &svc.deferred_keep, &svc.slots)
        .unwrap()
        .engine
        .adapter_keys();
    keys.sort();
    keys
}

/// The tokens and logprob bits of `r`'s prefill and `steps` decode steps, alone in a batch.
async fn generate(svc: &ShardServer<Gated>, r: pb::Request, steps: usize) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let take = |g: &[pb::Generation], out: &mut Vec<(u32, u32)>| {
        let t = g[0].token.unwrap();
        out.push((t.id, t.logprob.to_bits()));
    };
    let p = svc
        .prefill(Request::new(pb::PrefillRequest {
            requests: vec![r],
            ..Default::default()
        }))
        .await
        .unwrap();
    take(&p.into_inner().generations, &mut out);
    for _ in 0..steps {
        let d = svc.decode(Request::new(pb::DecodeRequest::default())).await.unwrap();
        take(&d.into_inner().generations, &mut out);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decode_completes_while_an_adapter_uploads() {
    let (backend, mut gate) = gated();
    let svc = server(backend, 4).await;
    let base = svc
        .prefill(Request::new(pb::PrefillRequest {
            requests: vec![sequence(1, 0, "")],
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(base.into_inner().generations.len(), 1);
    let loading = tokio::spawn({
        let svc = Arc::clone(&svc);
        async move { svc.load_adapter(load_request("lora-r8")).await }
    });
    gate.started.recv().await.unwrap();
    // The upload now waits for the release; decode steps of the running batch must not.
    for _ in 0..3 {
        let step = tokio::time::timeout(
            Duration::from_secs(30),
            svc.decode(Request::new(pb::DecodeRequest::default())),
        )
        .await
        .expect("a decode step waited for the adapter upload")
        .unwrap();
        assert_eq!(step.into_inner().generations.len(), 1);
    }
    assert!(
        !loading.is_finished(),
        "the load finished before its upload was released"
    );
    assert!(loaded_keys(&svc).is_empty());
    gate.release.send(()).unwrap();
    let bytes = loading.await.unwrap().unwrap().into_inner().device_bytes;
    assert!(bytes > 0);
    assert_eq!(loaded_keys(&svc), vec!["local:lora-r8".to_string()]);

    // The adapter serves as one loaded into an engine directly (alone in the batch, both times).
    svc.filter_batch(Request::new(pb::FilterBatchRequest { keep_ids: vec![] }))
        .await
        .unwrap();
    let got = generate(&svc, sequence(2, 100, "lora-r8"), 4).await;
    let mut e = Engine::load(
        CpuBackend,
        &fixtures().join("models/llama"),
        CacheConfig {
            num_blocks: 256,
            block_size: BLOCK as usize,
        },
    )
    .unwrap();
    let host = HostAdapter::load(&fixtures().join("adapters/lora-r8"), e.config(), 128).unwrap();
    assert_eq!(e.load_adapter("local:lora-r8", &host).unwrap() as u64, bytes);
    let r = sequence(2, 100, "lora-r8");
    let mut batch = Batch::default();
    let mut want = Vec::new();
    let new = NewSequence {
        id: 2,
        input_ids: r.input_ids,
        block_table: r.blocks,
        params: sampling(None, 0),
        prefill_logprobs: false,
        prefill_top_n: 0,
        adapter: Some("local:lora-r8".into()),
    };
    for g in e.prefill(&mut batch, vec![new]).unwrap() {
        want.push((g.choice.token, g.choice.logprob.to_bits()));
    }
    for _ in 0..4 {
        for g in e.decode(&mut batch).unwrap() {
            want.push((g.choice.token, g.choice.logprob.to_bits()));
        }
    }
    assert_eq!(got, want);
    let base = generate(&svc, sequence(3, 200, ""), 0).await;
    assert_ne!(base[0], got[0], "the adapter changes nothing");
}

/// Two loads of one adapter at once: both upload (neither was loaded when they started), one inserts,
/// the other's copy is dropped and it answers 0 bytes. Two loads of different adapters for the last slot:
/// the first claims it, the second is refused at once, before reading or uploading anything. A load of a
/// loaded adapter uploads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_loads_keep_one_copy_and_the_slot_limit() {
    let (backend, mut gate) = gated();
    let svc = server(backend, 2).await;
    let load = |id: &'static str| {
        let svc = Arc::clone(&svc);
        tokio::spawn(async move { svc.load_adapter(load_request(id)).await })
    };
    let (a, b) = (load("lora-r8"), load("lora-r8"));
    gate.started.recv().await.unwrap();
    gate.started.recv().await.unwrap();
    gate.release.send(()).unwrap();
    gate.release.send(()).unwrap();
    let mut bytes = [
        a.await.unwrap().unwrap().into_inner().device_bytes,
        b.await.unwrap().unwrap().into_inner().device_bytes,
    ];
    bytes.sort_unstable();
    assert_eq!(bytes[0], 0);
    assert!(bytes[1] > 0);
    assert_eq!(loaded_keys(&svc), vec!["local:lora-r8".to_string()]);

    // Already loaded: answered without an upload.
    let again = svc.load_adapter(load_request("lora-r8")).await.unwrap();
    assert_eq!(again.into_inner().device_bytes, 0);
    assert!(gate.started.try_recv().is_err(), "a loaded adapter was uploaded again");

    // One slot left: a load in flight holds it, so a second adapter is refused before it uploads.
    let c = load("lora-r16-all");
    gate.started.recv().await.unwrap();
    let refused = svc.load_adapter(load_request("rslora-r16-patterns")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(gate.started.try_recv().is_err(), "the refused load uploaded");
    gate.release.send(()).unwrap();
    assert!(c.await.unwrap().unwrap().into_inner().device_bytes > 0);
    assert_eq!(loaded_keys(&svc).len(), 2);

    // Full: refused before anything is read or uploaded.
    let full = svc.load_adapter(load_request("lora-r64-regex")).await.unwrap_err();
    assert_eq!(full.code(), tonic::Code::ResourceExhausted);
    assert!(gate.started.try_recv().is_err());
}

/// A DownloadAdapter of an adapter whose files are unchanged since its parse takes that parse from the
/// host tier (a chat template's fetch, a request with another token). Once a file is rewritten the next
/// one parses again, and so does every one while a file was modified in the last 2 s (a rewrite within
/// a timestamp tick would leave the stamp equal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_of_unchanged_files_take_the_parse_and_rewritten_files_are_parsed_again() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    std::fs::create_dir(&dir).unwrap();
    let weights = dir.join("adapter_model.safetensors");
    let age = |path: &std::path::Path, secs: u64| {
        let t = std::time::SystemTime::now() - Duration::from_secs(secs);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    };
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixtures().join("adapters/lora-r8").join(f), dir.join(f)).unwrap();
        age(&dir.join(f), 200);
    }
    let (backend, _gate) = gated();
    let svc = server_in(backend, 2, root.path()).await;
    let download = || {
        svc.download_adapter(Request::new(pb::DownloadAdapterRequest {
            adapter_id: "a".into(),
            adapter_source: "local".into(),
            ..Default::default()
        }))
    };
    let parsed = || svc.host_tier.get(&adapters::key("local", "a")).unwrap();
    download().await.unwrap();
    let first = parsed();
    download().await.unwrap();
    assert!(Arc::ptr_eq(&first, &parsed()), "unchanged files were parsed again");
    // The same bytes written anew: a new file on disk, modified just now.
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::remove_file(&weights).unwrap();
    std::fs::write(&weights, bytes).unwrap();
    download().await.unwrap();
    let second = parsed();
    assert!(!Arc::ptr_eq(&first, &second), "a rewritten file was not parsed again");
    download().await.unwrap();
    let third = parsed();
    assert!(
        !Arc::ptr_eq(&second, &third),
        "a file modified just now was taken as unchanged"
    );
    // Once the file has been still for a while, its new parse is kept.
    age(&weights, 100);
    download().await.unwrap();
    let fourth = parsed();
    assert!(
        !Arc::ptr_eq(&third, &fourth),
        "the parse before the file settled was kept"
    );
    download().await.unwrap();
    assert!(Arc::ptr_eq(&fourth, &parsed()), "the settled file's parse was not kept");
}

/// An offload that arrives while the adapter is still uploading cancels the load: it answers ABORTED,
/// nothing is inserted, and its slot is free again. A load that fails (no such adapter) frees its slot too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offload_cancels_a_load_in_flight_and_failed_loads_free_their_slot() {
    let (backend, mut gate) = gated();
    let svc = server(backend, 1).await;
    let loading = tokio::spawn({
        let svc = Arc::clone(&svc);
        async move { svc.load_adapter(load_request("lora-r8")).await }
    });
    gate.started.recv().await.unwrap();
    svc.offload_adapter(Request::new(pb::OffloadAdapterRequest {
        adapter_id: "lora-r8".into(),
        adapter_source: "local".into(),
    }))
    .await
    .unwrap();
    gate.release.send(()).unwrap();
    let cancelled = loading.await.unwrap().unwrap_err();
    assert_eq!(cancelled.code(), tonic::Code::Aborted, "{cancelled:?}");
    assert!(loaded_keys(&svc).is_empty());
    assert!(
        svc.slots.lock().unwrap().pending.is_empty(),
        "the cancelled load kept its claim"
    );

    let missing = svc.load_adapter(load_request("no-such-adapter")).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    assert!(
        svc.slots.lock().unwrap().pending.is_empty(),
        "the failed load kept its claim"
    );

    // The one slot is free: a load goes through.
    let next = tokio::spawn({
        let svc = Arc::clone(&svc);
        async move { svc.load_adapter(load_request("lora-r16-all")).await }
    });
    gate.started.recv().await.unwrap();
    gate.release.send(()).unwrap();
    assert!(next.await.unwrap().unwrap().into_inner().device_bytes > 0);
    assert_eq!(loaded_keys(&svc), vec!["local:lora-r16-all".to_string()]);
}

/// Waits for the gated backend's next upload to start; fails (rather than hang) if none starts in a
/// minute.
async fn upload_started(gate: &mut Gate) {
    tokio::time::timeout(Duration::from_secs(60), gate.started.recv())
        .await
        .expect("no upload started")
        .unwrap();
}

/// A DownloadAdapter with `load` puts the adapter on the device when a slot is free (uploaded beside
/// the read, or from the host tier's parse), answers `loaded` without an upload when it is there already,
/// and, with every slot taken, downloads alone and answers `loaded: false` (a LoadAdapter follows later).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn downloads_that_load_fill_a_free_slot_or_leave_the_load_for_later() {
    let (backend, mut gate) = gated();
    let svc = server(backend, 2).await;
    let download = |id: &'static str| {
        let svc = Arc::clone(&svc);
        tokio::spawn(async move {
            svc.download_adapter(Request::new(pb::DownloadAdapterRequest {
                adapter_id: id.into(),
                adapter_source: "local".into(),
                load: true,
                ..Default::default()
            }))
            .await
            .map(Response::into_inner)
        })
    };
    // Not parsed before: uploaded beside its read.
    let first = download("lora-r8");
    upload_started(&mut gate).await;
    gate.release.send(()).unwrap();
    let first = first.await.unwrap().unwrap();
    assert!(first.loaded && first.device_bytes > 0, "{first:?}");
    assert_eq!(first.device_bytes, first.size_bytes);
    let host = svc.host_tier.get(&adapters::key("local", "lora-r8")).unwrap();
    assert_eq!(
        first.upload_bytes,
        host.elements() as u64 * 4,
        "f32 storage on the CPU backend"
    );
    assert_eq!(loaded_keys(&svc), vec!["local:lora-r8".to_string()]);
    // Loaded already: no upload.
    let again = download("lora-r8").await.unwrap().unwrap();
    assert!(again.loaded && again.device_bytes == 0, "{again:?}");
    assert!(gate.started.try_recv().is_err(), "a loaded adapter was uploaded again");
    // Parsed before (a download without load), then a download with load: the host tier's parse goes up.
    svc.download_adapter(Request::new(pb::DownloadAdapterRequest {
        adapter_id: "lora-r16-all".into(),
        adapter_source: "local".into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert!(gate.started.try_recv().is_err(), "a download without load uploaded");
    let parsed = download("lora-r16-all");
    upload_started(&mut gate).await;
    gate.release.send(()).unwrap();
    let parsed = parsed.await.unwrap().unwrap();
    assert!(parsed.loaded && parsed.device_bytes > 0, "{parsed:?}");
    // Every slot taken: downloaded, not loaded, nothing uploaded.
    let full = download("rslora-r16-patterns").await.unwrap().unwrap();
    assert!(
        !full.loaded && full.device_bytes == 0 && full.size_bytes > 0,
        "{full:?}"
    );
    assert!(
        gate.started.try_recv().is_err(),
        "a download with no slot free uploaded"
    );
    assert!(svc
        .host_tier
        .get(&adapters::key("local", "rslora-r16-patterns"))
        .is_some());
    assert_eq!(loaded_keys(&svc).len(), 2);
    assert!(svc.slots.lock().unwrap().pending.is_empty(), "a claim was kept");
    // No device memory left: downloaded, not loaded, said so, and the claim released.
    svc.offload_adapter(Request::new(pb::OffloadAdapterRequest {
        adapter_id: "lora-r16-all".into(),
        adapter_source: "local".into(),
    }))
    .await
    .unwrap();
    gate.oom.store(true, std::sync::atomic::Ordering::SeqCst);
    let refused = download("lora-r64-regex").await.unwrap().unwrap();
    assert!(
        !refused.loaded && refused.load_refused && refused.size_bytes > 0,
        "{refused:?}"
    );
    assert!(
        svc.slots.lock().unwrap().pending.is_empty(),
        "the refused load kept its claim"
    );
    assert_eq!(loaded_keys(&svc).len(), 1);
    gate.oom.store(false, std::sync::atomic::Ordering::SeqCst);
    // The adapter loaded by its download serves as one loaded by LoadAdapter into another server.
    let (other_backend, mut other_gate) = gated();
    let other = server(other_backend, 2).await;
    let load = tokio::spawn({
        let other = Arc::clone(&other);
        async move { other.load_adapter(load_request("lora-r8")).await }
    });
    upload_started(&mut other_gate).await;
    other_gate.release.send(()).unwrap();
    load.await.unwrap().unwrap();
    assert_eq!(
        generate(&svc, sequence(7, 0, "lora-r8"), 3).await,
        generate(&other, sequence(7, 0, "lora-r8"), 3).await
    );
}

/// A load answers while a step holds the engine state (a step run ahead holds it between calls): its
/// upload waits as the slots' `ready`, and the next call that takes the state inserts it, so a Prefill
/// right after the answer finds the adapter. An offload of it then frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loads_answer_while_a_step_holds_the_engine_and_the_next_call_inserts_them() {
    let (backend, mut gate) = gated();
    let svc = server(backend, 2).await;
    // Stands for a step: holds the engine state until told to let go.
    let (held_tx, held_rx) = tokio::sync::oneshot::channel();
    let (let_go, wait) = mpsc::channel::<()>();
    let holder = std::thread::spawn({
        let svc = Arc::clone(&svc);
        move || {
            let _state = svc.state.lock().unwrap();
            held_tx.send(()).unwrap();
            wait.recv().unwrap();
        }
    });
    held_rx.await.unwrap();
    let load = tokio::spawn({
        let svc = Arc::clone(&svc);
        async move { svc.load_adapter(load_request("lora-r8")).await }
    });
    upload_started(&mut gate).await;
    gate.release.send(()).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(60), load)
        .await
        .expect("the load waited for the engine state")
        .unwrap()
        .unwrap();
    assert!(answer.into_inner().device_bytes > 0);
    assert_eq!(
        svc.slots.lock().unwrap().ready.len(),
        1,
        "inserted while the state was held"
    );
    let_go.send(()).unwrap();
    holder.join().unwrap();
    let served = generate(&svc, sequence(3, 0, "lora-r8"), 2).await;
    assert_eq!(served.len(), 3);
    assert!(svc.slots.lock().unwrap().ready.is_empty());
    assert_eq!(loaded_keys(&svc), vec!["local:lora-r8".to_string()]);
    svc.filter_batch(Request::new(pb::FilterBatchRequest { keep_ids: vec![] }))
        .await
        .unwrap();
    svc.offload_adapter(Request::new(pb::OffloadAdapterRequest {
        adapter_id: "lora-r8".into(),
        adapter_source: "local".into(),
    }))
    .await
    .unwrap();
    assert!(loaded_keys(&svc).is_empty());
    assert!(svc.slots.lock().unwrap().loaded.is_empty(), "the offload kept the slot");
}

mod ahead;
mod mixed;

#[tokio::test]
async fn the_decode_warm_up_runs_each_row_count_within_the_cache_and_the_shard_serves_after_it() {
    let (backend, _gate) = gated();
    let svc = server(backend, 4).await;
    let warm = |named: Vec<usize>, num_blocks: usize, block_size: usize| {
        let svc = Arc::clone(&svc);
        async move {
            svc.with_state(move |s| warm_decode_steps(s, named, num_blocks, block_size, 1).map_err(status))
                .await
        }
    };
    // Sequences that stay are decoded at every later row count: 6 steps need 7 positions each (two blocks
    // of the cache's 4 tokens), which one block a sequence would not hold.
    let named = vec![1, 8, 4, 3, 2, 16, 8];
    assert_eq!(
        warm(named.clone(), 256, BLOCK as usize).await.unwrap(),
        [16, 8, 4, 3, 2, 1]
    );
    // As many blocks as the warm-up counts per sequence (7 of one token) are used, so a smaller cache
    // leaves out the row counts it cannot hold: 20 blocks hold 2 such sequences.
    assert_eq!(warm(named.clone(), 20, 1).await.unwrap(), [2, 1]);
    assert!(warm(Vec::new(), 256, BLOCK as usize).await.unwrap().is_empty());
    // Nothing of it stays: a request gets the tokens and logprobs a shard without the warm-up gives it.
    let (fresh, _gate) = gated();
    let fresh = server(fresh, 4).await;
    let request = || sequence(900, 0, "");
    assert_eq!(generate(&svc, request(), 4).await, generate(&fresh, request(), 4).await);
}

#[tokio::test]
async fn the_warmup_call_warms_decode_steps_up_to_the_routers_largest_batch() {
    let (backend, _gate) = gated();
    let svc = server(backend, 4).await;
    let steps = |svc: &ShardServer<Gated>| svc.state.lock().unwrap().engine.decode_times().steps;
    let warmup = |max_decode_rows| {
        Request::new(pb::WarmupRequest {
            max_prefill_tokens: 8,
            max_total_tokens: 64,
            max_decode_rows,
        })
    };
    // Gated names 16, 8, 4, 2 and 1 rows; the router's batches hold at most 5 (5 rows on the CPU).
    let before = steps(&svc);
    svc.warmup(warmup(5)).await.unwrap();
    assert_eq!(steps(&svc) - before, 3);
    // A router that does not say: every row count named.
    let before = steps(&svc);
    svc.warmup(warmup(0)).await.unwrap();
    assert_eq!(steps(&svc) - before, 5);
}

#[test]
fn decode_warmup_plans_each_row_count_once_largest_first_within_the_blocks() {
    assert_eq!(decode_warmup_plan(vec![1, 8, 4, 8, 0, 16], 100), [16, 8, 4, 1]);
    assert_eq!(decode_warmup_plan(vec![256, 248, 8], 250), [248, 8]);
    assert!(decode_warmup_plan(Vec::new(), 100).is_empty());
}

#[test]
fn warmup_pieces_cover_the_largest_step_within_positions_and_blocks() {
    let lens = |p: &[WarmupPiece]| p.iter().map(|p| p.len).collect::<Vec<_>>();
    // A step longer than the model's positions runs as several sequences (4096 + 128 rows at 4096).
    let p = warmup_pieces(4224, 4096, 1000, 16);
    assert_eq!(lens(&p), [4096, 128]);
    assert_eq!(p[0].blocks, (0..256).collect::<Vec<u32>>());
    assert_eq!(p[1].blocks, (256..264).collect::<Vec<u32>>());
    // Pieces are whole blocks but the last, so they fit where one sequence would.
    let p = warmup_pieces(100, 40, 7, 16);
    assert_eq!(lens(&p), [32, 32, 32, 4]);
    let blocks: Vec<u32> = p.iter().flat_map(|p| p.blocks.clone()).collect();
    assert_eq!(blocks, (0..7).collect::<Vec<u32>>(), "distinct, in order");
    // The cache bounds the tokens.
    assert_eq!(lens(&warmup_pieces(500, 4096, 10, 16)), [160]);
    // Fewer positions than a block: one block a piece, as many as there are blocks.
    assert_eq!(lens(&warmup_pieces(50, 8, 3, 16)), [8, 8, 8]);
    assert!(warmup_pieces(0, 4096, 10, 16).is_empty());
}

/// Running out of device memory is a retryable RESOURCE_EXHAUSTED (an adapter offloaded or sequences
/// finished free it), not an internal error; other backend failures stay internal.
#[test]
fn device_memory_exhaustion_is_resource_exhausted() {
    let oom = status(EngineError::DeviceMemory("CUDA allocating 28311552 bytes".into()));
    assert_eq!(oom.code(), tonic::Code::ResourceExhausted, "{oom:?}");
    assert!(oom.message().contains("out of device memory"), "{}", oom.message());
    assert_eq!(
        status(EngineError::Backend("CUDA launch".into())).code(),
        tonic::Code::Internal
    );
}

/// A gate whose outcome the test sets (the read's gate of a streamed load).
#[derive(Debug)]
struct FixedGate(Result<(), String>);

impl lorax_engine::lora::AdapterGate for FixedGate {
    fn done(&self) -> bool {
        self.0.is_ok()
    }
    fn wait_layer(&self, _: usize) -> lorax_engine::Result<()> {
        self.wait_end()
    }
    fn wait_all(&self) -> lorax_engine::Result<()> {
        self.wait_end()
    }
    fn wait_end(&self) -> lorax_engine::Result<()> {
        self.0.clone().map_err(EngineError::Backend)
    }
}

/// A streamed load's outcome: the read's own when it ended, its error kept as the file's (not the gate's
/// copy); a failed gate whose read does not answer (or answers a success, after a stall) is a stall.
#[test]
fn streamed_read_outcomes_tell_the_file_from_a_stall() {
    let grace = Duration::from_millis(50);
    let failed = FixedGate(Err("nothing of its weights came for 30 s".into()));
    // The gate passed: the read's parse.
    let (tx, rx) = mpsc::channel::<lorax_engine::Result<u32>>();
    tx.send(Ok(7)).unwrap();
    assert!(matches!(
        read_outcome(Some(&FixedGate(Ok(()))), &rx, grace),
        ReadOutcome::Read(Ok(7))
    ));
    // The file's NaN failed both: the read's error, which names the tensor.
    let (tx, rx) = mpsc::channel::<lorax_engine::Result<u32>>();
    tx.send(Err(EngineError::InvalidAdapter("w holds values that are NaN".into())))
        .unwrap();
    match read_outcome(Some(&failed), &rx, grace) {
        ReadOutcome::Read(Err(EngineError::InvalidAdapter(m))) => assert!(m.contains("NaN")),
        other => panic!("the file's error was taken for {other:?}"),
    }
    // A stall: nothing on the read's channel (its thread still reads), or a success after the gate failed.
    let (_tx, rx) = mpsc::channel::<lorax_engine::Result<u32>>();
    assert!(matches!(
        read_outcome(Some(&failed), &rx, grace),
        ReadOutcome::Stalled(_)
    ));
    let (tx, rx) = mpsc::channel::<lorax_engine::Result<u32>>();
    tx.send(Ok(7)).unwrap();
    assert!(matches!(
        read_outcome(Some(&failed), &rx, grace),
        ReadOutcome::Stalled(_)
    ));
    // A read thread gone without an answer.
    let (tx, rx) = mpsc::channel::<lorax_engine::Result<u32>>();
    drop(tx);
    assert!(matches!(read_outcome(None, &rx, grace), ReadOutcome::Read(Err(_))));
}

/// A Prefill call with decode rows, behind a decode step launched ahead (the engine's host stand-in for fed
/// steps), serves the decode rows from it and runs no prompt token: the new sequence comes back in `prefilling_ids`
/// with no generation, and the next mixed call gives it the first token a plain prefill gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_behind_a_step_launched_ahead_waits_for_the_next_call() {
    let want = {
        let (backend, _gate) = gated();
        let svc = server(backend, 4).await;
        generate(&svc, sequence(2, 16, ""), 0).await[0]
    };
    let (backend, _gate) = gated();
    let svc = server(backend, 4).await;
    lock_state(&svc.state, &svc.deferred_keep, &svc.slots)
        .unwrap()
        .engine
        .set_feed_on_host(true);
    generate(&svc, sequence(1, 0, ""), 3).await;
    let mixed = |requests| pb::PrefillRequest {
        requests,
        decode_running: true,
        max_prompt_tokens: 64,
    };
    let r = svc
        .prefill(Request::new(mixed(vec![sequence(2, 16, "")])))
        .await
        .unwrap()
        .into_inner();
    let ids = |r: &pb::PrefillResponse| r.generations.iter().map(|g| g.request_id).collect::<Vec<_>>();
    assert_eq!((ids(&r), r.prefilling_ids.clone()), (vec![1], vec![2]));
    let r = svc.prefill(Request::new(mixed(vec![]))).await.unwrap().into_inner();
    assert_eq!((ids(&r), r.prefilling_ids.clone()), (vec![1, 2], vec![]));
    let first = r.generations[1].token.unwrap();
    assert_eq!(first.id, want.0, "the first token of the prompt that waited");
    assert!((first.logprob - f32::from_bits(want.1)).abs() <= 1e-4);
}
