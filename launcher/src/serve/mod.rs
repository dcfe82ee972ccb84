//! `warden serve`: predictions from a signed model over HTTPS, built so that
//! copying the model through the API costs far more than it would with full
//! confidences and no limits (Tramèr et al., USENIX Security 2016).
//!
//! - The model is loaded only after its signature verifies, from the very
//!   bytes that verified (the file is read once).
//! - Every request needs an API key (only SHA-256 hashes of keys are on
//!   disk) unless anonymous access is configured.
//! - Answers are a label plus the top-k probabilities rounded to `precision`
//!   decimals, or labels only; per key.
//! - Each key has a token bucket, a daily and a total budget; past any, 429
//!   with `Retry-After` (except for the total, which never recovers). Counts
//!   are written to a state file, so a restart does not reset them.
//! - Bodies and batches are bounded before parsing; connections and TLS
//!   handshakes are capped (past a cap, closed at once) and have deadlines.
//! - `/metrics` answers only the keys and certificate holders named for it.
//! - The state file is private (0600) and replaced atomically (`state`).

mod input;
mod state;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use warden_agent::spec::ModelSpec;

/// What a key may get, and how much.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Labels only, or labels with rounded top-k probabilities.
    pub labels_only: bool,
    /// Decimal places of probabilities (9 is full f32 precision: test use only).
    pub precision: u32,
    /// Probabilities returned per input.
    pub top_k: usize,
    /// Queries per UTC day.
    pub per_day: u64,
    /// Queries ever.
    pub total: u64,
    /// Sustained queries per second.
    pub rate: f64,
    /// Bucket size: queries allowed at once.
    pub burst: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { labels_only: false, precision: 2, top_k: 3, per_day: 1000, total: 100_000, rate: 5.0, burst: 20.0 }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    output: Option<String>,
    precision: Option<u32>,
    top_k: Option<usize>,
    queries_per_day: Option<u64>,
    queries_total: Option<u64>,
    rate_per_s: Option<f64>,
    burst: Option<u32>,
}

impl RawPolicy {
    fn apply(&self, base: &Policy, classes: usize, whose: &str) -> Result<Policy, String> {
        let mut p = base.clone();
        if let Some(o) = &self.output {
            p.labels_only = match o.as_str() {
                "label" => true,
                "probabilities" => false,
                other => return Err(format!("{whose}: output `{other}`; use \"label\" or \"probabilities\"")),
            };
        }
        if let Some(v) = self.precision {
            if v > 9 {
                return Err(format!("{whose}: precision {v}; 0 to 9 decimals (9 is full precision, for tests only)"));
            }
            p.precision = v;
        }
        if let Some(v) = self.top_k {
            if v == 0 || v > classes {
                return Err(format!("{whose}: top_k {v}; 1 to {classes} (the model's classes)"));
            }
            p.top_k = v;
        }
        p.top_k = p.top_k.min(classes);
        if let Some(v) = self.queries_per_day {
            p.per_day = v;
        }
        if let Some(v) = self.queries_total {
            p.total = v;
        }
        if let Some(v) = self.rate_per_s {
            if !(v > 0.0 && v <= 1e6) {
                return Err(format!("{whose}: rate_per_s {v}; above 0 and at most 1e6"));
            }
            p.rate = v;
        }
        if let Some(v) = self.burst {
            if v == 0 {
                return Err(format!("{whose}: burst 0; at least 1"));
            }
            p.burst = f64::from(v);
        }
        Ok(p)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    defaults: RawPolicy,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    detector: RawDetector,
    #[serde(default)]
    metrics: RawMetrics,
    /// Per client-certificate holder (subject common name) overrides.
    #[serde(default)]
    clients: std::collections::BTreeMap<String, RawPolicy>,
    state_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDetector {
    #[serde(default)]
    enabled: bool,
    window: Option<usize>,
    min_queries: Option<usize>,
    cv_below: Option<f64>,
    action: Option<String>,
    throttle_rate_per_s: Option<f64>,
}

/// The extraction detector, after PRADA (Juuti et al., EuroS&P 2019): each
/// new query's distance to the nearest of the key's recent queries is
/// recorded, and the key is flagged when those distances are too regular
/// (coefficient of variation below `cv_below`). Natural inputs lie at very
/// uneven distances from each other; synthetic ones (random points, small
/// steps along a boundary) at machine-regular ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Detector {
    /// Recent queries kept per key to measure distances against.
    pub window: usize,
    /// Distances recorded before a key can be flagged.
    pub min_queries: usize,
    /// Flag when the distances' standard deviation over mean falls below this.
    pub cv_below: f64,
    /// Slow flagged keys down to this many queries per second (`None`: log only).
    pub throttle: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    api_keys: Option<String>,
    #[serde(default)]
    anonymous: bool,
    client_ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_body_bytes: Option<usize>,
    max_batch: Option<usize>,
    max_connections: Option<usize>,
    max_handshakes: Option<usize>,
    handshake_timeout_s: Option<u64>,
    idle_timeout_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    /// Key ids (from the keys file) that may read `/metrics`.
    #[serde(default)]
    keys: Vec<String>,
    /// Client-certificate holders (subject CN) that may read `/metrics`.
    #[serde(default)]
    clients: Vec<String>,
}

/// How many connections are held at once, and for how long without progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once, TLS handshakes included; more are closed
    /// as soon as they are accepted.
    pub max_connections: usize,
    /// TLS handshakes in progress at once; more are closed as soon as they
    /// are accepted.
    pub max_handshakes: usize,
    /// A handshake not complete by then is dropped.
    pub handshake_timeout: Duration,
    /// A connection that has not sent a complete request header for this
    /// long (an idle keep-alive connection too) is closed.
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 512,
            max_handshakes: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
        }
    }
}

impl RawLimits {
    /// The connection limits, each within its bounds.
    fn conn_limits(&self) -> Result<ConnLimits, String> {
        let d = ConnLimits::default();
        let max_connections = self.max_connections.unwrap_or(d.max_connections);
        if !(1..=65_536).contains(&max_connections) {
            return Err(format!(
                "[limits] max_connections {max_connections}; 1 to 65536, and below the open-file limit \
                 (`ulimit -n`): each connection holds a file descriptor"
            ));
        }
        let max_handshakes = self.max_handshakes.unwrap_or(d.max_handshakes.min(max_connections));
        if !(1..=max_connections).contains(&max_handshakes) {
            return Err(format!("[limits] max_handshakes {max_handshakes}; 1 to max_connections ({max_connections})"));
        }
        let seconds = |v: Option<u64>, default: Duration, name: &str, max: u64| match v {
            None => Ok(default),
            Some(s) if (1..=max).contains(&s) => Ok(Duration::from_secs(s)),
            Some(s) => Err(format!("[limits] {name} {s}; 1 to {max} seconds")),
        };
        Ok(ConnLimits {
            max_connections,
            max_handshakes,
            handshake_timeout: seconds(self.handshake_timeout_s, d.handshake_timeout, "handshake_timeout_s", 120)?,
            idle_timeout: seconds(self.idle_timeout_s, d.idle_timeout, "idle_timeout_s", 3600)?,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<RawKey>,
}

#[derive(Debug, Deserialize)]
// The policy fields are repeated from RawPolicy on purpose: serde cannot
// combine `flatten` with `deny_unknown_fields`, and a misspelt key setting
// must be an error, not silently ignored.
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    sha256: String,
    output: Option<String>,
    precision: Option<u32>,
    top_k: Option<usize>,
    queries_per_day: Option<u64>,
    queries_total: Option<u64>,
    rate_per_s: Option<f64>,
    burst: Option<u32>,
}

/// The serving configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Key hash -> (key id, policy).
    keys: HashMap<[u8; 32], (String, Policy)>,
    /// Policy for requests without a key, when allowed.
    anonymous: Option<Policy>,
    max_body: usize,
    max_batch: usize,
    conn: ConnLimits,
    /// Who may read `/metrics`: key ids, and `cert:NAME` for certificate holders.
    metrics_readers: std::collections::HashSet<String>,
    state_file: Option<PathBuf>,
    detector: Option<Detector>,
    /// CA whose client certificates are accepted instead of a key, and the
    /// policy their holders get unless `clients` names them ([defaults]).
    client_ca: Option<(PathBuf, Policy)>,
    /// Certificate holder (subject common name) -> policy, from `[clients.NAME]`.
    clients: HashMap<String, Policy>,
}

impl Config {
    /// Reads `serve.toml` (or the defaults) for a model of `classes` classes.
    pub fn load(path: Option<&Path>, classes: usize) -> Result<Config, String> {
        let (raw, base): (RawConfig, PathBuf) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
                let raw = toml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
                (raw, p.parent().map(Path::to_path_buf).unwrap_or_default())
            }
            None => (RawConfig::default(), PathBuf::new()),
        };
        let defaults = raw.defaults.apply(&Policy::default(), classes, "[defaults]")?;
        let mut keys = HashMap::new();
        if let Some(file) = &raw.auth.api_keys {
            let path = base.join(file);
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let parsed: KeysFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            for k in parsed.key {
                let digest = unhex32(&k.sha256).ok_or_else(|| {
                    format!(
                        "{}: key `{}`: sha256 must be 64 hex digits (`warden apikey` prints it)",
                        path.display(),
                        k.id
                    )
                })?;
                let over = RawPolicy {
                    output: k.output,
                    precision: k.precision,
                    top_k: k.top_k,
                    queries_per_day: k.queries_per_day,
                    queries_total: k.queries_total,
                    rate_per_s: k.rate_per_s,
                    burst: k.burst,
                };
                let policy = over.apply(&defaults, classes, &format!("{}: key `{}`", path.display(), k.id))?;
                if keys.insert(digest, (k.id.clone(), policy)).is_some() {
                    return Err(format!("{}: the same key hash is listed twice", path.display()));
                }
            }
        }
        if keys.is_empty() && !raw.auth.anonymous && raw.auth.client_ca.is_none() {
            return Err("no API keys, no client CA and anonymous access is off: nobody could ask. \
                 List key hashes in [auth] api_keys (make keys with `warden apikey --id NAME`), \
                 name a client_ca, or set [auth] anonymous = true knowingly"
                .into());
        }
        let max_body = raw.limits.max_body_bytes.unwrap_or(1 << 20);
        let max_batch = raw.limits.max_batch.unwrap_or(64);
        if max_body < 64 || max_batch == 0 {
            return Err("[limits] max_body_bytes must be at least 64 and max_batch at least 1".into());
        }
        let conn = raw.limits.conn_limits()?;
        let mut metrics_readers = std::collections::HashSet::new();
        for id in &raw.metrics.keys {
            if !keys.values().any(|(k, _)| k == id) {
                return Err(format!(
                    "[metrics] keys: `{id}` is not the id of a key in [auth] api_keys; \
                     list ids of keys from that file (make one with `warden apikey --id {id}`)"
                ));
            }
            metrics_readers.insert(id.clone());
        }
        if let Some(name) = raw.metrics.clients.first().filter(|_| raw.auth.client_ca.is_none()) {
            return Err(format!(
                "[metrics] clients names `{name}`, a client-certificate holder, but no [auth] client_ca is set: \
                 name the CA that issues their certificates"
            ));
        }
        metrics_readers.extend(raw.metrics.clients.iter().map(|name| format!("cert:{name}")));
        let d = &raw.detector;
        let detector = if d.enabled {
            let det = Detector {
                window: d.window.unwrap_or(100),
                min_queries: d.min_queries.unwrap_or(50),
                cv_below: d.cv_below.unwrap_or(0.05),
                throttle: match d.action.as_deref() {
                    None | Some("log") => None,
                    Some("throttle") => Some(d.throttle_rate_per_s.unwrap_or(0.1)),
                    Some(other) => return Err(format!("[detector] action `{other}`; use \"log\" or \"throttle\"")),
                },
            };
            if det.window == 0
                || det.window > 10_000
                || det.min_queries < 3
                || !(0.0..=1.0).contains(&det.cv_below)
                || det.throttle.is_some_and(|r| r.is_nan() || r <= 0.0)
            {
                return Err("[detector]: window 1 to 10000, min_queries at least 3, cv_below in [0, 1], \
                            throttle_rate_per_s above 0"
                    .into());
            }
            Some(det)
        } else {
            None
        };
        if let Some(name) = raw.clients.keys().next().filter(|_| raw.auth.client_ca.is_none()) {
            return Err(format!(
                "[clients.{name}] applies to holders of client certificates, but no [auth] client_ca is set: \
                 name the CA that issues them"
            ));
        }
        let clients = raw
            .clients
            .iter()
            .map(|(name, over)| Ok((name.clone(), over.apply(&defaults, classes, &format!("[clients.{name}]"))?)))
            .collect::<Result<HashMap<_, _>, String>>()?;
        Ok(Config {
            keys,
            clients,
            anonymous: raw.auth.anonymous.then(|| defaults.clone()),
            max_body,
            max_batch,
            conn,
            metrics_readers,
            state_file: raw.state_file.map(|f| base.join(f)),
            detector,
            client_ca: raw.auth.client_ca.map(|f| (base.join(f), defaults.clone())),
        })
    }
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A new API key and the line that admits it.
pub fn new_api_key(id: &str) -> (String, String) {
    let bytes: [u8; 24] = warden_agent::secure_random::bytes();
    let key = format!("wdn_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let hash: String = Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    (key, format!("[[key]]\nid = \"{id}\"\nsha256 = \"{hash}\"\n"))
}

/// Counts kept per key; the persisted part survives restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Usage {
    total: u64,
    day: u64,
    today: u64,
    /// Flagged by the extraction detector (stays flagged across restarts).
    #[serde(default)]
    flagged: bool,
    #[serde(skip)]
    tokens: Option<(f64, Option<Instant>)>,
    /// Recent queries, for the detector's distances.
    #[serde(skip)]
    recent: std::collections::VecDeque<Vec<f32>>,
    /// Each query's distance to its nearest recent one.
    #[serde(skip)]
    distances: std::collections::VecDeque<f64>,
}

#[derive(Default)]
struct Metrics {
    requests: AtomicU64,
    predictions: AtomicU64,
    unauthorized: AtomicU64,
    limited: AtomicU64,
    too_large: AtomicU64,
    bad: AtomicU64,
    latency_us: AtomicU64,
    flagged: AtomicU64,
    /// Connections closed on accept: over max_connections, over max_handshakes.
    refused_connections: AtomicU64,
    refused_handshakes: AtomicU64,
}

struct Server {
    model: ModelSpec,
    /// Runs the forward passes, batching concurrent requests.
    batcher: Batcher,
    config: Config,
    usage: Mutex<HashMap<String, Usage>>,
    dirty: AtomicBool,
    metrics: Metrics,
    /// One permit per open connection, and one per TLS handshake in progress.
    connections: Arc<tokio::sync::Semaphore>,
    handshakes: Arc<tokio::sync::Semaphore>,
}

fn today() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400)
}

fn seconds_to_midnight() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    86_400 - now % 86_400
}

type Reply = Response<Full<Bytes>>;

fn reply(code: StatusCode, body: impl Serialize) -> Reply {
    // Replies are plain structs and strings; should one ever fail to
    // encode, the client still gets valid JSON.
    let text = serde_json::to_vec(&body).unwrap_or_else(|_| br#"{"error": "the reply could not be encoded"}"#.to_vec());
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = code;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
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

impl Server {
    /// Who asks (key id, `cert:NAME` or `anonymous`) and under which policy.
    /// Requests without credentials pass only when `[auth] anonymous` is on
    /// and `anonymous_ok` says they may.
    fn authenticate(
        &self,
        req: &Request<Incoming>,
        client: Option<&str>,
        anonymous_ok: bool,
    ) -> Result<(String, Policy), Box<Reply>> {
        let header = req.headers().get(hyper::header::AUTHORIZATION).and_then(|h| h.to_str().ok());
        let unauthorized = |why: &str| {
            self.metrics.unauthorized.fetch_add(1, Ordering::Relaxed);
            let mut r = error(StatusCode::UNAUTHORIZED, why);
            r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Bearer"));
            Box::new(r)
        };
        match header.and_then(|h| h.strip_prefix("Bearer ")) {
            Some(key) => {
                let digest: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
                self.config.keys.get(&digest).cloned().ok_or_else(|| unauthorized("unknown API key"))
            }
            None => match (client, &self.config.client_ca, &self.config.anonymous) {
                (Some(name), Some((_, p)), _) => {
                    Ok((format!("cert:{name}"), self.config.clients.get(name).unwrap_or(p).clone()))
                }
                (_, _, Some(p)) if anonymous_ok => Ok(("anonymous".into(), p.clone())),
                _ => Err(unauthorized("an API key (Authorization: Bearer KEY) or a client certificate is required")),
            },
        }
    }

    /// Charges `n` queries to `id`, or says when to come back.
    fn charge(&self, id: &str, p: &Policy, n: u64) -> Result<(), Box<Reply>> {
        let mut all = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        let u = all.entry(id.to_string()).or_default();
        let day = today();
        if u.day != day {
            u.day = day;
            u.today = 0;
        }
        let limited = |why: String, retry: Option<u64>| {
            self.metrics.limited.fetch_add(1, Ordering::Relaxed);
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, why);
            if let Some(s) = retry {
                r.headers_mut().insert(hyper::header::RETRY_AFTER, s.into());
            }
            Box::new(r)
        };
        if u.total + n > p.total {
            return Err(limited(
                format!("the total query budget of this key ({}) is used up; ask the operator for another", p.total),
                None,
            ));
        }
        if u.today + n > p.per_day {
            return Err(limited(
                format!("the daily query budget of this key ({}) is used up until 00:00 UTC", p.per_day),
                Some(seconds_to_midnight()),
            ));
        }
        // A key the detector flagged gets the throttle rate and no burst.
        let (rate, burst) = match (&self.config.detector, u.flagged) {
            (Some(Detector { throttle: Some(r), .. }), true) => (*r, 1.0),
            _ => (p.rate, p.burst),
        };
        let now = Instant::now();
        let (tokens, at) = u.tokens.unwrap_or((burst, Some(now)));
        let tokens = (tokens + at.map_or(0.0, |t| now.duration_since(t).as_secs_f64()) * rate).min(burst);
        if tokens < n as f64 {
            u.tokens = Some((tokens, Some(now)));
            let wait = ((n as f64 - tokens) / rate).ceil().max(1.0) as u64;
            return Err(limited(format!("rate limit of {rate} queries/s (burst {burst}) exceeded"), Some(wait)));
        }
        u.tokens = Some((tokens - n as f64, Some(now)));
        u.total += n;
        u.today += n;
        self.dirty.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn predict(&self, req: Request<Incoming>, client: Option<&str>) -> Reply {
        let (id, policy) = match self.authenticate(&req, client, true) {
            Ok(x) => x,
            Err(r) => return *r,
        };
        let too_large = |what: String| {
            self.metrics.too_large.fetch_add(1, Ordering::Relaxed);
            error(StatusCode::PAYLOAD_TOO_LARGE, what)
        };
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        // Read at most max_body bytes. Past that, the rest is read and thrown
        // away (up to a bound, for a short while) so that the client, still
        // sending, gets to read the 413 instead of a reset connection.
        let mut over = declared.is_some_and(|n| n > self.config.max_body);
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
                    if !over && kept + data.len() <= self.config.max_body {
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
                        if drained > 16 * self.config.max_body {
                            break;
                        }
                    }
                }
                Ok(None) => break,
                Ok(Some(Err(_))) | Err(_) => {
                    if !over {
                        return error(StatusCode::BAD_REQUEST, "the request body was cut off or too slow");
                    }
                    break;
                }
            }
        }
        if over {
            return too_large(format!("bodies are at most {} bytes", self.config.max_body));
        }
        let body = first.unwrap_or_else(|| Bytes::from(joined));
        let bad = |why: String| {
            self.metrics.bad.fetch_add(1, Ordering::Relaxed);
            error(StatusCode::BAD_REQUEST, why)
        };
        let f = self.model.inputs;
        let inputs = match input::single_input(&body, f) {
            Some(one) => vec![one],
            None => {
                let parsed: PredictRequest = match serde_json::from_slice(&body) {
                    Ok(p) => p,
                    Err(e) => {
                        return bad(format!("expected {{\"input\": [...]}} or {{\"inputs\": [[...], ...]}}: {e}"));
                    }
                };
                match (parsed.input, parsed.inputs) {
                    (Some(one), None) => vec![one],
                    (None, Some(many)) if !many.is_empty() => many,
                    _ => return bad("give exactly one of `input` or a non-empty `inputs`".into()),
                }
            }
        };
        // Done with the body: hyper can reuse its read buffer.
        drop(body);
        if inputs.len() > self.config.max_batch {
            return too_large(format!("a batch of {} inputs; at most {}", inputs.len(), self.config.max_batch));
        }
        if let Some((i, x)) = inputs.iter().enumerate().find(|(_, x)| x.len() != f || x.iter().any(|v| !v.is_finite()))
        {
            return bad(format!("input {i} has {} values; this model takes {f} finite numbers", x.len()));
        }
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
        let Some(probs) = self.batcher.predict(flat, rows).await else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "the model is not answering; try again");
        };
        let predictions: Vec<_> = probs.chunks_exact(self.model.classes).map(|row| answer(row, &policy)).collect();
        self.metrics.predictions.fetch_add(rows as u64, Ordering::Relaxed);
        if let Some(det) = &self.config.detector {
            self.watch(&id, det, inputs);
        }
        reply(StatusCode::OK, Predictions { predictions })
    }

    /// Feeds the detector; flags the key (once) when the distances between
    /// its queries are machine-regular.
    fn watch(&self, id: &str, det: &Detector, inputs: Vec<Vec<f32>>) {
        let mut all = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        let u = all.entry(id.to_string()).or_default();
        for x in inputs {
            let nearest = u
                .recent
                .iter()
                .map(|r| r.iter().zip(&x).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>())
                .fold(f64::INFINITY, f64::min);
            if nearest.is_finite() {
                u.distances.push_back(nearest.sqrt());
                if u.distances.len() > det.window {
                    u.distances.pop_front();
                }
            }
            u.recent.push_back(x);
            if u.recent.len() > det.window {
                u.recent.pop_front();
            }
        }
        if u.flagged || u.distances.len() < det.min_queries {
            return;
        }
        let n = u.distances.len() as f64;
        let mean = u.distances.iter().sum::<f64>() / n;
        let sd = (u.distances.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n).sqrt();
        let cv = if mean > 0.0 { sd / mean } else { 0.0 };
        if cv < det.cv_below {
            u.flagged = true;
            self.dirty.store(true, Ordering::Relaxed);
            self.metrics.flagged.fetch_add(1, Ordering::Relaxed);
            let what = if det.throttle.is_some() { "throttled" } else { "logged only" };
            eprintln!(
                "warden serve: key `{id}` flagged ({what}): the distances between its last {} queries vary by only {:.1}% \
                 (natural inputs vary far more), the pattern of synthetic extraction queries",
                u.distances.len(),
                cv * 100.0
            );
        }
    }

    fn metrics_text(&self) -> String {
        let m = &self.metrics;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "# HELP warden_requests_total HTTP requests received.\n# TYPE warden_requests_total counter\nwarden_requests_total {}\n\
             # HELP warden_predictions_total Inputs answered.\n# TYPE warden_predictions_total counter\nwarden_predictions_total {}\n\
             # HELP warden_rejected_total Requests refused, by reason.\n# TYPE warden_rejected_total counter\n\
             warden_rejected_total{{reason=\"unauthorized\"}} {}\nwarden_rejected_total{{reason=\"limited\"}} {}\n\
             warden_rejected_total{{reason=\"too_large\"}} {}\nwarden_rejected_total{{reason=\"bad_request\"}} {}\n\
             # HELP warden_flagged_keys_total Keys the extraction detector flagged.\n# TYPE warden_flagged_keys_total counter\n\
             warden_flagged_keys_total {}\n\
             # HELP warden_request_seconds_total Time spent answering requests.\n# TYPE warden_request_seconds_total counter\n\
             warden_request_seconds_total {:.6}\n\
             # HELP warden_connections_open Connections open now, TLS handshakes included.\n\
             # TYPE warden_connections_open gauge\nwarden_connections_open {}\n\
             # HELP warden_connections_refused_total Connections closed on accept, by the limit reached.\n\
             # TYPE warden_connections_refused_total counter\n\
             warden_connections_refused_total{{limit=\"max_connections\"}} {}\n\
             warden_connections_refused_total{{limit=\"max_handshakes\"}} {}\n",
            g(&m.requests),
            g(&m.predictions),
            g(&m.unauthorized),
            g(&m.limited),
            g(&m.too_large),
            g(&m.bad),
            g(&m.flagged),
            g(&m.latency_us) as f64 / 1e6,
            self.config.conn.max_connections - self.connections.available_permits(),
            g(&m.refused_connections),
            g(&m.refused_handshakes),
        )
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
        let mut r = Response::new(Full::new(Bytes::from(self.metrics_text())));
        r.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"));
        r
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, client: Option<Arc<str>>) -> Result<Reply, Infallible> {
        let started = Instant::now();
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let r = match (req.method(), req.uri().path()) {
            (&Method::POST, "/v1/predict") => self.predict(req, client.as_deref()).await,
            (&Method::GET, "/healthz") => reply(StatusCode::OK, serde_json::json!({ "status": "ok" })),
            (&Method::GET, "/metrics") => self.metrics(&req, client.as_deref()),
            (_, "/v1/predict" | "/healthz" | "/metrics") => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            _ => error(StatusCode::NOT_FOUND, "no such endpoint; try POST /v1/predict"),
        };
        self.metrics.latency_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(r)
    }

    fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.config.state_file else { return Ok(()) };
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let text = {
            let all = self.usage.lock().unwrap_or_else(|e| e.into_inner());
            serde_json::to_vec_pretty(&*all).map_err(std::io::Error::other)?
        };
        state::write_private(path, &text)
    }
}

/// Forward passes with the requests that arrived meanwhile taken together:
/// a single input reads every weight once (800 KB for the 784-256-10 MLP,
/// beyond L2), so a batch of k costs little more than one. Nothing waits
/// for a batch to fill: a request that finds no pass running starts one.
///
/// The passes run in a tokio task (the "combiner"), not a thread of their
/// own: handing each request to a sleeping thread and waking its task from
/// there cost two cross-thread wake-ups per request, about 5% of the
/// machine at 15k requests/s (docs/benchmarks.md). The combiner lives while
/// requests keep coming: after each pass it yields, so the connections on
/// its worker get read and their inputs join the next pass, and it ends
/// when a pass finds nothing queued. A pass blocks the worker it runs on
/// (at most `MAX_ROWS` rows, about a millisecond on the development
/// machine); the other workers carry on meanwhile.
struct Batcher {
    inner: Arc<Combiner>,
}

struct Combiner {
    model: warden_agent::model::Predictor,
    state: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// A combiner task is running (it will see every job pushed).
    running: bool,
    /// The forward pass's buffers, kept between combiner tasks.
    workspace: Option<warden_agent::model::Workspace>,
}

struct Job {
    x: Vec<f32>,
    rows: usize,
    reply: tokio::sync::oneshot::Sender<Vec<f32>>,
}

impl Batcher {
    /// Rows in one forward pass at most (more wait for the next pass).
    const MAX_ROWS: usize = 256;

    fn start(model: ModelSpec, params: Vec<f32>) -> Batcher {
        let model = warden_agent::model::Predictor::new(model, params);
        Batcher { inner: Arc::new(Combiner { model, state: Mutex::default() }) }
    }

    /// The class probabilities of `rows` inputs (row after row), or `None`
    /// if the forward pass failed.
    async fn predict(&self, x: Vec<f32>, rows: usize) -> Option<Vec<f32>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let start = {
            // Not bounded here: HTTP/1 answers a connection's requests in
            // turn, so the queue holds at most one job per connection (at
            // most max_connections), inputs that are in memory anyway.
            let mut q = self.inner.lock();
            q.jobs.push(Job { x, rows, reply });
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            let inner = self.inner.clone();
            tokio::spawn(async move { inner.run().await });
        }
        answer.await.ok()
    }
}

impl Combiner {
    async fn run(&self) {
        // Should a pass panic, the guard ends this combiner cleanly: the
        // queued requests get their senders dropped (503), and the next
        // request starts a new combiner.
        struct Stop<'a>(&'a Mutex<Queue>);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
                q.running = false;
                q.jobs.clear();
            }
        }
        let stop = Stop(&self.state);
        let mut ws = self.lock().workspace.take().unwrap_or_default();
        let (mut jobs, mut flat) = (Vec::new(), Vec::new());
        loop {
            {
                let mut q = self.lock();
                if q.jobs.is_empty() {
                    q.running = false;
                    q.workspace = Some(ws);
                    std::mem::forget(stop);
                    return;
                }
                let mut rows = 0;
                let take = q.jobs.iter().take_while(|j| {
                    let first = rows == 0;
                    rows += j.rows;
                    first || rows <= Batcher::MAX_ROWS
                });
                let n = take.count();
                jobs.extend(q.jobs.drain(..n));
            }
            let rows = jobs.iter().map(|j| j.rows).sum();
            let probs = if let [one] = &jobs[..] {
                self.model.predict(&mut ws, &one.x, rows)
            } else {
                flat.clear();
                for j in &jobs {
                    flat.extend_from_slice(&j.x);
                }
                self.model.predict(&mut ws, &flat, rows)
            };
            let mut at = 0;
            for j in jobs.drain(..) {
                let len = j.rows * self.model.spec().classes;
                let _ = j.reply.send(probs[at..at + len].to_vec());
                at += len;
            }
            tokio::task::yield_now().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One input's answer under `p`: the label, and unless labels only, the
/// top-k classes with probabilities rounded to `p.precision` decimals.
fn answer(probs: &[f32], p: &Policy) -> Answer {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    if p.labels_only {
        return Answer { label: order[0], top: None };
    }
    let scale = 10f64.powi(p.precision as i32);
    let top = order[..p.top_k]
        .iter()
        .map(|&c| Top { class: c, probability: (f64::from(probs[c]) * scale).round() / scale })
        .collect();
    Answer { label: order[0], top: Some(top) }
}

/// One input's answer, as it is written in the reply (plain structs, not
/// `serde_json::Value` maps: this is on every request's path).
#[derive(Debug, Serialize)]
struct Answer {
    label: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    top: Option<Vec<Top>>,
}

#[derive(Debug, Serialize)]
struct Top {
    class: usize,
    probability: f64,
}

#[derive(Serialize)]
struct Predictions {
    predictions: Vec<Answer>,
}

/// Options of `warden serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The signed model directory.
    pub model: PathBuf,
    /// Public key its signature must verify under.
    pub pubkey: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// serve.toml.
    pub config: Option<PathBuf>,
    /// TLS certificate and key (PEM); a self-signed pair when absent.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Verifies, loads and serves until SIGINT or SIGTERM.
pub async fn serve(o: ServeOptions) -> Result<(), String> {
    let key = warden_agent::signing::load_public_key(&o.pubkey).map_err(|e| e.to_string())?;
    // Verified and parsed from one read of the file: what is served is what verified.
    let warden_agent::artifact::SignedModel { verified, spec: model, params } =
        warden_agent::artifact::load_signed(&o.model, &key)
            .map_err(|e| format!("refusing to serve {}: {e}", o.model.display()))?;
    let config = Config::load(o.config.as_deref(), model.classes)?;
    let usage = match &config.state_file {
        Some(p) if p.exists() => {
            let text = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
            serde_json::from_slice(&text).map_err(|e| format!("{}: not a warden serve state file: {e}", p.display()))?
        }
        _ => HashMap::new(),
    };
    let tls = tls_config(o.tls.as_ref(), o.listen, config.client_ca.as_ref().map(|(p, _)| p.as_path()))?;
    let server = Arc::new(Server {
        batcher: Batcher::start(model.clone(), params),
        model,
        usage: Mutex::new(usage),
        dirty: AtomicBool::new(false),
        metrics: Metrics::default(),
        connections: Arc::new(tokio::sync::Semaphore::new(config.conn.max_connections)),
        handshakes: Arc::new(tokio::sync::Semaphore::new(config.conn.max_handshakes)),
        config,
    });
    let listener =
        tokio::net::TcpListener::bind(o.listen).await.map_err(|e| format!("cannot listen on {}: {e}", o.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!(
        "warden serve: {} verified (sha256:{}), {} inputs -> {} classes; https://{addr}/v1/predict",
        o.model.display(),
        verified.digest,
        server.model.inputs,
        server.model.classes
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let saver = {
        let s = server.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Err(e) = s.save() {
                    tracing::warn!("cannot save the serve state: {e}");
                }
            }
        })
    };
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| e.to_string())?;
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        // Over either limit the connection is closed at once: nothing waits
        // in a queue, and an idle or slow client holds at most one slot of
        // each until its deadline.
        let Ok(connection) = server.connections.clone().try_acquire_owned() else {
            server.metrics.refused_connections.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Ok(handshake) = server.handshakes.clone().try_acquire_owned() else {
            server.metrics.refused_handshakes.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        // rustls asks for at most 4 KiB per read, so a single-input request
        // (one 4.4 KB record) took two system calls; through this buffer it
        // takes one, and rustls copies the rest from memory. (8 KiB per
        // connection, like hyper's own read buffer.)
        let tcp = tokio::io::BufReader::with_capacity(8 * 1024, tcp);
        let (acceptor, server) = (acceptor.clone(), server.clone());
        let limits = server.config.conn;
        tokio::spawn(async move {
            let _connection = connection;
            // A client that does not finish its handshake in time is dropped.
            let accepted = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await;
            drop(handshake);
            let Ok(Ok(tls)) = accepted else { return };
            // A verified client certificate names its holder (subject CN).
            let client: Option<Arc<str>> =
                tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|der| {
                    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
                    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
                    Some(Arc::from(cn))
                });
            let service = hyper::service::service_fn(move |req| server.clone().handle(req, client.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.idle_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
    saver.abort();
    server.dirty.store(true, Ordering::Relaxed);
    server.save().map_err(|e| format!("cannot save the serve state: {e}"))?;
    eprintln!("warden serve: stopped; usage saved");
    Ok(())
}

fn tls_config(
    given: Option<&(PathBuf, PathBuf)>,
    listen: SocketAddr,
    client_ca: Option<&Path>,
) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (certs, key) = match given {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
            (certs, key)
        }
        None => {
            let names = vec!["localhost".to_string(), listen.ip().to_string()];
            let ck = rcgen::generate_simple_self_signed(names).map_err(|e| e.to_string())?;
            let der = ck.cert.der().clone();
            let fp: String = Sha256::digest(&der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
            eprintln!("warden serve: self-signed certificate, SHA-256 fingerprint {fp}");
            let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).map_err(|e| e.to_string())?;
            (vec![der], key)
        }
    };
    let builder =
        rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12]);
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            // Certificates from this CA identify their holders; clients
            // without one may still come with an API key.
            let bad = |e: &dyn std::fmt::Display| format!("[auth] client_ca {}: {e}", ca.display());
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| bad(&e))? {
                roots.add(c.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .allow_unauthenticated()
                .build()
                .map_err(|e| bad(&e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_single_cert(certs, key).map_err(|e| format!("TLS certificate and key: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Config::load` of `text` as a serve.toml, for a 10-class model.
    fn load(text: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, text).expect("written");
        Config::load(Some(&path), 10)
    }

    #[test]
    fn settings_that_cannot_work_are_refused_with_what_to_do() {
        let err = |text: &str| load(text).expect_err(text);
        assert!(err("").contains("nobody could ask"));
        let no_ca = err("[auth]\nanonymous = true\n[clients.bob]\noutput = \"label\"\n");
        assert!(no_ca.contains("[clients.bob]") && no_ca.contains("client_ca"), "{no_ca}");
        let ca = "[auth]\nclient_ca = \"ca.pem\"\n";
        let bad = err(&format!("{ca}[clients.bob]\nprecision = 12\n"));
        assert!(bad.contains("[clients.bob]: precision 12"), "{bad}");
        let misspelt = err(&format!("{ca}[clients.bob]\nprecison = 1\n"));
        assert!(misspelt.contains("precison"), "{misspelt}");
        let c = load(&format!("{ca}[defaults]\ntop_k = 4\n[clients.bob]\noutput = \"label\"\n")).expect("valid");
        assert_eq!(c.clients["bob"], Policy { labels_only: true, top_k: 4, ..Policy::default() });
        assert_eq!(c.client_ca.map(|(_, p)| p), Some(Policy { top_k: 4, ..Policy::default() }));
    }

    #[test]
    fn connection_limits_and_metrics_readers_have_safe_defaults_and_bounds() {
        let open = "[auth]\nanonymous = true\n";
        let c = load(open).expect("valid");
        assert_eq!(c.conn, ConnLimits::default());
        assert!(c.metrics_readers.is_empty(), "nobody reads /metrics unless named");
        let err = |text: &str| load(&format!("{open}{text}")).expect_err(text);
        let zero = err("[limits]\nmax_connections = 0\n");
        assert!(zero.contains("max_connections 0; 1 to 65536") && zero.contains("ulimit -n"), "{zero}");
        let over = err("[limits]\nmax_connections = 8\nmax_handshakes = 9\n");
        assert!(over.contains("max_handshakes 9; 1 to max_connections (8)"), "{over}");
        assert!(err("[limits]\nhandshake_timeout_s = 0\n").contains("handshake_timeout_s 0; 1 to 120 seconds"));
        assert!(err("[limits]\nidle_timeout_s = 7200\n").contains("idle_timeout_s 7200; 1 to 3600 seconds"));
        // Fewer connections than the default handshakes: the handshakes follow.
        let few = load(&format!("{open}[limits]\nmax_connections = 8\n")).expect("valid");
        assert_eq!((few.conn.max_connections, few.conn.max_handshakes), (8, 8));
        let unknown = err("[metrics]\nkeys = [\"prometheus\"]\n");
        assert!(
            unknown.contains("`prometheus` is not the id of a key") && unknown.contains("warden apikey"),
            "{unknown}"
        );
        let no_ca = err("[metrics]\nclients = [\"scraper\"]\n");
        assert!(no_ca.contains("[metrics] clients") && no_ca.contains("client_ca"), "{no_ca}");
        let c = load("[auth]\nclient_ca = \"ca.pem\"\n[metrics]\nclients = [\"scraper\"]\n").expect("valid");
        assert!(c.metrics_readers.contains("cert:scraper"));
    }

    /// Many requests at once, each batched with whatever else was queued:
    /// every one must get its own input's probabilities, bit for bit.
    #[test]
    fn concurrent_requests_each_get_their_own_answer() {
        let spec = ModelSpec::mlp(784, vec![256], 10);
        let params = warden_agent::model::init(&spec, 5);
        let input = |r: usize, rows: usize| -> Vec<f32> {
            (0..rows * 784).map(|i| ((i * 31 + r * 97) % 255) as f32 / 255.0).collect()
        };
        let alone = warden_agent::model::Predictor::new(spec.clone(), params.clone());
        let mut ws = warden_agent::model::Workspace::default();
        let batcher = Arc::new(Batcher::start(spec, params));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().expect("a runtime");
        let answers = runtime.block_on(async {
            let tasks: Vec<_> = (0..200)
                .map(|r| {
                    let b = batcher.clone();
                    // Mostly single inputs, some batches of up to 5.
                    let rows = if r % 7 == 0 { 1 + r % 5 } else { 1 };
                    tokio::spawn(async move { (r, rows, b.predict(input(r, rows), rows).await) })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.push(t.await.expect("the request task"));
            }
            all
        });
        for (r, rows, got) in answers {
            let got = got.expect("an answer");
            let want = alone.predict(&mut ws, &input(r, rows), rows);
            assert_eq!(got.len(), rows * 10, "request {r}");
            assert!(got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "request {r} got another answer");
        }
        // The combiner ends when the queue is empty and is started again.
        let again = runtime.block_on(batcher.predict(input(7, 1), 1)).expect("an answer");
        assert_eq!(again, alone.predict(&mut ws, &input(7, 1), 1));
    }

    #[test]
    fn answers_round_and_cut_as_configured() {
        let probs = [0.123456f32, 0.654321, 0.2, 0.022223];
        let p = Policy { precision: 2, top_k: 2, ..Policy::default() };
        let json = |a: Answer| serde_json::to_value(a).expect("serialises");
        assert_eq!(
            json(answer(&probs, &p)),
            serde_json::json!({"label": 1, "top": [{"class": 1, "probability": 0.65}, {"class": 2, "probability": 0.2}]})
        );
        let p4 = Policy { precision: 4, top_k: 1, ..Policy::default() };
        assert_eq!(json(answer(&probs, &p4))["top"][0]["probability"], 0.6543);
        assert_eq!(json(answer(&probs, &Policy { labels_only: true, ..p })), serde_json::json!({"label": 1}));
    }
}
