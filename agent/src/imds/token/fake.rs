//! A scripted stand-in for IMDS, for the tests of everything that calls it.

use std::sync::{
    Mutex,
    atomic::{AtomicUsize, Ordering},
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, StatusCode};

use super::upstream::{TransportError, Upstream, UpstreamResponse};

/// A scripted upstream: answers from a queue (the last one repeats), counts calls, records what it was asked.
pub struct FakeUpstream {
    pub script: Mutex<Vec<Scripted>>,
    pub calls: AtomicUsize,
    pub requests: Mutex<Vec<(String, HeaderMap)>>,
}

#[derive(Clone)]
pub enum Scripted {
    Status(u16, &'static str, Option<&'static str>),
    Fail(TransportError),
    Hang,
}

impl FakeUpstream {
    pub fn new(script: Vec<Scripted>) -> Self {
        FakeUpstream {
            script: Mutex::new(script),
            calls: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
        }
    }
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

pub fn reply(
    status: u16,
    body: &'static str,
    retry_after: Option<&'static str>,
) -> UpstreamResponse {
    UpstreamResponse {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        content_type: Some(HeaderValue::from_static("application/json; charset=utf-8")),
        retry_after: retry_after.map(HeaderValue::from_static),
        body: Bytes::from_static(body.as_bytes()),
    }
}

impl Upstream for FakeUpstream {
    fn get<'a>(
        &'a self,
        path_and_query: &'a str,
        headers: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<UpstreamResponse, TransportError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut r) = self.requests.lock() {
            r.push((path_and_query.to_owned(), headers.clone()));
        }
        let step = {
            let mut script = self.script.lock().unwrap_or_else(|p| p.into_inner());
            if script.len() > 1 {
                script.remove(0)
            } else {
                script[0].clone()
            }
        };
        Box::pin(async move {
            match step {
                Scripted::Status(s, body, ra) => Ok(reply(s, body, ra)),
                Scripted::Fail(e) => Err(e),
                Scripted::Hang => std::future::pending().await,
            }
        })
    }
}
