//! Training itself: the scheduler, server and worker ([`roles`]), the
//! update rules ([`optimizer`]), the built-in models ([`model`]) and their
//! data ([`data`]), training randomness ([`train_rng`]), and the local KV
//! socket through which a user's own program trains ([`kv`]), with the memory
//! it may share with its agent ([`shared`]).

pub mod data;
pub mod kv;
pub mod model;
pub mod optimizer;
pub mod roles;
pub mod shared;
pub mod train_rng;
