//! One module per subcommand.

pub mod bench;
pub mod launch;
pub mod plan;
pub mod validate;
