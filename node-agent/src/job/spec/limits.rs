//! `[limits]`: protocol bounds that protect every process, each with a
//! default that suits most jobs.

use serde::Serialize;
use toml::Spanned;

use super::{SpecError, Src, int_in, raw};

/// `[limits]`: protocol bounds that protect every process.
#[derive(Debug, Clone, Serialize)]
pub struct LimitsSpec {
    /// Largest frame a peer may send, checked before any allocation.
    pub max_frame_bytes: u32,
    /// Time a new connection has to finish TLS and send its first message.
    pub first_message_timeout_ms: u64,
    /// How long a process keeps retrying to reach a peer at startup.
    pub connect_timeout_s: u64,
    /// Connections a listener holds open at once (raised to the job's own needs).
    pub max_connections: usize,
    /// Connections a listener holds open at once from one address (likewise).
    pub max_connections_per_source: usize,
    /// Seconds an authenticated peer may stall mid-frame or stop reading
    /// before it is dropped (`None`: the heartbeat timeout).
    pub stall_timeout_s: Option<u64>,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        LimitsSpec {
            max_frame_bytes: 64 << 20,
            first_message_timeout_ms: 10_000,
            connect_timeout_s: 60,
            max_connections: 512,
            max_connections_per_source: 32,
            stall_timeout_s: None,
        }
    }
}

/// Checks `[limits]`; a missing table or key keeps the default.
pub(super) fn convert_limits(src: &Src<'_>, limits: Option<&Spanned<raw::Limits>>) -> Result<LimitsSpec, SpecError> {
    let mut out = LimitsSpec::default();
    let Some(l) = limits else { return Ok(out) };
    let l = l.get_ref();
    if let Some(v) = &l.max_frame_mib {
        let mib: u32 = int_in(src, v, "max_frame_mib", 1, 1024, "the largest message in MiB; 64 suits most models")?;
        out.max_frame_bytes = mib << 20;
    }
    if let Some(v) = &l.first_message_timeout_ms {
        out.first_message_timeout_ms =
            int_in(src, v, "first_message_timeout_ms", 50, 600_000, "10000 suits most networks")?;
    }
    if let Some(v) = &l.connect_timeout_s {
        out.connect_timeout_s = int_in(src, v, "connect_timeout_s", 1, 3600, "60 suits most clusters")?;
    }
    if let Some(v) = &l.max_connections {
        out.max_connections = int_in(src, v, "max_connections", 1, 65_536, "512 suits most jobs")?;
    }
    if let Some(v) = &l.max_connections_per_source {
        out.max_connections_per_source = int_in(src, v, "max_connections_per_source", 1, 65_536, "32 suits most jobs")?;
    }
    if let Some(v) = &l.stall_timeout_s {
        out.stall_timeout_s = Some(int_in(
            src,
            v,
            "stall_timeout_s",
            1,
            3600,
            "seconds a peer may stop mid-message or stop reading; the heartbeat timeout (default) suits most jobs",
        )?);
    }
    Ok(out)
}
