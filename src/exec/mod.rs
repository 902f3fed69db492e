//! Executors run a plan's nodes against the cache.
//!
//! The local executor runs ready nodes in topological order in this process. A node that fails
//! keeps its partial entry (journal included) for the next run, its descendants are skipped, and
//! every independent node still runs: nothing already computed is lost.

pub mod local;
pub mod progress;
pub mod shards;
pub mod slurm;

pub use local::{run_local, RunOptions, RunReport};
pub use progress::Progress;
pub use shards::{NodeProgress, ShardQueue};
