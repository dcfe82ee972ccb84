//! `serve.toml`: the plain serde types of the file, and the validated
//! [`Config`] built from them (every cross-field check is in
//! [`Config::load`]), with the per-key [`Policy`] and the [`ConnLimits`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::auth::{self, Keys};
use super::detector::Detector;

/// Why `serve.toml` or the keys file it names cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of its kind.
    #[error("{}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and why.
        #[source]
        source: toml::de::Error,
    },
    /// A setting that cannot work, and what to do instead.
    #[error("{0}")]
    Invalid(String),
}

impl ConfigError {
    /// Reads and parses the TOML file at `path`.
    pub(super) fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })
    }
}

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

/// A policy as written: `[defaults]`, `[clients.NAME]` or a key's entry in
/// the keys file. Unset fields keep the base policy's values.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) output: Option<String>,
    pub(super) precision: Option<u32>,
    pub(super) top_k: Option<usize>,
    pub(super) queries_per_day: Option<u64>,
    pub(super) queries_total: Option<u64>,
    pub(super) rate_per_s: Option<f64>,
    pub(super) burst: Option<u32>,
}

impl RawPolicy {
    /// `base` with this policy's settings, each checked; errors name `whose`.
    pub(super) fn apply(&self, base: &Policy, classes: usize, whose: &str) -> Result<Policy, ConfigError> {
        let mut p = base.clone();
        if let Some(o) = &self.output {
            p.labels_only = match o.as_str() {
                "label" => true,
                "probabilities" => false,
                other => {
                    return Err(ConfigError::Invalid(format!(
                        "{whose}: output `{other}`; use \"label\" or \"probabilities\""
                    )));
                }
            };
        }
        if let Some(v) = self.precision {
            if v > 9 {
                return Err(ConfigError::Invalid(format!(
                    "{whose}: precision {v}; 0 to 9 decimals (9 is full precision, for tests only)"
                )));
            }
            p.precision = v;
        }
        if let Some(v) = self.top_k {
            if v == 0 || v > classes {
                return Err(ConfigError::Invalid(format!("{whose}: top_k {v}; 1 to {classes} (the model's classes)")));
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
                return Err(ConfigError::Invalid(format!("{whose}: rate_per_s {v}; above 0 and at most 1e6")));
            }
            p.rate = v;
        }
        if let Some(v) = self.burst {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{whose}: burst 0; at least 1")));
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
    clients: BTreeMap<String, RawPolicy>,
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

impl RawDetector {
    /// The detector when enabled, its settings within their bounds.
    fn detector(&self) -> Result<Option<Detector>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        let det = Detector {
            window: self.window.unwrap_or(100),
            min_queries: self.min_queries.unwrap_or(50),
            cv_below: self.cv_below.unwrap_or(0.05),
            throttle: match self.action.as_deref() {
                None | Some("log") => None,
                Some("throttle") => Some(self.throttle_rate_per_s.unwrap_or(0.1)),
                Some(other) => {
                    return Err(ConfigError::Invalid(format!(
                        "[detector] action `{other}`; use \"log\" or \"throttle\""
                    )));
                }
            },
        };
        if det.window == 0
            || det.window > 10_000
            || det.min_queries < 3
            || !(0.0..=1.0).contains(&det.cv_below)
            || det.throttle.is_some_and(|r| r.is_nan() || r <= 0.0)
        {
            return Err(ConfigError::Invalid(
                "[detector]: window 1 to 10000, min_queries at least 3, cv_below in [0, 1], \
                        throttle_rate_per_s above 0"
                    .into(),
            ));
        }
        Ok(Some(det))
    }
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

impl RawMetrics {
    /// Who may read `/metrics`: key ids of `keys`, and `cert:NAME` for
    /// certificate holders (only when a client CA is set).
    fn readers(&self, keys: &Keys, client_ca: bool) -> Result<HashSet<String>, ConfigError> {
        let mut readers = HashSet::new();
        for id in &self.keys {
            if !keys.values().any(|(k, _)| k == id) {
                return Err(ConfigError::Invalid(format!(
                    "[metrics] keys: `{id}` is not the id of a key in [auth] api_keys; \
                     list ids of keys from that file (make one with `warden apikey --id {id}`)"
                )));
            }
            readers.insert(id.clone());
        }
        if let Some(name) = self.clients.first().filter(|_| !client_ca) {
            return Err(ConfigError::Invalid(format!(
                "[metrics] clients names `{name}`, a client-certificate holder, but no [auth] client_ca is set: \
                 name the CA that issues their certificates"
            )));
        }
        readers.extend(self.clients.iter().map(|name| format!("cert:{name}")));
        Ok(readers)
    }
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
    /// The largest body and batch accepted.
    fn body_and_batch(&self) -> Result<(usize, usize), ConfigError> {
        let max_body = self.max_body_bytes.unwrap_or(1 << 20);
        let max_batch = self.max_batch.unwrap_or(64);
        if max_body < 64 || max_batch == 0 {
            return Err(ConfigError::Invalid(
                "[limits] max_body_bytes must be at least 64 and max_batch at least 1".into(),
            ));
        }
        Ok((max_body, max_batch))
    }

    /// The connection limits, each within its bounds.
    fn conn_limits(&self) -> Result<ConnLimits, ConfigError> {
        let d = ConnLimits::default();
        let max_connections = self.max_connections.unwrap_or(d.max_connections);
        if !(1..=65_536).contains(&max_connections) {
            return Err(ConfigError::Invalid(format!(
                "[limits] max_connections {max_connections}; 1 to 65536, and below the open-file limit \
                 (`ulimit -n`): each connection holds a file descriptor"
            )));
        }
        let max_handshakes = self.max_handshakes.unwrap_or(d.max_handshakes.min(max_connections));
        if !(1..=max_connections).contains(&max_handshakes) {
            return Err(ConfigError::Invalid(format!(
                "[limits] max_handshakes {max_handshakes}; 1 to max_connections ({max_connections})"
            )));
        }
        let seconds = |v: Option<u64>, default: Duration, name: &str, max: u64| match v {
            None => Ok(default),
            Some(s) if (1..=max).contains(&s) => Ok(Duration::from_secs(s)),
            Some(s) => Err(ConfigError::Invalid(format!("[limits] {name} {s}; 1 to {max} seconds"))),
        };
        Ok(ConnLimits {
            max_connections,
            max_handshakes,
            handshake_timeout: seconds(self.handshake_timeout_s, d.handshake_timeout, "handshake_timeout_s", 120)?,
            idle_timeout: seconds(self.idle_timeout_s, d.idle_timeout, "idle_timeout_s", 3600)?,
        })
    }
}

/// The serving configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Key hash -> (key id, policy).
    pub(super) keys: Keys,
    /// Policy for requests without a key, when allowed.
    pub(super) anonymous: Option<Policy>,
    pub(super) max_body: usize,
    pub(super) max_batch: usize,
    pub(super) conn: ConnLimits,
    /// Who may read `/metrics`: key ids, and `cert:NAME` for certificate holders.
    pub(super) metrics_readers: HashSet<String>,
    pub(super) state_file: Option<PathBuf>,
    pub(super) detector: Option<Detector>,
    /// CA whose client certificates are accepted instead of a key, and the
    /// policy their holders get unless `clients` names them ([defaults]).
    pub(super) client_ca: Option<(PathBuf, Policy)>,
    /// Certificate holder (subject common name) -> policy, from `[clients.NAME]`.
    pub(super) clients: HashMap<String, Policy>,
}

impl Config {
    /// Reads `serve.toml` (or the defaults) for a model of `classes` classes.
    pub fn load(path: Option<&Path>, classes: usize) -> Result<Config, ConfigError> {
        let (raw, base): (RawConfig, PathBuf) = match path {
            Some(p) => (ConfigError::load(p)?, p.parent().map(Path::to_path_buf).unwrap_or_default()),
            None => (RawConfig::default(), PathBuf::new()),
        };
        let defaults = raw.defaults.apply(&Policy::default(), classes, "[defaults]")?;
        let keys = match &raw.auth.api_keys {
            Some(file) => auth::load_keys(&base.join(file), &defaults, classes)?,
            None => Keys::new(),
        };
        if keys.is_empty() && !raw.auth.anonymous && raw.auth.client_ca.is_none() {
            return Err(ConfigError::Invalid(
                "no API keys, no client CA and anonymous access is off: nobody could ask. \
                 List key hashes in [auth] api_keys (make keys with `warden apikey --id NAME`), \
                 name a client_ca, or set [auth] anonymous = true knowingly"
                    .into(),
            ));
        }
        let (max_body, max_batch) = raw.limits.body_and_batch()?;
        let conn = raw.limits.conn_limits()?;
        let metrics_readers = raw.metrics.readers(&keys, raw.auth.client_ca.is_some())?;
        let detector = raw.detector.detector()?;
        if let Some(name) = raw.clients.keys().next().filter(|_| raw.auth.client_ca.is_none()) {
            return Err(ConfigError::Invalid(format!(
                "[clients.{name}] applies to holders of client certificates, but no [auth] client_ca is set: \
                 name the CA that issues them"
            )));
        }
        let clients = raw
            .clients
            .iter()
            .map(|(name, over)| Ok((name.clone(), over.apply(&defaults, classes, &format!("[clients.{name}]"))?)))
            .collect::<Result<HashMap<_, _>, ConfigError>>()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `Config::load` of `text` as a serve.toml, for a 10-class model.
    /// Errors as the CLI prints them, with their causes.
    fn load(text: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, text).expect("written");
        Config::load(Some(&path), 10).map_err(|e| crate::error::Chain(&e).to_string())
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
}
