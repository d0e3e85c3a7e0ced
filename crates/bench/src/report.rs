//! Throughput and latency of a run, as JSON and as a markdown table.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::run::Outcome;

/// Mean, percentiles and maximum of a sample, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Values summarised.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Stats {
    /// Summary of `seconds` (reported in milliseconds); nearest-rank percentiles.
    pub fn of(seconds: &[f64]) -> Self {
        if seconds.is_empty() {
            return Self::default();
        }
        let mut v: Vec<f64> = seconds.iter().map(|s| s * 1e3).collect();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[(((p / 100.0) * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            max: v[v.len() - 1],
        }
    }
}

/// A run's summary.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Name of the run.
    pub label: String,
    /// Requests sent.
    pub requests: usize,
    /// Requests that produced all their tokens.
    pub completed: usize,
    /// Failed requests by error.
    pub errors: BTreeMap<String, usize>,
    /// Wall time of the run, seconds.
    pub duration_s: f64,
    /// Prompt tokens of the completed requests.
    pub prompt_tokens: u64,
    /// Generated tokens received (all requests).
    pub output_tokens: u64,
    /// Generated tokens per second.
    pub output_tok_s: f64,
    /// Completed requests per second.
    pub req_s: f64,
    /// Distinct adapters among the requests.
    pub distinct_adapters: usize,
    /// Time to first token.
    pub ttft_ms: Stats,
    /// Time per output token after the first, per request.
    pub tpot_ms: Stats,
    /// Every gap between consecutive tokens.
    pub itl_ms: Stats,
    /// End-to-end latency.
    pub e2e_ms: Stats,
    /// Free-form settings of the run (concurrency, lengths, popularity, ...).
    pub settings: BTreeMap<String, String>,
}

impl Report {
    /// Summarises `outcomes` of a run that took `duration_s`.
    pub fn new(label: &str, outcomes: &[Outcome], duration_s: f64, settings: BTreeMap<String, String>) -> Self {
        let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_none()).collect();
        let mut errors = BTreeMap::new();
        for o in outcomes {
            if let Some(e) = &o.error {
                *errors.entry(e.clone()).or_insert(0) += 1;
            }
        }
        let ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft).collect();
        let tpot: Vec<f64> = ok
            .iter()
            .filter(|o| o.received > 1)
            .filter_map(|o| o.ttft.map(|t| (o.e2e - t) / f64::from(o.received - 1)))
            .collect();
        let itl: Vec<f64> = ok.iter().flat_map(|o| o.itl.iter().copied()).collect();
        let e2e: Vec<f64> = ok.iter().map(|o| o.e2e).collect();
        let output_tokens: u64 = outcomes.iter().map(|o| u64::from(o.received)).sum();
        let mut adapters: Vec<usize> = outcomes.iter().filter_map(|o| o.adapter).collect();
        adapters.sort_unstable();
        adapters.dedup();
        Self {
            label: label.to_string(),
            requests: outcomes.len(),
            completed: ok.len(),
            errors,
            duration_s,
            prompt_tokens: ok.iter().map(|o| u64::from(o.prompt_tokens)).sum(),
            output_tokens,
            output_tok_s: output_tokens as f64 / duration_s.max(1e-9),
            req_s: ok.len() as f64 / duration_s.max(1e-9),
            distinct_adapters: adapters.len(),
            ttft_ms: Stats::of(&ttft),
            tpot_ms: Stats::of(&tpot),
            itl_ms: Stats::of(&itl),
            e2e_ms: Stats::of(&e2e),
            settings,
        }
    }
}

/// A markdown table with one row per report.
pub fn markdown(reports: &[Report]) -> String {
    let mut s = String::from(
        "| run | done | errors | tok/s | req/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | ITL p50/p99 ms | e2e p50/p99 ms |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let errors: usize = r.errors.values().sum();
        s.push_str(&format!(
            "| {} | {}/{} | {} | {:.1} | {:.2} | {:.1} / {:.1} / {:.1} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} | {:.0} / {:.0} |\n",
            r.label,
            r.completed,
            r.requests,
            errors,
            r.output_tok_s,
            r.req_s,
            r.ttft_ms.p50,
            r.ttft_ms.p90,
            r.ttft_ms.p99,
            r.tpot_ms.p50,
            r.tpot_ms.p90,
            r.tpot_ms.p99,
            r.itl_ms.p50,
            r.itl_ms.p99,
            r.e2e_ms.p50,
            r.e2e_ms.p99,
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(ttft: f64, gaps: &[f64], error: Option<&str>) -> Outcome {
        Outcome {
            adapter: Some(gaps.len() % 2),
            prompt_tokens: 10,
            output_tokens: gaps.len() as u32 + 1,
            received: if error.is_some() { 0 } else { gaps.len() as u32 + 1 },
            sent_at: 0.0,
            ttft: error.is_none().then_some(ttft),
            itl: gaps.to_vec(),
            e2e: ttft + gaps.iter().sum::<f64>(),
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(|i| f64::from(i) / 1000.0).collect();
        let s = Stats::of(&v);
        assert_eq!((s.p50, s.p90, s.p99, s.max), (50.0, 90.0, 99.0, 100.0));
        assert!((s.mean - 50.5).abs() < 1e-9);
        assert_eq!(Stats::of(&[]).count, 0);
    }

    #[test]
    fn report_counts_tokens_errors_and_rates() {
        let outcomes = vec![
            outcome(0.1, &[0.01, 0.03], None),
            outcome(0.3, &[0.02], None),
            outcome(0.0, &[0.0], Some("adapter_not_found")),
        ];
        let r = Report::new("t", &outcomes, 2.0, BTreeMap::new());
        assert_eq!((r.requests, r.completed, r.output_tokens), (3, 2, 5));
        assert_eq!(r.errors.get("adapter_not_found"), Some(&1));
        assert!((r.output_tok_s - 2.5).abs() < 1e-9);
        assert!((r.req_s - 1.0).abs() < 1e-9);
        assert_eq!(r.ttft_ms.count, 2);
        // TPOT: (0.14 - 0.1) / 2 = 20 ms and 20 ms.
        assert!((r.tpot_ms.p50 - 20.0).abs() < 1e-6, "{:?}", r.tpot_ms);
        assert_eq!(r.itl_ms.count, 3);
        assert_eq!(r.distinct_adapters, 2);
        let md = markdown(&[r]);
        assert!(md.contains("| t | 2/3 | 1 | 2.5 |"), "{md}");
    }
}
