//! Graceful shutdown: on SIGTERM/SIGINT the server stops admitting requests (503, and no new
//! connections), lets the streams in flight finish for up to `shutdown_grace`, then cuts the
//! rest: each gets its dialect's final error line or SSE error event (`the server is shutting
//! down`), so no client is left with a half-written reply, and the process exits 0.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

/// The message a cut stream or a refused request carries.
pub const MESSAGE: &str = "the server is shutting down";

pub struct Shutdown {
    draining: AtomicBool,
    cut: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self { draining: AtomicBool::new(false), cut: watch::channel(false).0 }
    }
}

impl Shutdown {
    /// New requests are refused from now on.
    pub fn begin(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Streams still running end now.
    pub fn cut_now(&self) {
        self.begin();
        self.cut.send_replace(true);
    }

    /// A receiver for [`Shutdown::cut_now`] (see [`cut`]).
    pub fn watcher(&self) -> watch::Receiver<bool> {
        self.cut.subscribe()
    }
}

/// Resolves once the streams are to be cut (never, if the sender is gone without cutting).
pub async fn cut(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|&c| c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cut_wakes_every_watcher() {
        let s = Shutdown::default();
        let (mut a, mut b) = (s.watcher(), s.watcher());
        assert!(!s.draining());
        let waiting = tokio::spawn(async move { cut(&mut a).await });
        s.begin();
        assert!(s.draining());
        assert!(!waiting.is_finished());
        s.cut_now();
        waiting.await.unwrap();
        cut(&mut b).await;
        // A watcher made after the cut resolves at once.
        cut(&mut s.watcher()).await;
    }

    #[tokio::test]
    async fn draining_refuses_requests_in_both_dialects_and_health_says_stopping() {
        use crate::server::tests::{get, post, state};
        use serde_json::json;
        let st = state();
        assert_eq!(get(&st, "/health").await.status, 200);
        st.shutdown.begin();
        let o = post(&st, "/api/chat", json!({ "model": "tiny", "messages": [] })).await;
        assert_eq!((o.status.as_u16(), o.error()), (503, MESSAGE.to_owned()));
        let v = post(&st, "/v1/chat/completions", json!({ "model": "tiny", "messages": [] })).await;
        assert_eq!(v.status, 503);
        assert_eq!(v.json()["error"]["message"], MESSAGE);
        let h = get(&st, "/health").await;
        assert_eq!((h.status.as_u16(), h.json()["status"].clone()), (503, json!("stopping")));
    }
}
