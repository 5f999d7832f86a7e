//! `GET /metrics`: the server's counters in Prometheus' text format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the time-to-first-token histogram, in seconds.
const TTFT_BUCKETS: [f64; 12] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Default)]
pub struct Metrics {
    /// Answered requests by HTTP status.
    by_status: Mutex<BTreeMap<u16, u64>>,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Requests whose client went away before the answer was complete.
    pub cancelled: AtomicU64,
    /// Requests handed to the engine thread and not yet finished (waiting or running): what the queue limit bounds.
    pub outstanding: AtomicUsize,
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    ttft: Mutex<Histogram>,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; TTFT_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    pub fn answered(&self, status: u16) {
        if let Ok(mut m) = self.by_status.lock() {
            *m.entry(status).or_default() += 1;
        }
    }

    pub fn first_token(&self, after: Duration) {
        let s = after.as_secs_f64();
        if let Ok(mut h) = self.ttft.lock() {
            for (c, &b) in h.counts.iter_mut().zip(&TTFT_BUCKETS) {
                *c += u64::from(s <= b);
            }
            h.count += 1;
            h.sum += s;
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let mut put = |name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        put("bpo_requests_total", "counter", "HTTP requests answered, by status code.");
        let by_status = self.by_status.lock().map(|m| m.clone()).unwrap_or_default();
        for (status, n) in by_status {
            let _ = writeln!(o, "bpo_requests_total{{status=\"{status}\"}} {n}");
        }
        let counter = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let gauge = |o: &mut String, name: &str, help: &str, v: usize| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(&mut o, "bpo_prompt_tokens_total", "Prompt tokens of finished requests.", load(&self.prompt_tokens));
        counter(&mut o, "bpo_generation_tokens_total", "Tokens generated.", load(&self.generation_tokens));
        counter(&mut o, "bpo_requests_cancelled_total", "Requests whose client went away.", load(&self.cancelled));
        let waiting = self.waiting.load(Ordering::Relaxed);
        gauge(&mut o, "bpo_requests_waiting", "Requests queued for the engine.", waiting);
        gauge(&mut o, "bpo_requests_running", "Sequences being generated.", self.running.load(Ordering::Relaxed));
        let name = "bpo_time_to_first_token_seconds";
        let _ = writeln!(o, "# HELP {name} From arrival at the engine to the first token.\n# TYPE {name} histogram");
        if let Ok(h) = self.ttft.lock() {
            for (c, b) in h.counts.iter().zip(TTFT_BUCKETS) {
                let _ = writeln!(o, "{name}_bucket{{le=\"{b}\"}} {c}");
            }
            let _ =
                writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", h.count, h.sum, h.count);
        }
        o
    }
}
