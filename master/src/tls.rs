//! TLS for the master's listeners: a certificate and key read from PEM files and read again when
//! they change (cert-manager rotates them in place), handshakes done off the accept loop, and
//! the resulting streams handed to the gRPC and HTTP servers.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use crate::config::TlsConfig;

/// How often the certificate files are checked for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(5);
/// How long a client may take over its handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct TlsError {
    /// The configuration key whose files are at fault.
    pub key: String,
    pub reason: String,
}

/// The certificate the listener presents, swapped when its files change.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>)>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().expect("certificate lock poisoned").0))
    }
}

/// The newest modification time of a certificate and its key (a rotation may replace either).
fn stamp(cert: &Path, key: &Path) -> Option<SystemTime> {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    modified(cert).max(modified(key))
}

impl Reloading {
    /// Reads the files again if they changed; a broken new pair keeps the old one in service.
    fn refresh(&self) {
        let stamp = stamp(&self.cert, &self.key);
        if stamp == self.current.read().expect("certificate lock poisoned").1 {
            return;
        }
        match certified_key(&self.cert, &self.key) {
            Ok(key) => {
                *self.current.write().expect("certificate lock poisoned") = (Arc::new(key), stamp);
                info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(reason) => {
                warn!(cert = %self.cert.display(), %reason, "cannot reload the TLS certificate; keeping the old one")
            }
        }
    }
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    CertifiedKey::from_der(chain, key, &ring::default_provider()).map_err(|e| e.to_string())
}

/// Builds the acceptor of the listener configured at `key` (`workers.tls`, `http.tls`) and
/// starts watching its files.
pub fn acceptor(key: &str, tls: &TlsConfig, alpn: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
    let error = |reason: String| TlsError { key: key.to_owned(), reason };
    let read_at = stamp(&tls.cert, &tls.key);
    let first = certified_key(&tls.cert, &tls.key).map_err(error)?;
    let reloading = Arc::new(Reloading {
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        current: RwLock::new((Arc::new(first), read_at)),
    });
    let builder = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| error(e.to_string()))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in
                CertificateDer::pem_file_iter(ca).map_err(|e| error(format!("cannot read {}: {e}", ca.display())))?
            {
                roots
                    .add(cert.map_err(|e| error(format!("{}: {e}", ca.display())))?)
                    .map_err(|e| error(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots)).build().map_err(|e| error(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::clone(&reloading) as Arc<dyn ResolvesServerCert>);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let watched = Arc::downgrade(&reloading);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(reloading) = watched.upgrade() else { return };
            tokio::task::spawn_blocking(move || reloading.refresh()).await.ok();
        }
    });
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts TCP connections on `listener` and completes their handshakes concurrently; the
/// streams that finish one arrive on the returned channel. A failed handshake (a client that
/// does not trust the certificate, or speaks plain text) is logged and dropped.
pub fn accept(listener: TcpListener, acceptor: TlsAcceptor) -> mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, sender) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = sender.send((stream, peer)).await;
                    }
                    Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// TLS connections as an HTTP server's listener.
pub struct TlsListener {
    streams: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        Ok(TlsListener { streams: accept(listener, acceptor), local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.streams.recv().await {
            Some(accepted) => accepted,
            // The accept loop only ends with the runtime.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
