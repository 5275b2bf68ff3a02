//! Cooperative cancellation (Ctrl-C, `q` in the dashboard): engines stop
//! their transfers but still run their cleanup (the `after` hooks).

use tokio::sync::watch;

/// The side that cancels (Ctrl-C handler, dashboard keys).
#[derive(Clone)]
pub struct Canceller(std::sync::Arc<watch::Sender<bool>>);

/// The side that listens; cheap to clone into every node task.
#[derive(Clone)]
pub struct Cancel(watch::Receiver<bool>);

pub fn pair() -> (Canceller, Cancel) {
    let (tx, rx) = watch::channel(false);
    (Canceller(std::sync::Arc::new(tx)), Cancel(rx))
}

impl Canceller {
    pub fn cancel(&self) {
        let _ = self.0.send(true);
    }

    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }
}

impl Cancel {
    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once cancelled (never, if the canceller is gone uncancelled).
    pub async fn cancelled(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
