//! A watchdog on the collective calls of a multi-node step. A node that dies closes its
//! connections and the others' calls fail at once; a node that vanishes without closing them
//! (power loss, a cut network, a suspended process) leaves them waiting for ever. Each worker
//! notes when it starts waiting in a collective call; the thread that waits for the workers
//! stops the step when one has waited longer than `--peer-timeout`.

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Since when each worker waits in a collective call, and in which.
pub struct Watch(Mutex<Vec<Option<(Instant, &'static str)>>>);

/// Why [`Watch::collect`] gave up on a step.
#[derive(Debug, PartialEq)]
pub enum Stop {
    /// `worker` waited longer than the limit in the collective call `call`.
    TimedOut {
        worker: usize,
        call: &'static str,
        waited: Duration,
    },
    /// This worker ended without a result.
    Died(usize),
}

impl Watch {
    pub fn new(workers: usize) -> Self {
        Self(Mutex::new(vec![None; workers]))
    }

    /// Runs `call`, a collective call of worker `k` (`what` names it in messages), noting the
    /// wait until it returns or panics.
    pub fn waiting<R>(&self, k: usize, what: &'static str, call: impl FnOnce() -> R) -> R {
        struct Done<'a>(&'a Watch, usize);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.set(self.1, None);
            }
        }
        self.set(k, Some((Instant::now(), what)));
        let _done = Done(self, k);
        call()
    }

    fn set(&self, k: usize, state: Option<(Instant, &'static str)>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner())[k] = state;
    }

    /// The first worker that has waited longer than `limit` in one call (a worker that has
    /// reported is done waiting: its call returned, or panicked, first).
    fn overdue(&self, limit: Duration) -> Option<Stop> {
        let waits = self.0.lock().unwrap_or_else(|e| e.into_inner());
        waits.iter().enumerate().find_map(|(worker, w)| {
            let (since, call) = (*w)?;
            let waited = since.elapsed();
            (waited > limit).then_some(Stop::TimedOut {
                worker,
                call,
                waited,
            })
        })
    }

    /// Every worker's result from `results` (worker index, result), in worker order. With a
    /// `limit`, stops once a worker has waited longer than that in one call (it is left behind,
    /// still waiting); stops if a worker ends without a result.
    pub fn collect<T>(
        &self,
        results: Receiver<(usize, T)>,
        limit: Option<Duration>,
    ) -> Result<Vec<T>, Stop> {
        let workers = self.0.lock().unwrap_or_else(|e| e.into_inner()).len();
        let mut got: Vec<Option<T>> = (0..workers).map(|_| None).collect();
        // Often enough that a timeout is seen within a second of the limit.
        let poll = limit.map_or(Duration::MAX, |l| (l / 4).min(Duration::from_secs(1)));
        while got.iter().any(Option::is_none) {
            match results.recv_timeout(poll) {
                Ok((k, result)) => got[k] = Some(result),
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(stop) = limit.and_then(|l| self.overdue(l)) {
                        return Err(stop);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let k = got
                        .iter()
                        .position(Option::is_none)
                        .expect("one is missing");
                    return Err(Stop::Died(k));
                }
            }
        }
        Ok(got.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_worker_that_waits_too_long_fails_the_step_and_a_quick_one_does_not() {
        let watch = Arc::new(Watch::new(3));
        let (tx, rx) = std::sync::mpsc::channel();
        // Worker 0 answers at once; worker 1 panics inside a call (and reports, as a step's
        // workers do); worker 2 waits in a call that does not return in time.
        tx.send((0, "zero")).unwrap();
        let (w, tx1) = (watch.clone(), tx.clone());
        std::thread::spawn(move || {
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                w.waiting(1, "gathering", || panic!("a collective call failed"))
            }));
            assert!(panicked.is_err());
            tx1.send((1, "one died")).unwrap();
        });
        let (w, tx2) = (watch.clone(), tx.clone());
        std::thread::spawn(move || {
            w.waiting(2, "summing the gradients", || {
                std::thread::sleep(Duration::from_secs(5))
            });
            let _ = tx2.send((2, "two"));
        });
        let start = Instant::now();
        let limit = Duration::from_millis(200);
        let Err(Stop::TimedOut {
            worker,
            call,
            waited,
        }) = watch.collect(rx, Some(limit))
        else {
            panic!("no timeout");
        };
        assert_eq!((worker, call), (2, "summing the gradients"));
        assert!(waited > limit && start.elapsed() < Duration::from_secs(2));

        // Calls that end in time: every result, in worker order.
        let watch = Watch::new(2);
        let (tx, rx) = std::sync::mpsc::channel();
        watch.waiting(1, "quick", || tx.send((1, "one")).unwrap());
        watch.waiting(0, "quick", || tx.send((0, "zero")).unwrap());
        // A call that panics is done waiting too.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            watch.waiting(1, "failing", || panic!("a collective call failed"))
        }));
        assert!(panicked.is_err());
        assert_eq!(watch.overdue(Duration::ZERO), None);
        assert_eq!(watch.collect(rx, Some(limit)).unwrap(), ["zero", "one"]);

        // A worker that ends without a result.
        let watch = Watch::new(2);
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send((0, "zero")).unwrap();
        drop(tx);
        assert_eq!(watch.collect(rx, None).unwrap_err(), Stop::Died(1));
    }
}
