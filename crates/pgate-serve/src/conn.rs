//! The accept loop: HTTP/1.1 connections with a cap, a header read timeout and idle eviction.
//!
//! `axum::serve` accepts without limit and waits for request headers forever, so a client that
//! opens sockets and trickles bytes (slowloris) keeps every one of them open. Here:
//!
//! - at most `max_connections` connections are served at once (file descriptors and buffers stay
//!   bounded);
//! - a connection must deliver a complete request head within `header_timeout` of starting to
//!   wait for one (a fresh connection, or one idle between keep-alive requests), else hyper closes
//!   it;
//! - when a new connection arrives at the cap, the oldest connection that has no request in flight
//!   (still reading headers, or idle between requests) is closed to make room. A flood of slow
//!   sockets then evicts itself, while a real client, which sends its request head at once, is
//!   served: the cap cannot be held by sockets that never send a request.
//!
//! Request bodies are read by the handlers (after auth), with their own limit and timeout.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use crate::metrics::Metrics;

/// Connection limits of the accept loop.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a connection has to send a complete request head (also the keep-alive idle timeout).
    pub header_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// One open connection as the eviction sees it.
struct Entry {
    /// Requests whose response has not been fully sent or dropped yet.
    busy: Arc<AtomicUsize>,
    kill: Arc<Notify>,
}

/// Open connections by arrival order, so the oldest idle one can be found.
#[derive(Default)]
struct Table {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Entry>>,
}

impl Table {
    fn insert(&self) -> (u64, Arc<AtomicUsize>, Arc<Notify>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let busy = Arc::new(AtomicUsize::new(0));
        let kill = Arc::new(Notify::new());
        self.lock().insert(
            id,
            Entry {
                busy: busy.clone(),
                kill: kill.clone(),
            },
        );
        (id, busy, kill)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Ask the oldest connection without a request in flight to close; false when every
    /// connection is busy with a request.
    fn evict_oldest_idle(&self) -> bool {
        let mut open = self.lock();
        let victim = open
            .iter()
            .find(|(_, e)| e.busy.load(Ordering::SeqCst) == 0)
            .map(|(id, _)| *id);
        match victim.and_then(|id| open.remove(&id)) {
            Some(e) => {
                e.kill.notify_one();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts a request as in flight on its connection until its response body is done or dropped,
/// so the connection is not evicted while it answers (a stream may run for minutes).
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(c: &Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        Busy(c.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that holds its connection's [`Busy`] mark.
struct TrackedBody {
    inner: Body,
    _busy: Busy,
}

impl http_body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// What every connection task shares.
struct Shared {
    router: Router,
    builder: hyper::server::conn::http1::Builder,
    table: Table,
    metrics: Arc<Metrics>,
}

/// Serve one connection until it ends, is evicted while idle, or the server stops (then in-flight
/// requests finish first); its slot is given back at the end.
async fn connection(
    shared: Arc<Shared>,
    stream: tokio::net::TcpStream,
    mut stop: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
    (id, busy, kill): (u64, Arc<AtomicUsize>, Arc<Notify>),
) {
    let metrics = &shared.metrics;
    metrics.conn_open.fetch_add(1, Ordering::Relaxed);
    metrics.conn_total.fetch_add(1, Ordering::Relaxed);
    let in_flight = busy.clone();
    let router = shared.router.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let mark = Busy::new(&busy);
        let router = router.clone();
        async move {
            let r = router.oneshot(req.map(Body::new)).await;
            r.map(|res| {
                res.map(|b| {
                    Body::new(TrackedBody {
                        inner: b,
                        _busy: mark,
                    })
                })
            })
        }
    });
    let conn = shared.builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let r = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
            // Evicted; unless a request arrived since the eviction chose it.
            _ = kill.notified() => if in_flight.load(Ordering::SeqCst) == 0 {
                break Ok(());
            },
        }
    };
    if let Err(e) = r {
        if e.is_timeout() {
            metrics.conn_timeouts.fetch_add(1, Ordering::Relaxed);
        }
    }
    shared.table.remove(id);
    metrics.conn_open.fetch_sub(1, Ordering::Relaxed);
    drop(permit);
}

/// At the cap: evict the oldest idle connection and wait for a slot. When every connection is
/// busy with a request, look again every 50 ms, since one may go idle (keep-alive) without
/// ending; an evicted one that took a request just before its notice stays, so look again after
/// 500 ms too. `None` when the server stops first.
async fn make_room(
    slots: &Arc<Semaphore>,
    table: &Table,
    metrics: &Metrics,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Option<OwnedSemaphorePermit> {
    loop {
        let evicted = table.evict_oldest_idle();
        if evicted {
            metrics.conn_evicted.fetch_add(1, Ordering::Relaxed);
        }
        let wait = if evicted {
            Duration::from_millis(500)
        } else {
            Duration::from_millis(50)
        };
        tokio::select! {
            _ = shutdown.as_mut() => return None,
            p = slots.clone().acquire_owned() => return p.ok(),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Serve `router` on `listener` until `shutdown` resolves; then stop accepting, let in-flight
/// requests finish (idle connections close at once) and return.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cap = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(cap));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let shared = Arc::new(Shared {
        router,
        builder,
        table: Table::default(),
        metrics,
    });
    let (table, metrics) = (&shared.table, &shared.metrics);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    eprintln!("[pgate serve] accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => match make_room(&slots, table, metrics, &mut shutdown).await {
                Some(p) => p,
                None => break,
            },
        };
        // Entered in the table before its task runs: an accept that finds the cap full must be
        // able to evict every connection holding a slot, not only those whose tasks have started
        // (else it waited for a header timeout; seen as a 1.7 s /health on a loaded CI box).
        let entry = table.insert();
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            shared.clone(),
            stream,
            stop_rx.clone(),
            permit,
            entry,
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection gives its slot back when it ends: all slots back = all done.
    let _ = slots.acquire_many(cap as u32).await;
    Ok(())
}
