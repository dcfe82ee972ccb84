//! What a job keeps: encrypted checkpoints ([`checkpoint`]), the trained
//! model as safetensors ([`artifact`]) and its signature in the OpenSSF
//! model-signing format ([`signing`]).

pub mod artifact;
pub mod checkpoint;
pub mod signing;
