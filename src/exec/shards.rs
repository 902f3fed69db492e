//! Shards pulled by workers: the local multi-device executor hands every worker thread the same
//! queue (work stealing: a worker that finishes takes the next shard), and `cip shard` hands its
//! node a queue of one. All workers of a queue share one progress bar, so it shows the total
//! rate.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

use super::Progress;
use crate::cache::ShardSpec;

pub struct ShardQueue {
    pending: Mutex<VecDeque<ShardSpec>>,
    progress: OnceLock<Mutex<Progress>>,
    show_progress: bool,
}

impl ShardQueue {
    /// All `count` shards, in index order.
    pub fn all(count: u32, show_progress: bool) -> ShardQueue {
        ShardQueue::of(
            (0..count).filter_map(|i| ShardSpec::new(i, count)),
            show_progress,
        )
    }

    pub fn of(shards: impl IntoIterator<Item = ShardSpec>, show_progress: bool) -> ShardQueue {
        ShardQueue {
            pending: Mutex::new(shards.into_iter().collect()),
            progress: OnceLock::new(),
            show_progress,
        }
    }

    /// The next shard nobody has taken yet.
    pub fn next(&self) -> Option<ShardSpec> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    /// The shared progress; the first worker to ask creates it with its totals (every worker
    /// of one node computes the same ones).
    pub fn progress(&self, label: &str, total: u64, already: u64) -> &Mutex<Progress> {
        self.progress
            .get_or_init(|| Mutex::new(Progress::new(label, total, already, self.show_progress)))
    }
}

/// A node's progress: its own, or the one its shard queue shares among workers.
pub enum NodeProgress<'a> {
    Own(Progress),
    Shared(&'a Mutex<Progress>),
}

impl NodeProgress<'_> {
    pub fn advance(&mut self, n: u64) {
        match self {
            NodeProgress::Own(p) => p.advance(n),
            NodeProgress::Shared(p) => p.lock().unwrap_or_else(|e| e.into_inner()).advance(n),
        }
    }
}
