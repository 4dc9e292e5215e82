//! Kiln's build worker: connects to a master over gRPC and runs its remote commands — shell
//! processes, git checkouts through a shared mirror cache, and file operations.

pub mod commands;
pub mod dirs;
pub mod git;
pub mod probes;
pub mod session;

pub use session::{WorkerConfig, WorkerError, run};
