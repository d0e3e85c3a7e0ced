//! `lorax-bench`: a load generator for the HTTP API and the pieces of a benchmark run.
//!
//! - [`workload`]: who asks what: prompt and output lengths from distributions, the adapter of each request
//!   from a popularity regime (identical, uniform, Zipf(α), all distinct over N adapters).
//! - [`run`]: sends the requests as streams (`/generate_stream`) in a closed loop of fixed concurrency or
//!   with Poisson arrivals, and times each one: time to first token, every inter-token gap, end to end.
//! - [`report`]: throughput and latency percentiles as JSON and as a markdown table.
//! - [`adapters`]: N random PEFT LoRA adapters (rank, targets) for a base model's config.json.

pub mod adapters;
pub mod report;
pub mod run;
pub mod workload;

/// A deterministic random stream (ChaCha20): the same seed gives the same workload.
pub struct Rng(rand_chacha::ChaCha20Rng);

impl Rng {
    /// The stream of `seed`.
    pub fn new(seed: u64) -> Self {
        use rand_core::SeedableRng;
        Self(rand_chacha::ChaCha20Rng::seed_from_u64(seed))
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        use rand_core::Rng as _;
        (self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n.saturating_sub(1))
    }

    /// Exponential with the given mean.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.uniform()).ln()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (1.0 - self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}
