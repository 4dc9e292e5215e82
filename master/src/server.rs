//! Wires a master together: database, dispatcher, housekeeping, the gRPC and HTTP listeners and
//! the local worker pool, with one graceful shutdown for all of them.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{error, info};

use crate::config::Config;
use crate::grpc::WorkerGrpc;
use crate::local_pool::{LocalPool, PoolError};
use crate::master::Master;
use crate::store::{Store, StoreError};

/// Why the master could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("cannot serve: {0}")]
    Serve(String),
}

/// The sockets a master serves on, bound by the caller (tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
}

impl Listeners {
    /// Binds the addresses the configuration names.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        let http =
            TcpListener::bind(config.http.listen).await.map_err(|e| annotate(e, "http.listen", config.http.listen))?;
        let grpc = TcpListener::bind(config.workers.listen)
            .await
            .map_err(|e| annotate(e, "workers.listen", config.workers.listen))?;
        Ok(Listeners { http, grpc })
    }
}

fn annotate(error: std::io::Error, key: &str, addr: SocketAddr) -> std::io::Error {
    std::io::Error::new(error.kind(), format!("{key}: cannot listen on {addr}: {error}"))
}

/// A started master, for callers that need to reach it (tests, the benchmark).
pub type Started = Arc<Master>;

/// Runs a master until `shutdown` completes. `on_start` is called once everything listens.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
    on_start: impl FnOnce(&Started) + Send,
) -> Result<(), RunError> {
    let config = Arc::new(config);
    let local_binary = config.workers.local.as_ref().map(LocalPool::locate_binary).transpose()?;
    let store = Store::connect(&config.database).await?;
    let master = Master::start(Arc::clone(&config), store.clone()).await?;

    let mut tokens = config.worker_tokens();
    let local_token = format!("local-{:032x}", rand::random::<u128>());
    if local_binary.is_some() {
        tokens.push(local_token.clone());
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let grpc_addr = listeners.grpc.local_addr().map_err(|e| RunError::Serve(e.to_string()))?;
    let grpc = {
        let service = WorkerGrpc::new(Arc::clone(&master), tokens).into_server();
        let mut stop = stop_rx.clone();
        let incoming = TcpListenerStream::new(listeners.grpc);
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(10)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        })
    };
    let http = {
        let router = crate::http::router(Arc::clone(&master));
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            axum::serve(listeners.http, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        })
    };
    let background = [
        tokio::spawn(Arc::clone(&master).run_dispatcher()),
        tokio::spawn(Arc::clone(&master).run_housekeeping()),
        tokio::spawn(Arc::clone(&master).run_timers()),
        tokio::spawn(Arc::clone(&master).run_pollers()),
        tokio::spawn(Arc::clone(&master).run_timed()),
        tokio::spawn(Arc::clone(&master).run_completions()),
        tokio::spawn(Arc::clone(&master).run_queue_listener(config.database.clone())),
    ];
    let (pool_stop_tx, pool_stop_rx) = watch::channel(false);
    let pool = match (&config.workers.local, local_binary) {
        (Some(local), Some(binary)) => {
            let pool = Arc::new(LocalPool::new(
                local.clone(),
                binary,
                format!("http://{grpc_addr}"),
                local_token,
                config.data_dir.clone(),
            ));
            Some(tokio::spawn(pool.run(Arc::clone(&master), pool_stop_rx, Duration::from_secs(30))))
        }
        _ => None,
    };
    on_start(&master);

    shutdown.await;
    info!("shutting down: handing running builds back to the queue");
    master.begin_shutdown();
    let _ = pool_stop_tx.send(true);
    if let Some(pool) = pool {
        let _ = pool.await;
    }
    master.wait_idle(Duration::from_secs(15)).await;
    master.close_sessions();
    let _ = stop_tx.send(true);
    for task in background {
        task.abort();
    }
    if let Err(error) = store.master_stopped(master.masterid).await {
        error!(%error, "could not mark the master stopped");
    }
    match grpc.await {
        Ok(Err(e)) => return Err(RunError::Serve(e.to_string())),
        Err(e) => return Err(RunError::Serve(e.to_string())),
        Ok(Ok(())) => {}
    }
    match http.await {
        Ok(Err(e)) => return Err(RunError::Serve(e.to_string())),
        Err(e) => return Err(RunError::Serve(e.to_string())),
        Ok(Ok(())) => {}
    }
    store.close().await;
    info!("master stopped");
    Ok(())
}
