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
//!
//! # Layout
//! - this file: [`serve`], which verifies and loads the model, wires the
//!   parts together, accepts connections within the caps and saves the
//!   state on the way out.
//! - `config`: `serve.toml`, read into a validated [`Config`] ([`Policy`]
//!   per key, [`ConnLimits`]).
//! - `auth`: API keys and the keys file, client-certificate holders; who is
//!   asking, and under which policy.
//! - `budget`: the token bucket, daily and total budgets (pure; the caller
//!   passes the time).
//! - `detector`: the PRADA-style extraction [`Detector`] (pure).
//! - `state`: per-key usage and flags, and the private state file.
//! - `batch`: the queue of forward passes, concurrent requests batched.
//! - `input`: the fast reader of `{"input": [...]}`.
//! - `answer`: a label and rounded top-k probabilities per input.
//! - `metrics`: the counters behind `/metrics`.
//! - `http`: routes, bounded bodies, replies and status codes.
//! - `tls`: certificates, client verification and the handshake.

mod answer;
mod auth;
mod batch;
mod budget;
mod config;
mod detector;
mod http;
mod input;
mod metrics;
mod state;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use auth::new_api_key;
pub use config::{Config, ConnLimits, Policy};
pub use detector::Detector;

use batch::ForwardQueue;
use http::Server;
use metrics::{Metrics, add};
use state::Ledger;

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
    /// Where a self-signed certificate goes (default: `serve-cert.pem`
    /// beside the state file, or in the current directory).
    pub tls_cert_out: Option<PathBuf>,
}

/// Why `warden serve` could not start, or could not save its state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The public key cannot be read.
    #[error(transparent)]
    PublicKey(#[from] warden_agent::store::signing::SignError),
    /// The model does not verify or load.
    #[error("refusing to serve {}", .model.display())]
    Refused {
        /// The model directory.
        model: PathBuf,
        /// Why.
        #[source]
        source: crate::error::BoxError,
    },
    /// `serve.toml` or the keys file cannot be used.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The state file cannot be used.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// TLS cannot be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The address cannot be listened on.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state cannot be saved on the way out.
    #[error("cannot save the serve state")]
    Save(#[source] std::io::Error),
    /// The listener or the signal handler failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The self-signed certificate's file name, when no place is given.
const CERT_FILE: &str = "serve-cert.pem";

/// Verifies, loads and serves until SIGINT or SIGTERM.
pub async fn serve(o: ServeOptions) -> Result<(), ServeError> {
    let key = warden_agent::store::signing::load_public_key(&o.pubkey)?;
    // Verified and parsed from one read of the file: what is served is what verified.
    let warden_agent::store::artifact::SignedModel { verified, spec: model, params } =
        warden_agent::store::artifact::load_signed(&o.model, &key)
            .map_err(|e| ServeError::Refused { model: o.model.clone(), source: e.into() })?;
    let config = Config::load(o.config.as_deref(), model.classes)?;
    let ledger = Ledger::open(config.state_file.clone())?;
    let cert_out = o.tls_cert_out.clone().unwrap_or_else(|| {
        config.state_file.as_ref().map_or_else(|| PathBuf::from(CERT_FILE), |f| f.with_file_name(CERT_FILE))
    });
    let client_ca = config.client_ca.as_ref().map(|(p, _)| p.as_path());
    let tls = tls::server_config(o.tls.as_ref(), o.listen, client_ca, &cert_out)?;
    let server = Arc::new(Server {
        forward: ForwardQueue::start(model.clone(), params),
        model,
        ledger,
        metrics: Metrics::default(),
        connections: Arc::new(tokio::sync::Semaphore::new(config.conn.max_connections)),
        handshakes: Arc::new(tokio::sync::Semaphore::new(config.conn.max_handshakes)),
        config,
    });
    let listener = tokio::net::TcpListener::bind(o.listen)
        .await
        .map_err(|source| ServeError::Listen { addr: o.listen, source })?;
    let addr = listener.local_addr()?;
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
                if let Err(e) = s.ledger.save() {
                    tracing::warn!("cannot save the serve state: {e}");
                }
            }
        })
    };
    accept_until_signal(&listener, &acceptor, &server).await?;
    saver.abort();
    server.ledger.changed();
    server.ledger.save().map_err(ServeError::Save)?;
    eprintln!("warden serve: stopped; usage saved");
    Ok(())
}

/// Accepts connections, each within the caps and served in a task of its
/// own, until SIGINT or SIGTERM.
async fn accept_until_signal(
    listener: &tokio::net::TcpListener,
    acceptor: &tokio_rustls::TlsAcceptor,
    server: &Arc<Server>,
) -> Result<(), ServeError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
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
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
        };
        // Over either limit the connection is closed at once: nothing waits
        // in a queue, and an idle or slow client holds at most one slot of
        // each until its deadline.
        let Ok(connection) = server.connections.clone().try_acquire_owned() else {
            add(&server.metrics.refused_connections, 1);
            continue;
        };
        let Ok(handshake) = server.handshakes.clone().try_acquire_owned() else {
            add(&server.metrics.refused_handshakes, 1);
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
            let accepted = tls::handshake(&acceptor, tcp, limits.handshake_timeout).await;
            drop(handshake);
            let Some((tls, client)) = accepted else { return };
            http::serve_connection(server, tls, client, limits.idle_timeout).await;
        });
    }
}
