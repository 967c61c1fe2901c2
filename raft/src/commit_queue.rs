// The body of the group-commit queue. It is included twice: by `group_commit.rs` with std's
// `Mutex`/`Condvar`, and by the loom model test with loom's, so the model checks the code
// that runs. The includer brings `Mutex`, `Condvar` and `VecDeque` into scope.

/// Why a push was refused; the item is handed back.
#[derive(Debug)]
pub enum PushError<T> {
    /// The queue holds `capacity` items. Callers bound their pushes (a semaphore in
    /// `GroupCommit`), so this is a bug, reported as an error rather than a wait.
    Full(T),
    /// The syncer has shut down.
    Closed(T),
}

struct QueueState<T> {
    items: VecDeque<T>,
    closed: bool,
}

/// A bounded FIFO between the tasks that append log entries and the one syncer thread.
pub struct CommitQueue<T> {
    state: Mutex<QueueState<T>>,
    not_empty: Condvar,
    capacity: usize,
}

impl<T> CommitQueue<T> {
    /// A queue that holds at most `capacity` items.
    pub fn new(capacity: usize) -> Self {
        CommitQueue {
            state: Mutex::new(QueueState {
                items: VecDeque::with_capacity(capacity),
                closed: false,
            }),
            not_empty: Condvar::new(),
            capacity,
        }
    }

    /// Appends `item` unless the queue is full or closed.
    pub fn try_push(&self, item: T) -> Result<(), PushError<T>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.closed {
            return Err(PushError::Closed(item));
        }
        if state.items.len() >= self.capacity {
            return Err(PushError::Full(item));
        }
        state.items.push_back(item);
        drop(state);
        self.not_empty.notify_one();
        Ok(())
    }

    /// Blocks until items are queued, then takes up to `max_items` of them in FIFO order.
    /// Returns `None` once the queue is closed and drained.
    pub fn pop_batch(&self, max_items: usize) -> Option<Vec<T>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if !state.items.is_empty() {
                let n = state.items.len().min(max_items);
                return Some(state.items.drain(..n).collect());
            }
            if state.closed {
                return None;
            }
            state = self.not_empty.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Refuses new items; `pop_batch` drains what is queued, then returns `None`.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.not_empty.notify_all();
    }
}
