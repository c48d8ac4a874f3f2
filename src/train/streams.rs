//! CubeCL streams kept for clue's own threads: thread k of a role (a data-loading thread, a
//! data-parallel worker) runs on the stream of the process's first thread k of that role, for
//! every epoch and step, though each epoch and step starts threads of its own.
//!
//! CubeCL gives each new thread a stream of its own (`StreamId::current`: a thread-local taken
//! from a global counter, mapped to one of `max_streams` = 128 streams per device), and on a GPU
//! each stream keeps its own pool of device memory. New threads on new streams would walk each
//! device through up to 128 streams, each holding on to a batch's or a step's worth of memory
//! (lavapipe's streaming log showed 4 new streams per epoch from the loaders, and the run's
//! resident memory grew until 128 streams were in use).

use std::collections::BTreeMap;
use std::sync::Mutex;

use burn::tensor::StreamId;

/// Whose thread a stream is kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Thread `w` of a data loader: training, validation or scoring ([`crate::train::loader`]).
    Loader,
    /// Data-parallel worker `k` ([`crate::train::parallel`]).
    Worker,
}

/// Runs `f` on the stream kept for thread `k` of `role`: the stream of the first thread that
/// called this for (`role`, `k`). Call it on the thread that does the work, never on the thread
/// that starts it (which would lend its own stream).
pub fn on_kept_stream<T>(role: Role, k: usize, f: impl FnOnce() -> T) -> T {
    kept_stream(role, k).executes(f)
}

fn kept_stream(role: Role, k: usize) -> StreamId {
    static STREAMS: Mutex<BTreeMap<(Role, usize), StreamId>> = Mutex::new(BTreeMap::new());
    let mut streams = STREAMS.lock().unwrap_or_else(|e| e.into_inner());
    *streams.entry((role, k)).or_insert_with(StreamId::current)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a new thread: the stream `on_kept_stream` runs on, and the thread's own.
    fn on_new_thread(role: Role, k: usize) -> (StreamId, StreamId) {
        std::thread::spawn(move || {
            (
                on_kept_stream(role, k, StreamId::current),
                StreamId::current(),
            )
        })
        .join()
        .unwrap()
    }

    /// Thread k of a role keeps one stream from thread to thread, apart from thread k ± 1's, the
    /// other role's and a new thread's own.
    #[test]
    fn each_thread_of_a_role_keeps_its_first_stream() {
        let (first, _) = on_new_thread(Role::Loader, 0);
        let (again, own) = on_new_thread(Role::Loader, 0);
        assert_eq!(again, first);
        assert_ne!(own, first, "a new thread has a new stream of its own");
        let (other, _) = on_new_thread(Role::Loader, 1);
        assert_ne!(other, first);
        assert_eq!(on_new_thread(Role::Loader, 1).0, other);
        let (worker, _) = on_new_thread(Role::Worker, 0);
        assert_ne!(worker, first, "a worker's stream is not a loader's");
        for _ in 0..3 {
            assert_eq!(on_new_thread(Role::Worker, 0).0, worker);
        }
    }
}
