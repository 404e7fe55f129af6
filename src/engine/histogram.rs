//! Latency histograms with fixed bucket bounds, updated lock-free from the engine thread and
//! rendered as Prometheus histograms (`_bucket{le=…}`, `_sum`, `_count`).

use std::sync::atomic::{AtomicU64, Ordering};

/// vLLM's bounds for `vllm:time_to_first_token_seconds`.
pub const TTFT_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
/// vLLM's bounds for `vllm:time_per_output_token_seconds`, with 1 ms and 5 ms in front (a small
/// model decodes faster than vLLM's first bucket).
pub const TPOT_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0,
];
/// vLLM's bounds for `vllm:e2e_request_latency_seconds`, with 0.05 s and 0.1 s in front.
pub const E2E_BOUNDS: &[f64] = &[
    0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
];

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last is +Inf.
    counts: Vec<AtomicU64>,
    /// Sum of observations in nanoseconds.
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_ns: AtomicU64::new(0) }
    }

    pub fn observe(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.iter().position(|&b| s <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(d.as_nanos().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Appends `name_bucket`, `name_sum` and `name_count` lines with `labels` (`k="v",…`).
    pub fn render(&self, name: &str, labels: &str, out: &mut String) {
        use std::fmt::Write;
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = self.bounds.get(i).map_or("+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn buckets_are_cumulative_and_inclusive() {
        let h = Histogram::new(&[0.01, 0.1]);
        for ms in [5, 10, 50, 2000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut out = String::new();
        h.render("t", "m=\"x\"", &mut out);
        assert_eq!(
            out,
            "t_bucket{m=\"x\",le=\"0.01\"} 2\nt_bucket{m=\"x\",le=\"0.1\"} 3\nt_bucket{m=\"x\",le=\"+Inf\"} 4\n\
             t_sum{m=\"x\"} 2.065\nt_count{m=\"x\"} 4\n"
        );
        assert_eq!(h.count(), 4);
    }
}
