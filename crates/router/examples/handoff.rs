//! What handing a step's tokens to their streams costs on one thread against a rayon fan-out (the
//! scheduler's handling, `Scheduler::handle`, used the fan-out from 16 tokens up until session 29), on an
//! idle and on a busy host: every 6 ms (a decode step) N items, each a little string work and a send to
//! its own stream's channel, the pattern of one token's handling (not the router's code itself, whose
//! detokenising costs more per token). A measurement (bench/NOTES.md, session 29):
//!
//!     cargo run --release -p lorax-router --example handoff
//!
//! `HANDOFF_BUSY` (default `0,2`) threads spin meanwhile, to stand for a host whose cores the benchmark's
//! clients and the shard keep busy.

use std::time::{Duration, Instant};

use rayon::prelude::*;

/// One token's handling, roughly: text for it, then the send that may wake its stream's task.
fn hand(i: usize, tx: &tokio::sync::mpsc::UnboundedSender<String>) -> bool {
    let _ = tx.send(format!("token {i} {}", i * 31));
    i % 1000 == 999
}

/// Milliseconds of each of `rounds` handlings of `n` tokens.
fn handlings(parallel: bool, n: usize, rounds: usize) -> Vec<f64> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut txs = Vec::new();
        for _ in 0..n {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            txs.push(tx);
            tokio::spawn(async move { while rx.recv().await.is_some() {} });
        }
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            tokio::time::sleep(Duration::from_millis(6)).await;
            let t = Instant::now();
            let items: Vec<_> = txs.iter().enumerate().collect();
            let done: Vec<bool> = if parallel {
                items.into_par_iter().map(|(i, tx)| hand(i, tx)).collect()
            } else {
                items.into_iter().map(|(i, tx)| hand(i, tx)).collect()
            };
            std::hint::black_box(done);
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times
    })
}

fn main() {
    let busy: Vec<usize> = std::env::var("HANDOFF_BUSY")
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|_| vec![0, 2]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut spinning = Vec::new();
    for b in busy {
        while spinning.len() < b {
            let stop = std::sync::Arc::clone(&stop);
            spinning.push(std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::black_box((0..1000u64).sum::<u64>());
                }
            }));
        }
        for n in [32, 128] {
            for parallel in [true, false] {
                let mut t = handlings(parallel, n, 400);
                t.sort_by(f64::total_cmp);
                let p = |q: f64| t[((t.len() - 1) as f64 * q) as usize];
                println!(
                    "{} cores, {b} spinning threads, {n} tokens, {}: p50 {:.3} p90 {:.3} p99 {:.3} max {:.3} ms; {} of {} at 3 ms or more",
                    std::thread::available_parallelism().map_or(0, usize::from),
                    if parallel { "rayon fan-out" } else { "one thread" },
                    p(0.5),
                    p(0.9),
                    p(0.99),
                    t[t.len() - 1],
                    t.iter().filter(|&&x| x >= 3.0).count(),
                    t.len()
                );
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinning {
        s.join().expect("spinning thread");
    }
}
