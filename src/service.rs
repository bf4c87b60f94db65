//! The owner of the lifecycle: it starts everything that uses the store — the API
//! listener, the admin listener and the background tasks — and stops them in order on
//! shutdown:
//!
//! 1. mark the server as stopping (the admin `/readyz` answers 503), stop accepting API
//!    connections and finish in-flight requests (the server's grace);
//! 2. stop the admin listener the same way (it served `/readyz` and `/metrics` while the
//!    API drained);
//! 3. tell the background tasks to stop, and wait for them (the same grace);
//! 4. let the writer commit what is queued, then stop it;
//! 5. close the store, releasing the database file.
//!
//! So a background task may still write while it stops, and nothing writes after the
//! store is closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::admin::{self, Admin};
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
    /// The admin listener, if `[admin]` is configured.
    admin: Option<TcpListener>,
}

impl Service {
    /// The server and its built-in background tasks: the delivery worker.
    pub fn new(app: Arc<App>) -> Service {
        let mut service = Service {
            app,
            background: Vec::new(),
            admin: None,
        };
        service.background("delivery", crate::worker::run);
        service
    }

    /// Serves the admin endpoints (see [`crate::admin`]) on `listener` beside the API.
    pub fn admin(&mut self, listener: TcpListener) {
        self.admin = Some(listener);
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

        let stopping_flag = Arc::new(AtomicBool::new(false));
        let (admin_stop, admin_stopped) = oneshot::channel::<()>();
        let admin_server = {
            let state = Arc::new(Admin::new(self.app.clone(), stopping_flag.clone()));
            // The admin listener serves few clients, none of them the public.
            let config = crate::config::ServerConfig {
                max_connections: 16,
                ..self.app.config.server.clone()
            };
            let listener = self.admin;
            async move {
                if let Some(listener) = listener {
                    let route = move |req, remote| admin::route(state.clone(), req, remote);
                    let stop = async {
                        let _ = admin_stopped.await;
                    };
                    server::serve(listener, &config, route, stop).await;
                }
            }
        };
        let app = self.app.clone();
        let route = move |req, remote| router::route(app.clone(), req, remote);
        let api_shutdown = async {
            shutdown.await;
            stopping_flag.store(true, Ordering::Release);
        };
        let api_server = async {
            server::serve(listener, &self.app.config.server, route, api_shutdown).await;
            let _ = admin_stop.send(());
        };
        tokio::join!(api_server, admin_server);

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
