//! The owner of the lifecycle: it starts everything that uses the store — the API
//! listener and the background tasks — and stops them in order on shutdown:
//!
//! 1. stop accepting connections and finish in-flight requests (the server's grace);
//! 2. tell the background tasks to stop, and wait for them (the same grace);
//! 3. let the writer commit what is queued, then stop it;
//! 4. close the store, releasing the database file.
//!
//! So a background task may still write while it stops, and nothing writes after the
//! store is closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::app::App;
use crate::{router, server};

/// A background task's view of shutdown.
#[derive(Clone)]
pub struct Stopping(watch::Receiver<bool>);

impl Stopping {
    /// Completes once shutdown has reached the background tasks.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stopping| *stopping).await;
    }

    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
}

type Task = Box<dyn FnOnce(Stopping) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// The server and its background tasks, ready to run.
pub struct Service {
    app: Arc<App>,
    background: Vec<(&'static str, Task)>,
}

impl Service {
    /// The server and its built-in background tasks: the delivery worker.
    pub fn new(app: Arc<App>) -> Service {
        let mut service = Service {
            app,
            background: Vec::new(),
        };
        service.background("delivery", crate::worker::run);
        service
    }

    /// Adds a task that runs beside the API from [`Service::run`] until it has finished
    /// after [`Stopping`] was set (or the shutdown grace ran out).
    pub fn background<F, Fut>(&mut self, name: &'static str, task: F)
    where
        F: FnOnce(Arc<App>, Stopping) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let app = self.app.clone();
        self.background.push((
            name,
            Box::new(move |stopping| Box::pin(task(app, stopping))),
        ));
    }

    /// Serves the API on `listener` until `shutdown` completes, then stops everything in
    /// the order above.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let (stop, stopping) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for (name, task) in self.background {
            let running = task(Stopping(stopping.clone()));
            tasks.spawn(async move {
                running.await;
                tracing::debug!(task = name, "background task stopped");
            });
        }

        let app = self.app.clone();
        let route = move |req, remote| router::route(app.clone(), req, remote);
        server::serve(listener, &self.app.config.server, route, shutdown).await;

        let _ = stop.send(true);
        let grace = self.app.config.server.shutdown_grace;
        let finished =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if finished.is_err() {
            tracing::warn!("background tasks did not stop within the grace period; cut off");
            tasks.shutdown().await;
        }

        self.app.store.shutdown().await;
        self.app.store.close().await;
        tracing::info!("stopped");
    }
}
