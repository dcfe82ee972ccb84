//! `[job]`: the job's name, its training seed and its longest lifetime.

use toml::Spanned;

use super::{SpecError, Src, int_in, raw};

/// The validated `[job]` table; [`super::JobSpec`] holds its fields.
pub(super) struct Job {
    pub(super) name: String,
    pub(super) seed: Option<u64>,
    pub(super) max_hours: u32,
}

/// Checks `[job]`: a name that can be part of file names, a seed from 0 up,
/// and a lifetime of 1 hour to 30 days.
pub(super) fn convert_job(src: &Src<'_>, job: &Spanned<raw::Job>) -> Result<Job, SpecError> {
    let job = job.get_ref();
    let name = job.name.get_ref().trim().to_string();
    if name.is_empty()
        || name.len() > 64
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(src.err(
            job.name.span(),
            "job name must be 1 to 64 characters of letters, digits, '-', '_' or '.'",
            "for example: name = \"fashion-mnist\"",
        ));
    }
    let seed = match &job.seed {
        Some(s) if *s.get_ref() < 0 => {
            return Err(src.err(
                s.span(),
                "seed must not be negative",
                "use any number from 0 up, or leave `seed` out to draw one at random",
            ));
        }
        Some(s) => Some(*s.get_ref() as u64),
        None => None,
    };
    let max_hours = match &job.max_hours {
        Some(h) => int_in(src, h, "max_hours", 1, 24 * 30, "certificates live this long; 24 suits most jobs")?,
        None => 24,
    };
    Ok(Job { name, seed, max_hours })
}
