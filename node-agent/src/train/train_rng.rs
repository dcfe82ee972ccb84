//! The training RNG: deterministic from the job's recorded seed.
//!
//! PCG64 (rand_pcg) is reproducible across platforms and versions, which is
//! what a recorded seed needs. Every stream is derived from the seed and a
//! purpose tag, so workers and servers draw independent sequences.

use rand::SeedableRng;
use rand_pcg::Pcg64Mcg;

/// Streams for distinct purposes.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    /// Parameter initialisation.
    Init,
    /// Holding out a test set from the training data.
    Split,
    /// Dropout masks of one worker in one step.
    Dropout {
        /// Worker rank.
        rank: u32,
        /// Epoch number.
        epoch: u32,
        /// Step within the epoch.
        step: u64,
    },
    /// Per-epoch shuffling on a worker.
    Shuffle {
        /// Worker rank.
        rank: u32,
        /// Epoch number.
        epoch: u32,
    },
}

/// The training generator type.
pub type TrainRng = Pcg64Mcg;

/// A generator for one purpose under one seed.
#[allow(clippy::disallowed_methods)] // the one place training generators are made
pub fn rng(seed: u64, stream: Stream) -> Pcg64Mcg {
    let tag: u64 = match stream {
        Stream::Init => 0x1,
        Stream::Shuffle { rank, epoch } => 0x2 | (u64::from(rank) << 8) | (u64::from(epoch) << 32),
        Stream::Split => 0x3,
        Stream::Dropout { rank, epoch, step } => {
            (0x4 | (u64::from(rank) << 8) | (u64::from(epoch) << 32))
                ^ step.wrapping_mul(0xD6E8_FEB8_6659_FD93).rotate_left(17)
        }
    };
    // SplitMix-style mixing so neighbouring seeds and tags give unrelated streams.
    let mut z = seed ^ tag.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    Pcg64Mcg::seed_from_u64(z ^ (z >> 31))
}
