//! Test harness: in-process fake shards (tonic servers on temporary Unix sockets, deterministic tokens:
//! next = (last + 1) % vocab) and the real router application served on 127.0.0.1:0, spoken to over
//! HTTP with reqwest. Waiting is done by polling with a deadline, never by sleeping.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use lorax_proto::shard::v1::shard_service_server::{ShardService, ShardServiceServer};
use lorax_proto::shard::v1::{
    ClearCacheRequest, ClearCacheResponse, DecodeRequest, DecodeResponse, DownloadAdapterRequest,
    DownloadAdapterResponse, FilterBatchRequest, FilterBatchResponse, Generation, HealthRequest, HealthResponse,
    InfoRequest, InfoResponse, LoadAdapterRequest, LoadAdapterResponse, OffloadAdapterRequest, OffloadAdapterResponse,
    PrefillRequest, PrefillResponse, ServiceDiscoveryRequest, ServiceDiscoveryResponse, Token, WarmupRequest,
    WarmupResponse,
};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

/// Vocabulary of the fixture tokenizer.
pub const VOCAB: u32 = 32000;
/// `</s>` of the fixture tokenizer.
pub const EOS: u32 = 2;
/// KV block size the fakes report.
pub const BLOCK_SIZE: u32 = 16;

/// One sequence in a fake shard's batch.
#[derive(Debug, Clone)]
struct Seq {
    last: u32,
    blocks: Vec<u32>,
    top_n: u32,
}

/// Observable state of one fake shard.
#[derive(Debug, Default)]
pub struct FakeState {
    batch: Mutex<BTreeMap<u64, Seq>>,
    /// Fail the next Prefill or Decode with "injected failure".
    pub fail_next: AtomicBool,
    /// Leave the first sequence out of the next Decode response (a misbehaving shard).
    pub drop_next_generation: AtomicBool,
    /// Answer Health with an error.
    pub unhealthy: AtomicBool,
    /// Prefill calls seen.
    pub prefills: AtomicUsize,
    /// Decode calls seen.
    pub decodes: AtomicUsize,
    /// Requests ever prefilled.
    pub prefilled_requests: AtomicUsize,
    /// Most sequences ever in the batch at once.
    pub max_batch: AtomicUsize,
    /// Block-table errors detected (double allocation, too few blocks).
    pub block_errors: AtomicUsize,
}

impl FakeState {
    /// Ids of the sequences in the batch.
    pub fn live(&self) -> Vec<u64> {
        self.batch.lock().expect("lock").keys().copied().collect()
    }
}

/// A fake shard.
#[derive(Clone)]
struct FakeShard {
    state: Arc<FakeState>,
    rank: u32,
    urls: Vec<String>,
    num_blocks: u32,
    step_delay: Duration,
}

fn next_token(last: u32, offset: u32) -> u32 {
    (last + 1 + offset) % VOCAB
}

impl FakeShard {
    fn generation(id: u64, seq: &Seq, prefill: Option<&[u32]>) -> Generation {
        let token = next_token(seq.last, 0);
        Generation {
            request_id: id,
            token: Some(Token {
                id: token,
                logprob: -0.25,
            }),
            top_tokens: (0..seq.top_n)
                .map(|i| Token {
                    id: next_token(seq.last, i),
                    logprob: -0.25 - i as f32,
                })
                .collect(),
            prefill_tokens: prefill
                .map(|ids| {
                    ids.iter()
                        .enumerate()
                        .map(|(i, &id)| Token {
                            id,
                            logprob: if i == 0 { f32::NAN } else { -1.0 },
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn check_failure(&self) -> Result<(), Status> {
        if self.state.fail_next.swap(false, Ordering::SeqCst) {
            return Err(Status::internal(format!("injected failure on rank {}", self.rank)));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl ShardService for FakeShard {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            model_id: "fake".into(),
            architecture: "llama".into(),
            vocab_size: VOCAB,
            max_position_embeddings: 4096,
            eos_token_ids: vec![EOS],
            bos_token_id: Some(1),
            device: "cpu (fake)".into(),
            dtype: "float32".into(),
            block_size: BLOCK_SIZE,
            num_blocks: self.num_blocks,
            rank: self.rank,
            world_size: self.urls.len() as u32,
            supports_adapters: false,
        }))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        if self.state.unhealthy.load(Ordering::SeqCst) {
            return Err(Status::unavailable("fake shard is unhealthy"));
        }
        Ok(Response::new(HealthResponse {}))
    }

    async fn service_discovery(
        &self,
        _: Request<ServiceDiscoveryRequest>,
    ) -> Result<Response<ServiceDiscoveryResponse>, Status> {
        Ok(Response::new(ServiceDiscoveryResponse {
            urls: self.urls.clone(),
        }))
    }

    async fn clear_cache(&self, _: Request<ClearCacheRequest>) -> Result<Response<ClearCacheResponse>, Status> {
        self.state.batch.lock().expect("lock").clear();
        Ok(Response::new(ClearCacheResponse {}))
    }

    async fn warmup(&self, request: Request<WarmupRequest>) -> Result<Response<WarmupResponse>, Status> {
        Ok(Response::new(WarmupResponse {
            prefill_tokens: request.into_inner().max_prefill_tokens,
        }))
    }

    async fn prefill(&self, request: Request<PrefillRequest>) -> Result<Response<PrefillResponse>, Status> {
        self.state.prefills.fetch_add(1, Ordering::SeqCst);
        self.check_failure()?;
        let mut batch = self.state.batch.lock().expect("lock");
        let mut used: HashSet<u32> = batch.values().flat_map(|s| s.blocks.iter().copied()).collect();
        let mut generations = Vec::new();
        for r in request.into_inner().requests {
            let needed = (r.input_ids.len() as u32 + 1).div_ceil(BLOCK_SIZE) as usize;
            if r.blocks.len() < needed
                || r.blocks.iter().any(|b| !used.insert(*b) || *b >= self.num_blocks)
                || batch.contains_key(&r.id)
            {
                self.state.block_errors.fetch_add(1, Ordering::SeqCst);
                return Err(Status::invalid_argument(format!(
                    "bad block table for request {}",
                    r.id
                )));
            }
            let seq = Seq {
                last: *r.input_ids.last().expect("non-empty prompt"),
                blocks: r.blocks.clone(),
                top_n: r.top_n_tokens,
            };
            let prompt = r.prefill_logprobs.then_some(r.input_ids.as_slice());
            generations.push(Self::generation(r.id, &seq, prompt));
            batch.insert(
                r.id,
                Seq {
                    last: next_token(seq.last, 0),
                    ..seq
                },
            );
            self.state.prefilled_requests.fetch_add(1, Ordering::SeqCst);
        }
        self.state.max_batch.fetch_max(batch.len(), Ordering::SeqCst);
        Ok(Response::new(PrefillResponse {
            generations,
            forward_ns: 1000,
        }))
    }

    async fn decode(&self, _: Request<DecodeRequest>) -> Result<Response<DecodeResponse>, Status> {
        self.state.decodes.fetch_add(1, Ordering::SeqCst);
        // Simulated forward-pass time (not synchronisation: tests never wait on it).
        if !self.step_delay.is_zero() {
            tokio::time::sleep(self.step_delay).await;
        }
        self.check_failure()?;
        let mut batch = self.state.batch.lock().expect("lock");
        let mut generations = Vec::new();
        let mut drop_one = self.state.drop_next_generation.swap(false, Ordering::SeqCst);
        for (&id, seq) in batch.iter_mut() {
            if std::mem::take(&mut drop_one) {
                continue;
            }
            generations.push(Self::generation(id, seq, None));
            seq.last = next_token(seq.last, 0);
        }
        Ok(Response::new(DecodeResponse {
            generations,
            forward_ns: 1000,
        }))
    }

    async fn filter_batch(
        &self,
        request: Request<FilterBatchRequest>,
    ) -> Result<Response<FilterBatchResponse>, Status> {
        let keep: HashSet<u64> = request.into_inner().keep_ids.into_iter().collect();
        let mut batch = self.state.batch.lock().expect("lock");
        batch.retain(|id, _| keep.contains(id));
        Ok(Response::new(FilterBatchResponse {
            remaining: batch.len() as u32,
        }))
    }

    async fn download_adapter(
        &self,
        _: Request<DownloadAdapterRequest>,
    ) -> Result<Response<DownloadAdapterResponse>, Status> {
        Err(Status::unimplemented("adapters"))
    }

    async fn load_adapter(&self, _: Request<LoadAdapterRequest>) -> Result<Response<LoadAdapterResponse>, Status> {
        Err(Status::unimplemented("adapters"))
    }

    async fn offload_adapter(
        &self,
        _: Request<OffloadAdapterRequest>,
    ) -> Result<Response<OffloadAdapterResponse>, Status> {
        Err(Status::unimplemented("adapters"))
    }
}

/// Settings of a test deployment.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Number of fake shards.
    pub shards: u32,
    /// KV blocks per shard.
    pub num_blocks: u32,
    /// Simulated time of a decode step.
    pub step_delay: Duration,
    /// Extra router flags.
    pub flags: Vec<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            shards: 2,
            num_blocks: 1024,
            step_delay: Duration::ZERO,
            flags: Vec::new(),
        }
    }
}

/// A running router in front of fake shards.
pub struct Deployment {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// HTTP client.
    pub http: reqwest::Client,
    /// The fakes' states, rank order.
    pub shards: Vec<Arc<FakeState>>,
    _dir: tempfile::TempDir,
}

/// Path of the fixture tokenizer directory.
pub fn tokenizer_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tokenizer"))
}

impl Deployment {
    /// Starts `setup.shards` fake shards and the router.
    pub async fn start(setup: Setup) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths: Vec<PathBuf> = (0..setup.shards)
            .map(|r| dir.path().join(format!("shard-{r}")))
            .collect();
        let urls: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        let mut shards = Vec::new();
        for (rank, path) in paths.iter().enumerate() {
            let state = Arc::new(FakeState::default());
            let fake = FakeShard {
                state: Arc::clone(&state),
                rank: rank as u32,
                urls: urls.clone(),
                num_blocks: setup.num_blocks,
                step_delay: setup.step_delay,
            };
            let listener = UnixListener::bind(path).expect("bind fake shard socket");
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(ShardServiceServer::new(fake))
                    .serve_with_incoming(UnixListenerStream::new(listener)),
            );
            shards.push(state);
        }

        let mut argv: Vec<String> = vec![
            "lorax-router".into(),
            "--master-shard-uds-path".into(),
            urls[0].clone(),
            "--tokenizer-path".into(),
            tokenizer_dir().display().to_string(),
            "--model-id".into(),
            "fake/model".into(),
        ];
        argv.extend(setup.flags.iter().cloned());
        let args = lorax_router::Args::try_parse_from(argv).expect("router flags");
        let app = lorax_router::build_app(&args).await.expect("router starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            base,
            http: reqwest::Client::new(),
            shards,
            _dir: dir,
        }
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("request sent")
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request sent")
    }

    /// The value of an unlabelled metric in /metrics, if present.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.get("/metrics").await.text().await.expect("metrics body");
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

/// Polls `check` until it returns true, failing after `deadline`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < until, "timed out waiting for: {what}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads server-sent events from a streaming response.
pub struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buffer: Vec<u8>,
}

impl SseReader {
    /// Wraps a 200 SSE response.
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            stream: response.bytes_stream().boxed(),
            buffer: Vec::new(),
        }
    }

    /// The next `data:` payload as JSON; `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<serde_json::Value> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let event = String::from_utf8(event).expect("utf-8 event");
                let data: String = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                return Some(serde_json::from_str(&data).expect("event is JSON"));
            }
            let chunk = self.stream.next().await?.expect("stream chunk");
            self.buffer.extend_from_slice(&chunk);
        }
    }

    /// Every remaining event.
    pub async fn collect(mut self) -> Vec<serde_json::Value> {
        let mut events = Vec::new();
        while let Some(e) = self.next().await {
            events.push(e);
        }
        events
    }
}
