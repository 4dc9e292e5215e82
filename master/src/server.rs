//! Wires a master together: database, dispatcher, housekeeping, the gRPC and HTTP listeners and
//! the worker pools, with one graceful shutdown for all of them.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{error, info, warn};

use crate::clock::Clock;
use crate::config::{BackendKind, Config, ControlAccess};
use crate::grpc::{Admission, WorkerGrpc};
use crate::master::Master;
use crate::plan::Plan;
use crate::pool::kubernetes::KubernetesPool;
use crate::pool::local::{LocalError, LocalPool};
use crate::pool::{Backend, MasterPort, Pool};
use crate::store::{Store, StoreError};
use crate::tls::{self, TlsError};
use crate::worker_port;

/// Why the master could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Local(#[from] LocalError),
    #[error("pool {pool}: cannot set up the Kubernetes client: {reason}")]
    Kubernetes { pool: String, reason: String },
    #[error("cannot serve: {0}")]
    Serve(String),
    #[error("invalid configuration: {key}: {reason}")]
    Config { key: String, reason: String },
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
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

/// What the caller may provide besides the configuration.
#[derive(Default)]
pub struct Options {
    /// The Kubernetes client for `kubernetes` pools; by default one from the environment
    /// (in-cluster service account, or the kubeconfig).
    pub kube_client: Option<kube::Client>,
    /// The wall clock; the system's unless a test drives time.
    pub clock: crate::clock::Clock,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options").field("kube_client", &self.kube_client.is_some()).field("clock", &self.clock).finish()
    }
}

/// Runs a master until `shutdown` completes. `on_start` is called once everything listens.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
    on_start: impl FnOnce(&Started) + Send,
) -> Result<(), RunError> {
    run_with(config, listeners, Options::default(), shutdown, on_start).await
}

/// [`run`], with options.
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    options: Options,
    shutdown: impl Future<Output = ()> + Send,
    on_start: impl FnOnce(&Started) + Send,
) -> Result<(), RunError> {
    let config = Arc::new(config);
    match config.open_api_warning() {
        Some(warning) => warn!("{warning}"),
        None if config.control_access() == ControlAccess::Closed => {
            info!("control actions are closed: http.auth gives no credentials");
        }
        None => {}
    }
    if !config.services.is_empty() && config.buildbot_url.is_none() {
        let listen = config.http.listen;
        if listen.ip().is_unspecified() || listen.port() == 0 {
            warn!(
                url = %config.buildbot_url(),
                "reporters link builds to the web UI at buildbotURL, which is not set: set it to the address people reach"
            );
        }
    }
    let mut local_binaries = Vec::new();
    for pool in config.pools.iter().filter(|p| p.backend == BackendKind::Local) {
        local_binaries.push(LocalPool::locate_binary(pool)?);
    }
    let mut kube_client = options.kube_client;
    if let Some(pool) = config.pools.iter().find(|p| p.backend == BackendKind::Kubernetes)
        && kube_client.is_none()
    {
        let error = |reason: String| RunError::Kubernetes { pool: pool.name.clone(), reason };
        let mut kube_config = kube::Config::infer().await.map_err(|e| error(e.to_string()))?;
        kube_config.headers.push((
            axum::http::header::USER_AGENT,
            axum::http::HeaderValue::from_static(crate::pool::kubernetes::USER_AGENT),
        ));
        kube_client =
            Some(kube::Client::try_from(kube_config).map_err(|e| error(crate::pool::kubernetes::describe(&e)))?);
    }
    let mut shutdown = std::pin::pin!(shutdown);
    let Some(store) = connect(&config, options.clock, &mut shutdown).await? else {
        return Ok(());
    };
    let plan = Plan::compile(&config).map_err(|(key, reason)| RunError::Config { key, reason })?;
    let master = Master::start(Arc::clone(&config), plan, store.clone()).await?;

    let mut tokens = config.worker_tokens();
    let local_token = format!("local-{:032x}", rand::random::<u128>());
    if !local_binaries.is_empty() {
        tokens.push(local_token.clone());
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let grpc_addr = listeners.grpc.local_addr().map_err(|e| RunError::Serve(e.to_string()))?;
    // HTTP/2 for kiln-workers' gRPC, HTTP/1.1 for Buildbot workers' WebSocket.
    let grpc_tls =
        config.workers.tls.as_ref().map(|t| tls::acceptor("workers.tls", t, &[b"h2", b"http/1.1"])).transpose()?;
    let http_tls = config.http.tls.as_ref().map(|t| tls::acceptor("http.tls", t, &[b"http/1.1"])).transpose()?;
    let admission = if config.workers.tls.as_ref().is_some_and(|t| t.client_ca.is_some()) {
        Admission::Certificates
    } else {
        Admission::Tokens(tokens)
    };
    let grpc = serve_workers(
        listeners.grpc,
        grpc_tls,
        &master,
        WorkerGrpc::new(Arc::clone(&master), admission),
        stop_rx.clone(),
    )?;
    let header_timeout = Duration::from_secs_f64(master.config.http.request_timeout);
    let router = crate::http::router(Arc::clone(&master)).await?;
    let http = serve_http(listeners.http, http_tls, router, header_timeout, stop_rx)?;
    let background = [
        tokio::spawn(Arc::clone(&master).run_dispatcher()),
        tokio::spawn(Arc::clone(&master).run_housekeeping()),
        tokio::spawn(Arc::clone(&master).run_timers()),
        tokio::spawn(Arc::clone(&master).run_pollers()),
        tokio::spawn(Arc::clone(&master).run_timed()),
        tokio::spawn(Arc::clone(&master).run_completions()),
        tokio::spawn(Arc::clone(&master).run_janitor()),
        tokio::spawn(Arc::clone(&master).run_reports()),
        tokio::spawn(Arc::clone(&master).run_queue_listener(config.database.clone())),
    ];
    let local = LocalWorkers { binaries: local_binaries, grpc: format!("http://{grpc_addr}"), token: local_token };
    let (pool_stop_tx, pool_stop_rx) = watch::channel(false);
    let pool_tasks = start_pools(&master, local, kube_client, pool_stop_rx)?;
    on_start(&master);

    shutdown.await;
    info!("shutting down: handing running builds back to the queue");
    master.begin_shutdown();
    let _ = pool_stop_tx.send(true);
    for task in pool_tasks {
        let _ = task.await;
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
    for server in [grpc, http] {
        server.await.map_err(|e| RunError::Serve(e.to_string()))?.map_err(RunError::Serve)?;
    }
    store.close().await;
    info!("master stopped");
    Ok(())
}

/// Opens the database. It may not be up yet (a fresh install starts both at once): a server
/// database is waited for here rather than crash-looping, until `shutdown` (then `None`); a
/// broken schema or URL is not retried.
async fn connect(
    config: &Config,
    clock: Clock,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<Option<Store>, RunError> {
    let mut delay = Duration::from_millis(500);
    loop {
        match Store::connect_with_clock(&config.database, clock).await {
            Ok(store) => return Ok(Some(store)),
            Err(StoreError::Connect { url, source }) if !config.database.starts_with("sqlite:") => {
                warn!(%url, error = %source, retry_in = ?delay, "cannot reach the database yet");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut *shutdown => return Ok(None),
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// A server task; it ends once `stop` turns true and its connections have closed.
type Server = tokio::task::JoinHandle<Result<(), String>>;

/// Serves the worker port on `listener`, over TLS when `tls` is given: kiln-workers' gRPC
/// sessions and Buildbot workers' WebSockets (see [`worker_port`]).
fn serve_workers(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    master: &Arc<Master>,
    service: WorkerGrpc,
    mut stop: watch::Receiver<bool>,
) -> Result<Server, RunError> {
    let service = service.into_server();
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(service);
    let buildbot = crate::msgpack::router(Arc::clone(master));
    let header_timeout = Duration::from_secs_f64(master.config.http.request_timeout);
    let mut ws_stop = stop.clone();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let ws_stopped = async move {
        let _ = ws_stop.wait_for(|s| *s).await;
    };
    let serve_error = |e: std::io::Error| RunError::Serve(e.to_string());
    Ok(match tls {
        None => {
            let (grpc, websockets) = worker_port::plain(listener).map_err(serve_error)?;
            tokio::spawn(async move {
                let incoming = ReceiverStream::new(grpc).map(Ok::<_, std::io::Error>);
                let websockets = serve_router(websockets, buildbot, header_timeout, ws_stopped);
                let (grpc, _) = tokio::join!(router.serve_with_incoming_shutdown(incoming, stopped), websockets);
                grpc.map_err(|e| e.to_string())
            })
        }
        Some(acceptor) => {
            let (grpc, websockets) = worker_port::tls(listener, acceptor).map_err(serve_error)?;
            tokio::spawn(async move {
                let incoming = ReceiverStream::new(grpc).map(Ok::<_, std::io::Error>);
                let websockets = serve_router(websockets, buildbot, header_timeout, ws_stopped);
                let (grpc, _) = tokio::join!(router.serve_with_incoming_shutdown(incoming, stopped), websockets);
                grpc.map_err(|e| e.to_string())
            })
        }
    })
}

/// Serves the HTTP API on `listener`, over TLS when `tls` is given; a client must send each
/// request's headers within `header_timeout`.
fn serve_http(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: axum::Router,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<Server, RunError> {
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    Ok(match tls {
        None => tokio::spawn(async move {
            serve_router(listener, router, header_timeout, stopped).await;
            Ok(())
        }),
        Some(acceptor) => {
            let listener = tls::TlsListener::new(listener, acceptor).map_err(|e| RunError::Serve(e.to_string()))?;
            tokio::spawn(async move {
                serve_router(listener, router, header_timeout, stopped).await;
                Ok(())
            })
        }
    })
}

/// Serves `router` on `listener` until `stopped`, then ends each connection once its request in
/// progress is answered — as `axum::serve` does, but with a deadline for each request's headers
/// (which also bounds how long a kept-alive connection waits for its next request), so that
/// connections that never finish a request cannot pile up. Handlers find the peer as
/// `ConnectInfo<L::Addr>`. An upgraded connection (a WebSocket) is its handler's from then on.
async fn serve_router<L>(
    mut listener: L,
    router: axum::Router,
    header_timeout: Duration,
    stopped: impl Future<Output = ()>,
) where
    L: axum::serve::Listener,
    L::Addr: Clone + Send + Sync + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stopped = std::pin::pin!(stopped);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stopped => break,
        };
        let service = tower::ServiceExt::map_request(router.clone(), move |mut request: axum::http::Request<_>| {
            request.extensions_mut().insert(axum::extract::ConnectInfo(peer.clone()));
            request
        });
        let service = hyper_util::service::TowerToHyperService::new(service);
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service).into_owned();
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "an HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
}

/// What local pools need to start workers: one binary per local pool, in configuration order,
/// the address workers dial, and the token that admits them.
struct LocalWorkers {
    binaries: Vec<PathBuf>,
    grpc: String,
    token: String,
}

/// Builds each configured pool's backend and starts its scaler.
fn start_pools(
    master: &Arc<Master>,
    local: LocalWorkers,
    kube_client: Option<kube::Client>,
    stop: watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, RunError> {
    let config = &master.config;
    let mut binaries = local.binaries.into_iter();
    let mut pools = Vec::new();
    for (i, pool_config) in config.pools.iter().enumerate() {
        let backend = match pool_config.backend {
            BackendKind::Local => {
                let binary = binaries.next().ok_or_else(|| RunError::Config {
                    key: format!("pools[{i}]"),
                    reason: "no kiln-worker binary was located for this pool".into(),
                })?;
                Backend::Local(Arc::new(LocalPool::new(
                    pool_config.clone(),
                    binary,
                    local.grpc.clone(),
                    local.token.clone(),
                    config.data_dir.clone(),
                )))
            }
            BackendKind::Kubernetes => {
                let (Some(k8s), Some(client)) = (pool_config.kubernetes.as_ref(), kube_client.clone()) else {
                    return Err(RunError::Config {
                        key: format!("pools[{i}].kubernetes"),
                        reason: "a kubernetes pool needs its deployment and a cluster client".into(),
                    });
                };
                Backend::Kubernetes(Arc::new(KubernetesPool::new(
                    client,
                    k8s.namespace.as_deref(),
                    &k8s.deployment,
                    &pool_config.name,
                )))
            }
            BackendKind::Static => Backend::Static,
        };
        pools.push(Arc::new(Pool::new(pool_config.clone(), backend)));
    }
    master.set_pools(pools.clone());
    Ok(pools
        .into_iter()
        .map(|pool| {
            let port = MasterPort {
                store: master.store.clone(),
                workers: Arc::clone(&master.workers),
                signals: Arc::clone(&master.signals),
                builderids: master.pool_builder_ids(&pool.config.name).unwrap_or_default().to_vec(),
            };
            tokio::spawn(pool.run(port, stop.clone(), Duration::from_secs(30)))
        })
        .collect())
}
