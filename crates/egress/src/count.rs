//! Byte counting for proxied HTTP bodies, so each request's audit event
//! says how much went each way. The event is recorded when the response
//! body is done (or abandoned), with the final counts.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::event::{EventSink, NetEvent};

/// A body that adds the size of every data frame to a counter.
pub(crate) struct Counted<B> {
    inner: B,
    counter: Arc<AtomicU64>,
    /// Held by the response body only: records the event when dropped.
    _record: Option<RecordOnDrop>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, counter: Arc<AtomicU64>) -> Counted<B> {
        Counted { inner, counter, _record: None }
    }

    pub fn recording(inner: B, counter: Arc<AtomicU64>, record: RecordOnDrop) -> Counted<B> {
        Counted { inner, counter, _record: Some(record) }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Records an event with the bytes counted so far, once.
pub(crate) struct RecordOnDrop {
    pub event: NetEvent,
    pub out: Arc<AtomicU64>,
    pub inbound: Arc<AtomicU64>,
    pub started: Instant,
    pub sink: Arc<dyn EventSink>,
}

impl Drop for RecordOnDrop {
    fn drop(&mut self) {
        let mut event = self.event.clone();
        event.bytes_out = self.out.load(Ordering::Relaxed);
        event.bytes_in = self.inbound.load(Ordering::Relaxed);
        event.duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.sink.record(event);
    }
}
