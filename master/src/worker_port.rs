//! The worker port: one listener for kiln-workers (gRPC over HTTP/2) and Buildbot's workers
//! (a WebSocket carrying msgpack), told apart by what they send first, over TLS by the protocol
//! the TLS handshake agreed. A Buildbot worker still on the PB protocol waits for the server to
//! speak first; it is known by that silence and refused with a line saying what to change.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, warn};

/// How long a client may stay silent before it is taken for a PB worker.
const SILENCE: Duration = Duration::from_secs(3);
/// How long a TLS handshake may take.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// A connection, whatever carries it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Connections for the WebSocket side, as an HTTP server's listener.
pub struct WebSocketListener {
    connections: mpsc::Receiver<(Box<dyn Io>, SocketAddr)>,
    local: SocketAddr,
    tls: bool,
}

impl axum::serve::Listener for WebSocketListener {
    type Io = Box<dyn Io>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some((io, addr)) => (io, Peer { addr, tls: self.tls }),
            // The accept loop only ends with the runtime.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(Peer { addr: self.local, tls: self.tls })
    }
}

/// The address of a WebSocket client and whether it came over TLS, for handlers
/// (`ConnectInfo<Peer>`).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: SocketAddr,
    pub tls: bool,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, WebSocketListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, WebSocketListener>) -> Self {
        *stream.remote_addr()
    }
}

/// What a client's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spoken {
    Http2,
    Http1,
    Tls,
    /// The connection closed before saying anything.
    Closed,
    Other,
}

fn classify(bytes: &[u8]) -> Spoken {
    match bytes {
        [] => Spoken::Closed,
        [0x16, ..] => Spoken::Tls,
        _ if bytes.starts_with(b"PRI ") => Spoken::Http2,
        _ if bytes.starts_with(b"GET ") => Spoken::Http1,
        _ => Spoken::Other,
    }
}

/// The first bytes on a TCP connection, left unread; `None` when it stays silent.
async fn peek(tcp: &TcpStream) -> Option<Vec<u8>> {
    let mut buf = [0u8; 4];
    tokio::time::timeout(SILENCE, async {
        loop {
            match tcp.peek(&mut buf).await {
                Ok(n) if n >= buf.len() || n == 0 => return buf[..n].to_vec(),
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(_) => return Vec::new(),
            }
        }
    })
    .await
    .ok()
}

/// Banana (PB's encoding) for the one-element list `["msgpack_experimental_v7"]`: offered to a
/// PB worker as the only dialect this side speaks, it makes the worker log that it speaks none
/// of the server's protocols and disconnect, rather than retry in silence.
const PB_DIALECTS: &[u8] = b"\x01\x80\x17\x82msgpack_experimental_v7";

async fn refuse_pb(stream: &mut (impl AsyncWrite + Unpin), peer: SocketAddr, port: u16) {
    let _ = tokio::time::timeout(SILENCE, async {
        let _ = stream.write_all(PB_DIALECTS).await;
        let _ = stream.flush().await;
        // Give the worker a moment to read it and hang up first.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = stream.shutdown().await;
    })
    .await;
    warn!(
        %peer,
        "a Buildbot PB worker connected from {peer} (it said nothing, waiting for a PB greeting): Kiln speaks \
         msgpack_experimental_v7 on port {port}: set protocol = 'msgpack_experimental_v7' in buildbot.tac (for the \
         buildbot-worker image, BUILDMASTER_PROTOCOL=msgpack_experimental_v7); connection closed"
    );
}

fn refuse(peer: SocketAddr, spoken: Spoken, tls: bool) {
    match (spoken, tls) {
        (Spoken::Closed, _) => debug!(%peer, "a client closed its connection before saying anything"),
        (Spoken::Tls, false) => warn!(%peer, "a TLS client connected to the plain-text worker port; connection closed"),
        (Spoken::Http1 | Spoken::Http2, true) => warn!(
            %peer,
            "a plain-text client connected to the worker port, which serves TLS (workers.tls); connection closed"
        ),
        _ => warn!(%peer, "a client on the worker port spoke neither gRPC nor a WebSocket; connection closed"),
    }
}

/// Where a connection goes once it is told apart: to gRPC, or to the WebSocket side.
type Routes<G> = (mpsc::Sender<G>, mpsc::Sender<(Box<dyn Io>, SocketAddr)>);

/// Accepts connections on `listener` and hands each to `route` on a task of its own, until the
/// gRPC server has ended (then the loop, and with it the listening socket, ends).
fn split<G, F, Fut>(listener: TcpListener, tls: bool, route: F) -> io::Result<(mpsc::Receiver<G>, WebSocketListener)>
where
    G: Send + 'static,
    F: Fn(TcpStream, SocketAddr, u16, Routes<G>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr()?;
    let (grpc_tx, grpc_rx) = mpsc::channel(64);
    let (ws_tx, ws_rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = accept(&listener) => accepted,
                _ = grpc_tx.closed() => return,
            };
            let Some((tcp, peer)) = accepted else { continue };
            tokio::spawn(route(tcp, peer, local.port(), (grpc_tx.clone(), ws_tx.clone())));
        }
    });
    Ok((grpc_rx, WebSocketListener { connections: ws_rx, local, tls }))
}

/// Splits a plain-text worker port: gRPC connections on the first receiver, WebSocket ones on
/// the listener.
pub fn plain(listener: TcpListener) -> io::Result<(mpsc::Receiver<TcpStream>, WebSocketListener)> {
    split(listener, false, |mut tcp, peer, port, (grpc, ws)| async move {
        match peek(&tcp).await.map(|bytes| classify(&bytes)) {
            Some(Spoken::Http2) => drop(grpc.send(tcp).await),
            Some(Spoken::Http1) => drop(ws.send((Box::new(tcp) as Box<dyn Io>, peer)).await),
            None => refuse_pb(&mut tcp, peer, port).await,
            Some(other) => refuse(peer, other, false),
        }
    })
}

/// Splits a TLS worker port: after the handshake, clients that agreed on HTTP/2 are gRPC; the
/// others (Buildbot's worker asks for no protocol) are looked at as on a plain port.
pub fn tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> io::Result<(mpsc::Receiver<TlsStream<TcpStream>>, WebSocketListener)> {
    split(listener, true, move |mut tcp, peer, port, (grpc, ws)| {
        let acceptor = acceptor.clone();
        async move {
            match peek(&tcp).await.map(|bytes| classify(&bytes)) {
                Some(Spoken::Tls) => {}
                None => return refuse_pb(&mut tcp, peer, port).await,
                Some(other) => return refuse(peer, other, true),
            }
            let mut stream = match tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => return debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => return debug!(%peer, "TLS handshake timed out"),
            };
            if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                let _ = grpc.send(stream).await;
                return;
            }
            let mut first = [0u8; 4];
            let read = tokio::time::timeout(SILENCE, stream.read(&mut first)).await;
            match read {
                Err(_) => refuse_pb(&mut stream, peer, port).await,
                Ok(Ok(n)) if n > 0 && (classify(&first[..n]) == Spoken::Http1 || b"GET ".starts_with(&first[..n])) => {
                    let prefixed = Prefixed { prefix: first[..n].to_vec(), inner: stream };
                    let _ = ws.send((Box::new(prefixed) as Box<dyn Io>, peer)).await;
                }
                Ok(Ok(n)) => refuse(peer, classify(&first[..n]), false),
                Ok(Err(error)) => debug!(%peer, %error, "a TLS client's connection failed"),
            }
        }
    })
}

async fn accept(listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
    match listener.accept().await {
        Ok(accepted) => Some(accepted),
        Err(error) => {
            debug!(%error, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// A stream whose first bytes were already read: they are read again first.
struct Prefixed<S> {
    prefix: Vec<u8>,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_name_the_protocol() {
        assert_eq!(classify(b"PRI * HTTP/2.0"), Spoken::Http2);
        assert_eq!(classify(b"GET / HTTP/1.1"), Spoken::Http1);
        assert_eq!(classify(&[0x16, 3, 1, 0]), Spoken::Tls);
        assert_eq!(classify(b""), Spoken::Closed);
        assert_eq!(classify(b"\x00\x01"), Spoken::Other);
    }

    #[tokio::test]
    async fn read_bytes_come_back_before_the_rest() {
        let mut stream = Prefixed { prefix: b"GE".to_vec(), inner: &b"T /"[..] };
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        assert_eq!(text, "GET /");
    }
}
