//! The client port's accept loop: each connection served by hyper, HTTP/2 (gRPC) or HTTP/1.1
//! (the JSON gateway) as the client speaks, with the whole request stack as one service.
//!
//! tonic's `Server` does the same, with a few more layers around every request (a timeout per
//! call from `grpc-timeout`, error recovery, connection info, boxing): about 3% of the server's
//! CPU per put in a profile, for features these services do not use. A call whose client gives
//! up is still dropped: the client resets its stream and hyper drops the call's future.

use std::convert::Infallible;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::Service;

use super::{AuthorityFix, CoalescedWrites, PeerCommonName};
use crate::tls::ServerTls;
use std::sync::Arc;

/// How long to wait before accepting again after `accept` failed (out of file descriptors, say).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Serves every connection `listener` accepts with `service` until `stop` resolves; then stops
/// accepting, asks each connection to finish the calls it has, and returns once all are closed.
/// With `tls`, each connection's handshake comes first (on its own task: a slow or garbage
/// handshake holds up no one); the common name of a client certificate goes with each request
/// when client certificates are required (`--client-cert-auth`). A client may open
/// `max_concurrent_streams` streams at a time on a connection (`--max-concurrent-streams`).
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    tls: Option<Arc<ServerTls>>,
    max_concurrent_streams: u32,
    stop: impl std::future::Future<Output = ()>,
) where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper enforces its timeouts (HTTP/1's header read, HTTP/2 keep-alive) only with a timer.
    builder.http1().timer(TokioTimer::new());
    // gRPC answers carry no `date` header (grpc-go's, etcd's, have none): not one per call to
    // format, add and encode. The JSON gateway's HTTP/1.1 answers keep theirs.
    builder
        .http2()
        .timer(TokioTimer::new())
        .auto_date_header(false)
        // hyper's default is 200 a connection: a client with more watch streams on one
        // connection than that (the etcd-client crate opens each watch as a stream) saw the
        // rest wait without end. etcd's default is no limit.
        .max_concurrent_streams(max_concurrent_streams);
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let Some(tls) = tls.clone() else {
            let service = FromIncoming(service.clone(), None);
            let connection = serve_io(&builder, stream, service);
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
            continue;
        };
        let (builder, service, watcher) = (builder.clone(), service.clone(), graceful.watcher());
        tokio::spawn(async move {
            let Some((stream, common_name)) = tls.accept(stream).await else {
                return;
            };
            let common_name = common_name
                .filter(|_| tls.options().client_cert_auth)
                .map(|cn| Arc::new(PeerCommonName(cn)));
            let connection = serve_io(&builder, stream, FromIncoming(service, common_name));
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    // Closes the port: new clients are refused rather than left waiting.
    drop(listener);
    graceful.shutdown().await;
}

/// One client connection as hyper serves it.
type Connection<IO, S> = auto::Connection<
    'static,
    TokioIo<CoalescedWrites<AuthorityFix<IO>>>,
    TowerToHyperService<FromIncoming<S>>,
    TokioExecutor,
>;

/// One connection served by `builder` with `service`.
fn serve_io<IO, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: IO,
    service: FromIncoming<S>,
) -> Connection<IO, S>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    // etcdctl's `endpoint status` sends the endpoint URL as :authority, which h2 refuses.
    let io = TokioIo::new(CoalescedWrites::new(AuthorityFix::new(io)));
    builder
        .serve_connection(io, TowerToHyperService::new(service))
        .into_owned()
}

/// `service` taking hyper's request body, as tonic's services take it; with the common name
/// of the connection's client certificate put on each request.
#[derive(Clone)]
struct FromIncoming<S>(S, Option<Arc<PeerCommonName>>);

impl<S> Service<Request<Incoming>> for FromIncoming<S>
where
    S: Service<Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let mut request = request.map(Body::new);
        if let Some(cn) = &self.1 {
            request.extensions_mut().insert((**cn).clone());
        }
        self.0.call(request)
    }
}
