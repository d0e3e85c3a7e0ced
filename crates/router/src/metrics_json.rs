//! `GET /metrics?format=json`: the Prometheus text exposition of `/metrics` turned into JSON, so both
//! formats always carry the same samples. Counters and gauges have a `value`; histograms have their
//! cumulative `buckets` (the `+Inf` bucket is `count`), `sum` and `count`; summaries their `quantiles`,
//! `sum` and `count`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The JSON form of `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MetricsJson {
    /// Metric families in exposition order.
    pub metrics: Vec<MetricFamily>,
}

/// One metric (a `# TYPE` block).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MetricFamily {
    /// Metric name, e.g. `lorax_request_count`.
    pub name: String,
    /// `counter`, `gauge`, `histogram`, `summary` or `untyped`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Description (`# HELP`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub help: Option<String>,
    /// One entry per label set.
    pub samples: Vec<Sample>,
}

/// The value(s) of one label set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Sample {
    /// Labels (for histograms without `le`, for summaries without `quantile`).
    pub labels: BTreeMap<String, String>,
    /// Counter or gauge value.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub value: Option<f64>,
    /// Histogram buckets: cumulative count of observations `<= le`, `+Inf` left out.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub buckets: Option<Vec<Bucket>>,
    /// Summary quantiles.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub quantiles: Option<Vec<Quantile>>,
    /// Sum of the observations (histograms, summaries).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sum: Option<f64>,
    /// Number of observations (histograms, summaries).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub count: Option<f64>,
}

/// A histogram bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Bucket {
    /// Upper bound.
    pub le: f64,
    /// Observations `<= le`.
    pub count: f64,
}

/// A summary quantile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Quantile {
    /// The quantile (0..=1).
    pub quantile: f64,
    /// Its value.
    pub value: f64,
}

/// Parses the text exposition format (as `metrics-exporter-prometheus` renders it). Lines that cannot
/// be read are skipped.
pub fn parse(text: &str) -> MetricsJson {
    let mut help: BTreeMap<String, String> = BTreeMap::new();
    let mut families: Vec<MetricFamily> = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, text)) = rest.split_once(' ') {
                help.insert(name.to_string(), unescape_help(text));
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                families.push(MetricFamily {
                    name: name.to_string(),
                    kind: kind.trim().to_string(),
                    help: help.remove(name),
                    samples: Vec::new(),
                });
            }
        } else if !line.starts_with('#') {
            if let Some(sample) = parse_sample(line) {
                add(&mut families, sample);
            }
        }
    }
    MetricsJson { metrics: families }
}

/// One sample line: name, labels, value.
struct Line {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_sample(line: &str) -> Option<Line> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if rest.starts_with('{') {
        let (parsed, after) = parse_labels(&rest[1..])?;
        labels = parsed;
        rest = after;
    }
    // A timestamp may follow the value.
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Line { name, labels, value })
}

/// `a="x",b="y"}` → the labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = s.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_string(), value);
        s = &after[end + 1..];
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

fn unescape_help(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some('n')) => {
                out.push('\n');
                chars.next();
            }
            ('\\', Some('\\')) => {
                out.push('\\');
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// The suffix `name` has as a sample of `family` (`""`, `_bucket`, `_sum`, `_count`), if it is one.
fn sample_suffix<'a>(family: &MetricFamily, name: &'a str) -> Option<&'a str> {
    let suffix = name.strip_prefix(family.name.as_str())?;
    let fits = match family.kind.as_str() {
        "histogram" => matches!(suffix, "_bucket" | "_sum" | "_count"),
        "summary" => matches!(suffix, "" | "_sum" | "_count"),
        _ => suffix.is_empty(),
    };
    fits.then_some(suffix)
}

/// Files a sample line under its family (the last `# TYPE` block whose name it extends).
fn add(families: &mut Vec<MetricFamily>, line: Line) {
    let found = families
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, f)| sample_suffix(f, &line.name).map(|suffix| (i, suffix.to_string())));
    let (index, suffix) = found.unwrap_or_else(|| {
        families.push(MetricFamily {
            name: line.name.clone(),
            kind: "untyped".into(),
            help: None,
            samples: Vec::new(),
        });
        (families.len() - 1, String::new())
    });
    let family = &mut families[index];
    let mut labels = line.labels;
    let bound = match (family.kind.as_str(), suffix.as_str()) {
        ("histogram", "_bucket") => labels.remove("le"),
        ("summary", "") => labels.remove("quantile"),
        _ => None,
    };
    let index = match family.samples.iter().position(|s| s.labels == labels) {
        Some(index) => index,
        None => {
            family.samples.push(Sample {
                labels,
                ..Sample::default()
            });
            family.samples.len() - 1
        }
    };
    let sample = &mut family.samples[index];
    match (family.kind.as_str(), suffix.as_str()) {
        ("histogram", "_bucket") => {
            let le = bound.as_deref().and_then(parse_value);
            let buckets = sample.buckets.get_or_insert_with(Vec::new);
            if let Some(le) = le.filter(|le| le.is_finite()) {
                buckets.push(Bucket { le, count: line.value });
            }
        }
        ("summary", "") => {
            if let Some(quantile) = bound.as_deref().and_then(parse_value) {
                sample.quantiles.get_or_insert_with(Vec::new).push(Quantile {
                    quantile,
                    value: line.value,
                });
            }
        }
        (_, "_sum") => sample.sum = Some(line.value),
        (_, "_count") => sample.count = Some(line.value),
        _ => sample.value = Some(line.value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP lorax_request_count Requests received
# TYPE lorax_request_count counter
lorax_request_count 3

# HELP lorax_request_failure Requests failed, by error_type
# TYPE lorax_request_failure counter
lorax_request_failure{err="validation"} 2
lorax_request_failure{err="over\"loaded\\x"} 1

# TYPE lorax_queue_size gauge
lorax_queue_size 0

# HELP lorax_batch_forward_duration Shard forward time per call
# TYPE lorax_batch_forward_duration histogram
lorax_batch_forward_duration_bucket{method="prefill",le="0.001"} 0
lorax_batch_forward_duration_bucket{method="prefill",le="0.01"} 2
lorax_batch_forward_duration_bucket{method="prefill",le="+Inf"} 3
lorax_batch_forward_duration_sum{method="prefill"} 0.5
lorax_batch_forward_duration_count{method="prefill"} 3
lorax_batch_forward_duration_bucket{method="decode",le="0.001"} 7
lorax_batch_forward_duration_bucket{method="decode",le="0.01"} 7
lorax_batch_forward_duration_bucket{method="decode",le="+Inf"} 7
lorax_batch_forward_duration_sum{method="decode"} 0.002
lorax_batch_forward_duration_count{method="decode"} 7

# TYPE some_summary summary
some_summary{quantile="0.5"} 1.5
some_summary{quantile="0.99"} NaN
some_summary_sum 3
some_summary_count 2
stray_metric 1 1700000000000
"#;

    #[test]
    fn every_kind() {
        let json = parse(TEXT);
        let names: Vec<&str> = json.metrics.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "lorax_request_count",
                "lorax_request_failure",
                "lorax_queue_size",
                "lorax_batch_forward_duration",
                "some_summary",
                "stray_metric"
            ]
        );
        let count = &json.metrics[0];
        assert_eq!(
            (count.kind.as_str(), count.help.as_deref()),
            ("counter", Some("Requests received"))
        );
        assert_eq!(count.samples[0].value, Some(3.0));
        assert!(count.samples[0].labels.is_empty());

        let failure = &json.metrics[1];
        assert_eq!(failure.samples.len(), 2);
        assert_eq!(failure.samples[0].labels["err"], "validation");
        assert_eq!(failure.samples[1].labels["err"], "over\"loaded\\x");
        assert_eq!(failure.samples[1].value, Some(1.0));

        assert_eq!(json.metrics[2].help, None);
        assert_eq!(json.metrics[2].samples[0].value, Some(0.0));

        let histogram = &json.metrics[3];
        assert_eq!(histogram.samples.len(), 2);
        let prefill = &histogram.samples[0];
        assert_eq!(prefill.labels.len(), 1, "le is not a label of the sample");
        assert_eq!(prefill.labels["method"], "prefill");
        assert_eq!(
            prefill.buckets.as_deref(),
            Some(&[Bucket { le: 0.001, count: 0.0 }, Bucket { le: 0.01, count: 2.0 }][..])
        );
        assert_eq!(
            (prefill.sum, prefill.count, prefill.value),
            (Some(0.5), Some(3.0), None)
        );
        assert_eq!(histogram.samples[1].count, Some(7.0));

        let summary = &json.metrics[4];
        let quantiles = summary.samples[0].quantiles.as_deref().expect("quantiles");
        assert_eq!(
            quantiles[0],
            Quantile {
                quantile: 0.5,
                value: 1.5
            }
        );
        assert!(quantiles[1].value.is_nan());
        assert_eq!(summary.samples[0].count, Some(2.0));

        let stray = &json.metrics[5];
        assert_eq!((stray.kind.as_str(), stray.samples[0].value), ("untyped", Some(1.0)));
    }

    #[test]
    fn serialized_shape() {
        let json = serde_json::to_value(parse(TEXT)).expect("json");
        assert_eq!(
            json["metrics"][0],
            serde_json::json!({"name": "lorax_request_count", "type": "counter", "help": "Requests received",
                               "samples": [{"labels": {}, "value": 3.0}]})
        );
        assert_eq!(
            json["metrics"][3]["samples"][0],
            serde_json::json!({"labels": {"method": "prefill"},
                               "buckets": [{"le": 0.001, "count": 0.0}, {"le": 0.01, "count": 2.0}],
                               "sum": 0.5, "count": 3.0})
        );
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let json = parse("# TYPE a counter\na{x=\"unterminated} 1\na 2\nb{x=1} 3\n# TYPE\nc notanumber\n");
        assert_eq!(json.metrics.len(), 1);
        assert_eq!(json.metrics[0].samples[0].value, Some(2.0));
        assert_eq!(unescape_help(r"a\\b\nc"), "a\\b\nc");
    }
}
