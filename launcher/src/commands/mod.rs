//! One module per subcommand.

pub mod bench;
pub mod firewall;
pub mod launch;
pub mod plan;
pub mod validate;
