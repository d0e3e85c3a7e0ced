//! The shard call's own latency, apart from the engine step: a client of one running `lorax-shard`
//! (nothing else connected to it) times Health round trips and Prefill calls of one prompt, split as the
//! router's metrics split them (`lorax_batch_shard_{send,handler,return}_duration`): the way there (the
//! shard's receive clock less the call's start), the handler's time around the engine step, and the way
//! back. Each Prefill is followed by a FilterBatch that empties the batch again.
//!
//!     cargo run --release -p lorax-router --example shard_rpc_latency -- SOCKET [PROMPT_TOKENS] [CALLS]
//!
//! Start the shard first, for example on the embedded model (`lorax-launcher` writes it to
//! /tmp/lorax-embedded-VERSION on its first start):
//!
//!     lorax-shard --model-dir /tmp/lorax-embedded-0.1.0 --model-id tiny --uds-prefix /tmp/rpc/shard
//!
//! and pass `/tmp/rpc/shard-0`. Prints the medians (and p90) in microseconds.
#![allow(clippy::unwrap_used, clippy::cast_precision_loss)]

use std::path::PathBuf;
use std::time::Instant;

use lorax_proto::shard::v1::{shard_service_client::ShardServiceClient, FilterBatchRequest, HealthRequest};
use lorax_proto::shard::v1::{PrefillRequest, Request, SamplingParameters};

fn quantiles(name: &str, mut us: Vec<f64>) {
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
    println!("{name:>28}: p50 {:8.1} us, p90 {:8.1} us", at(0.5), at(0.9));
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let socket = PathBuf::from(
        args.next()
            .expect("usage: shard_rpc_latency SOCKET [PROMPT_TOKENS] [CALLS]"),
    );
    let tokens: usize = args.next().map_or(1000, |a| a.parse().unwrap());
    let calls: usize = args.next().map_or(200, |a| a.parse().unwrap());
    let mut c = ShardServiceClient::new(lorax_proto::uds::connect(socket).await.unwrap());

    let mut health = Vec::new();
    for i in 0..calls + 10 {
        let t = Instant::now();
        c.health(HealthRequest {}).await.unwrap();
        if i >= 10 {
            health.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    quantiles("Health round trip", health);

    let blocks = u32::try_from((tokens + 16).div_ceil(16)).unwrap();
    let (mut there, mut handler, mut back, mut total, mut engine) = (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..calls + 10 {
        let request = PrefillRequest {
            requests: vec![Request {
                id: i as u64,
                input_ids: (0..tokens as u32).map(|t| 3 + t * 7 % 200).collect(),
                blocks: (0..blocks).collect(),
                parameters: Some(SamplingParameters::default()),
                ..Default::default()
            }],
            decode_running: false,
            max_prompt_tokens: 0,
        };
        let (t, t_unix) = (Instant::now(), lorax_proto::shard::v1::unix_time_ns());
        let r = c.prefill(request).await.unwrap().into_inner();
        let call = t.elapsed().as_secs_f64() * 1e6;
        c.filter_batch(FilterBatchRequest { keep_ids: vec![] }).await.unwrap();
        if i < 10 {
            continue;
        }
        let send = r.received_unix_ns.saturating_sub(t_unix) as f64 * 1e-3;
        let handler_us = r.handler_ns as f64 * 1e-3;
        let forward_us = r.forward_ns as f64 * 1e-3;
        there.push(send);
        handler.push(handler_us - forward_us);
        back.push(call - send - handler_us);
        engine.push(forward_us);
        total.push(call);
    }
    println!("Prefill of one {tokens}-token prompt, {calls} calls:");
    quantiles("call", total);
    quantiles("engine step", engine);
    quantiles("there (send)", there);
    quantiles("handler less the step", handler);
    quantiles("back (return)", back);
}
