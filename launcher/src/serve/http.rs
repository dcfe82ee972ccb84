//! The HTTP layer: routes (`POST /v1/predict`, `GET /healthz`, `GET
//! /metrics`), bodies read within their bound, and the JSON replies. It
//! turns the pure layers' refusals into status codes: [`Refused`] into 401,
//! [`Limited`] into 429 with `Retry-After`, oversized bodies and batches
//! into 413.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use warden_agent::job::spec::ModelSpec;

use super::answer::{Predictions, answer};
use super::auth::{self, Refused};
use super::batch::ForwardQueue;
use super::budget::{self, Limited, Now};
use super::config::{Config, Policy};
use super::input;
use super::metrics::{Metrics, add};
use super::state::Ledger;

/// What every request shares.
pub(super) struct Server {
    pub(super) model: ModelSpec,
    /// Runs the forward passes, batching concurrent requests.
    pub(super) forward: ForwardQueue,
    pub(super) config: Config,
    pub(super) ledger: Ledger,
    pub(super) metrics: Metrics,
    /// One permit per open connection, and one per TLS handshake in progress.
    pub(super) connections: Arc<tokio::sync::Semaphore>,
    pub(super) handshakes: Arc<tokio::sync::Semaphore>,
}

type Reply = Response<Full<Bytes>>;

fn reply(code: StatusCode, body: impl Serialize) -> Reply {
    // Replies are plain structs and strings; should one ever fail to
    // encode, the client still gets valid JSON.
    let text = serde_json::to_vec(&body).unwrap_or_else(|_| br#"{"error": "the reply could not be encoded"}"#.to_vec());
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = code;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(code: StatusCode, message: impl Into<String>) -> Reply {
    reply(code, serde_json::json!({ "error": message.into() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictRequest {
    input: Option<Vec<f32>>,
    inputs: Option<Vec<Vec<f32>>>,
}

/// Serves HTTP/1.1 requests on an established TLS connection until the
/// client leaves or sends no complete request header for `idle_timeout`.
pub(super) async fn serve_connection<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    server: Arc<Server>,
    io: IO,
    client: Option<Arc<str>>,
    idle_timeout: Duration,
) {
    let service = hyper::service::service_fn(move |req| server.clone().handle(req, client.clone()));
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(idle_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

impl Server {
    async fn handle(self: Arc<Self>, req: Request<Incoming>, client: Option<Arc<str>>) -> Result<Reply, Infallible> {
        let started = Instant::now();
        add(&self.metrics.requests, 1);
        let r = match (req.method(), req.uri().path()) {
            (&Method::POST, "/v1/predict") => self.predict(req, client.as_deref()).await,
            (&Method::GET, "/healthz") => reply(StatusCode::OK, serde_json::json!({ "status": "ok" })),
            (&Method::GET, "/metrics") => self.metrics(&req, client.as_deref()),
            (_, "/v1/predict" | "/healthz" | "/metrics") => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            _ => error(StatusCode::NOT_FOUND, "no such endpoint; try POST /v1/predict"),
        };
        add(&self.metrics.latency_us, started.elapsed().as_micros() as u64);
        Ok(r)
    }

    /// Who asks, from the bearer key or the client certificate, or 401.
    fn authenticate(
        &self,
        req: &Request<Incoming>,
        client: Option<&str>,
        anonymous_ok: bool,
    ) -> Result<(String, Policy), Box<Reply>> {
        let key = req.headers().get(header::AUTHORIZATION).and_then(|h| h.to_str().ok());
        auth::identify(&self.config, key.and_then(|h| h.strip_prefix("Bearer ")), client, anonymous_ok).map_err(
            |why: Refused| {
                add(&self.metrics.unauthorized, 1);
                let mut r = error(StatusCode::UNAUTHORIZED, why.to_string());
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                Box::new(r)
            },
        )
    }

    /// Charges `n` queries to `id`, or 429 with when to come back.
    fn charge(&self, id: &str, policy: &Policy, n: u64) -> Result<(), Box<Reply>> {
        let charged = self.ledger.with_key(id, |k| {
            let now = Now::read();
            let throttled = self.config.detector.as_ref().and_then(|d| d.charged_policy(&k.trail, policy));
            budget::charge(&mut k.usage, throttled.as_ref().unwrap_or(policy), n, now)
        });
        charged.map_err(|Limited { why, retry_after }| {
            add(&self.metrics.limited, 1);
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, why.to_string());
            if let Some(s) = retry_after {
                r.headers_mut().insert(header::RETRY_AFTER, s.into());
            }
            Box::new(r)
        })?;
        self.ledger.changed();
        Ok(())
    }

    async fn predict(&self, req: Request<Incoming>, client: Option<&str>) -> Reply {
        let (id, policy) = match self.authenticate(&req, client, true) {
            Ok(x) => x,
            Err(r) => return *r,
        };
        // The body is dropped once parsed: hyper can reuse its read buffer.
        let inputs = match self.read_body(req).await.and_then(|body| self.parse_inputs(&body)) {
            Ok(inputs) => inputs,
            Err(r) => return *r,
        };
        if let Err(r) = self.charge(&id, &policy, inputs.len() as u64) {
            return *r;
        }
        let rows = inputs.len();
        // One input (the common case) goes to the model as it is; the
        // detector, when configured, needs the inputs afterwards.
        let (flat, inputs) = if rows == 1 && self.config.detector.is_none() {
            let mut inputs = inputs;
            (inputs.pop().unwrap_or_default(), inputs)
        } else {
            (inputs.concat(), inputs)
        };
        let Some(probs) = self.forward.predict(flat, rows).await else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "the model is not answering; try again");
        };
        let predictions: Vec<_> = probs.chunks_exact(self.model.classes).map(|row| answer(row, &policy)).collect();
        add(&self.metrics.predictions, rows as u64);
        self.watch(&id, inputs);
        reply(StatusCode::OK, Predictions { predictions })
    }

    fn too_large(&self, what: String) -> Box<Reply> {
        add(&self.metrics.too_large, 1);
        Box::new(error(StatusCode::PAYLOAD_TOO_LARGE, what))
    }

    fn bad(&self, why: String) -> Box<Reply> {
        add(&self.metrics.bad, 1);
        Box::new(error(StatusCode::BAD_REQUEST, why))
    }

    /// The request body, at most `max_body` bytes, or 413 (400 if it was cut
    /// off or too slow).
    async fn read_body(&self, req: Request<Incoming>) -> Result<Bytes, Box<Reply>> {
        let max_body = self.config.max_body;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        // Read at most max_body bytes. Past that, the rest is read and thrown
        // away (up to a bound, for a short while) so that the client, still
        // sending, gets to read the 413 instead of a reset connection.
        let mut over = declared.is_some_and(|n| n > max_body);
        let mut body = req.into_body();
        // A body that arrives in one frame (one read: the common case) is
        // kept as hyper hands it over; more frames are copied together.
        let (mut first, mut joined) = (None::<Bytes>, Vec::new());
        let mut kept = 0usize;
        let mut drained = 0usize;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else { continue };
                    if !over && kept + data.len() <= max_body {
                        kept += data.len();
                        if first.is_none() && joined.is_empty() {
                            first = Some(data);
                        } else {
                            if let Some(f) = first.take() {
                                joined.extend_from_slice(&f);
                            }
                            joined.extend_from_slice(&data);
                        }
                    } else {
                        over = true;
                        drained += data.len();
                        if drained > 16 * max_body {
                            break;
                        }
                    }
                }
                Ok(None) => break,
                Ok(Some(Err(_))) | Err(_) => {
                    if !over {
                        return Err(Box::new(error(
                            StatusCode::BAD_REQUEST,
                            "the request body was cut off or too slow",
                        )));
                    }
                    break;
                }
            }
        }
        if over {
            return Err(self.too_large(format!("bodies are at most {max_body} bytes")));
        }
        Ok(first.unwrap_or_else(|| Bytes::from(joined)))
    }

    /// The inputs of a request body, each of the model's width and finite,
    /// at most `max_batch` of them; or 400 or 413.
    fn parse_inputs(&self, body: &[u8]) -> Result<Vec<Vec<f32>>, Box<Reply>> {
        let f = self.model.inputs;
        let inputs = match input::single_input(body, f) {
            Some(one) => vec![one],
            None => {
                let parsed: PredictRequest = serde_json::from_slice(body).map_err(|e| {
                    self.bad(format!("expected {{\"input\": [...]}} or {{\"inputs\": [[...], ...]}}: {e}"))
                })?;
                match (parsed.input, parsed.inputs) {
                    (Some(one), None) => vec![one],
                    (None, Some(many)) if !many.is_empty() => many,
                    _ => return Err(self.bad("give exactly one of `input` or a non-empty `inputs`".into())),
                }
            }
        };
        if inputs.len() > self.config.max_batch {
            return Err(self.too_large(format!(
                "a batch of {} inputs; at most {}",
                inputs.len(),
                self.config.max_batch
            )));
        }
        if let Some((i, x)) = inputs.iter().enumerate().find(|(_, x)| x.len() != f || x.iter().any(|v| !v.is_finite()))
        {
            return Err(self.bad(format!("input {i} has {} values; this model takes {f} finite numbers", x.len())));
        }
        Ok(inputs)
    }

    /// Feeds the detector, when configured; reports a key it flags.
    fn watch(&self, id: &str, inputs: Vec<Vec<f32>>) {
        let Some(det) = &self.config.detector else { return };
        let Some((cv, n)) = self.ledger.with_key(id, |k| det.observe(&mut k.trail, inputs)) else { return };
        self.ledger.changed();
        add(&self.metrics.flagged, 1);
        let what = if det.throttle.is_some() { "throttled" } else { "logged only" };
        eprintln!(
            "warden serve: key `{id}` flagged ({what}): the distances between its last {n} queries vary by only {:.1}% \
             (natural inputs vary far more), the pattern of synthetic extraction queries",
            cv * 100.0
        );
    }

    /// `GET /metrics`, for the key ids and certificate holders named in
    /// `[metrics]` only: the counts describe everyone's traffic.
    fn metrics(&self, req: &Request<Incoming>, client: Option<&str>) -> Reply {
        let id = match self.authenticate(req, client, false) {
            Ok((id, _)) => id,
            Err(r) => return *r,
        };
        if !self.config.metrics_readers.contains(&id) {
            return error(
                StatusCode::FORBIDDEN,
                format!("`{id}` may not read /metrics; the operator lists its readers in [metrics] keys or clients"),
            );
        }
        let open = self.config.conn.max_connections - self.connections.available_permits();
        let mut r = Response::new(Full::new(Bytes::from(self.metrics.text(open))));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
        r
    }
}
