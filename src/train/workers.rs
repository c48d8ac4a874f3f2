//! The threads of the data-parallel workers ([`crate::train::parallel`]): worker k's part of
//! every step runs on the same thread, started at its first step and kept until a step gives up
//! on its workers ([`abandon_workers`]).
//!
//! A thread per step would cost more than its start on CUDA: CubeCL gives each thread a stream
//! of its own (`StreamId::current`, numbered in order of first use), and each stream keeps its
//! own pool of device memory, so new threads every step would walk each GPU through up to 128
//! streams (CubeCL's `max_streams`), each of which can hold on to a step's worth of memory.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::mpsc::{Sender, channel};

/// A part of a step, run on a worker's thread.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// The queue of each worker's thread, by worker index.
static QUEUES: Mutex<Vec<Sender<Job>>> = Mutex::new(Vec::new());

/// Runs `job` on worker `k`'s thread, starting the thread (and those of the workers before it)
/// if it is not running yet. A job that panics leaves its thread running (a step's job reports
/// its own panics).
pub fn run_on_worker(k: usize, job: Job) -> Result<(), String> {
    let mut queues = QUEUES.lock().unwrap_or_else(|e| e.into_inner());
    while queues.len() <= k {
        let (tx, rx) = channel::<Job>();
        let name = format!("clue-worker-{}", queues.len());
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                // Ends when the queue is dropped ([`abandon_workers`]) and empty.
                while let Ok(job) = rx.recv() {
                    let _ = catch_unwind(AssertUnwindSafe(job));
                }
            })
            .map_err(|e| format!("starting thread {name} failed: {e}"))?;
        queues.push(tx);
    }
    // The thread ends when its queue is dropped, or if it dies between jobs: then the next
    // step starts it again.
    queues[k].send(job).map_err(|_| {
        queues.truncate(k);
        format!("worker {k}'s thread is gone")
    })
}

/// Leave the workers' threads behind (one may be stuck in a call that never returns, or be
/// waiting for a worker that never started): each ends once it has run the jobs it was given,
/// and the next step starts new ones.
pub fn abandon_workers() {
    QUEUES.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::thread::ThreadId;

    /// The thread that runs a job of worker `k`.
    fn thread_of(k: usize) -> ThreadId {
        let (tx, rx) = channel();
        run_on_worker(
            k,
            Box::new(move || tx.send(std::thread::current().id()).unwrap()),
        )
        .unwrap();
        rx.recv().unwrap()
    }

    #[test]
    fn each_worker_keeps_its_thread_until_abandoned() {
        let (first, second) = (thread_of(0), thread_of(1));
        assert_ne!(first, second);
        assert_ne!(first, std::thread::current().id());
        // A job that panics does not take the thread down.
        run_on_worker(1, Box::new(|| panic!("a worker's job failed"))).unwrap();
        for _ in 0..3 {
            assert_eq!(thread_of(0), first);
            assert_eq!(thread_of(1), second);
        }
        abandon_workers();
        let again = thread_of(0);
        assert_ne!(again, first);
        assert_eq!(thread_of(0), again);
    }
}
