//! Fault injection: what a test makes the server do wrong (be down, answer
//! late, answer with an error status, cut the open watches) and how often it
//! sends BOOKMARKs. The HTTP layer asks [`Faults::before_answer`] about every
//! request.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::ApiError;
use crate::server::lock;
use crate::watch::Msg;
use crate::FakeApiServer;

/// The fault settings, shared by the test's thread and the server's.
pub(crate) struct Faults {
    down: AtomicBool,
    latency: Mutex<Duration>,
    error_status: Mutex<Option<u16>>,
    bookmark_interval: Mutex<Option<Duration>>,
    bookmark_interval_changed: Notify,
}

impl Default for Faults {
    /// Up, no latency, no injected errors, a BOOKMARK every second.
    fn default() -> Self {
        Faults {
            down: AtomicBool::new(false),
            latency: Mutex::new(Duration::ZERO),
            error_status: Mutex::new(None),
            bookmark_interval: Mutex::new(Some(Duration::from_secs(1))),
            bookmark_interval_changed: Notify::new(),
        }
    }
}

impl Faults {
    /// True while the test has the server down.
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// What happens to a request before it is served: `Err` closes the
    /// connection without an answer (the server is down), `Ok(Some)` is the
    /// injected error answer, `Ok(None)` serves it. Waits out the latency.
    pub(crate) async fn before_answer(&self) -> Result<Option<ApiError>, io::Error> {
        let down = || io::Error::other("fake apiserver is down");
        if self.is_down() {
            return Err(down());
        }
        let latency = *lock(&self.latency);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
            // It may have gone down meanwhile.
            if self.is_down() {
                return Err(down());
            }
        }
        Ok(lock(&self.error_status).map(ApiError::status))
    }

    pub(crate) fn bookmark_interval(&self) -> Option<Duration> {
        *lock(&self.bookmark_interval)
    }

    /// Resolves when [`FakeApiServer::set_bookmark_interval`] changes it.
    pub(crate) async fn bookmark_interval_changed(&self) {
        self.bookmark_interval_changed.notified().await
    }
}

impl FakeApiServer {
    /// Abruptly closes every open watch stream (the chunked body is cut: the
    /// client sees an unexpected EOF and resumes from its last resourceVersion).
    pub fn disconnect_watches(&self) {
        let _ = self.shared.tx.send(Msg::Disconnect);
    }

    /// Sends a BOOKMARK now on every watch that allowed bookmarks.
    pub fn send_bookmarks(&self) {
        let _ = self.shared.tx.send(Msg::Bookmark);
    }

    /// `true`: the server is down: open watches are cut, new connections are
    /// closed at once and requests on kept-alive connections get the connection
    /// closed without an answer (what a client sees when kube-apiserver
    /// restarts). `false`: serve again.
    pub fn set_unavailable(&self, down: bool) {
        self.shared.faults.down.store(down, Ordering::SeqCst);
        if down {
            self.disconnect_watches();
        }
    }

    /// Answers every request with this HTTP status and a Status body (503,
    /// 500, 429 with `Retry-After: 1`, ...), or serves normally with `None`.
    /// Open watches are not touched. Note kube's default client retries 429,
    /// 503 and 504 itself (up to 15 times, exponential backoff from 5 ms).
    pub fn set_error_status(&self, status: Option<u16>) {
        *lock(&self.shared.faults.error_status) = status;
    }

    /// Delays every answer (the response head; watch events flow at once).
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.shared.faults.latency) = latency;
    }

    /// Period of BOOKMARK events on watches that allowed them (`None`: only
    /// [`Self::send_bookmarks`] and the initial-events-end one). Default 1 s.
    pub fn set_bookmark_interval(&self, interval: Option<Duration>) {
        *lock(&self.shared.faults.bookmark_interval) = interval;
        self.shared.faults.bookmark_interval_changed.notify_one();
    }
}
