//! Cancel requests (the PostgreSQL protocol's `CancelRequest`, sent on a new connection with
//! the process id and secret key the server gave the session at startup).
//!
//! A cancel stops the statement running when it arrives, as `statement_timeout` does: its
//! work is dropped and it fails with `57014`, so its own transaction rolls back and an
//! explicit one is failed until `ROLLBACK`. A `COMMIT` in progress is never canceled (its
//! outcome would be unknown to the client that asked). A cancel stops the statements of the
//! message (query string or Execute) being served when it arrives, the part of it that has
//! not run yet included; one that arrives while the session is idle is forgotten, as in
//! PostgreSQL.
//!
//! pgwire's own cancel support drops the handler's whole future, which could leave an
//! explicit transaction open with half of a statement's writes in it; this one stops only
//! the statement's work, inside the session.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use pgwire::api::cancel::CancelHandler;
use pgwire::messages::cancel::CancelRequest;
use tokio::sync::watch;

/// Asks a session to cancel its running statement.
#[derive(Clone)]
pub struct Canceler {
    requests: Arc<watch::Sender<u64>>,
}

/// What a session watches for cancels: those after the message it is serving arrived.
pub struct CancelWatch {
    requests: watch::Receiver<u64>,
    /// The count of requests when the message being served arrived.
    armed: u64,
}

/// A canceler and the watch it signals.
pub fn channel() -> (Canceler, CancelWatch) {
    let (requests, watch) = watch::channel(0);
    (
        Canceler {
            requests: Arc::new(requests),
        },
        CancelWatch {
            requests: watch,
            armed: 0,
        },
    )
}

impl Canceler {
    pub fn cancel(&self) {
        self.requests.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl CancelWatch {
    /// A message (a query string, an Execute) arrived: cancels from now on stop its
    /// statements; earlier ones are forgotten.
    pub fn arm(&mut self) {
        self.armed = *self.requests.borrow();
    }

    /// A future that completes once a cancel arrived since [`CancelWatch::arm`] (at once if
    /// one already has), and never when no canceler is left.
    pub fn canceled(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut requests = self.requests.clone();
        let armed = self.armed;
        async move {
            while *requests.borrow_and_update() == armed {
                if requests.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// The node's sessions by the (process id, secret key) each was given at startup.
#[derive(Default)]
pub struct Cancelers {
    by_key: std::sync::Mutex<HashMap<(i32, Vec<u8>), Canceler>>,
}

impl Cancelers {
    pub fn register(&self, key: (i32, Vec<u8>), canceler: Canceler) {
        self.lock().insert(key, canceler);
    }

    pub fn unregister(&self, key: &(i32, Vec<u8>)) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(i32, Vec<u8>), Canceler>> {
        self.by_key.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl CancelHandler for Cancelers {
    async fn on_cancel_request(&self, request: CancelRequest) {
        let key = (request.pid, request.secret_key.to_bytes().to_vec());
        // A wrong key is ignored without a word, as PostgreSQL does: the requester learns
        // nothing about which sessions exist.
        let canceler = self.lock().get(&key).cloned();
        if let Some(canceler) = canceler {
            canceler.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire::messages::startup::SecretKey;
    use std::time::Duration;

    #[tokio::test]
    async fn a_cancel_stops_what_runs_after_its_message_arrived() {
        let (canceler, mut watch) = channel();
        canceler.cancel();
        // Sent before the message arrived: forgotten.
        watch.arm();
        let waited = tokio::time::timeout(Duration::from_millis(50), watch.canceled()).await;
        assert!(waited.is_err());
        // Sent after it arrived, before its statement began waiting: kept.
        canceler.cancel();
        tokio::time::timeout(Duration::from_secs(5), watch.canceled())
            .await
            .expect("a cancel before the statement began stops it");
        watch.arm();
        let canceled = watch.canceled();
        canceler.cancel();
        tokio::time::timeout(Duration::from_secs(5), canceled)
            .await
            .expect("a cancel during the statement stops it");
    }

    #[tokio::test]
    async fn requests_reach_the_session_their_key_names() {
        let cancelers = Cancelers::default();
        let (canceler, mut watch) = channel();
        cancelers.register((7, vec![1, 2, 3, 4]), canceler);
        watch.arm();
        let wrong = CancelRequest::new(7, SecretKey::I32(5));
        cancelers.on_cancel_request(wrong).await;
        let right = CancelRequest::new(7, SecretKey::I32(0x01020304));
        let wrong_canceled =
            tokio::time::timeout(Duration::from_millis(50), watch.canceled()).await;
        assert!(
            wrong_canceled.is_err(),
            "a wrong secret canceled the statement"
        );
        cancelers.on_cancel_request(right).await;
        tokio::time::timeout(Duration::from_secs(5), watch.canceled())
            .await
            .expect("the right key cancels");
        cancelers.unregister(&(7, vec![1, 2, 3, 4]));
        assert!(cancelers.lock().is_empty());
    }
}
