//! The internal gRPC service around one engine. The engine is single-owner state: calls take a mutex
//! and run the forward pass on a blocking thread so the async runtime stays responsive.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lorax_engine::{Batch, CacheConfig, CpuBackend, Engine, EngineError, Generation, NewSequence, SamplingParams};
use lorax_proto::shard::v1 as pb;
use pb::shard_service_server::ShardService;
use tonic::{Request, Response, Status};

/// What a shard is started with.
pub struct ShardConfig {
    pub model_dir: PathBuf,
    pub model_id: String,
    pub rank: u32,
    pub world_size: u32,
    pub num_blocks: u32,
    pub block_size: u32,
    pub urls: Vec<String>,
}

struct State {
    engine: Engine<CpuBackend>,
    batch: Batch,
}

/// The service: the engine and its running batch behind one lock.
pub struct ShardServer {
    state: Arc<Mutex<State>>,
    info: pb::InfoResponse,
    urls: Vec<String>,
}

fn status(e: EngineError) -> Status {
    match e {
        EngineError::InvalidBatch(m) => Status::invalid_argument(m),
        other => Status::internal(other.to_string()),
    }
}

fn poisoned() -> Status {
    Status::internal("the shard's engine state was poisoned by an earlier panic")
}

impl ShardServer {
    /// Load the model (on a blocking thread) and build the service.
    pub async fn load(cfg: ShardConfig) -> anyhow::Result<Self> {
        let dir = cfg.model_dir.clone();
        let cache = CacheConfig {
            num_blocks: cfg.num_blocks as usize,
            block_size: cfg.block_size as usize,
        };
        let engine = tokio::task::spawn_blocking(move || Engine::load(CpuBackend, &dir, cache)).await??;
        let c = engine.config().clone();
        let info = pb::InfoResponse {
            model_id: cfg.model_id,
            architecture: format!("{:?}", c.architecture).to_lowercase(),
            vocab_size: u32::try_from(c.vocab_size)?,
            max_position_embeddings: u32::try_from(c.max_position_embeddings).unwrap_or(u32::MAX),
            eos_token_ids: c.eos_token_ids.clone(),
            bos_token_id: c.bos_token_id,
            device: lorax_engine::Backend::name(&engine.backend),
            dtype: "float32".into(),
            block_size: cfg.block_size,
            num_blocks: cfg.num_blocks,
            rank: cfg.rank,
            world_size: cfg.world_size,
            supports_adapters: false,
        };
        Ok(Self {
            state: Arc::new(Mutex::new(State {
                engine,
                batch: Batch::default(),
            })),
            info,
            urls: cfg.urls,
        })
    }

    async fn with_state<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let state = Arc::clone(&self.state);
        tokio::task::spawn_blocking(move || {
            let mut guard = state.lock().map_err(|_| poisoned())?;
            f(&mut guard)
        })
        .await
        .map_err(|e| Status::internal(format!("shard task failed: {e}")))?
    }
}

fn to_pb(g: Generation) -> pb::Generation {
    pb::Generation {
        request_id: g.id,
        token: Some(pb::Token {
            id: g.choice.token,
            logprob: g.choice.logprob,
        }),
        top_tokens: g
            .choice
            .top
            .into_iter()
            .map(|(id, logprob)| pb::Token { id, logprob })
            .collect(),
        prefill_tokens: g
            .prefill
            .unwrap_or_default()
            .into_iter()
            .map(|t| pb::Token {
                id: t.id,
                logprob: t.logprob.unwrap_or(f32::NAN),
            })
            .collect(),
    }
}

fn sampling(p: Option<pb::SamplingParameters>, top_n: u32) -> SamplingParams {
    let p = p.unwrap_or_default().normalized();
    SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        typical_p: p.typical_p,
        do_sample: p.do_sample,
        repetition_penalty: p.repetition_penalty,
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        seed: p.seed,
        top_n_tokens: top_n,
    }
}

#[tonic::async_trait]
impl ShardService for ShardServer {
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn health(&self, _: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        // The lock being takeable (not poisoned) is the health of this process.
        if self.state.is_poisoned() {
            return Err(poisoned());
        }
        Ok(Response::new(pb::HealthResponse {}))
    }

    async fn service_discovery(
        &self,
        _: Request<pb::ServiceDiscoveryRequest>,
    ) -> Result<Response<pb::ServiceDiscoveryResponse>, Status> {
        Ok(Response::new(pb::ServiceDiscoveryResponse {
            urls: self.urls.clone(),
        }))
    }

    async fn clear_cache(&self, _: Request<pb::ClearCacheRequest>) -> Result<Response<pb::ClearCacheResponse>, Status> {
        self.with_state(|s| {
            s.batch = Batch::default();
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::ClearCacheResponse {}))
    }

    async fn warmup(&self, req: Request<pb::WarmupRequest>) -> Result<Response<pb::WarmupResponse>, Status> {
        let r = req.into_inner();
        let info = self.info.clone();
        let tokens = self
            .with_state(move |s| {
                let cap = (info.num_blocks as usize * info.block_size as usize)
                    .min(info.max_position_embeddings as usize)
                    .min(r.max_prefill_tokens.max(1) as usize);
                let bs = info.block_size as usize;
                let blocks: Vec<u32> = (0..u32::try_from(cap.div_ceil(bs)).unwrap_or(u32::MAX)).collect();
                let ids = vec![info.bos_token_id.unwrap_or(0); cap];
                // A throwaway batch: nothing of it survives the call.
                let mut scratch = Batch::default();
                s.engine
                    .prefill(
                        &mut scratch,
                        vec![NewSequence {
                            id: 0,
                            input_ids: ids,
                            block_table: blocks,
                            params: SamplingParams::default(),
                            prefill_logprobs: false,
                            adapter: None,
                        }],
                    )
                    .map_err(status)?;
                Ok(u32::try_from(cap).unwrap_or(u32::MAX))
            })
            .await?;
        Ok(Response::new(pb::WarmupResponse { prefill_tokens: tokens }))
    }

    async fn prefill(&self, req: Request<pb::PrefillRequest>) -> Result<Response<pb::PrefillResponse>, Status> {
        let reqs = req.into_inner().requests;
        if let Some(r) = reqs.iter().find(|r| !r.adapter_id.is_empty()) {
            return Err(Status::unimplemented(format!(
                "adapter {:?}: LoRA adapters are not supported by this build yet",
                r.adapter_id
            )));
        }
        let news: Vec<NewSequence> = reqs
            .into_iter()
            .map(|r| NewSequence {
                id: r.id,
                input_ids: r.input_ids,
                block_table: r.blocks,
                params: sampling(r.parameters, r.top_n_tokens),
                prefill_logprobs: r.prefill_logprobs,
                adapter: None,
            })
            .collect();
        let (gens, ns) = self
            .with_state(move |s| {
                let t = Instant::now();
                let gens = s.engine.prefill(&mut s.batch, news).map_err(status)?;
                Ok((gens, t.elapsed().as_nanos()))
            })
            .await?;
        Ok(Response::new(pb::PrefillResponse {
            generations: gens.into_iter().map(to_pb).collect(),
            forward_ns: u64::try_from(ns).unwrap_or(u64::MAX),
        }))
    }

    async fn decode(&self, _: Request<pb::DecodeRequest>) -> Result<Response<pb::DecodeResponse>, Status> {
        let (gens, ns) = self
            .with_state(|s| {
                let t = Instant::now();
                let gens = s.engine.decode(&mut s.batch).map_err(status)?;
                Ok((gens, t.elapsed().as_nanos()))
            })
            .await?;
        Ok(Response::new(pb::DecodeResponse {
            generations: gens.into_iter().map(to_pb).collect(),
            forward_ns: u64::try_from(ns).unwrap_or(u64::MAX),
        }))
    }

    async fn filter_batch(
        &self,
        req: Request<pb::FilterBatchRequest>,
    ) -> Result<Response<pb::FilterBatchResponse>, Status> {
        let keep = req.into_inner().keep_ids;
        let remaining = self
            .with_state(move |s| {
                s.batch.filter(&keep);
                Ok(u32::try_from(s.batch.len()).unwrap_or(u32::MAX))
            })
            .await?;
        Ok(Response::new(pb::FilterBatchResponse { remaining }))
    }

    async fn download_adapter(
        &self,
        _: Request<pb::DownloadAdapterRequest>,
    ) -> Result<Response<pb::DownloadAdapterResponse>, Status> {
        Err(Status::unimplemented(
            "LoRA adapters are not supported by this build yet",
        ))
    }

    async fn load_adapter(
        &self,
        _: Request<pb::LoadAdapterRequest>,
    ) -> Result<Response<pb::LoadAdapterResponse>, Status> {
        Err(Status::unimplemented(
            "LoRA adapters are not supported by this build yet",
        ))
    }

    async fn offload_adapter(
        &self,
        _: Request<pb::OffloadAdapterRequest>,
    ) -> Result<Response<pb::OffloadAdapterResponse>, Status> {
        Err(Status::unimplemented(
            "LoRA adapters are not supported by this build yet",
        ))
    }
}
