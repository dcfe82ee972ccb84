//! Who talks to whom, and how: identities ([`identity`]), the per-job CA
//! and node keys ([`pki`]), mutual TLS 1.3 with role authorization in the
//! handshake ([`tls`]), the TLS 1.3 record layer after rustls' handshake
//! ([`record`]), the framed protocol and who may send each message
//! ([`wire`]), authenticated connections with limits and deadlines
//! ([`conn`]), and the launcher-agent channel over stdin/stdout
//! ([`control`]).

pub mod conn;
pub mod control;
pub mod identity;
pub mod pki;
pub mod record;
pub mod tls;
pub mod wire;
