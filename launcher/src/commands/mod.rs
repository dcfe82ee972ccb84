//! One module per subcommand.

pub mod launch;
pub mod plan;
pub mod validate;
