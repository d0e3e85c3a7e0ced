//! What each request asks for: lengths from distributions and an adapter from a popularity regime.

use std::str::FromStr;

use crate::Rng;

/// A distribution of token counts: `N` (fixed), `uniform:A:B` (inclusive), `normal:MEAN:SD` or
/// `exp:MEAN`, all clamped to at least 1.
#[derive(Clone, Debug, PartialEq)]
pub enum Lengths {
    /// Always this many.
    Fixed(u32),
    /// Uniform in [lo, hi].
    Uniform(u32, u32),
    /// Normal, rounded.
    Normal(f64, f64),
    /// Exponential with this mean, rounded.
    Exponential(f64),
}

impl FromStr for Lengths {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |p: &str| p.parse::<f64>().map_err(|_| format!("{p:?} in {s:?} is not a number"));
        let d = match parts.as_slice() {
            [n] => Lengths::Fixed(n.parse().map_err(|_| format!("{s:?} is not a token count"))?),
            ["uniform", a, b] => {
                let (a, b) = (num(a)? as u32, num(b)? as u32);
                if a > b {
                    return Err(format!("{s:?}: the low end is above the high end"));
                }
                Lengths::Uniform(a, b)
            }
            ["normal", m, sd] => Lengths::Normal(num(m)?, num(sd)?),
            ["exp", m] => Lengths::Exponential(num(m)?),
            _ => return Err(format!("{s:?}: expected N, uniform:A:B, normal:MEAN:SD or exp:MEAN")),
        };
        if d.mean() < 1.0 {
            return Err(format!("{s:?}: the mean must be at least one token"));
        }
        Ok(d)
    }
}

impl Lengths {
    /// One draw.
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        let v = match *self {
            Lengths::Fixed(n) => f64::from(n),
            Lengths::Uniform(a, b) => f64::from(a) + rng.below((b - a + 1) as usize) as f64,
            Lengths::Normal(m, sd) => (m + sd * rng.normal()).round(),
            Lengths::Exponential(m) => rng.exponential(m).round(),
        };
        v.max(1.0) as u32
    }

    /// The mean.
    pub fn mean(&self) -> f64 {
        match *self {
            Lengths::Fixed(n) => f64::from(n),
            Lengths::Uniform(a, b) => (f64::from(a) + f64::from(b)) / 2.0,
            Lengths::Normal(m, _) | Lengths::Exponential(m) => m,
        }
    }
}

/// How requests spread over adapters.
#[derive(Clone, Debug, PartialEq)]
pub enum Popularity {
    /// The base model only.
    Base,
    /// Every request uses adapter 0.
    Identical,
    /// Each request picks one of the N adapters uniformly.
    Uniform,
    /// Adapter k (0-based) with probability ∝ 1/(k+1)^α.
    Zipf(f64),
    /// Request i uses adapter i mod N: with N at least the number of requests in flight, every running
    /// request has its own adapter.
    Distinct,
}

impl FromStr for Popularity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "none" | "base" => Popularity::Base,
            "identical" => Popularity::Identical,
            "uniform" => Popularity::Uniform,
            "distinct" => Popularity::Distinct,
            z => match z.strip_prefix("zipf:").map(str::parse::<f64>) {
                Some(Ok(a)) if a > 0.0 => Popularity::Zipf(a),
                _ => {
                    return Err(format!(
                        "{s:?}: expected none, identical, uniform, zipf:ALPHA (> 0) or distinct"
                    ))
                }
            },
        })
    }
}

/// Draws adapter indices in [0, n) for request numbers, by a [`Popularity`].
pub struct AdapterPicker {
    popularity: Popularity,
    n: usize,
    /// Cumulative Zipf probabilities.
    cdf: Vec<f64>,
}

impl AdapterPicker {
    /// A picker over `n` adapters.
    pub fn new(popularity: Popularity, n: usize) -> Self {
        let cdf = match popularity {
            Popularity::Zipf(a) => {
                let w: Vec<f64> = (1..=n).map(|k| (k as f64).powf(-a)).collect();
                let total: f64 = w.iter().sum();
                w.iter()
                    .scan(0.0, |acc, x| {
                        *acc += x / total;
                        Some(*acc)
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        Self { popularity, n, cdf }
    }

    /// The adapter of request number `i`, or `None` for the base model.
    pub fn pick(&self, i: usize, rng: &mut Rng) -> Option<usize> {
        if self.n == 0 {
            return None;
        }
        match self.popularity {
            Popularity::Base => None,
            Popularity::Identical => Some(0),
            Popularity::Uniform => Some(rng.below(self.n)),
            Popularity::Distinct => Some(i % self.n),
            Popularity::Zipf(_) => {
                let u = rng.uniform();
                Some(self.cdf.partition_point(|&c| c <= u).min(self.n - 1))
            }
        }
    }
}

/// One request of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Tokens to generate (EOS ignored, so exactly this many).
    pub output_tokens: u32,
    /// Adapter index, `None` for the base model.
    pub adapter: Option<usize>,
}

/// `count` requests of a workload, deterministic in `seed`, numbered from `first` (the number picks the
/// adapter of an all-distinct workload: a warm-up numbered after the measured requests leaves their
/// adapters cold).
pub fn requests(
    count: usize,
    first: usize,
    prompt: &Lengths,
    output: &Lengths,
    picker: &AdapterPicker,
    seed: u64,
) -> Vec<Request> {
    let mut rng = Rng::new(seed);
    (first..first + count)
        .map(|i| Request {
            prompt_tokens: prompt.sample(&mut rng),
            output_tokens: output.sample(&mut rng),
            adapter: picker.pick(i, &mut rng),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse_and_sample_within_bounds() {
        assert_eq!("512".parse::<Lengths>(), Ok(Lengths::Fixed(512)));
        assert!("uniform:9:3".parse::<Lengths>().is_err());
        assert!("exp:0.5".parse::<Lengths>().is_err());
        assert!("gamma:3".parse::<Lengths>().is_err());
        let d: Lengths = "uniform:10:20".parse().expect("uniform");
        let mut rng = Rng::new(1);
        let v: Vec<u32> = (0..2000).map(|_| d.sample(&mut rng)).collect();
        assert!(v.iter().all(|x| (10..=20).contains(x)));
        assert!(v.contains(&10) && v.contains(&20));
        let e: Lengths = "exp:100".parse().expect("exp");
        let mean = (0..20000).map(|_| f64::from(e.sample(&mut rng))).sum::<f64>() / 20000.0;
        assert!((mean - 100.0).abs() < 5.0, "{mean}");
    }

    #[test]
    fn popularity_regimes() {
        let mut rng = Rng::new(7);
        let count = |p: Popularity, draws: usize, rng: &mut Rng| {
            let picker = AdapterPicker::new(p, 100);
            let mut c = vec![0usize; 100];
            for i in 0..draws {
                c[picker.pick(i, rng).expect("adapter")] += 1;
            }
            c
        };
        let ident = count(Popularity::Identical, 1000, &mut rng);
        assert_eq!(ident[0], 1000);
        let distinct = count(Popularity::Distinct, 1000, &mut rng);
        assert!(distinct.iter().all(|&c| c == 10));
        let uniform = count(Popularity::Uniform, 100_000, &mut rng);
        assert!(uniform.iter().all(|&c| (800..1200).contains(&c)), "{uniform:?}");
        // Zipf(1) over 100: p(0) = 1/H(100) ≈ 0.193, p(1) ≈ 0.096.
        let zipf = count("zipf:1".parse().expect("zipf"), 100_000, &mut rng);
        let p0 = zipf[0] as f64 / 100_000.0;
        assert!((p0 - 0.193).abs() < 0.01, "{p0}");
        assert!((zipf[0] as f64 / zipf[1] as f64 - 2.0).abs() < 0.15);
        assert_eq!(AdapterPicker::new(Popularity::Base, 100).pick(0, &mut rng), None);
        assert!("zipf:0".parse::<Popularity>().is_err());
    }

    #[test]
    fn workloads_are_deterministic() {
        let picker = AdapterPicker::new(Popularity::Uniform, 10);
        let l: Lengths = "uniform:1:100".parse().expect("lengths");
        assert_eq!(requests(50, 0, &l, &l, &picker, 3), requests(50, 0, &l, &l, &picker, 3));
        assert_ne!(requests(50, 0, &l, &l, &picker, 3), requests(50, 0, &l, &l, &picker, 4));
    }

    #[test]
    fn a_warm_up_numbered_after_the_work_leaves_its_distinct_adapters_cold() {
        let picker = AdapterPicker::new(Popularity::Distinct, 1000);
        let l: Lengths = "8".parse().expect("lengths");
        let work = requests(256, 0, &l, &l, &picker, 1);
        let warm = requests(16, 256, &l, &l, &picker, 2);
        let used: std::collections::HashSet<_> = work.iter().map(|r| r.adapter).collect();
        assert_eq!(used.len(), 256);
        assert!(warm.iter().all(|r| !used.contains(&r.adapter)), "{warm:?}");
    }
}
