//! The subcommands' `exec` functions, one module per subcommand or group of
//! related subcommands (see [`crate::cli`]).

pub mod bench;
pub mod checkpoint;
pub mod firewall;
pub mod launch;
pub mod plan;
pub mod run_dir;
pub mod signing;
pub mod validate;
