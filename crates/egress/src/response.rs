//! Keeping secret values out of the responses the proxy relays.
//!
//! The proxy puts a secret's value into requests to the secret's hosts; a
//! server that reflects it (an echo endpoint, an error page quoting the
//! request, a token in a redirect) would hand it to the sandbox. So in every
//! response the proxy parses (plain HTTP and intercepted HTTPS), each
//! secret's value is replaced by its placeholder: in the status line, in
//! header names and values, in the body — streamed, so a value split
//! between two reads or chunks is still caught (the replacer holds back at
//! most a value's length less one byte) — and in trailers. A body that
//! changes length can no longer carry its Content-Length, so that header is
//! dropped and the body goes out chunked.
//!
//! A compressed body hides the value from this scan. Requests to a secret's
//! hosts therefore ask for `Accept-Encoding: identity`, and a response to
//! one that is encoded anyway is refused. Compressed responses from other
//! hosts pass as they are: they never received the value from the proxy.
//! What cannot be caught is a value the server transforms before sending it
//! back (encoded, reversed, split over several responses, lowercased);
//! SECURITY.md says so.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};

use crate::redact::Redactor;

/// The secrets as the replacer needs them: `(name, value)` and each name's
/// placeholder.
pub(crate) struct Replacements {
    values: Vec<(String, Vec<u8>)>,
    placeholders: Vec<(String, Vec<u8>)>,
}

impl Replacements {
    /// Every secret of the sandbox: a server may hold a value it got
    /// elsewhere, so all are replaced wherever they come from.
    pub fn of(shared: &crate::proxy::Shared) -> Replacements {
        let mut values = Vec::new();
        let mut placeholders = Vec::new();
        for secret in shared.secrets.iter().map(|s| &s.secret) {
            values.push(secret.redaction_entry());
            placeholders.push((secret.name.clone(), secret.placeholder.as_bytes().to_vec()));
        }
        Replacements { values, placeholders }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    fn placeholder(&self, name: &str) -> Vec<u8> {
        self.placeholders.iter().find(|(n, _)| n == name).map(|(_, p)| p.clone()).unwrap_or_default()
    }

    /// Replaces values with their placeholders.
    pub fn replacer(&self) -> Redactor {
        Redactor::replacing(&self.values, |name| self.placeholder(name))
    }

    /// The same for header names, which arrive lowercased: lowercased
    /// values, lowercased placeholders.
    fn name_replacer(&self) -> Redactor {
        let lowered: Vec<(String, Vec<u8>)> =
            self.values.iter().map(|(n, v)| (n.clone(), v.to_ascii_lowercase())).collect();
        Redactor::replacing(&lowered, |name| self.placeholder(name).to_ascii_lowercase())
    }

    /// Every header with values (and names) replaced. A header whose
    /// replaced name is not a valid name any more is dropped.
    pub fn headers(&self, headers: &HeaderMap) -> HeaderMap {
        let mut values = self.replacer();
        let mut names = self.name_replacer();
        let mut out = HeaderMap::with_capacity(headers.len());
        for (name, value) in headers {
            let name = match names.redact(name.as_str().as_bytes()) {
                same if same == name.as_str().as_bytes() => name.clone(),
                changed => match HeaderName::from_bytes(&changed) {
                    Ok(renamed) => renamed,
                    Err(_) => continue,
                },
            };
            let replaced = values.redact(value.as_bytes());
            let value = if replaced == value.as_bytes() {
                value.clone()
            } else {
                match HeaderValue::from_bytes(&replaced) {
                    Ok(v) => v,
                    Err(_) => continue,
                }
            };
            out.append(name, value);
        }
        out
    }
}

/// Why a response to a request that carried a secret's host cannot be
/// checked, if it cannot: a body encoded other than `identity`.
pub(crate) fn unreadable_encoding(headers: &HeaderMap, host: &str) -> Option<String> {
    let encodings: Vec<&str> = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let encoded = encodings.iter().any(|e| !e.eq_ignore_ascii_case("identity"));
    encoded.then(|| {
        format!(
            "the response from {host} is encoded ({}) although the proxy asked for identity; a secret's value \
             in it could not be replaced",
            encodings.join(", ")
        )
    })
}

/// The response with every secret value replaced by its placeholder:
/// status line, headers, body and trailers. A response without a body (to a
/// HEAD request, 204, 304) keeps its Content-Length, which describes
/// another response.
pub(crate) fn replace_values<B>(
    replacements: &Arc<Replacements>,
    response: Response<B>,
    head_request: bool,
) -> Response<Replacing<B>> {
    let (mut parts, body) = response.into_parts();
    parts.headers = replacements.headers(&parts.headers);
    if let Some(reason) = parts.extensions.remove::<hyper::ext::ReasonPhrase>() {
        let replaced = replacements.replacer().redact(reason.as_bytes());
        if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(replaced) {
            parts.extensions.insert(reason);
        }
    }
    let no_body =
        head_request || parts.status == StatusCode::NO_CONTENT || parts.status == StatusCode::NOT_MODIFIED;
    if !no_body {
        parts.headers.remove(CONTENT_LENGTH);
    }
    let body = Replacing {
        inner: body,
        replacements: replacements.clone(),
        replacer: replacements.replacer(),
        trailers: None,
        done: false,
    };
    Response::from_parts(parts, body)
}

/// A body whose secret values are replaced as it streams.
pub(crate) struct Replacing<B> {
    inner: B,
    replacements: Arc<Replacements>,
    replacer: Redactor,
    /// Trailers that arrived, sent after the held-back bytes.
    trailers: Option<HeaderMap>,
    done: bool,
}

impl<B> Body for Replacing<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    this.done = true;
                    let rest = this.replacer.finish();
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                    }
                    continue;
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    let out = this.replacer.feed(&data);
                    // An empty frame would end a chunked body early: wait for more.
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        this.trailers = Some(this.replacements.headers(&trailers));
                    }
                    this.done = true;
                    let rest = this.replacer.finish();
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // The length may change: never exact, so the body goes out chunked.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::VecDeque;
    use std::convert::Infallible;

    use http_body_util::BodyExt;

    use super::*;

    const VALUE: &str = "tok-Sekr3t-4711";
    const PLACEHOLDER: &str = "airlock-placeholder-TOKEN-00112233445566778899aabbccddeeff";

    fn replacements() -> Arc<Replacements> {
        Arc::new(Replacements {
            values: vec![("TOKEN".into(), VALUE.as_bytes().to_vec()), ("OTHER".into(), b"zz-9".to_vec())],
            placeholders: vec![
                ("TOKEN".into(), PLACEHOLDER.as_bytes().to_vec()),
                ("OTHER".into(), b"airlock-placeholder-OTHER-0".to_vec()),
            ],
        })
    }

    /// A body made of the given frames, as a server's reads would give them.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn data(pieces: &[&[u8]]) -> Frames {
        Frames(pieces.iter().map(|p| Frame::data(Bytes::copy_from_slice(p))).collect())
    }

    async fn relayed(body: Frames) -> (Vec<u8>, Option<HeaderMap>) {
        let response = replace_values(&replacements(), Response::new(body), false);
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn a_value_split_anywhere_between_chunks_becomes_the_placeholder() {
        let text = format!("{{\"echo\": \"Bearer {VALUE}\", \"again\": \"{VALUE}{VALUE}\"}}");
        let want = text.replace(VALUE, PLACEHOLDER);
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            let (out, _) = relayed(data(&[&bytes[..cut], &bytes[cut..]])).await;
            assert_eq!(String::from_utf8(out).unwrap(), want, "cut at {cut}");
        }
        // One byte per chunk, and empty chunks in between.
        let bytewise: Vec<&[u8]> = bytes.chunks(1).flat_map(|c| [c, b"".as_slice()]).collect();
        let (out, _) = relayed(data(&bytewise)).await;
        assert_eq!(String::from_utf8(out).unwrap(), want);
        // A prefix of the value at the very end is not the value: it is kept.
        let (out, _) = relayed(data(&[b"tail ", &VALUE.as_bytes()[..5]])).await;
        assert_eq!(out, format!("tail {}", &VALUE[..5]).as_bytes());
    }

    #[tokio::test]
    async fn trailers_are_replaced_too() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-token", HeaderValue::from_static(VALUE));
        let mut frames = data(&[b"body ", &VALUE.as_bytes()[..3]]);
        frames.0.push_back(Frame::trailers(trailers));
        let (out, trailers) = relayed(frames).await;
        assert_eq!(out, format!("body {}", &VALUE[..3]).as_bytes());
        assert_eq!(trailers.unwrap()["x-token"], PLACEHOLDER);
    }

    #[test]
    fn status_line_and_headers_are_replaced_and_the_length_dropped() {
        let mut response = Response::new(data(&[]));
        let headers = response.headers_mut();
        headers.insert("x-reflected", HeaderValue::from_str(&format!("Bearer {VALUE}")).unwrap());
        headers.append("set-cookie", HeaderValue::from_str(&format!("t={VALUE}")).unwrap());
        headers.append("set-cookie", HeaderValue::from_static("plain=1"));
        headers.insert("content-length", HeaderValue::from_static("42"));
        headers.insert(
            HeaderName::from_bytes(format!("x-{VALUE}").to_lowercase().as_bytes()).unwrap(),
            HeaderValue::from_static("1"),
        );
        response.extensions_mut().insert(hyper::ext::ReasonPhrase::try_from(format!("OK {VALUE}")).unwrap());

        let out = replace_values(&replacements(), response, false);
        let headers = out.headers();
        assert_eq!(headers["x-reflected"], format!("Bearer {PLACEHOLDER}").as_str());
        let cookies: Vec<&HeaderValue> = headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, [&format!("t={PLACEHOLDER}"), "plain=1"]);
        assert!(!headers.contains_key("content-length"));
        let renamed = format!("x-{}", PLACEHOLDER.to_lowercase());
        assert!(headers.contains_key(renamed.as_str()), "{headers:?}");
        let shown = format!("{headers:?}");
        assert!(!shown.to_lowercase().contains(&VALUE.to_lowercase()), "{shown}");
        let reason = out.extensions().get::<hyper::ext::ReasonPhrase>().unwrap();
        assert_eq!(reason.as_bytes(), format!("OK {PLACEHOLDER}").as_bytes());

        // No body follows a HEAD response: its length stays.
        let mut head = Response::new(data(&[]));
        head.headers_mut().insert("content-length", HeaderValue::from_static("42"));
        assert_eq!(replace_values(&replacements(), head, true).headers()["content-length"], "42");
    }

    #[test]
    fn only_identity_bodies_can_be_read() {
        let with = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(v) = value {
                headers.insert(CONTENT_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            unreadable_encoding(&headers, "api.example.com")
        };
        assert_eq!(with(None), None);
        assert_eq!(with(Some("identity")), None);
        assert_eq!(with(Some("Identity")), None);
        for encoded in ["gzip", "br", "identity, gzip", "x-custom"] {
            let reason = with(Some(encoded)).unwrap();
            assert!(reason.contains("api.example.com") && reason.contains("encoded"), "{reason}");
        }
    }
}
